"""The Flower backend against the numba backend, on one Flower simulation for the module.

The simulation (Flower's Simulation Runtime with Ray actors, 8 virtual SuperNodes, loopback,
telemetry off) starts once (30-45 s on two cores) and serves every test; a client mod from
``flower_faults`` lets the fault tests make one node slow in one round. Every value is checked
against the numba backend (an independent evaluator) to 1e-12, and the bytes read off the
messages against ``fad.cost``'s prediction.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import fadcore as fad
from fadcore import numpy as fnp
from fadcore import pytree
from fadcore.examples import (example_args_fed_mse, example_args_fedavg_round, fed_mse,
                              fedavg_round, two_round)

pytest.importorskip("flwr", reason="the flower extra is not installed: pip install "
                    "'fadcore[flower]'")
from fadcore.backends import flower  # noqa: E402
from fadcore.backends.flower.server import FlowerRoundError, hello, run_graph  # noqa: E402

from flower_faults import fault_mod  # noqa: E402
from test_properties import assert_close, float_argnums, tangents_for  # noqa: E402
from fadcore.testing.strategies import programs  # noqa: E402

pytestmark = pytest.mark.flower

RTOL, ATOL = 1e-12, 1e-14
TIMEOUT = 120       # seconds a round may wait: a hung simulation fails the test instead of CI
SHORT, SLOW = 8.0, 16.0  # a round's timeout in the fault tests (generous: CI machines are
#                         loaded), and how long the slow node takes
NODES = 8


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    faults = tmp_path_factory.mktemp("flower") / "faults.json"
    faults.write_text("")
    os.environ["FAD_TEST_FLOWER_FAULTS"] = str(faults)
    s = flower.Simulation(NODES, client_mods=[fault_mod])
    flower.set_default_simulation(s)
    s.faults = faults
    yield s
    flower.shutdown()


@pytest.fixture
def faults(sim):
    def set_fault(**spec):
        sim.faults.write_text(json.dumps(spec))
    yield set_fault
    sim.faults.write_text("")
    # wait until the slow node has answered (every node answers a hello): the next test
    # must not queue behind it
    sim.submit(lambda grid: hello(grid, timeout=None))


def assert_same(got, want):
    gl, gt = pytree.flatten(got)
    wl, wt = pytree.flatten(want)
    assert gt == wt
    for g, w in zip(gl, wl, strict=True):
        if isinstance(w, fad.ClientValues):
            assert isinstance(g, fad.ClientValues) and len(g) == len(w)
            for gm, wm in zip(g, w, strict=True):
                assert gm.dtype == wm.dtype and gm.shape == wm.shape
                np.testing.assert_allclose(gm, wm, rtol=RTOL, atol=ATOL)
        else:
            assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def run_flower(graph, *args, **kw):
    kw.setdefault("timeout", TIMEOUT)
    return fad.run(graph, *args, backend="flower", **kw)


MODES = {"primal": None, "reverse": dict(mode="reverse"),
         "remat": dict(mode="reverse", state="remat"), "forward": dict(mode="forward"),
         "mixed": dict(mode="mixed"), "auto": dict(mode="auto")}


def _graph(f, kw, args):
    return f.graph(*args) if kw is None else fad.grad(f, **kw).graph(*args)


@pytest.mark.parametrize("name", list(MODES))
def test_fed_mse_every_mode_matches_numba_and_the_cost_model(sim, name):
    args = example_args_fed_mse()
    g = _graph(fed_mse, MODES[name], args)
    assert_same(run_flower(g, *args), fad.run(g, *args, backend="numba"))
    # bytes read off the messages, per round, are fad.cost's prediction
    traffic = flower.last_traffic()
    c = fad.cost(g, clients=len(args[1]), rows=5)
    sent = [(t.round, t.down_values, t.up_values) for t in traffic]
    predicted = [(r, d, u) for r, d, u, _ in c.per_round]
    if name == "forward":
        # forward mode broadcasts constant basis tangents: they are literals of the client
        # sub-graph, which travels once per node, so fewer bytes per round than predicted
        assert [(r, u) for r, _, u in sent] == [(r, u) for r, _, u in predicted]
        assert all(s[1] < p[1] for s, p in zip(sent, predicted))
    else:
        assert sent == predicted
    assert all(t.nodes == len(args[1]) for t in traffic)


def test_stateful_reverse_keeps_residuals_on_the_nodes(sim):
    args = example_args_fed_mse()
    g = fad.grad(fed_mse).graph(*args)
    assert g.rounds().client_state()            # the graph does keep client state
    assert_same(run_flower(g, *args), fad.run(g, *args, backend="numba"))
    # round 2 reads what round 1 kept: nothing of it travelled back to the server
    t1, t2 = flower.last_traffic()
    assert t1.up_values == 8 and t2.down_values == 8


def test_two_round_program_and_its_gradients(sim):
    args = example_args_fed_mse(seed=3)
    for kw in (None, dict(mode="reverse"), dict(mode="reverse", state="remat"),
               dict(mode="mixed"), dict(mode="forward")):
        g = _graph(two_round, kw, args)
        assert_same(run_flower(g, *args), fad.run(g, *args, backend="numba"))


@pytest.mark.parametrize("mode", ["reverse", "mixed", "auto", "forward"])
def test_fedavg_hypergradient_with_per_client_gradients(sim, mode):
    args = example_args_fedavg_round()
    # forward mode cannot separate per-client gradients: d/d eta only
    argnums = 0 if mode == "forward" else (0, 1)
    f = fad.value_and_grad(fedavg_round, argnums=argnums, mode=mode)
    want = f.run(*args, backend="numba")
    got = f.run(*args, backend="flower", timeout=TIMEOUT)
    assert_same(got, want)
    if mode != "forward":
        assert isinstance(got[1][1], fad.ClientValues)    # d/d alpha: a gradient per client


def test_traced_function_runs_on_flower(sim):
    args = example_args_fed_mse(seed=1)
    assert_same(fed_mse.run(*args, backend="flower"), fed_mse(*args))


def test_each_subgraph_sent_once_per_node_then_by_hash(sim):
    @fad.trace
    def fresh(w, X):                 # a graph no earlier test sent
        return fad.sum(fnp.sum(fnp.tanh(X @ fad.broadcast(w))))

    w = np.array([0.3, -0.2])
    X = fad.clients([np.ones((2, 2)), np.full((3, 2), 0.5), np.eye(2)])
    g = fresh.graph(w, X)
    run_flower(g, w, X)
    assert [t.graphs_sent for t in flower.last_traffic()] == [3]
    assert_same(run_flower(g, w, X), fad.run(g, w, X, backend="numba"))
    assert [t.graphs_sent for t in flower.last_traffic()] == [0]


def test_subgraph_failing_on_a_node_names_node_round_and_line(sim):
    @fad.trace
    def xent(W, X, labels):
        z = X @ fad.broadcast(W)
        return fad.mean(fnp.mean(fad.nn.softmax_cross_entropy(z, labels)))

    rng = np.random.default_rng(0)
    W = rng.normal(size=(3, 4))
    X = fad.clients([rng.normal(size=(n, 3)) for n in (2, 3, 4)])
    labels = fad.clients([np.array([0, 1]), np.array([1, 2, 3]), np.array([0, 9, 1, 2])])
    with pytest.raises(FlowerRoundError) as err:
        xent.run(W, X, labels, backend="flower", timeout=TIMEOUT)
    msg = str(err.value)
    node = sim.nodes(3)[2]
    assert f"client node {node} (client 2 of 3)" in msg and "round 1 of 1" in msg
    assert "test_flower_backend.py" in msg and "index 9" in msg


def test_node_missing_its_data(sim):
    args = example_args_fed_mse(seed=7)
    g = fed_mse.graph(*args)
    w, X, y = args
    data = sim.stage_data([[X[i], y[i]] for i in range(len(X))])
    os.remove(os.path.join(data, "2.npz"))
    with pytest.raises(FlowerRoundError) as err:
        sim.submit(lambda grid: run_graph(grid, g, [w, None, None], sim.nodes(len(X)),
                                          session=sim.session, data=data, timeout=TIMEOUT))
    msg = str(err.value)
    assert f"client node {sim.nodes(4)[2]} (client 2 of 4)" in msg
    assert "round 1" in msg and "no client data" in msg


def test_node_that_times_out(sim, faults):
    args = example_args_fed_mse(seed=2)
    g = fed_mse.graph(*args)
    faults(partition=1, round=1, sleep=SLOW)
    with pytest.raises(FlowerRoundError) as err:
        run_flower(g, *args, timeout=SHORT)
    msg = str(err.value)
    assert f"client node {sim.nodes(4)[1]} (client 1 of 4)" in msg
    assert "round 1 of 1" in msg and f"timeout={SHORT}" in msg


def test_stateful_graph_fails_when_a_node_leaves_between_rounds(sim, faults):
    args = example_args_fed_mse(seed=4)
    g = fad.grad(fed_mse).graph(*args)
    faults(partition=3, round=2, sleep=SLOW)
    with pytest.raises(FlowerRoundError) as err:
        run_flower(g, *args, timeout=SHORT, on_dropout="resample")
    msg = str(err.value)
    assert "round 2 of 2" in msg and f"client node {sim.nodes(4)[3]}" in msg
    assert "client state kept from round(s) [1]" in msg and "same clients back" in msg


def test_remat_graph_resamples_a_node_that_left(sim, faults):
    """No client state crosses the rounds of a remat gradient: a node that leaves before
    round 2 is replaced by a spare node, whose client computes the backward round with its
    own data. The result is the gradient over the round-2 cohort (numba's, on those data)."""
    rng = np.random.default_rng(11)
    w = rng.normal(size=3)
    Xs = [rng.normal(size=(n, 3)) for n in (3, 5, 4, 6, 2)]
    ys = [rng.normal(size=len(x)) for x in Xs]
    g = fad.grad(fed_mse, state="remat").graph(w, fad.clients(Xs[:4]), fad.clients(ys[:4]))
    data = sim.stage_data([[x, y] for x, y in zip(Xs, ys)])    # partition 4 is the spare
    faults(partition=1, round=2, sleep=SLOW)
    (got,), traffic = sim.submit(lambda grid: run_graph(
        grid, g, [w, None, None], sim.nodes(4), session=sim.session, spares=sim.nodes(5)[4:],
        data=data, timeout=SHORT, on_dropout="resample"))
    round2 = [0, 4, 2, 3]                       # client 1 replaced by client 4
    want = fad.run(g, w, fad.clients([Xs[i] for i in round2]),
                   fad.clients([ys[i] for i in round2]), backend="numba")
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert traffic[1].resampled == [(sim.nodes(4)[1], sim.nodes(5)[4])]


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(prog=programs())
def test_random_programs_agree_with_reference(sim, prog):
    """Random federated programs (ragged clients, every aggregation) and their derivative
    graphs on Flower vs the reference evaluator."""
    f, args = prog
    fl = float_argnums(args)
    tangents = tangents_for(args, np.random.default_rng(0))
    graphs = {
        "primal": (f.graph(*args), args),
        "reverse": (fad.grad(f, argnums=fl).graph(*args), args),
        "reverse/remat": (fad.grad(f, argnums=fl, state="remat").graph(*args), args),
        "mixed": (fad.grad(f, argnums=fl, mode="mixed").graph(*args), args),
        "jvp": (fad.jvp(f).graph(tuple(args), tangents), (tuple(args), tangents)),
    }
    for what, (g, run_args) in graphs.items():
        assert_close(run_flower(g, *run_args), fad.run(g, *run_args, backend="reference"),
                     1e-12, f"{what} graph on flower vs reference")


def test_ragged_gradient_made_from_a_broadcast_alone(sim):
    """Round 2 of this gradient reads no client input, yet its output d/dX is ragged: each
    node takes its row count from its own data (found by the property test above)."""
    @fad.trace
    def program(w, X):
        return fad.sum(fnp.sum(X)) + fnp.sum(fnp.tanh(w))

    w = np.array([0.4])
    X = fad.clients([np.ones((2, 1)), np.full((5, 1), 2.0), np.zeros((1, 1))])
    for kw in ({}, dict(state="remat"), dict(mode="mixed")):
        f = fad.grad(program, argnums=(0, 1), **kw)
        assert_same(f.run(w, X, backend="flower", timeout=TIMEOUT),
                    f.run(w, X, backend="numba"))


def test_secure_aggregation_is_refused_clearly(sim):
    """Masked secure sums need each node to mask its own contribution: not on Flower yet, so
    a run that asks for them is a clear error, never a plaintext sum."""
    from fadcore.examples import secure_mse
    args = example_args_fed_mse()
    with pytest.raises(fad.FadError, match="secure aggregation"):
        secure_mse.run(*args, backend="flower", secure_aggregation=True, timeout=TIMEOUT)


def test_the_simulation_leaves_print_alone(sim):
    """Ray patches builtins.print for its progress bars unless told not to: user code (and
    fadcore's JSON refusal of builtins) must keep the real print."""
    import builtins
    run_flower(fed_mse.graph(*example_args_fed_mse()), *example_args_fed_mse())
    assert type(builtins.print).__name__ == "builtin_function_or_method"


def _curves(doc, path=""):
    """Every number of a fad-demo.json but timings and the backend's name."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k not in ("seconds", "backend"):
                yield from _curves(v, f"{path}/{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _curves(v, f"{path}[{i}]")
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool):
        yield path, doc


def test_demo_learned_learning_rate_on_flower_gives_numba_numbers(sim, tmp_path):
    """`fad demo --backend flower` (here at smoke sizes): every FedAvg round, hypergradient
    and evaluation runs on the Flower nodes; the curves are the numba backend's."""
    from fadcore.cli import main
    for backend in ("flower", "numba"):
        assert main(["demo", "--smoke", "--experiments", "lr", "--backend", backend,
                     "--out", str(tmp_path / backend)]) == 0
    got, want = (json.loads((tmp_path / b / "fad-demo.json").read_text())
                 for b in ("flower", "numba"))
    assert got["backend"] == "flower"
    pairs = list(zip(_curves(got), _curves(want), strict=True))
    assert len(pairs) > 20
    for (p, g), (q, w) in pairs:
        assert p == q
        assert g == pytest.approx(w, rel=1e-9, abs=1e-12), p
