"""Loops as primitives (fad.fori_loop, fad.scan): values against the unrolled Python-loop
programs, the IR (printing, verifier, JSON, DOT, DCE/CSE in bodies) and typed errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import fadcore as fad
from fadcore import numpy as fnp
from fadcore.ir.passes import simplify
from fadcore.loops import loop_p

HERE = os.path.basename(__file__)
ROWS = [3, 5, 1, 4]


def client_loss(w, X, y):
    z = X @ w
    return fnp.mean(fnp.logaddexp(0.0, z) - y * z)


@pytest.fixture
def data(rng):
    X = fad.clients([rng.normal(size=(r, 3)) for r in ROWS])
    y = fad.clients([rng.integers(0, 2, size=r).astype(float) for r in ROWS])
    w = rng.normal(size=3)
    return w, X, y


# --------------------------------------------------------------------------- programs
# Each program is written once with a flag: looped (fad.fori_loop / fad.scan) or unrolled
# (a Python loop, the oracle).

def fedavg_round(K, looped):
    def f(eta, w, X, y):
        wc = fad.broadcast(w)

        def step(i, v):
            return v - 0.3 * fad.grad(client_loss)(v, X, y)
        if looped:
            local = fad.fori_loop(0, K, step, wc)
        else:
            local = wc
            for i in range(K):
                local = step(i, local)
        w_new = w - eta * fad.mean(wc - local)
        return fad.mean(client_loss(fad.broadcast(w_new), X, y))
    return f


def fedavg_rounds(R, K, looped):
    """R rounds of FedAvg, each K local steps: a loop whose body communicates."""
    def f(eta, w, X, y):
        def one_round(r, w):
            wc = fad.broadcast(w)

            def step(i, v):
                return v - 0.3 * fad.grad(client_loss)(v, X, y)
            if looped:
                local = fad.fori_loop(0, K, step, wc)
            else:
                local = wc
                for i in range(K):
                    local = step(i, local)
            return w - eta * fad.mean(wc - local)
        if looped:
            w = fad.fori_loop(0, R, one_round, w)
        else:
            for r in range(R):
                w = one_round(r, w)
        return fad.mean(client_loss(fad.broadcast(w), X, y))
    return f


def server_pytree(K, looped):
    def f(eta, w, X, y):
        def step(i, c):
            a, b = c["a"], c["b"]
            return {"a": a * 0.9 + eta * fnp.tanh(b), "b": (b - 0.1 * a, b * eta)[0]}
        c = {"a": w, "b": w * 2.0}
        if looped:
            c = fad.fori_loop(0, K, step, c)
        else:
            for i in range(K):
                c = step(i, c)
        return fad.mean(client_loss(fad.broadcast(c["a"] + c["b"]), X, y))
    return f


def index_used(K, looped):
    """The loop index enters the arithmetic (a step-size schedule)."""
    def f(eta, w, X, y):
        def step(i, v):
            lr = 0.5 / (1.0 + fnp.astype(i, "float64"))
            return v - lr * fad.grad(client_loss)(v, X, y)
        v = fad.broadcast(w)
        if looped:
            v = fad.fori_loop(2, 2 + K, step, v)
        else:
            for i in range(2, 2 + K):
                v = step(np.int64(i), v)
        return fad.mean(client_loss(v, X, y)) * eta
    return f


def scan_program(K, looped):
    def f(eta, w, X, y):
        xs = {"s": np.linspace(0.5, 1.5, K), "t": np.arange(K * 3.0).reshape(K, 3) / 10}

        def body(c, x):
            c2 = c * x["s"] + eta * x["t"]
            return c2, (fnp.sum(c2 * c2), c2)
        if looped:
            c, (ys, zs) = fad.scan(body, w, xs)
        else:
            c, ys, zs = w, [], []
            for k in range(K):
                c, (yk, zk) = body(c, {"s": xs["s"][k], "t": xs["t"][k]})
                ys.append(yk)
                zs.append(zk)
            ys, zs = fnp.stack(ys), fnp.stack(zs)
        return fnp.sum(ys) + fnp.sum(zs * zs) + fad.mean(client_loss(fad.broadcast(c), X, y))
    return f


def nested(K, looped):
    def f(eta, w, X, y):
        etac = fad.broadcast(eta)

        def inner(j, v):
            return v - 0.1 * fad.grad(client_loss)(v, X, y)

        def outer(i, v):
            if looped:
                return fad.fori_loop(0, 2, inner, v * etac)
            for j in range(2):
                v = inner(j, v * etac if j == 0 else v)
            return v
        v = fad.broadcast(w)
        if looped:
            v = fad.fori_loop(0, K, outer, v)
        else:
            for i in range(K):
                v = outer(i, v)
        return fad.mean(client_loss(v, X, y))
    return f


PROGRAMS = {
    "fedavg_round": (fedavg_round, 4),
    "fedavg_round_0_steps": (fedavg_round, 0),
    "fedavg_rounds_communicating": (lambda K, looped: fedavg_rounds(3, K, looped), 2),
    "server_pytree": (server_pytree, 3),
    "index_used": (index_used, 3),
    "scan": (scan_program, 4),
    "nested": (nested, 2),
}


def _pair(name):
    make, K = PROGRAMS[name]
    return fad.trace(make(K, True), name=name), fad.trace(make(K, False), name=name + "_unrolled")


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_values_equal_unrolled(name, data):
    w, X, y = data
    looped, unrolled = _pair(name)
    g = looped.graph(0.7, w, X, y).verify()
    assert "loop" in g.primitives()
    assert "loop" not in unrolled.graph(0.7, w, X, y).primitives()
    want = fad.run(unrolled.graph(0.7, w, X, y), 0.7, w, X, y, backend="reference")
    got = fad.run(g, 0.7, w, X, y, backend="reference")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # the default backend runs loops too (on the reference evaluator, for now)
    np.testing.assert_allclose(looped(0.7, w, X, y), want, rtol=1e-12, atol=1e-12)


def test_graph_size_independent_of_steps(data):
    w, X, y = data
    sizes = {K: len(fad.trace(fedavg_round(K, True)).graph(0.7, w, X, y)) for K in (1, 10, 500)}
    assert len(set(sizes.values())) == 1, sizes
    body = [e for e in fad.trace(fedavg_round(500, True)).graph(0.7, w, X, y)
            if e.prim is loop_p][0].params["body"]
    assert len(body) < 20


def test_per_client_trip_counts(data):
    w, X, y = data
    steps = fad.clients([np.int64(k) for k in (2, 0, 5, 1)])

    @fad.trace
    def f(w, X, y, n):
        def step(i, v):
            return v - 0.3 * fad.grad(client_loss)(v, X, y)
        return fad.fori_loop(0, n, step, fad.broadcast(w))

    out = f(w, X, y, steps)
    for c, k in enumerate((2, 0, 5, 1)):
        v = w.copy()
        for _ in range(k):
            z = X[c] @ v
            v = v - 0.3 * X[c].T @ ((1 / (1 + np.exp(-z)) - y[c]) / len(z))
        np.testing.assert_allclose(out[c], v, rtol=1e-12, atol=1e-12)
    assert "{i64[]}@CLIENTS" in str(f.graph(w, X, y, steps))


def test_eager_loops_are_python_loops():
    assert fad.fori_loop(0, 4, lambda i, c: c * 2.0 + i, 1.0) == ((1 * 2 + 0) * 2 + 1) * 2 * 2 + 2 * 2 + 3
    c, ys = fad.scan(lambda c, x: (c + x, c * x), 0.0, np.arange(4.0))
    assert c == 6.0
    np.testing.assert_array_equal(ys, [0.0, 0.0, 2.0, 9.0])


def test_zero_step_scan_stacks_nothing():
    @fad.trace
    def f(w):
        return fad.scan(lambda c, x: (c + x, c * 2.0), w, np.zeros((0, 3)))
    c, ys = f(np.ones(3))
    np.testing.assert_array_equal(c, np.ones(3))
    assert ys.shape == (0, 3)


# --------------------------------------------------------------------------- typed errors

def _line_of(fn, marker):
    import inspect
    src, start = inspect.getsourcelines(fn)
    return start + next(i for i, l in enumerate(src) if marker in l)


def test_carry_type_and_placement_errors(data):
    w, X, y = data

    def dtype_change(w, X, y):
        return fad.fori_loop(0, 3, lambda i, v: fnp.astype(v, "float32"), w)  # MARK

    def shape_change(w, X, y):
        return fad.fori_loop(0, 3, lambda i, v: fnp.concatenate([v, v]), w)  # MARK

    def placement_change(w, X, y):
        return fad.fori_loop(0, 3, lambda i, v: fad.broadcast(v), w)  # MARK

    def structure_change(w, X, y):
        return fad.fori_loop(0, 3, lambda i, c: (c[0],), (w, w))  # MARK

    for fn, err in ((dtype_change, fad.DTypeError), (shape_change, fad.ShapeError),
                    (placement_change, fad.PlacementError), (structure_change, fad.TracingError)):
        with pytest.raises(err, match=f"{HERE}:{_line_of(fn, 'MARK')}"):
            fad.trace(fn).graph(w, X, y)


def test_trip_count_errors(data):
    w, X, y = data

    def negative(w, X, y):
        return fad.fori_loop(5, 2, lambda i, v: v, w)  # MARK

    def non_integer(w, X, y):
        return fad.fori_loop(0, 2.5, lambda i, v: v, w)  # MARK

    def float_traced(w, X, y):
        return fad.fori_loop(0, fnp.sum(w), lambda i, v: v, w)  # MARK

    def negative_scan(w, X, y):
        return fad.scan(lambda c, x: (c, c), w, length=-1)  # MARK

    def index_as_shape(w, X, y):
        return fad.fori_loop(0, 3, lambda i, v: v + fnp.sum(v[:i]), w)  # MARK

    for fn, err in ((negative, fad.ShapeError), (non_integer, fad.DTypeError),
                    (float_traced, fad.DTypeError), (negative_scan, fad.ShapeError),
                    (index_as_shape, fad.TracingError)):
        with pytest.raises(err, match=f"{HERE}:{_line_of(fn, 'MARK')}"):
            fad.trace(fn).graph(w, X, y)


def test_per_client_count_negative_at_run_time(data):
    w, X, y = data
    f = fad.trace(lambda w, n: fad.fori_loop(0, n, lambda i, v: v * 2.0, fad.broadcast(w)))
    with pytest.raises(fad.ShapeError, match="negative trip count"):
        f(w, fad.clients([np.int64(1), np.int64(-1)]))


# --------------------------------------------------------------------------- IR

def test_printed_ir_indents_the_body(data):
    w, X, y = data
    g = fad.trace(fedavg_round(5, True)).graph(0.7, w, X, y)
    text = str(g)
    head = [l for l in text.splitlines() if "= loop[" in l]
    assert head == ["      k:{f64[3]}@CLIENTS = loop[num_carry=1, num_xs=0, length=5, "
                    "reverse=False] 0 5 e c d h j"]
    lines = text.splitlines()
    k = lines.index(head[0])
    assert lines[k + 1].startswith("        { lambda a:i64[]@CLIENTS b:{f64[3]}@CLIENTS")
    assert lines[k + 2].startswith("          let ")


def test_loop_invariant_work_is_hoisted(data):
    """A client's row count and what depends on it alone run once, before the loop, and
    reverse mode reads them as consts instead of stacking them per step."""
    w, X, y = data
    g = fad.trace(fedavg_round(5, True)).graph(0.7, w, X, y)
    loop = next(e for e in g.eqns if e.prim is loop_p)
    assert "rows" not in loop.params["body"].primitives()
    assert [e.prim.name for e in g.eqns[:g.eqns.index(loop)]].count("rows") == 1
    dg = fad.grad(fad.trace(fedavg_round(5, True)), argnums=(0, 1)).graph(0.7, w, X, y)
    stacked = [e.out.type for e in dg.eqns if e.prim is loop_p and e.out.type.shape[:1] == (5,)]
    assert stacked and all(t.shape != (5, None) or t.placement.name == "CLIENTS" for t in stacked)
    assert all("rows" not in e.params["body"].primitives() for e in dg.eqns if e.prim is loop_p)


def test_scan_results_print_as_one_equation():
    @fad.trace
    def f(w):
        return fad.scan(lambda c, x: (c * x, c + x), w, np.arange(3.0))
    g = f.graph(np.ones(2))
    assert len(g.eqns) == 2
    loops = [l for l in str(g).splitlines() if "= loop[" in l]
    assert loops == ["  let b:f64[2]@SERVER c:f64[3,2]@SERVER = loop[num_carry=1, num_xs=1, "
                     "length=3, reverse=False] 0 3 a f64[3][0.,1.,2.]"]


def test_verifier_checks_bodies(data):
    w, X, y = data
    g = fad.trace(fedavg_round(3, True)).graph(0.7, w, X, y)
    e = next(e for e in g.eqns if e.prim is loop_p)
    body = e.params["body"]
    bad = body.replace(outputs=[body.inputs[2]])     # returns client data as the carry
    e2 = type(e)(e.prim, e.inputs, e.out, {**e.params, "body": bad}, e.source)
    with pytest.raises(fad.VerificationError, match="carry 0"):
        g.replace(eqns=[e2 if x is e else x for x in g.eqns]).verify()
    e3 = type(e)(e.prim, e.inputs, e.out, {**e.params, "out": 3}, e.source)
    with pytest.raises(fad.VerificationError, match="result 3"):
        g.replace(eqns=[e3 if x is e else x for x in g.eqns]).verify()


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_json_round_trip(name, data):
    w, X, y = data
    looped, _ = _pair(name)
    g = looped.graph(0.7, w, X, y)
    g2 = fad.Graph.from_json(g.to_json())
    assert str(g2) == str(g)
    np.testing.assert_allclose(fad.run(g2, 0.7, w, X, y, backend="reference"),
                               fad.run(g, 0.7, w, X, y, backend="reference"), rtol=0, atol=0)


def test_json_hostile_bodies(data):
    w, X, y = data
    text = fad.trace(nested(2, True)).graph(0.7, w, X, y).to_json()
    doc = json.loads(text)
    assert len(doc["graphs"]) == 2

    def load(d):
        return fad.Graph.from_json(json.dumps(d))

    bad = json.loads(text)          # a body referring to itself or a later graph
    bad["graphs"][0]["eqns"][-1].setdefault("params", {})["body"] = ["graph", 0]
    with pytest.raises(fad.SerializationError, match="graphs\\[0\\]"):
        load(bad)
    bad = json.loads(text)          # a reference to no graph
    loop_eqn = next(e for e in bad["eqns"] if e["prim"] == "loop")
    loop_eqn["params"]["body"] = ["graph", 7]
    with pytest.raises(fad.SerializationError, match="not an earlier entry"):
        load(bad)
    bad = json.loads(text)          # an ill-typed body
    bad["graphs"][0]["inputs"][1] = "{f64[4]}@CLIENTS"
    with pytest.raises(fad.SerializationError, match="graphs\\[0\\]|type-check"):
        load(bad)
    bad = json.loads(text)          # a body that is not a graph
    loop_eqn = next(e for e in bad["eqns"] if e["prim"] == "loop")
    loop_eqn["params"]["body"] = ["int", 3]
    with pytest.raises(fad.SerializationError, match="not a graph"):
        load(bad)
    bad = json.loads(text)          # unknown fields in a body
    bad["graphs"][0]["extra"] = 1
    with pytest.raises(fad.SerializationError, match="unknown field"):
        load(bad)


def test_json_depth_limit():
    from fadcore.ir import serialize

    def deep(levels):
        def f(w):
            if levels == 0:
                return w * 2.0
            return fad.fori_loop(0, 2, lambda i, v: deep(levels - 1)(v), w)
        return f
    g = fad.trace(deep(4)).graph(np.ones(2))
    text = g.to_json()
    old = serialize.LIMITS["graph_depth"]
    serialize.LIMITS["graph_depth"] = 3
    try:
        with pytest.raises(fad.SerializationError, match="nested more than 3"):
            g.to_json()
        with pytest.raises(fad.SerializationError, match="nested more than 3"):
            fad.Graph.from_json(text)
    finally:
        serialize.LIMITS["graph_depth"] = old
    assert str(fad.Graph.from_json(text)) == str(g)


def test_dce_and_cse_inside_bodies():
    def body(i, v):
        dead = fnp.exp(v) * 3.0                 # unused
        a = fnp.tanh(v) * 2.0
        b = fnp.tanh(v) * 2.0                   # same as a
        return a + b + 0.0 * dead[0]

    @fad.trace
    def f(w):
        return fad.fori_loop(0, 3, lambda i, v: body(i, v) - fnp.exp(v) * 3.0 * 0.0, w)
    g = f.graph(np.ones(2))
    e = next(e for e in g.eqns if e.prim is loop_p)
    n_before = len(e.params["body"])

    @fad.trace
    def h(w):
        def b2(i, v):
            _ = fnp.exp(v) * 3.0                  # dead
            return fnp.tanh(v) * 2.0 + fnp.tanh(v) * 2.0
        return fad.fori_loop(0, 3, b2, w)
    g = h.graph(np.ones(2))
    raw = next(e for e in g.eqns if e.prim is loop_p).params["body"]
    assert raw.primitives() == {"add": 1, "exp": 1, "mul": 3, "tanh": 2}
    s = simplify(g)
    body2 = next(e for e in s.eqns if e.prim is loop_p).params["body"]
    assert body2.primitives() == {"add": 1, "mul": 1, "tanh": 1}
    s.verify()
    x = np.array([0.3, -0.2])
    want = x
    for _ in range(3):
        want = 4 * np.tanh(want)
    np.testing.assert_allclose(fad.run(s, x, backend="reference"), want, rtol=1e-14)
    assert n_before > 0


def test_other_backends(data):
    """numba and dask hand graphs with loops to the reference evaluator (for now)."""
    w, X, y = data
    g = fad.trace(fedavg_round(3, True)).graph(0.7, w, X, y)
    want = fad.run(g, 0.7, w, X, y, backend="reference")
    np.testing.assert_allclose(fad.run(g, 0.7, w, X, y, backend="numba"), want, rtol=1e-12)


# --------------------------------------------------------------------------- derivatives

MODES = [("forward", "stateful"), ("reverse", "stateful"), ("reverse", "remat"),
         ("mixed", "stateful"), ("auto", "stateful")]


@pytest.mark.parametrize("name", sorted(PROGRAMS))
@pytest.mark.parametrize("mode,state", MODES)
def test_derivatives_equal_unrolled(name, mode, state, data):
    """grad w.r.t. the server learning rate and the model (a hypergradient through local SGD):
    the looped program's equals the unrolled one's (reverse mode) to 1e-12."""
    w, X, y = data
    looped, unrolled = _pair(name)
    want = fad.run(fad.grad(unrolled, argnums=(0, 1)).graph(0.7, w, X, y), 0.7, w, X, y,
                   backend="reference")
    g = fad.grad(looped, argnums=(0, 1), mode=mode, state=state).graph(0.7, w, X, y).verify()
    assert "loop" in g.primitives()
    got = fad.run(g, 0.7, w, X, y, backend="reference")
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_jvp_equals_unrolled(name, data, rng):
    w, X, y = data
    looped, unrolled = _pair(name)
    tw = rng.normal(size=3)
    outs = []
    for f in (looped, unrolled):
        jf = fad.trace(lambda eta, w, X, y, f=f: fad.jvp(f, (eta, w, X, y), (0.3, tw, None, None)))
        outs.append(fad.run(jf.graph(0.7, w, X, y), 0.7, w, X, y, backend="reference"))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["fedavg_round", "nested", "scan", "fedavg_rounds_communicating"])
def test_second_order_against_finite_differences(name, data):
    """grad of grad through a loop: check_grads recurses (forward and reverse, order 2)."""
    w, X, y = data
    looped, _ = _pair(name)
    fad.check_grads(looped, (0.7, w, X, y), order=2, modes=("forward", "reverse"), fixed={2, 3})


def test_hypergradient_graph_size_independent_of_steps(data):
    w, X, y = data
    sizes = {}
    for K in (2, 50):
        f = fad.trace(fedavg_round(K, True))
        sizes[K] = len(fad.grad(f, argnums=(0, 1)).graph(0.7, w, X, y))
    assert sizes[2] == sizes[50], sizes


def test_reverse_through_a_run_time_trip_count_is_a_typed_error(data):
    w, X, y = data

    @fad.trace
    def f(eta, w, X, y, n):
        v = fad.fori_loop(0, n, lambda i, v: v * 0.5 + fad.grad(client_loss)(v, X, y),
                          fad.broadcast(w))
        return fad.mean(client_loss(v, X, y)) * eta

    n = fad.clients([np.int64(k) for k in (2, 0, 1, 3)])
    with pytest.raises(fad.DifferentiationError, match="run-time trip count"):
        fad.grad(f, argnums=(1,)).graph(0.7, w, X, y, n)
    # forward mode differentiates through per-client trip counts (0 steps included)
    fad.check_grads(f, (0.7, w, X, y, n), order=1, modes=("forward",), fixed={2, 3})


# --------------------------------------------------------------------------- rounds, cost, audit

@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_cost_equals_unrolled(name, data):
    """rounds(), bytes and FLOPs multiply by trip counts: the looped program costs what the
    unrolled one does, for the primal and for its reverse-mode gradient."""
    w, X, y = data
    looped, unrolled = _pair(name)
    for k, make in enumerate((lambda f: f.graph(0.7, w, X, y),
                              lambda f: fad.grad(f, argnums=(0, 1)).graph(0.7, w, X, y))):
        a, b = fad.cost(make(looped), clients=4, rows=5), fad.cost(make(unrolled), clients=4, rows=5)
        assert len(make(looped).rounds()) == len(make(unrolled).rounds())
        for field in ("rounds", "bytes_down", "bytes_up"):
            assert getattr(a, field) == getattr(b, field), (field, a, b)
        # FLOPs: trips x one step, and loop-invariant work runs once (the unrolled program
        # repeats it every step; its index arithmetic folds into constants, its scan stacks
        # with reshapes)
        if k == 0 and name not in ("index_used", "scan"):
            assert a.client_flops <= b.client_flops and a.server_flops <= b.server_flops


def test_flops_grow_linearly_with_trip_count(data):
    w, X, y = data
    f = {K: fad.cost(fad.trace(fedavg_round(K, True)).graph(0.7, w, X, y), rows=5).client_flops
         for K in (1, 2, 8)}
    assert f[8] - f[1] == 7 * (f[2] - f[1]) > 0


def test_cost_reports_per_client_counts_as_given(data):
    w, X, y = data
    f = fad.trace(lambda w, X, y, n: fad.fori_loop(
        0, n, lambda i, v: v - 0.3 * fad.grad(client_loss)(v, X, y), fad.broadcast(w)))
    n = fad.clients([np.int64(k) for k in (2, 0, 5, 1)])
    rep = fad.cost(f.graph(w, X, y, n), clients=4, rows=5)
    assert [(l["trips"], l["rounds_per_step"]) for l in rep.loops] == [("per client", 0)]
    # totals count one step of a loop whose count is known only at run time
    g1 = fad.trace(lambda w, X, y: fad.fori_loop(
        0, 1, lambda i, v: v - 0.3 * fad.grad(client_loss)(v, X, y), fad.broadcast(w)))
    assert rep.client_flops == fad.cost(g1.graph(w, X, y), clients=4, rows=5).client_flops


def test_audit_and_secure_policy_see_through_loops(data):
    w, X, y = data

    def rounds_with(agg):
        def f(w, X, y):
            return fad.fori_loop(0, 2, lambda r, v: agg(fnp.sum(fnp.tanh(X @ fad.broadcast(v))))
                                 * v, w)
        return fad.trace(f)

    secure = fad.Policy(aggregation="secure_sum")
    plain = rounds_with(fad.mean).graph(w, X, y)
    assert any("body of equation 0 (loop)" in line for line in fad.audit(plain, secure))
    with pytest.raises(fad.ClosureError):
        fad.grad(lambda w, X, y: fnp.sum(rounds_with(fad.mean)(w, X, y)),
                 policy=secure).graph(w, X, y)
    ok = rounds_with(fad.secure_sum)
    g = fad.grad(lambda w, X, y: fnp.sum(ok(w, X, y))).graph(w, X, y)
    assert fad.audit(g, secure) == []
    assert {"sum", "mean", "weighted_mean"}.isdisjoint(g.primitives())
    assert "secure_sum" in g.primitives()
