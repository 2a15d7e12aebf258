"""The runtime-neutral round executor and its in-process runtime, against the reference backend.

The in-process runtime runs every round's client step on groups of clients in this process;
its results must equal the whole-graph evaluators' (the reference backend is the oracle), and a
runtime written against the documented :class:`Runtime` interface alone must work too.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import fadcore as fad
from fadcore import numpy as fnp
from fadcore import pytree
from fadcore.backends import executor, inprocess
from fadcore.backends.inputs import prepare_inputs
from fadcore.examples import (example_args_fed_mse, example_args_fedavg_round,
                              example_args_log_sum, fed_mse, fedavg_round, log_sum, secure_mse,
                              two_round)

RTOL, ATOL = 1e-12, 1e-14


def inputs_of(g, args):
    return prepare_inputs(g, pytree.flatten(tuple(args))[0])


def assert_same(got, want, exact=False):
    gl, wl = pytree.flatten(got)[0], pytree.flatten(want)[0]
    assert len(gl) == len(wl)
    for g, w in zip(gl, wl, strict=True):
        if isinstance(w, fad.ClientValues):
            assert isinstance(g, fad.ClientValues) and g.all_equal == w.all_equal
            pairs = list(zip(g, w, strict=True))
        else:
            assert isinstance(g, np.ndarray) and g.dtype == w.dtype
            pairs = [(g, w)]
        for a, b in pairs:
            assert a.shape == b.shape and a.dtype == b.dtype
            if exact:
                assert np.array_equal(a, b)
            else:
                np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def ragged(n=5, d=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = [1 + (3 * i) % 5 for i in range(n)]
    X = fad.clients([rng.normal(size=(r, d)) for r in rows])
    y = fad.clients([rng.normal(size=r) for r in rows])
    return rng.normal(size=d), X, y


@fad.trace
def client_out(w, X, y):
    """A client-placed output kept from round 1, plus a server loss."""
    r = X @ fad.broadcast(w) - y
    return r, fad.mean(fnp.mean(r * r))


CASES = {
    "fed_mse": (fed_mse, example_args_fed_mse),
    "fed_mse/reverse": (fad.grad(fed_mse, argnums=(0, 1)), example_args_fed_mse),
    "fed_mse/remat": (fad.grad(fed_mse, state="remat"), example_args_fed_mse),
    "fed_mse/mixed": (fad.grad(fed_mse, mode="mixed"), example_args_fed_mse),
    "fed_mse/forward": (fad.grad(fed_mse, mode="forward"), example_args_fed_mse),
    "two_round/reverse": (fad.grad(two_round, argnums=(0, 2)), ragged),
    "fedavg_round/reverse": (fad.grad(fedavg_round, argnums=(0, 1)), example_args_fedavg_round),
    "secure_mse/reverse": (fad.grad(secure_mse), example_args_fed_mse),
    "log_sum/auto": (fad.grad(log_sum, mode="auto"), example_args_log_sum),
    "client_out": (client_out, ragged),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("chunk_size", [None, 1, 2])
@pytest.mark.parametrize("evaluator", ["reference", "numba"])
def test_inprocess_matches_reference(name, chunk_size, evaluator):
    f, make = CASES[name]
    args = make()
    g = f.graph(*args)
    want = fad.run(g, *args, backend="reference")
    got = inprocess.execute(g, inputs_of(g, args), chunk_size=chunk_size, evaluator=evaluator)
    assert_same(pytree.unflatten(g.out_tree, got), want)


@pytest.mark.parametrize("name", ["fed_mse/reverse", "two_round/reverse", "client_out"])
def test_one_group_is_bit_identical_to_numba(name):
    f, make = CASES[name]
    args = make()
    g = f.graph(*args)
    got = inprocess.execute(g, inputs_of(g, args), evaluator="numba")
    assert_same(pytree.unflatten(g.out_tree, got), fad.run(g, *args, backend="numba"),
                exact=True)


def test_executor_imports_no_third_party_runtime():
    code = ("import sys, fadcore.backends.executor, fadcore.backends.inprocess, "
            "fadcore.backends.secagg; "
            "bad = [m for m in ('dask', 'distributed', 'flwr', 'cryptography') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


class OneClientPerNode(executor.Runtime):
    """A runtime written from the Runtime docstring alone: one group per client (as a Flower
    node would be), state in a per-client dict, every call recorded."""

    def __init__(self):
        self.calls, self.state = [], {}

    def start(self, execution):
        self.inputs = execution.inputs
        self.groups = [(i, i + 1) for i in range(execution.inputs.num_clients)]
        self.calls.append(("start",))

    def client_step(self, rp, server_values, masking=None):
        self.calls.append(("step", rp.index))
        parts = []
        for i, _ in self.groups:
            srcs = [[self.inputs.values[s[1]][i]] if s[0] == "data"
                    else self.state[(s[1], i)][s[2]] for s in rp.client_in]
            rows = None if self.inputs.rows is None else self.inputs.rows[i:i + 1]
            res = executor.run_client_step(rp.subgraph, rp.num_partials, server_values, srcs,
                                           1, rows, "reference", rp.key)
            self.state[(rp.index, i)] = res.kept
            parts.append(res.partials)
        return parts

    def client_output(self, rp, j):
        return [self.state[(rp.index, i)][j][0] for i, _ in self.groups]

    def release(self, round_index):
        self.calls.append(("release", round_index))
        for key in [k for k in self.state if k[0] == round_index]:
            del self.state[key]

    def finish(self):
        self.calls.append(("finish",))


@pytest.mark.parametrize("name", ["fed_mse/reverse", "two_round/reverse", "client_out",
                                  "fedavg_round/reverse"])
def test_a_runtime_from_the_interface(name):
    f, make = CASES[name]
    args = make()
    g = f.graph(*args)
    rt = OneClientPerNode()
    got = executor.execute(g, inputs_of(g, args), rt)
    assert_same(pytree.unflatten(g.out_tree, got), fad.run(g, *args, backend="reference"))
    p = executor.plan(g)
    assert rt.calls[0] == ("start",) and rt.calls[-1] == ("finish",)
    assert [c[1] for c in rt.calls if c[0] == "step"] == [rp.index for rp in p.rounds]
    # state is released right after the last round that reads it, and only then
    for rp in p.rounds:
        if rp.kept and rp.last_use <= len(p.rounds):
            rel = rt.calls.index(("release", rp.index))
            assert rt.calls[rel - 1] == ("step", rp.last_use)


def test_client_state_of_a_stateful_reverse_pass_is_kept_and_read():
    args = ragged()
    g = fad.grad(two_round, argnums=(0, 2)).graph(*args)
    p = executor.plan(g)
    reads = [s for rp in p.rounds for s in rp.state_in]
    assert reads, "a stateful reverse pass reads residuals kept from earlier rounds"
    assert {(p.rounds[r - 1].kept[j], r) for r, j in reads} == \
        {(v, made) for v, made, _ in g.rounds().client_state()}


def test_bytes_received_are_exact():
    """fed_mse's reverse gradient: round 1 sends one float64 loss partial per group, round 2
    the d-vector gradient partial (closed forms, ``DESIGN.md``'s cost table)."""
    w, X, y = example_args_fed_mse(d=5)
    g = fad.grad(fed_mse).graph(w, X, y)
    for chunk, groups in [(None, 1), (1, len(X)), (3, -(-len(X) // 3))]:
        ex = executor.Execution(g, inputs_of(g, (w, X, y)), inprocess.InProcessRuntime(chunk))
        ex.run()
        assert [r["bytes"] for r in ex.received] == [8 * groups, 8 * 5 * groups]
        assert [r["groups"] for r in ex.received] == [groups, groups]
        assert [s["bytes"] for s in ex.sent] == [8 * 5, 8]   # w, then the loss cotangent


def test_bad_runtime_options():
    args = example_args_fed_mse()
    g = fed_mse.graph(*args)
    with pytest.raises(fad.FadError, match="chunk_size"):
        inprocess.execute(g, inputs_of(g, args), chunk_size=0)
    with pytest.raises(fad.FadError, match="evaluator"):
        inprocess.execute(g, inputs_of(g, args), evaluator="gpu")
    with pytest.raises(fad.FadError, match="secure_aggregation="):
        fad.run(secure_mse.graph(*args), *args, secure_aggregation="yes")
