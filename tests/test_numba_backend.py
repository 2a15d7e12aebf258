"""The numba backend against the reference evaluator (the oracle) and hand-written NumPy.

Every primitive runs on both backends (ragged clients, one client, 10,000 clients); the opcode
table is checked against the primitive registry; bad run-time input gets a clear error; the
compiled code is reused from the on-disk cache by a second process. Compiled code is shared by
every test (one interpreter for all graphs), so the module runs in seconds once compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fadcore as fad
from fadcore.examples import make_fedavg_round
from fadcore import nn, ops
from fadcore import numpy as fnp
from fadcore.backends import numba_backend as nb
from fadcore.backends.inputs import Inputs
from fadcore.core import primitives

RTOL = 1e-12
SEEN: set[str] = set()          # primitives exercised by the comparison tests


# --------------------------------------------------------------------------- helpers

def _leaves(x):
    if isinstance(x, (tuple, list)):
        return [y for v in x for y in _leaves(v)]
    if isinstance(x, dict):
        return [y for k in sorted(x) for y in _leaves(x[k])]
    return [x]


def _close(got, want, rtol, what):
    if isinstance(want, fad.ClientValues):
        assert isinstance(got, fad.ClientValues), what
        assert len(got) == len(want), what
        assert got.all_equal == want.all_equal, what
        for i, (g, w) in enumerate(zip(got.members, want.members)):
            _close(g, w, rtol, f"{what}, client {i}")
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.dtype.kind == "f":
        # rtol on every element; an absolute floor at rtol times the data's scale for
        # entries that cancel to ~0 (different but equally exact summation orders)
        scale = np.max(np.abs(want[np.isfinite(want)]), initial=1.0)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


def check(f, *args, rtol=RTOL, types=None, **kw):
    """Run ``f`` (traced at ``types``, else at the arguments) on both backends and compare
    every output; returns numba's."""
    f = fad.trace(f) if not isinstance(f, fad.TracedFunction) else f
    g = f.graph(*(types or args))
    SEEN.update(g.primitives())
    want = fad.run(g, *args, backend="reference", **kw)
    got = fad.run(g, *args, backend="numba", **kw)
    for k, (a, b) in enumerate(zip(_leaves(got), _leaves(want), strict=True)):
        _close(a, b, rtol, f"{g.name} output {k}")
    return got


def ragged(rng, rows, *trailing, positive=False, high=None, dtype=np.float64):
    if high is not None:
        return fad.clients([rng.integers(0, high, size=(r, *trailing)).astype(dtype)
                            for r in rows])
    if positive:
        return fad.clients([rng.uniform(0.5, 2.0, size=(r, *trailing)).astype(dtype)
                            for r in rows])
    return fad.clients([rng.normal(size=(r, *trailing)).astype(dtype) for r in rows])


ROWS = {1: [3], 5: [4, 1, 6, 2, 3], 40: [(7 * i) % 11 + 1 for i in range(40)]}


@pytest.fixture(params=sorted(ROWS), ids=lambda n: f"{n}clients")
def rows(request):
    return ROWS[request.param]


@pytest.fixture
def rng():
    return np.random.default_rng(7)


# --------------------------------------------------------------------------- the opcode table

def test_every_primitive_has_an_opcode_or_alias():
    from fadcore.backends import ON_REFERENCE       # loops: run by the reference evaluator
    missing = [name for name in primitives if name not in nb.OPCODES and name not in nb.ALIASES
               and name not in ON_REFERENCE]
    assert not missing, f"primitives without a numba lowering: {missing}"
    from fadcore.backends import _numba_kernels as K
    assert len(set(K.OPCODE_NAMES)) == len(K.OPCODE_NAMES)
    for name, code in nb.OPCODES.items():
        assert K.OPCODE_NAMES[code] in (name, "zeros_like", "aggregate"), name


def test_opcode_table_is_checked_against_the_kernels(monkeypatch):
    """One row per op; a row that disagrees with the jitted constants fails at import."""
    from fadcore.backends.numba import kernels as K, opcodes
    opcodes.check_table()
    good = opcodes.OPS
    bad = dict(good)
    bad["exp"] = opcodes.Op("exp", K.OP_LOG, K.KI_UNARY, family="unary")
    monkeypatch.setattr(opcodes, "OPS", bad)
    with pytest.raises(RuntimeError, match="share an opcode"):
        opcodes.check_table()
    bad = dict(good)
    bad["matmul"] = opcodes.Op("matmul", K.OP_MATMUL, K.KI_DOT, family="binary")
    monkeypatch.setattr(opcodes, "OPS", bad)
    with pytest.raises(RuntimeError, match="outside the binary range"):
        opcodes.check_table()


def test_disassemble_shows_every_row_with_its_source_line(rng):
    from fadcore.backends.numba import disassemble
    X = ragged(rng, [2, 3], 3)
    y = ragged(rng, [2, 3])
    g = fad.grad(fed_mse).graph(rng.normal(size=3), X, y)
    text = disassemble(g)
    rows = [l for l in text.splitlines() if l.startswith("  ")]
    assert len(rows) == nb.lower(g).stats["instructions"]
    assert all("test_numba_backend.py:" in l for l in rows), text
    assert "stage 0 clients" in text and " matvec " in text and " aggregate " in text


def test_lowering_is_a_pipeline_of_small_passes():
    import inspect
    from fadcore.backends.numba import lowering
    assert len(lowering.PIPELINE) >= 6
    for f in (*lowering.PIPELINE, lowering.assemble, lowering._client_part,
              lowering._server_part, lowering.encode):
        assert len(inspect.getsource(f).splitlines()) <= 60, f.__name__


def test_unknown_primitive_is_a_lowering_error():
    from fadcore.core import Primitive
    from fadcore.ir.graph import Eqn, Graph, Var

    p = primitives.get("numba_test_mystery") or Primitive(
        "numba_test_mystery", shape_rule=lambda x: x)
    try:
        x = Var(fad.f64[3] @ fad.SERVER)
        y = Var(fad.f64[3] @ fad.SERVER)
        g = Graph([x], [Eqn(p, [x], y, {})], [y])
        with pytest.raises(fad.LoweringError, match="numba_test_mystery"):
            nb.lower(g)
    finally:
        del primitives["numba_test_mystery"]    # the registry is global: leave it as found


# --------------------------------------------------------------------------- every primitive

def f_unary(w, X):
    wc = fad.broadcast(w)
    Z = X * wc
    outs = [-Z, fnp.exp(Z), fnp.log(X), fnp.log1p(X), fnp.expm1(Z), fnp.sqrt(X), fnp.tanh(Z),
            fnp.sigmoid(Z), fnp.sin(Z), fnp.cos(Z), fnp.sign(Z - 1.0), fnp.abs(Z - 1.0)]
    total = sum(fnp.sum(o, axis=1) for o in outs)
    return fad.mean(fnp.sum(total)), Z, fad.sum(fnp.sum(outs[3] * outs[6], axis=0))


def f_binary(X, Y):
    outs = [X + Y, X - Y, X * Y, X / Y, X ** Y, fnp.maximum(X, Y), fnp.minimum(X, Y),
            fnp.logaddexp(X, Y), X * 2.0, 3.0 - X, 1.0 / Y]
    cmp = [X < Y, X <= Y, X > Y, X >= Y, X == Y, X != Y]
    picked = fnp.where(cmp[0], X, Y) + fnp.where(cmp[3], 1.0, -1.0)
    counts = sum(fnp.sum(fnp.astype(c, fnp.float64), axis=1) for c in cmp)
    return (fad.sum(sum(fnp.sum(o, axis=0) for o in outs)), picked, cmp[1],
            fad.sum(fnp.sum(counts)))


def f_shapes(X, T):
    # X {f64[?,4]}, T {f64[?,2,3]}
    s0, s1, sall = fnp.sum(X, axis=0), fnp.sum(X, axis=1), fnp.sum(X)
    m0, m1 = fnp.max(X, axis=0), fnp.max(T, axis=(0, 2))
    t02 = fnp.sum(T, axis=(0, 2)) + fnp.sum(T, axis=(0, 1))[:2] * 0.0
    g3 = fnp.sum(T, axis=(1,))                      # [kept, reduced, kept]
    gen = fnp.sum(fnp.transpose(T, (1, 0, 2)), axis=(0, 2))
    am = fnp.astype(fnp.argmax(X, axis=1), fnp.float64)
    bt = fnp.broadcast_to(s0, (3, 4)) + fnp.expand_dims(fnp.sum(X, axis=(0, 1)), 0)
    sl = X[:, 1:3] * 2.0 + X[:, ::3][:, :2]
    cat = fnp.concatenate([X, X[:, :1] * 0.5], axis=1)
    st = fnp.stack([s0, m0], axis=0)
    rs = fnp.reshape(T, (-1, 6))
    tr = fnp.transpose(X)
    total = (fnp.sum(s1) + sall + fnp.sum(m0) + fnp.sum(m1) + fnp.sum(t02) + fnp.sum(g3)
             + fnp.sum(gen) + fnp.sum(am) + fnp.sum(bt) + fnp.sum(sl) + fnp.sum(cat)
             + fnp.sum(st) + fnp.sum(rs) + fnp.sum(tr))
    return fad.sum(total), cat, fad.mean(st), fad.sum(fnp.max(m0))


def f_products(W, X, V):
    # W f64[4,3]@S, X {f64[?,4]}, V {f64[80,60]} (BLAS sizes)
    Wc = fad.broadcast(W)
    H = X @ Wc                                      # matmul [?,4]@[4,3]
    v = H @ fnp.ones_like(fnp.sum(H, axis=0))       # matvec
    u = fnp.ones_like(X[:, 0]) @ X                  # vecmat
    d = u @ u                                       # vdot
    o = fnp.outer(u, fnp.sum(H, axis=0))
    big = V @ fnp.transpose(V)                      # BLAS matmul
    bv = V @ V[0]                                   # BLAS matvec
    bw = V[0] @ fnp.transpose(V)                    # BLAS vecmat
    bd = fnp.reshape(V, (-1,)) @ fnp.reshape(V, (-1,))   # BLAS vdot
    return (fad.sum(fnp.sum(v) + d + fnp.sum(o)), H,
            fad.sum(fnp.sum(big) + fnp.sum(bv) + fnp.sum(bw) + bd))


def f_gathers(X, lab, E):
    # X {f64[?,5]} logits, lab {i64[?]} labels in [0, 5), E f64[5,3]@S
    loss = nn.softmax_cross_entropy(X, lab)
    oh = fnp.one_hot(lab, 5)
    emb = fnp.take(fad.broadcast(E), lab, axis=0)   # [?,3]
    cols = fnp.take(X, np.array([4, 0, -1]), axis=1)
    pred = fnp.argmax(X, axis=1)
    hits = fnp.sum(fnp.astype(pred == lab, fnp.float64))
    return (fad.mean(fnp.sum(loss) + fnp.sum(oh * X) + fnp.sum(emb) + fnp.sum(cols)),
            fad.sum(hits), pred, emb)


def f_federated(w, X, alpha, c):
    wc = fad.broadcast(w)
    z = fnp.sum(X * wc, axis=0)
    n = fad.num_clients()
    return (fad.sum(z), fad.mean(z), fad.secure_sum(z), fad.weighted_mean(z, alpha),
            fad.sum(fad.broadcast(c) * 2.0), n, wc)


def f_internal(w, X, lab):
    # primitives derivative passes emit, called directly
    wc = fad.broadcast(w)
    Z = X * wc                                       # [?,3]
    tok = fad.mean(fnp.sum(Z))
    y = ops.after(w * 2.0, tok)
    d = Z.shape[0]                                   # None (ragged) or the rows
    p = ops.pad(Z, (d, 5), (0, 1), (d, 4), (1, 1))
    u = ops.untake(Z, lab, 0, 4)                     # scatter-add rows by label
    ua = ops.untake_along_axis(Z[:, :1], fnp.expand_dims(lab, -1), 1, 3)
    zl = ops.zeros_like(Z) + ops.stop_gradient(Z)
    r = ops.rows(X) if X.shape[0] is None else float(X.shape[0])
    return (y, fad.sum(fnp.sum(p, axis=0)), fad.sum(fnp.sum(u, axis=1)), fad.sum(
        fnp.sum(ua, axis=0)), fad.sum(fnp.sum(zl) + r), p)


def test_unary(rng, rows):
    check(f_unary, rng.normal(size=3), ragged(rng, rows, 3, positive=True))


def test_binary(rng, rows):
    X = ragged(rng, rows, 4, positive=True)
    Y = fad.clients([np.where(rng.random(x.shape) < 0.3, x, rng.uniform(0.5, 2, x.shape))
                     for x in X])                    # some ties for ==, max, min
    check(f_binary, X, Y)


def test_shapes_and_reductions(rng, rows):
    check(f_shapes, ragged(rng, rows, 4), ragged(rng, rows, 2, 3))


def test_products(rng, rows):
    check(f_products, rng.normal(size=(4, 3)), ragged(rng, rows, 4),
          fad.clients([rng.normal(size=(80, 60)) for _ in rows]))


def test_gathers(rng, rows):
    check(f_gathers, ragged(rng, rows, 5), ragged(rng, rows, high=5, dtype=np.int64),
          rng.normal(size=(5, 3)))


def test_federated(rng, rows):
    n = len(rows)
    check(f_federated, rng.normal(size=3), ragged(rng, rows, 3),
          fad.clients(rng.uniform(0.1, 1.0, size=n)), np.float64(1.5))


def test_internal_primitives(rng, rows):
    check(f_internal, rng.normal(size=3), ragged(rng, rows, 3),
          ragged(rng, rows, high=3, dtype=np.int64))


def test_one_client_with_a_ragged_graph(rng):
    R = fad.CLIENTS
    check(f_internal, rng.normal(size=3), ragged(rng, [4], 3),
          ragged(rng, [4], high=3, dtype=np.int64),
          types=(fad.f64[3] @ fad.SERVER, fad.f64[None, 3] @ R, fad.i64[None] @ R))


def test_zero_row_client(rng):
    rows = [3, 0, 2]
    check(f_unary, rng.normal(size=3), ragged(rng, rows, 3, positive=True))
    check(fed_mse, rng.normal(size=3), ragged(rng, rows, 3), ragged(rng, rows))   # NaN mean


def test_server_only_graph(rng):
    def f(a, b):
        return fnp.tanh(a @ b).sum(axis=0), fnp.transpose(a) * 2.0, a[0] < 0.0
    check(f, rng.normal(size=(3, 4)), rng.normal(size=(4, 5)))


# --------------------------------------------------------------------------- gradients

def fed_mse(w, X, y):
    r = X @ fad.broadcast(w) - y
    return fad.mean(fnp.mean(r * r))


def fed_logreg(W, X, lab):
    logits = X @ fad.broadcast(W)
    return fad.mean(fnp.mean(nn.softmax_cross_entropy(logits, lab)))


def weighted_loss(w, X, y, alpha):
    r = X @ fad.broadcast(w) - y
    return fnp.log(fad.weighted_mean(fnp.mean(r * r), alpha) + 1.0)


@pytest.mark.parametrize("mode", ["reverse", "forward", "mixed"])
def test_gradients(rng, rows, mode):
    d = 4
    X = ragged(rng, rows, d)
    y = ragged(rng, rows)
    lab = ragged(rng, rows, high=3, dtype=np.int64)
    alpha = fad.clients(rng.uniform(0.5, 1.5, size=len(rows)))
    check(fad.value_and_grad(fed_mse, mode=mode), rng.normal(size=d), X, y)
    check(fad.grad(fed_logreg, mode=mode), rng.normal(size=(d, 3)), X, lab)
    argnums = 0 if mode == "forward" else (0, 3)     # forward mode: server arguments only
    check(fad.grad(weighted_loss, argnums=argnums, mode=mode), rng.normal(size=d), X, y, alpha)


def test_fedavg_round_grad_of_grad(rng):
    after_round = make_fedavg_round(K=3, client_lr=0.1)
    rows = ROWS[40]
    X = ragged(rng, rows, 5)
    y = fad.clients([(rng.random(r) < 0.5).astype(np.float64) for r in rows])
    alpha = fad.clients(rng.uniform(0.5, 1.5, size=len(rows)))
    check(fad.value_and_grad(after_round, argnums=(0, 1)), np.float64(0.5), alpha,
          rng.normal(size=5), X, y)


def test_every_primitive_was_compared():
    """The comparison tests of this module touch every primitive (re-run here at 5 clients so
    that the check holds whatever subset of tests was selected)."""
    rng, rows = np.random.default_rng(3), ROWS[5]
    for t in (test_unary, test_binary, test_shapes_and_reductions, test_products, test_gathers,
              test_federated, test_internal_primitives):
        t(rng, rows)
    for mode in ("reverse", "forward", "mixed"):
        test_gradients(rng, rows, mode)
    from fadcore.backends import ON_REFERENCE       # loops: compared in tests/test_loops.py
    missing = sorted(set(primitives) - SEEN - ON_REFERENCE)
    assert not missing, f"primitives no comparison test exercised: {missing}"


# --------------------------------------------------------------------------- dtypes

def test_float32_graph(rng):
    rows = ROWS[5]
    X = ragged(rng, rows, 4, dtype=np.float32)
    y = ragged(rng, rows, dtype=np.float32)
    w = rng.normal(size=4).astype(np.float32)
    out = check(fed_mse, w, X, y, rtol=2e-6)
    assert out.dtype == np.float32
    g = check(fad.grad(fed_mse), w, X, y, rtol=2e-5)
    assert g.dtype == np.float32


def test_int_and_bool_outputs(rng):
    X = ragged(rng, ROWS[5], 3)
    lab = ragged(rng, ROWS[5], high=3, dtype=np.int64)

    def f(X, lab):
        return lab * 2 + 1, fnp.argmax(X, axis=1), X > 0.0, fad.sum(fnp.sum(lab))
    got = check(f, X, lab)
    assert got[0].dtype == np.int64 and got[2].dtype == np.bool_


# --------------------------------------------------------------------------- scale

def test_ten_thousand_clients(rng):
    n, r, d = 10_000, 3, 4
    X = rng.normal(size=(n, r, d))
    y = rng.normal(size=(n, r))
    w = rng.normal(size=d)
    Xc, yc = fad.clients(X), fad.clients(y)
    got = check(fed_mse, w, Xc, yc)
    np.testing.assert_allclose(got, np.mean(np.mean((X @ w - y) ** 2, axis=1)), rtol=RTOL)
    g = fad.run(fad.grad(fed_mse).graph(w, Xc, yc), w, Xc, yc, backend="numba")
    want = np.einsum("ci,cij->j", 2.0 * (X @ w - y), X) / (n * r)
    np.testing.assert_allclose(g, want, rtol=1e-11)


def test_buffers_follow_the_live_set():
    """A long chain reuses a few buffers: peak memory is the live set, not the graph."""
    @fad.trace
    def chain(w, X):
        wc = fad.broadcast(w)
        z = X * wc
        for _ in range(60):
            z = fnp.tanh(z) * 1.01 + 0.1
        return fad.sum(fnp.sum(z, axis=0)), w * 1.0 + 2.0 * w - w

    g = chain.graph(fad.f64[1000] @ fad.SERVER, fad.f64[None, 1000] @ fad.CLIENTS)
    prog = nb.lower(g)
    assert prog.stats["instructions"] > 120
    assert max(prog.stats["work_slots"]) <= 3
    assert prog.stats["arena_floats"] <= 3 * 1000
    assert g._lowered["numba"] is prog          # cached on the graph


def test_cotangent_fused_into_one_client_pass():
    """grad of a mean of client losses: forward and backward in one client stage."""
    g = fad.grad(fed_mse).graph(fad.f64[8] @ fad.SERVER, fad.f64[None, 8] @ fad.CLIENTS,
                                fad.f64[None] @ fad.CLIENTS)
    prog = nb.lower(g)
    client_stages = [s for s in prog.stages.tolist() if s[3] > s[2]]
    assert len(client_stages) == 1


# --------------------------------------------------------------------------- bad input

def test_bad_shapes_dtypes_and_counts(rng):
    g = fad.trace(fed_mse).graph(fad.f64[3] @ fad.SERVER, fad.f64[None, 3] @ fad.CLIENTS,
                                 fad.f64[None] @ fad.CLIENTS)
    w = rng.normal(size=3)
    X = ragged(rng, [2, 3], 3)
    y = ragged(rng, [2, 3])
    with pytest.raises(fad.ShapeError):
        fad.run(g, w, ragged(rng, [2, 3], 4), y, backend="numba")
    with pytest.raises(fad.DTypeError):
        fad.run(g, w, ragged(rng, [2, 3], 3, dtype=np.float32), y, backend="numba")
    with pytest.raises(fad.CardinalityError):
        fad.run(g, w, X, ragged(rng, [2, 3, 4]), backend="numba")
    with pytest.raises(fad.ShapeError):            # rows disagree between X and y
        fad.run(g, w, X, ragged(rng, [3, 2]), backend="numba")
    with pytest.raises(fad.ShapeError):
        fad.run(g, rng.normal(size=4), X, y, backend="numba")


def test_execute_checks_inputs_itself(rng):
    """Inputs that bypass prepare_inputs still get errors, never a wild read."""
    g = fad.trace(fed_mse).graph(fad.f64[3] @ fad.SERVER, fad.f64[None, 3] @ fad.CLIENTS,
                                 fad.f64[None] @ fad.CLIENTS)
    X = [rng.normal(size=(2, 3)), rng.normal(size=(3, 4))]      # client 1 has 4 columns
    y = [rng.normal(size=2), rng.normal(size=3)]
    bad = Inputs([rng.normal(size=3), X, y], 2, np.array([2, 3]))
    with pytest.raises(fad.ShapeError, match="client 1"):
        nb.execute(g, bad)
    short = Inputs([rng.normal(size=3), X[:1], y], 2, np.array([2, 3]))
    with pytest.raises(fad.CardinalityError):
        nb.execute(g, short)


def test_nan_and_inf_propagate(rng):
    X = ragged(rng, [2, 3], 3)
    X.members[1][0, 0] = np.nan
    X.members[0][1, 2] = np.inf
    y = ragged(rng, [2, 3])
    check(fed_mse, rng.normal(size=3), X, y)
    out = fad.run(fad.trace(fed_mse).graph(rng.normal(size=3), X, y), rng.normal(size=3), X, y,
                  backend="numba")
    assert np.isnan(out)


@pytest.mark.parametrize("bad", [5, -6, 100])
def test_out_of_range_labels_raise(rng, bad):
    rows = [3, 4]
    X = ragged(rng, rows, 5)
    lab = ragged(rng, rows, high=5, dtype=np.int64)
    lab.members[1][2] = bad
    g = fad.trace(fed_logreg).graph(fad.f64[5, 5] @ fad.SERVER, X, lab)
    # a negative label is refused before the backend runs (backends/inputs.py)
    match = (f"index {bad} out of range .* client 1" if bad >= 0 else
             rf"indexes take_along_axis .* client 1 holds {bad} at \(2,\)")
    with pytest.raises(fad.ShapeError, match=match):
        fad.run(g, rng.normal(size=(5, 5)), X, lab, backend="numba")

    def f(E, lab):
        return fad.sum(fnp.sum(fnp.take(fad.broadcast(E), lab, axis=0)))
    g = fad.trace(f).graph(rng.normal(size=(5, 2)), lab)
    with pytest.raises(fad.ShapeError, match="take"):
        fad.run(g, rng.normal(size=(5, 2)), lab, backend="numba")


def test_negative_labels_are_refused_on_both_backends(rng):
    # issue 18: a traced label -1 silently meant the last row; indices from arguments must be
    # >= 0 (constant negative indices keep NumPy's meaning: the take of [4, 0, -1] above)
    def f(E, lab):
        return fad.sum(fnp.sum(fnp.take(fad.broadcast(E), lab, axis=0), axis=0))
    lab = fad.clients([np.array([1, 0, -5]), np.array([4])])
    E = rng.normal(size=(5, 2))
    for backend in ("reference", "numba"):
        with pytest.raises(fad.ShapeError, match=r"indexes take .* client 0 holds -5 at \(2,\)"):
            fad.run(fad.trace(f).graph(E, lab), E, lab, backend=backend)
    check(f, E, fad.clients([np.array([1, 0, 3]), np.array([4])]))


def test_zero_row_client_max_is_an_error(rng):
    def f(X):
        return fad.sum(fnp.max(X, axis=0))
    X = fad.clients([rng.normal(size=(2, 3)), np.zeros((0, 3))])
    with pytest.raises(fad.ShapeError, match="client 1"):
        fad.run(fad.trace(f).graph(X), X, backend="numba")


def test_huge_integers_are_refused(rng):
    def f(lab):
        return fad.sum(fnp.sum(lab))
    lab = fad.clients([np.array([2 ** 60, 1])])
    with pytest.raises(fad.DTypeError, match="2\\*\\*53"):
        fad.run(fad.trace(f).graph(lab), lab, backend="numba")


# --------------------------------------------------------------------------- cache

def test_second_process_reuses_the_cache(rng, tmp_path):
    # compile here (no-op if already compiled), then a fresh process must load, not compile
    X = ragged(rng, [2, 3], 3)
    check(fed_mse, rng.normal(size=3), X, ragged(rng, [2, 3]))
    code = textwrap.dedent("""
        import numpy as np, fadcore as fad
        from fadcore import numpy as fnp
        from fadcore.backends import _numba_kernels as K
        def fed_mse(w, X, y):
            r = X @ fad.broadcast(w) - y
            return fad.mean(fnp.mean(r * r))
        X = fad.clients([np.ones((2, 3)), np.ones((1, 3))])
        y = fad.clients([np.ones(2), np.ones(1)])
        fad.trace(fed_mse).run(np.ones(3), X, y, backend="numba")
        fs = (K.run_part, K.run_program)
        print(sum(sum(f.stats.cache_hits.values()) for f in fs),
              sum(sum(f.stats.cache_misses.values()) for f in fs))
    """)
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    hits, misses = map(int, out.stdout.split()[-2:])
    assert hits >= 1 and misses == 0


# --------------------------------------------------------------------------- hostile graphs (issue 18)

def _in_subprocess(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh process: a crash shows as a signal, not as a dead test run."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ),
                          cwd=os.path.dirname(os.path.dirname(__file__)))


ARGMAX_JSON = ('{"format": "fadcore.graph", "version": 1, "name": "bad", "inputs": '
               '["f64[%d,%d]@SERVER"], "literals": [], "eqns": [{"prim": "argmax", "in": [0], '
               '"type": "i64[%d,%d]@SERVER", "params": {"axis": ["int", %d]}, "source": '
               '"probe.py:1"}], "outputs": [1], "in_tree": ["tuple", [["leaf"]]], '
               '"out_tree": ["leaf"], "meta": {}}')


@pytest.mark.parametrize("shape,axis", [((2000, 2000), -1), ((3, 4), -1), ((3, 4), 5)])
def test_argmax_axis_out_of_range_is_refused_not_a_crash(shape, axis):
    a, b = shape
    doc = ARGMAX_JSON % (a, b, a, b, axis)
    out = _in_subprocess(f"""
        import numpy as np, fadcore as fad
        for backend in ("numba", "reference"):
            try:
                g = fad.Graph.from_json({doc!r})
                fad.run(g, np.ones({shape!r}), backend=backend)
                print(backend, "ran")
            except fad.FadError as e:
                print(backend, type(e).__name__, e)
    """)
    assert out.returncode == 0, out.stderr              # a signal gives a negative code
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(l.split()[1] != "ran" for l in lines), out.stdout
    assert all(f"axis {axis}" in l for l in lines), out.stdout


def test_argmax_axis_out_of_range_at_trace_time():
    from fadcore.core import bind
    for axis in (-1, 2, 5):
        with pytest.raises(fad.ShapeError, match=f"argmax: axis {axis} out of range"):
            fad.trace(lambda x: bind(ops.argmax_p, x, axis=axis)).graph(np.ones((3, 4)))


def test_huge_slice_stride_copies_the_data_and_its_gradient(rng):
    x = rng.normal(size=(3, 4))
    big = 2 ** 63 - 1
    got = fad.trace(lambda x: x[:, ::big])(x)
    np.testing.assert_array_equal(got, x[:, ::big])           # NumPy is the oracle
    g = fad.grad(lambda x: fnp.sum(x[:, 1::big] * x[:, 1::big]))(x)
    want = np.zeros_like(x)
    want[:, 1] = 2 * x[:, 1]
    np.testing.assert_allclose(g, want, rtol=1e-15)
    check(lambda x: (x[::big, 2:], x[1::3, ::big]), x)


def test_pad_with_a_huge_stride_matches_the_reference(rng):
    from fadcore.core import bind
    ct = rng.normal(size=(3, 1))
    got = check(lambda c: bind(ops.pad_p, c, shape=(3, 4), starts=(0, 2), limits=(3, 4),
                               strides=(1, 2 ** 62)), ct)
    want = np.zeros((3, 4))
    want[:, 2:3] = ct
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("prim,axis,idx_shape", [
    ("untake", 9, ()), ("untake", 2, (2,)), ("untake_along_axis", 7, (2, 2)),
    ("untake_along_axis", -1, (2, 2))])
def test_gather_transposes_check_their_axis(prim, axis, idx_shape):
    from fadcore.core import bind
    p = getattr(ops, prim + "_p")
    ct = np.ones(idx_shape if prim == "untake_along_axis" else (2, 4))
    idx = np.zeros(idx_shape, dtype=np.int64)
    with pytest.raises(fad.ShapeError, match=f"{prim}: .*axis {axis}"):
        fad.trace(lambda c, i: bind(p, c, i, axis=axis, dim=3)).graph(ct, idx)


def test_integer_overflow_is_an_error_on_both_backends():
    a = np.array([2 ** 40, 3], dtype=np.int64)
    g = fad.trace(lambda a: a * a).graph(a)
    for backend in ("reference", "numba"):
        with pytest.raises(fad.DTypeError, match="beyond \\+-2\\*\\*53"):
            fad.run(g, a, backend=backend)
    big = np.array([1e300, 2.0])
    g = fad.trace(lambda x: fnp.astype(x, fnp.int64)).graph(big)
    for backend in ("reference", "numba"):
        with pytest.raises(fad.DTypeError, match="beyond \\+-2\\*\\*53"):
            fad.run(g, big, backend=backend)
    small = np.array([2 ** 20, -3], dtype=np.int64)          # in range: exact, as NumPy
    np.testing.assert_array_equal(check(lambda a: a * a + a, small), small * small + small)


def test_client_integer_overflow_names_the_client():
    lab = fad.clients([np.array([1, 2]), np.array([2 ** 30, 2 ** 30])])
    g = fad.trace(lambda l: l * l * l).graph(lab)
    with pytest.raises(fad.DTypeError, match="client 1"):
        fad.run(g, lab, backend="numba")


def test_float32_sums_agree_across_backends():
    x = np.array([1e8, 1, -1e8, 1], dtype=np.float32)
    xc = fad.clients([np.asarray(v) for v in x])                 # one number per client
    for f, args in [(lambda x: fnp.sum(x), (x,)), (lambda x: x @ x, (x,)),
                    (lambda c: fad.sum(c), (xc,)), (lambda c: fad.mean(fnp.sum(c)), (xc,))]:
        assert np.asarray(check(f, *args, rtol=0)).dtype == np.float32
    # the exact sums (float64), rounded once: what both backends give
    assert fad.trace(lambda x: fnp.sum(x)).run(x, backend="reference") == np.float32(2.0)
    assert fad.trace(lambda x: fnp.sum(x)).run(x, backend="numba") == np.float32(2.0)
    for backend in ("reference", "numba"):
        assert fad.trace(lambda c: fad.sum(c)).run(xc, backend=backend) == np.float32(2.0)


def test_one_huge_client_does_not_multiply_the_workspace(rng, monkeypatch):
    """Scratch memory is sized per chunk of clients: one huge client costs one huge region,
    not one per chunk; the peak stays below the reference evaluator's."""
    import tracemalloc
    from fadcore.backends.numba import runtime
    monkeypatch.setattr(runtime, "PARALLEL_MIN_WORK", 0)       # the parallel layout

    @fad.trace
    def f(w, X):
        z = X @ fad.broadcast(w)
        return fad.mean(fnp.sum(fnp.exp(z) * z + fnp.tanh(z)))
    X = fad.clients([rng.normal(size=(200_000, 4))] + [rng.normal(size=(3, 4))] * 31)
    w = np.full(4, 0.01)
    g = fad.grad(f).graph(w, X)
    fad.run(g, w, X, backend="numba")

    def peak(backend):
        tracemalloc.start()
        try:
            out = fad.run(g, w, X, backend=backend)
            return out, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    got, numba_peak = peak("numba")
    want, ref_peak = peak("reference")
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert numba_peak < ref_peak, (numba_peak, ref_peak)
    assert numba_peak < 4 * 200_000 * 8 * 3, numba_peak        # a few temporaries, once


def test_kernels_refuse_sizes_that_do_not_fit_their_buffers():
    """Corrupt a lowered tape (what a lowering bug would do): a typed error, no crash."""
    out = _in_subprocess("""
        import numpy as np, fadcore as fad
        from fadcore import numpy as fnp
        from fadcore.backends import numba_backend as nb, _numba_kernels as K
        x = np.ones((30, 40))
        cases = {"argmax": (lambda x: fnp.argmax(x, axis=1), 0),
                 "slice": (lambda x: x[1:, ::3], 1), "reduce": (lambda x: fnp.sum(x, axis=0), 1),
                 "matvec": (lambda x: x @ x[0], 1), "transpose": (lambda x: x.T * 2.0, 1)}
        for name, (f, field) in cases.items():
            g = fad.trace(f).graph(x)
            prog = nb.lower(g)
            t = [r for r in range(prog.tape.shape[0])
                 if prog.tape[r, K.F_OP] != K.OP_COPY][0]
            prog.ip[prog.tape[t, K.F_IP] + field] *= 1000    # a dimension far too large
            try:
                fad.run(g, x, backend="numba")
                print(name, "ran")
            except fad.FadError as e:
                print(name, type(e).__name__)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["argmax", "LoweringError", "slice", "LoweringError",
                                  "reduce", "LoweringError", "matvec", "LoweringError",
                                  "transpose", "LoweringError"], out.stdout


def test_without_scipy_the_default_backend_says_what_to_install():
    out = _in_subprocess("""
        import sys, warnings
        sys.modules["scipy"] = None                 # an environment without scipy
        import numpy as np, fadcore as fad
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            print(fad.trace(lambda x: (x * x).sum())(np.arange(3.0)))
        print([str(m.message) for m in w])
        try:
            fad.run(fad.trace(lambda x: x).graph(np.ones(2)), np.ones(2), backend="numba")
        except fad.FadError as e:
            print("error:", e)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "5.0"
    assert "pip install scipy" in out.stdout and "numba backend" in out.stdout
    assert "error: backend 'numba' is not available: scipy" in out.stdout


def test_backend_table_is_not_rebuilt_per_call(monkeypatch):
    from fadcore import backends
    calls = []

    def no_dask():
        calls.append(1)
        raise ImportError("No module named 'distributed'")
    monkeypatch.setitem(backends._IMPORTS, "dask", no_dask)
    monkeypatch.setattr(backends, "_TABLE",
                        {k: v for k, v in backends._TABLE.items() if k != "dask"})
    monkeypatch.setattr(backends, "_MISSING", {})
    for _ in range(3):
        backends.available()
        fad.trace(lambda x: x * 2.0)(np.ones(2))
    assert calls == [1]


# --------------------------------------------------------------------------- start-up

def test_warmup_command_fills_the_cache():
    out = _in_subprocess("""
        import runpy, sys
        sys.argv = ["fadcore.warmup"]
        runpy.run_module("fadcore.warmup", run_name="__main__")
    """)
    assert out.returncode == 0, out.stderr
    assert "numba backend ready" in out.stdout


def test_a_slow_compile_says_so_once(caplog):
    import time
    from fadcore.backends.numba import _notice
    _notice._said.clear()
    with caplog.at_level("WARNING", logger="fadcore"):
        for _ in range(2):
            with _notice.compiling(after=0.05, poll=0.01):
                t = time.process_time()
                while time.process_time() - t < 0.3:        # burn CPU, like a compile
                    pass
        with _notice.compiling(after=10):                    # a fast (cached) load: silent
            pass
    msgs = [r.getMessage() for r in caplog.records if r.name == "fadcore"]
    assert msgs == [_notice.MESSAGE]
    assert "python -m fadcore.warmup" in msgs[0]


# --------------------------------------------------------------------------- blocks of clients

@pytest.fixture(params=[1, 2, 3, 7, 1000], ids=lambda b: f"block{b}")
def block(request, monkeypatch):
    """Force the number of clients per block (1: client-major execution)."""
    from fadcore.backends.numba import runtime
    monkeypatch.setattr(runtime, "block_size", lambda prog, rows, n: request.param)
    return request.param


@pytest.mark.parametrize("stacked", [False, True], ids=["ragged", "stacked"])
def test_blocks_give_the_reference_results(rng, block, stacked):
    rows = [4, 1, 6, 2, 3, 5, 2, 7, 1, 3, 4] if not stacked else [5] * 11
    mk = (lambda *s: fad.clients(rng.normal(size=(len(rows), *s)))) if stacked else (
        lambda *s: ragged(rng, rows, *s[1:]))
    X, T = mk(5, 4), mk(5, 2, 3)
    check(f_shapes, X, T)
    for mode in ("reverse", "forward"):
        g = fad.grad(fed_mse, mode=mode)
        check(g, rng.normal(size=4), X, mk(5))
    lab = fad.clients([rng.integers(0, 5, size=r) for r in rows])
    check(f_gathers, mk(5, 5) if not stacked else fad.clients(rng.normal(size=(11, 5, 5))),
          fad.clients([rng.integers(0, 5, size=5) for _ in rows]) if stacked else lab,
          rng.normal(size=(5, 3)))
    f = make_fedavg_round(3, 0.1)
    args = (np.float64(0.5), fad.clients(rng.uniform(0.5, 1.5, size=len(rows))),
            rng.normal(size=4), X, fad.clients([(rng.random(x.shape[0]) < 0.5) * 1.0
                                                 for x in X.members]))
    check(fad.grad(f, argnums=(0, 1)), *args)


def test_blocks_of_float32_and_int_values(rng, block):
    X = fad.clients(rng.normal(size=(9, 4, 3)).astype(np.float32))
    lab = fad.clients(rng.integers(-3, 3, size=(9, 4)))
    check(lambda X, l: (fad.sum(fnp.sum(fnp.exp(X) * 1.5, axis=1)), l * 3 + 1,
                        fad.sum(fnp.sum(l * l))), X, lab)


def test_blocks_name_the_client_of_a_bad_index(rng, block):
    lab = [rng.integers(0, 3, size=4) for _ in range(50)]
    lab[37] = np.array([0, 1, 7, 2])
    X = fad.clients(rng.normal(size=(50, 4, 3)))
    f = fad.trace(lambda X, l: fad.sum(fnp.sum(nn.softmax_cross_entropy(X, l))))
    with pytest.raises(fad.ShapeError, match="index 7 .* client 37"):
        f.run(X, fad.clients(lab), backend="numba")


def test_hundred_thousand_equal_clients_in_blocks(rng):
    from fadcore.backends.numba import runtime
    n, r, d = 100_000, 2, 3
    X = rng.normal(size=(n, r, d))
    y = rng.normal(size=(n, r))
    w = rng.normal(size=d)
    g = fad.grad(fed_mse)
    got = g(w, fad.clients(X), fad.clients(y))
    want = np.einsum("ci,cij->j", 2.0 * (X @ w - y), X) / (n * r)     # NumPy is the oracle
    np.testing.assert_allclose(got, want, rtol=1e-11)
    prog = nb.lower(g.graph(w, fad.clients(X), fad.clients(y)))
    assert runtime.block_size(prog, np.full(n, r), n) > 1


def test_large_clients_run_client_major(rng):
    from fadcore.backends.numba import runtime
    X = fad.clients(rng.normal(size=(4, 1000, 64)))
    prog = nb.lower(fad.grad(fed_mse).graph(np.zeros(64), X, fad.clients(np.zeros((4, 1000)))))
    assert runtime.block_size(prog, np.full(4, 1000), 4) == 1
