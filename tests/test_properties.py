"""Property-based closure and correctness suite over random federated programs (issue 6).

Every property draws programs from :func:`fadcore.testing.strategies.programs`: small random,
well-typed federated programs (ragged clients, pytree inputs, several rounds, every
aggregation, chains of local ops from the whole ``fadcore.numpy`` / ``fad.nn`` list) with their
arguments. On failure hypothesis prints the shrunk program as Python source, and each test
notes the program and its IR.

Sizes scale with the hypothesis profile of ``conftest.py`` (``ci``: 25 examples, ``dev``: 60);
``EXAMPLES`` below lists examples per property, and ``docs/testing.md`` states the CI figures.
"""

from __future__ import annotations

import collections
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import fadcore as fad
from fadcore import numpy as fnp
from fadcore import pytree
from fadcore.backends import available
from fadcore.core import primitives
from fadcore.testing.strategies import AGGREGATIONS, Op, describe, programs

try:
    from fadcore.ir import serialize
except ImportError:      # the JSON form is optional: skip only the round-trip property
    serialize = None

BASE = settings.default.max_examples   # from the profile conftest.py loaded

#: property -> fraction of the profile's max_examples (ci: 25, dev: 60)
SCALE = {
    "verify": 12, "json": 6, "backends": 6, "jvp": 8, "vjp": 6, "modes": 6, "closure": 6,
    "secure": 6, "policy": 3, "rounds": 6, "second_order": 4, "extension": 2, "float32": 4,
    "dask": 1,
}
EXAMPLES = {name: max(5, int(BASE * s)) for name, s in SCALE.items()}
COVERAGE_PROGRAMS = 800
#: the op families that build label plumbing (one_hot -> argmax, comparisons -> where)
LABEL_FAMILIES = ("labels", "compare_where", "gather", "unary", "kinked", "aggregate",
                  "broadcast")


def prop(name: str, **kw):
    return settings(max_examples=EXAMPLES[name], deadline=None,
                    suppress_health_check=[HealthCheck.too_slow], **kw)


FEDERATED_ALLOWED = {"broadcast", "sum", "mean", "weighted_mean", "secure_sum", "num_clients",
                     "after"}
LOCAL = {name for name, p in primitives.items() if p.kind == "local"}
CONTROL = {"loop"}              # a loop's body uses primitives of these sets (primitives() walks it)
ALLOWED = LOCAL | FEDERATED_ALLOWED | CONTROL
#: Primitives only the derivative passes emit (transposes and schedules), never user code.
INTERNAL = {"pad", "untake", "untake_along_axis", "after"}
SECURE = fad.Policy(aggregation="secure_sum")


# --------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True, scope="module")
def reference_backend():
    """Properties evaluate with the reference evaluator, the oracle; the other backends are
    compared with it in test_backends_agree_with_reference."""
    before = fad.default_backend()
    fad.set_default_backend("reference")
    yield
    fad.set_default_backend(before)


def show(f, args) -> None:
    note(describe(f, args))


def _float_leaf(x) -> bool:
    return (x.dtype.kind if isinstance(x, fad.ClientValues) else np.asarray(x).dtype.kind) == "f"


def float_argnums(args, server_only: bool = False) -> tuple:
    """Arguments whose leaves are all float (and at the SERVER when ``server_only``)."""
    out = []
    for i, a in enumerate(args):
        leaves, _ = pytree.flatten(a)
        if not leaves or not all(_float_leaf(x) for x in leaves):
            continue
        if server_only and any(isinstance(x, fad.ClientValues) for x in leaves):
            continue
        out.append(i)
    return tuple(out)


def arrays(tree) -> list[np.ndarray]:
    """Every array of a result pytree, client members one by one."""
    out = []
    for leaf in pytree.flatten(tree)[0]:
        ms = leaf.members if isinstance(leaf, fad.ClientValues) else [leaf]
        out += [np.asarray(m, dtype=np.float64) for m in ms]
    return out


def assert_close(got, want, rtol: float, what: str) -> None:
    g, w = arrays(got), arrays(want)
    assert len(g) == len(w), f"{what}: {len(g)} arrays, expected {len(w)}"
    for a, b in zip(g, w):
        assert a.shape == b.shape, f"{what}: shape {a.shape}, expected {b.shape}"
        scale = max(1.0, float(np.max(np.abs(b))) if b.size else 0.0)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=what)


def random_like(tree, rng):
    leaves, t = pytree.flatten(tree)
    out = []
    for x in leaves:
        if isinstance(x, fad.ClientValues):
            out.append(fad.clients([rng.standard_normal(m.shape).astype(m.dtype)
                                    for m in x.members]))
        else:
            out.append(rng.standard_normal(np.shape(x)).astype(np.asarray(x).dtype))
    return pytree.unflatten(t, out)


def tangents_for(args, rng) -> tuple:
    fl = set(float_argnums(args))
    return tuple(random_like(a, rng) if i in fl else None for i, a in enumerate(args))


def vdot(x, y) -> float:
    return float(sum(np.vdot(a, b) for a, b in zip(arrays(x), arrays(y), strict=True)))


def unit_cotangent(f, args, value=1.0) -> np.ndarray:
    """A scalar cotangent of ``f``'s output dtype."""
    return np.asarray(value, dtype=f.graph(*args).out_types[0].dtype.np)


def derivative_graphs(f, args) -> dict:
    """Every derivative graph of ``f`` at ``args``: grad in every mode and state, jvp, vjp."""
    fl, sv = float_argnums(args), float_argnums(args, server_only=True)
    gs = {"forward": fad.grad(f, argnums=sv, mode="forward").graph(*args)}
    for mode in ("reverse", "mixed"):
        for state in ("stateful", "remat"):
            gs[f"{mode}/{state}"] = fad.grad(f, argnums=fl, mode=mode, state=state).graph(*args)
    gs["auto"] = fad.grad(f, argnums=fl, mode="auto").graph(*args)
    gs["value_and_grad"] = fad.value_and_grad(f, argnums=fl).graph(*args)
    rng = np.random.default_rng(0)
    gs["jvp"] = fad.jvp(f).graph(tuple(args), tangents_for(args, rng))
    _, pullback = fad.vjp(f, *args)
    gs["vjp"] = pullback.graph(unit_cotangent(f, args))
    return gs


def aggregations(g) -> set:
    return set(g.primitives()) & set(AGGREGATIONS)


# --------------------------------------------------------------------------- 1. the IR

@prop("verify")
@given(programs())
def test_graphs_verify_and_print(prog):
    f, args = prog
    show(f, args)
    g = f.graph(*args)
    g.verify()
    text = str(g)
    assert text.startswith("{ lambda ") and text.endswith("}")
    out = g.out_types[0]
    assert (out.placement, out.shape, out.dtype) == (fad.SERVER, (), fad.f64)
    assert set(g.primitives()) <= ALLOWED
    assert str(f.graph(*args)) == text          # traced once per signature, printed stably


@pytest.mark.skipif(serialize is None, reason="fadcore/ir/serialize.py (graph JSON) not there yet")
@prop("json")
@given(programs())
def test_graphs_survive_json_round_trip(prog):
    f, args = prog
    show(f, args)
    g = f.graph(*args)
    graphs = {"primal": g, "reverse": fad.grad(f, argnums=float_argnums(args)).graph(*args)}
    for what, h in graphs.items():
        back = fad.Graph.from_json(h.to_json())
        assert str(back) == str(h), what
        assert back.to_json() == h.to_json(), what
    assert_close(fad.run(fad.Graph.from_json(g.to_json()), *args, backend="reference"),
                 fad.run(g, *args, backend="reference"), 0.0, "round-tripped graph evaluates")


# --------------------------------------------------------------------------- 2. backends

#: dask runs its tasks on a LocalCluster: test_dask_backend_agrees_with_reference, fewer examples;
#: flower on a Flower simulation: tests/test_flower_backend.py, on that module's simulation
OTHER_BACKENDS = sorted(set(available()) - {"reference", "dask", "flower"})


@prop("backends")
@given(programs())
def test_backends_agree_with_reference(prog):
    """The primal and every derivative graph give the same values on every backend."""
    f, args = prog
    show(f, args)
    note(f"backends: reference vs {OTHER_BACKENDS or 'none other available'}")
    graphs = {"primal": f.graph(*args), **derivative_graphs(f, args)}
    tangents = tangents_for(args, np.random.default_rng(0))     # as derivative_graphs
    inputs = {"jvp": (tuple(args), tangents), "vjp": (tuple(args), unit_cotangent(f, args))}
    for what, g in graphs.items():
        run_args = inputs.get(what, args)
        want = fad.run(g, *run_args, backend="reference")
        for name in OTHER_BACKENDS:
            assert_close(fad.run(g, *run_args, backend=name), want, 1e-12,
                         f"{what} graph on backend {name!r} vs reference")


@pytest.fixture(scope="module")
def dask_client():
    pytest.importorskip("distributed")              # the optional [dask] extra
    assert "dask" in available(), "distributed is installed but the dask backend fails to import"
    from fadcore.backends import dask_backend
    client = dask_backend.default_client()
    client.wait_for_workers(2, timeout=60)
    yield client
    dask_backend.shutdown()


@pytest.mark.dask
@prop("dask")
@given(programs())
def test_dask_backend_agrees_with_reference(dask_client, prog):
    """The dask backend (tasks per chunk of clients, partial sums reduced on the driver) on
    the primal and its main derivative graphs, one client per chunk."""
    f, args = prog
    show(f, args)
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
        got = fad.run(g, *run_args, backend="dask", chunk_size=1, evaluator="reference",
                      timeout=60)
        assert_close(got, fad.run(g, *run_args, backend="reference"), 1e-12,
                     f"{what} graph on dask vs reference")


# --------------------------------------------------------------------------- 3. gradients

@prop("jvp")
@given(programs())
def test_forward_jvp_matches_central_differences(prog):
    f, args = prog
    show(f, args)
    fad.check_grads(f, args, modes=("forward",))


@prop("vjp")
@given(programs())
def test_reverse_vjp_is_the_transpose_of_the_jvp(prog):
    """<JVP(v), u> = <v, VJP(u)> with fadcore's own forward mode, then against finite
    differences (check_grads) in reverse, mixed and auto mode."""
    f, args = prog
    show(f, args)
    rng = np.random.default_rng(2)
    v = tangents_for(args, rng)
    u = rng.standard_normal()
    _, jv = fad.jvp(f, args, v)
    for mode in ("reverse", "mixed", "auto"):
        _, pullback = fad.vjp(f, *args, mode=mode)
        cts = pullback(unit_cotangent(f, args, u))
        rhs = sum(vdot(t, c) for t, c in zip(v, cts) if t is not None)
        lhs = float(jv) * u
        assert abs(lhs - rhs) <= 1e-9 * max(1.0, abs(lhs)), (mode, lhs, rhs)
    fad.check_grads(f, args, modes=("reverse", "mixed", "auto"))


@prop("modes")
@given(programs())
def test_every_mode_gives_the_same_gradient(prog):
    f, args = prog
    show(f, args)
    fl, sv = float_argnums(args), float_argnums(args, server_only=True)
    want = fad.grad(f, argnums=fl, mode="reverse")(*args)
    for mode in ("mixed", "auto"):
        for state in ("stateful", "remat"):
            assert_close(fad.grad(f, argnums=fl, mode=mode, state=state)(*args), want, 1e-10,
                         f"grad mode={mode} state={state} vs reverse")
    assert_close(fad.grad(f, argnums=sv, mode="forward")(*args),
                 fad.grad(f, argnums=sv, mode="reverse")(*args), 1e-10, "forward vs reverse")
    value, grads = fad.value_and_grad(f, argnums=fl)(*args)
    assert_close(value, f(*args), 1e-12, "value_and_grad value")
    assert_close(grads, want, 1e-12, "value_and_grad grad")


# --------------------------------------------------------------------------- 4. closure

@prop("closure")
@given(programs())
def test_derivatives_are_built_from_the_same_primitives(prog):
    """Closure: derivative graphs use only local ops and {broadcast, sum, mean, weighted_mean,
    secure_sum, num_clients, after}, and aggregate with nothing the primal does not (bar
    ``sum``, the transpose of a broadcast in a plainly-aggregating program)."""
    f, args = prog
    show(f, args)
    primal = aggregations(f.graph(*args))
    assert primal, "every generated program aggregates"
    for what, g in derivative_graphs(f, args).items():
        note(f"{what}: {g.primitives()}")
        assert set(g.primitives()) <= ALLOWED, (what, set(g.primitives()) - ALLOWED)
        assert aggregations(g) <= primal | {"sum"}, (what, aggregations(g) - primal)


@prop("secure")
@given(programs(secure_only=True))
def test_secure_sum_only_programs_have_secure_sum_only_derivatives(prog):
    f, args = prog
    show(f, args)
    g = f.graph(*args)
    assert aggregations(g) == {"secure_sum"}
    assert fad.audit(g, SECURE) == []
    for what, dg in derivative_graphs(f, args).items():
        assert fad.audit(dg, SECURE) == [], (what, fad.audit(dg, SECURE))
    fl = float_argnums(args)
    want = fad.grad(f, argnums=fl)(*args)
    for mode in ("reverse", "mixed", "auto"):
        got = fad.grad(f, argnums=fl, mode=mode, policy=SECURE)(*args)
        assert_close(got, want, 1e-10, f"grad mode={mode} under the secure policy")


@prop("policy")
@given(programs(aggregations=("sum", "mean", "weighted_mean")))
def test_secure_policy_rejects_plain_aggregation(prog):
    f, args = prog
    show(f, args)
    assert aggregations(f.graph(*args)) - {"secure_sum"}
    fl, sv = float_argnums(args), float_argnums(args, server_only=True)
    for mode in ("reverse", "mixed", "auto", "forward"):
        with pytest.raises(fad.ClosureError):
            fad.grad(f, argnums=sv if mode == "forward" else fl, mode=mode,
                     policy=SECURE).graph(*args)


# --------------------------------------------------------------------------- 5. schedules

@prop("rounds")
@given(programs())
def test_derivative_graphs_verify_and_keep_their_schedules(prog):
    f, args = prog
    show(f, args)
    g = f.graph(*args)
    n, rows = f.recipe.num_clients, f.recipe.rows
    gs = derivative_graphs(f, args)
    for what, dg in gs.items():
        dg.verify()
    primal_rounds = len(g.rounds())
    assert fad.cost(g, clients=n, rows=max(rows)).rounds == primal_rounds
    # forward mode keeps the primal's rounds: the JVP graph and value_and_grad have exactly
    # them; grad alone may need fewer (its client work is dead when no client value matters)
    sv = float_argnums(args, server_only=True)
    gs["forward/value_and_grad"] = fad.value_and_grad(f, argnums=sv, mode="forward").graph(
        *args)
    gs["forward/value_and_grad"].verify()
    for what in ("jvp", "forward/value_and_grad"):
        assert len(gs[what].rounds()) == primal_rounds, what
        assert fad.cost(gs[what], clients=n, rows=max(rows)).rounds == primal_rounds, what
    assert len(gs["forward"].rounds()) <= primal_rounds
    # reverse: the forward sweep, then at most one backward round per aggregation level;
    # mixed pushes forward to save rounds; auto only accepts flips that lower its cost
    reverse_rounds = len(gs["reverse/stateful"].rounds())
    assert reverse_rounds <= 2 * primal_rounds
    assert len(gs["mixed/stateful"].rounds()) <= reverse_rounds
    w = fad.CostWeights()
    assert w.total(fad.cost(gs["auto"], w.clients, w.rows)) <= \
        w.total(fad.cost(gs["reverse/stateful"], w.clients, w.rows)) * (1 + 1e-12)
    for what in ("reverse/remat", "mixed/remat"):
        c = fad.cost(gs[what], clients=n, rows=max(rows))
        assert c.client_state_bytes == 0, (what, c)
    fl = float_argnums(args)
    for mode in ("reverse", "mixed"):
        assert_close(fad.grad(f, argnums=fl, mode=mode, state="remat")(*args),
                     fad.grad(f, argnums=fl, mode=mode, state="stateful")(*args), 1e-12,
                     f"{mode}: remat vs stateful")


# --------------------------------------------------------------------------- 6. second order

@prop("second_order")
@given(programs(smooth=True, max_ops=5))
def test_second_order(prog):
    f, args = prog
    show(f, args)
    fad.check_grads(f, args, order=2, modes=("forward", "reverse"))


# --------------------------------------------------------------------------- float32

@prop("float32")
@given(programs(dtype="float32"))
def test_float32_programs(prog):
    """float32 programs stay float32 (values and gradients), every mode and backend agrees at
    float32 precision, and they match the same program in float64."""
    f, args = prog
    show(f, args)
    g = f.graph(*args)
    g.verify()
    assert g.out_types[0].dtype is fad.f32
    fl = float_argnums(args)
    want = fad.grad(f, argnums=fl)(*args)
    assert {(x.dtype if isinstance(x, fad.ClientValues) else np.asarray(x).dtype)
            for x in pytree.flatten(want)[0]} == {np.dtype(np.float32)}
    for mode in ("mixed", "auto"):
        assert_close(fad.grad(f, argnums=fl, mode=mode)(*args), want, 1e-4, mode)
    for name in OTHER_BACKENDS:
        for what, h in {"primal": g, "reverse": fad.grad(f, argnums=fl).graph(*args)}.items():
            assert_close(fad.run(h, *args, backend=name), fad.run(h, *args, backend="reference"),
                         1e-5, f"{what} graph on backend {name!r} vs reference")
    twin = f.recipe.as_dtype("float64")
    f64, args64 = twin.function(), twin.make_args()
    note(f"float64 twin:\n{twin}")
    assert_close(f(*args), f64(*args64), 1e-4, "float32 value vs float64")
    assert_close(want, fad.grad(f64, argnums=fl)(*args64), 1e-3, "float32 grad vs float64")


# --------------------------------------------------------------------------- user extensions

def swish(x):
    """A user's extension: a new local op written with fadcore.numpy."""
    return x * fnp.sigmoid(x)


SWISH = Op("swish", "swish({0})", env={"swish": swish}, weight=20)


@prop("extension")
@given(programs(extra_ops=[SWISH], max_ops=5))
def test_user_extension_ops(prog):
    f, args = prog
    show(f, args)
    f.graph(*args).verify()
    fad.check_grads(f, args, modes=("forward", "reverse"))


def test_programs_rejects_unknown_options():
    with pytest.raises(ValueError, match="aggregation 'median'"):
        programs(aggregations=("median",))
    with pytest.raises(ValueError, match="op family 'fft'"):
        programs(ops=("fft",))
    with pytest.raises(ValueError, match="dtype"):
        programs(dtype="float16")
    with pytest.raises(ValueError, match="max_ops"):
        programs(max_ops=0)
    with pytest.raises(TypeError, match="Op"):
        programs(extra_ops=["swish({0})"])
    with pytest.raises(ValueError, match="lacks"):
        Op("bad", "f({0})", arity=2)


# --------------------------------------------------------------------------- the docs

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "testing.md"


def test_docs_testing_examples_run():
    """docs/testing.md: its ```python blocks run in order in a fresh interpreter (the page
    registers a primitive, which must not leak into this process's registry), then every
    test_* function they define."""
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), re.M | re.S)
    assert len(blocks) >= 4
    script = "\n".join(blocks) + (
        "\nfor _name, _fn in list(globals().items()):\n"
        "    if _name.startswith('test_') and callable(_fn):\n"
        "        _fn()\n        print('ran', _name)\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("ran test_") == 3, res.stdout


# --------------------------------------------------------------------------- coverage

def test_generator_reaches_every_primitive():
    """Over COVERAGE_PROGRAMS programs the generator reaches every primitive user code can
    produce; the internal ones (emitted only by derivative passes) show up in derivative
    graphs."""
    primal: collections.Counter = collections.Counter()
    derived: collections.Counter = collections.Counter()
    rounds: collections.Counter = collections.Counter()

    @settings(max_examples=COVERAGE_PROGRAMS, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(programs(), programs(ops=LABEL_FAMILIES)))
    def collect(prog):
        f, args = prog
        g = f.graph(*args)
        primal.update(g.primitives())
        rounds[len(g.rounds())] += 1
        if len(primal) < len(primitives) - len(INTERNAL) or not INTERNAL <= set(derived):
            derived.update(fad.grad(f, argnums=float_argnums(args)).graph(*args).primitives())

    collect()
    table = "\n".join(f"  {name:18s} {primal[name]:6d} {derived[name]:6d}"
                      for name in sorted(primitives))
    print(f"\nprimitive          primal  derivative ({COVERAGE_PROGRAMS} programs)\n{table}"
          f"\nrounds per program: {dict(sorted(rounds.items()))}")
    # loops are drawn by tests/test_loops.py's table, not yet by this generator
    reachable = set(primitives) - INTERNAL - {"loop"}
    assert reachable <= set(primal), f"never generated: {sorted(reachable - set(primal))}"
    assert INTERNAL <= set(derived), f"in no derivative graph: {sorted(INTERNAL - set(derived))}"
    assert not (INTERNAL - {"after"}) & set(primal), "user code emitted an internal primitive"
    assert len(rounds) >= 3, f"programs should span several rounds: {rounds}"
