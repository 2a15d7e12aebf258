"""Every local op of ``fadcore.numpy`` / ``fad.nn`` and every federated primitive, evaluated by
the reference backend and checked against hand-written NumPy, on ragged client data with 1, 2
and 7 clients and on the server.

Each case is ``f(m, *args)``, run twice: with ``m`` = fadcore (traced, then run per client) and
with ``m`` = plain NumPy (the expectation, computed for each client's own arrays). The last
test walks the primitive registry: a new primitive cannot skip evaluation tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

import fadcore as fad
from fadcore import numpy as fnp
from fadcore import ops, pytree
from fadcore.core import primitives

from conftest import Ragged

R = None          # the ragged (rows) dimension in argument specs
SERVER_ROWS = 4   # what R becomes when a case runs on the server
NUM_CLIENTS = (1, 2, 7)

_crng = np.random.default_rng(1234)
W32 = _crng.normal(size=(3, 2))             # closed-over NumPy constants
V3 = _crng.normal(size=3)
E53 = _crng.normal(size=(5, 3))
W32_f32 = W32.astype(np.float32)


# --------------------------------------------------------------------------- the two namespaces

class Fad:
    """fadcore's ops under NumPy's names (plus fad.nn)."""

    def __getattr__(self, name):
        return getattr(fnp, name)

    softmax_cross_entropy = staticmethod(fad.nn.softmax_cross_entropy)
    sigmoid_cross_entropy = staticmethod(fad.nn.sigmoid_cross_entropy)
    clip_by_norm = staticmethod(fad.nn.clip_by_norm)
    global_norm = staticmethod(fad.nn.global_norm)


def _lse(x, axis=None, keepdims=False):
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis) if axis is not None else out.reshape(())


class Ref:
    """Hand-written NumPy for what NumPy lacks; NumPy itself for the rest."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def sigmoid(x):
        return 1 / (1 + np.exp(-x))

    @staticmethod
    def relu(x):
        return np.where(x > 0, x, np.zeros((), x.dtype))

    @staticmethod
    def softplus(x):
        return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)

    logsumexp = staticmethod(_lse)

    @staticmethod
    def log_softmax(x, axis=-1):
        return x - _lse(x, axis, keepdims=True)

    @staticmethod
    def softmax(x, axis=-1):
        e = np.exp(x - np.max(x, axis=axis, keepdims=True))
        return e / np.sum(e, axis=axis, keepdims=True)

    @staticmethod
    def one_hot(labels, k, dtype=np.float64):
        return (labels[..., None] == np.arange(k)).astype(dtype)

    @staticmethod
    def astype(x, dtype):
        return np.asarray(x).astype(dtype)

    @staticmethod
    def stop_gradient(x):
        return x

    @staticmethod
    def softmax_cross_entropy(logits, labels):
        return _lse(logits, -1) - logits[np.arange(len(labels)), labels]

    @staticmethod
    def sigmoid_cross_entropy(logits, labels):
        y = labels.astype(logits.dtype)
        return np.log1p(np.exp(-np.abs(logits))) + np.maximum(logits, 0) - y * logits

    @staticmethod
    def global_norm(tree):
        return np.sqrt(sum(np.sum(np.square(v)) for v in pytree.flatten(tree)[0]))

    @staticmethod
    def clip_by_norm(tree, c):
        leaves, td = pytree.flatten(tree)
        norm = Ref.global_norm(tree)
        scale = np.minimum(1.0, c / norm).astype(leaves[0].dtype)
        return pytree.unflatten(td, [v * scale for v in leaves])


F, N = Fad(), Ref()


# --------------------------------------------------------------------------- cases

@dataclass
class Arg:
    shape: tuple
    dtype: type = np.float64
    high: int | None = None          # integer labels in [0, high)
    positive: bool = False           # values in [0.5, 2)


def A(*shape, dtype=np.float64, positive=False):
    return Arg(shape, dtype, None, positive)


def L(*shape, high, dtype=np.int64):
    return Arg(shape, dtype, high)


@dataclass
class Case:
    id: str
    f: Callable
    args: list
    server: bool = True              # also run with server-placed arguments
    tol: float | None = None
    prims: set = field(default_factory=set)


CASES: list[Case] = []


def case(id, f, *args, **kw):
    CASES.append(Case(id, f, list(args), **kw))


X3 = A(R, 3)
P3 = A(R, 3, positive=True)
X32 = A(R, 3, dtype=np.float32)
LBL5 = L(R, high=5)

# elementwise unary
for _name in ("negative", "exp", "expm1", "tanh", "sigmoid", "relu", "abs", "sign", "sin", "cos",
              "square", "softplus"):
    case(_name, lambda m, x, _n=_name: getattr(m, _n)(x), X3)
for _name in ("log", "log1p", "sqrt"):
    case(_name, lambda m, x, _n=_name: getattr(m, _n)(x), P3)
case("neg-operator", lambda m, x: -x, X3)
case("abs-builtin", lambda m, x: abs(x), X3)
case("relu-at-zero", lambda m, x: m.relu(x * 0.0), X3)
case("abs-int", lambda m, x: m.abs(x - 2), L(R, high=5))

# elementwise binary, broadcasting and operators
for _name in ("add", "subtract", "multiply", "divide", "maximum", "minimum", "logaddexp"):
    case(_name, lambda m, x, y, _n=_name: getattr(m, _n)(x, y), X3, X3)
case("power", lambda m, x, y: m.power(x, y), P3, X3)
case("pow-operator", lambda m, x: x ** 3 + 2.0 ** x, P3)
case("operators", lambda m, x, y: (x + y) * 2.0 - y / 3.0 + 1.0 / (1.0 + x * x), X3, X3)
case("int-arith", lambda m, a, b: a * b + a - 3, L(R, high=5), L(R, high=5))
case("int-float-promotion", lambda m, a, x: a * x + a / 2, L(R, 3, high=5), X3)
case("bcast-row-const", lambda m, x: x + V3 - V3 * x, X3)
case("bcast-const-on-left", lambda m, x: V3 - x, X3)
case("bcast-col", lambda m, x, c: x * c, X3, A(R, 1))
case("bcast-outer", lambda m, c, r: c + r, A(R, 1), A(1, 3))
case("bcast-vec", lambda m, x, v: m.maximum(x, v), X3, A(3))
case("bcast-scalar-arg", lambda m, x, s: x * s - s, X3, A())
case("clip", lambda m, x: m.clip(x, -0.5, 0.5), X3)

# comparisons and where
for _name in ("less", "less_equal", "greater", "greater_equal", "equal", "not_equal"):
    case(_name, lambda m, x, y, _n=_name: getattr(m, _n)(x, y), L(R, 2, high=3),
         L(R, 2, high=3))
case("compare-operators",
     lambda m, x, y: ((x < y), (x <= 0.0), (x > y), (x >= 0.5), (x == y), (x != y)), X3, X3)
case("where", lambda m, x, y: m.where(x > y, x, y), X3, X3)
case("where-scalar", lambda m, x: m.where(x > 0, x, 0.0), X3)
case("where-bcast", lambda m, x, c: m.where(c > 0, x, -x), X3, A(R, 1))

# reductions
for _ax in (None, 0, 1, -1, (0, 1)):
    for _kd in (False, True):
        for _name in ("sum", "mean", "max", "min"):
            case(f"{_name}-axis{_ax}-keep{_kd}",
                 lambda m, x, _n=_name, _a=_ax, _k=_kd: getattr(m, _n)(x, axis=_a, keepdims=_k),
                 X3)
for _ax in ((1, 2), (0, 2), 1):
    case(f"sum3d-axis{_ax}", lambda m, x, _a=_ax: m.sum(x, axis=_a), A(R, 2, 3))
    case(f"mean3d-axis{_ax}-keep", lambda m, x, _a=_ax: m.mean(x, axis=_a, keepdims=True),
         A(R, 2, 3))
case("mean-1d", lambda m, y: m.mean(y), A(R))
case("mean-int", lambda m, a: m.mean(a, axis=0), L(R, 2, high=5))
case("sum-bool", lambda m, x: m.sum(x > 0), X3)
case("methods", lambda m, x: (x.sum(), x.mean(axis=0), x.max(axis=1, keepdims=True), x.T,
                              x.reshape(-1, 3)), X3)
case("argmax-rows", lambda m, x: m.argmax(x, axis=-1), X3)
case("argmax-axis0", lambda m, x: m.argmax(x, axis=0), X3)
for _ax in (None, -1, 0):
    case(f"logsumexp-axis{_ax}", lambda m, x, _a=_ax: m.logsumexp(x, axis=_a), X3)
case("logsumexp-keep", lambda m, x: m.logsumexp(x, axis=1, keepdims=True), X3)
for _ax in (-1, 0):
    case(f"softmax-axis{_ax}", lambda m, x, _a=_ax: m.softmax(x, axis=_a), X3)
    case(f"log_softmax-axis{_ax}", lambda m, x, _a=_ax: m.log_softmax(x, axis=_a), X3)
case("logsumexp-large", lambda m, x: m.logsumexp(x * 1000.0, axis=-1), X3)

# products
case("matmul-const", lambda m, x: x @ W32, X3)
case("matmul-fn", lambda m, x: m.matmul(x, W32), X3)
case("matvec-const", lambda m, x: x @ V3, X3)
case("matmul-args", lambda m, x, w: m.matmul(x, w), X3, A(3, 2))
case("matvec-args", lambda m, x, v: x @ v, X3, A(3))
case("vecmat-over-rows", lambda m, y, x: y @ x, A(R), X3)
case("vdot-over-rows", lambda m, y, z: m.dot(y, z), A(R), A(R))
case("gram-over-rows", lambda m, x, z: x.T @ z, X3, A(R, 2))
case("vecmat-const", lambda m, w: V3 @ w, A(3, 2))
case("dot-scalar", lambda m, x: m.dot(2.0, x), X3)
case("dot-method", lambda m, x: x.dot(W32), X3)
case("outer", lambda m, a, y: m.outer(a, y), A(3), A(R))

# shapes
case("reshape-split", lambda m, x: m.reshape(x, (x.shape[0], 2, 3)), A(R, 6))
case("reshape-merge", lambda m, x: m.reshape(x, (x.shape[0], -1)), A(R, 2, 3))
case("reshape-static", lambda m, w: m.reshape(w, (3, 2)), A(2, 3))
case("reshape-flat", lambda m, w: m.reshape(w, -1), A(2, 3))
case("transpose-perm", lambda m, x: m.transpose(x, (0, 2, 1)), A(R, 2, 3))
case("transpose-default", lambda m, x: m.transpose(x), X3)
case("transpose-neg-axes", lambda m, x: m.transpose(x, (-1, 0, 1)), A(R, 2, 3))
case("expand_dims", lambda m, x: (m.expand_dims(x, 1), m.expand_dims(x, -1),
                                  m.expand_dims(x, 0)), X3)
case("squeeze", lambda m, x: (m.squeeze(x, 1), m.squeeze(x, axis=(1,))), A(R, 1, 3))
case("squeeze-all", lambda m, w: m.squeeze(w), A(1, 3, 1))
case("broadcast_to", lambda m, c: m.broadcast_to(c, (c.shape[0], 3)), A(R, 1))
case("broadcast_to-new-axes", lambda m, v: m.broadcast_to(v, (2, 4, 3)), A(3))
case("broadcast_to-scalar", lambda m, s: m.broadcast_to(s, (2, 3)), A())
case("concatenate-axis1", lambda m, x, y: m.concatenate([x, y], axis=1), A(R, 2), X3)
case("concatenate-axis-1", lambda m, x, y: m.concatenate((x, y, x), axis=-1), A(R, 2), X3)
case("concatenate-axis0-static", lambda m, a, b: m.concatenate([a, b]), A(2, 3), A(1, 3))
case("concatenate-promote", lambda m, x, a: m.concatenate([x, a], axis=1), A(R, 2),
     L(R, 1, high=4))
case("stack-axis1", lambda m, x, y: m.stack([x, y], axis=1), X3, X3)
case("stack-axis0", lambda m, x, y: m.stack([x, y]), X3, X3)
case("stack-axis-1", lambda m, x, y: m.stack([x, y], axis=-1), X3, X3)

# indexing, slicing, gathers
case("index-col", lambda m, x: (x[:, 1], x[:, -1], x[..., 0]), X3)
case("slice-cols", lambda m, x: (x[:, 1:], x[:, ::2], x[:, 0:2], x[:, 5:], x[:, -2:]), X3)
case("index-newaxis", lambda m, x: (x[:, None, :], x[None], x[..., None]), X3)
case("index-3d", lambda m, x: (x[:, 0, 1:], x[:, :, 2], x[..., 1, :]), A(R, 2, 3))
case("index-static", lambda m, w: (w[1], w[-1, 0], w[1:3], w[::2, 1:], w[0, None]), A(4, 3))
case("take-const-idx", lambda m, x: m.take(x, [0, 2], axis=1), X3)
case("take-int-idx", lambda m, x: m.take(x, 1, axis=1), X3)
case("take-embedding", lambda m, lab: m.take(E53, lab, axis=0), L(R, high=5))
case("take-labels-from-arg", lambda m, e, lab: m.take(e, lab, axis=0), A(5, 3), L(R, high=5))
case("take-flat", lambda m, w: m.take(w, [5, 0, 3]), A(2, 3))
case("take-array-index", lambda m, w: w[np.array([2, 0])], A(4, 3))
case("take_along_axis", lambda m, x, lab: m.take_along_axis(x, m.expand_dims(lab, -1), axis=1),
     A(R, 5), LBL5)
case("take_along_axis-2", lambda m, x, idx: m.take_along_axis(x, idx, axis=-1), A(R, 5),
     L(R, 3, high=5))
case("one_hot", lambda m, lab: m.one_hot(lab, 5), LBL5)
case("one_hot-f32", lambda m, lab: m.one_hot(lab, 4, dtype=m.float32), L(R, high=4))

# statistics, products, scans, sorting, einsum, norms (compositions of existing primitives)
for _ax in (None, 0, 1, -1):
    for _name in ("var", "std"):
        case(f"{_name}-axis{_ax}", lambda m, x, _n=_name, _a=_ax: getattr(m, _n)(x, axis=_a), X3)
    case(f"prod-static-axis{_ax}", lambda m, w, _a=_ax: m.prod(w, axis=_a), A(5, 3))
case("prod-rows", lambda m, x: (m.prod(x, axis=1), m.prod(x, axis=-1)), X3)
case("var-ddof-keep", lambda m, x: (m.var(x, axis=1, ddof=1, keepdims=True),
                                    m.std(x, axis=1, ddof=1)), X3)
case("prod-keep-3d", lambda m, x: m.prod(x, axis=(1, 2), keepdims=True), A(R, 2, 3))
case("prod-int-bool", lambda m, a, x: (m.prod(a, axis=1), m.prod(x > 0, axis=1)),
     L(R, 5, high=4), X3)
case("prod-empty-axis", lambda m, w: m.prod(w, axis=1), A(3, 0))
for _ax in (None, 1, -1):
    case(f"cumsum-axis{_ax}", lambda m, w, _a=_ax: m.cumsum(w, axis=_a), A(4, 7))
case("cumsum-rows-cols", lambda m, x: m.cumsum(x, axis=1), A(R, 5))
case("cumsum-int-bool", lambda m, a, x: (m.cumsum(a, axis=1), m.cumsum(x > 0, axis=1)),
     L(R, 6, high=4), X3)
case("argmin", lambda m, x: (m.argmin(x, axis=-1), m.argmin(x, axis=0)), X3)
case("argmin-int-ties", lambda m, a: m.argmin(a, axis=1), L(R, 6, high=3))
for _n in (1, 2, 3, 5, 8, 13):
    case(f"sort-{_n}", lambda m, x: m.sort(x, axis=1), A(R, _n))
case("sort-axis0-static", lambda m, w: (m.sort(w, axis=0), m.sort(w, axis=None)), A(9, 2))
case("sort-int", lambda m, a: m.sort(a, axis=-1), L(R, 7, high=4))
case("einsum-matmul", lambda m, x: m.einsum("ij,jk->ik", x, W32), X3)
case("einsum-matvec", lambda m, x: m.einsum("ij,j->i", x, V3), X3)
case("einsum-transposed", lambda m, x: m.einsum("ij,kj->ki", x, W32.T), X3)
case("einsum-gram", lambda m, x: m.einsum("ij,ik->jk", x, x), X3)
case("einsum-rowdot", lambda m, x, y: m.einsum("ij,ij->i", x, y), X3, X3)
case("einsum-implicit", lambda m, x: (m.einsum("ij", x), m.einsum("ji", x),
                                      m.einsum("ij->", x)), X3)
case("einsum-three", lambda m, x: m.einsum("ij,jk,k->i", x, W32, np.ones(2)), X3)
case("einsum-outer", lambda m, a, b: m.einsum("i,j->ij", a, b), A(3), A(2))
for _ord in (None, 1, 2, np.inf, -np.inf, 3):
    case(f"norm-ord{_ord}", lambda m, x, _o=_ord: m.linalg.norm(x, ord=_o, axis=1), X3)
case("norm-default", lambda m, x, w: (m.linalg.norm(x), m.linalg.norm(w, "fro"),
                                      m.linalg.norm(x, axis=0, keepdims=True)), X3, A(2, 3))
case("arange-zeros-ones", lambda m, x: (x + m.arange(3), x * m.arange(1, 7, 2),
                                        m.zeros(3) + x,
                                        m.ones((2, 3), dtype=m.int64) + m.sum(x > 9, axis=0),
                                        m.ones(3, m.float32) + m.astype(x, m.float32)), X3)

# dtype helpers and gradient helpers (values only)
case("astype-f32", lambda m, x: m.astype(x, m.float32), X3)
case("astype-labels", lambda m, lab: m.astype(lab, m.float64) * 0.5, LBL5)
case("astype-method", lambda m, x: x.astype(m.float32) * 2, X3)
case("zeros_ones_like", lambda m, x: (m.zeros_like(x), m.ones_like(x) + x), X3)
case("stop_gradient", lambda m, x: m.stop_gradient(x) * x, X3)

# fad.nn
case("softmax_cross_entropy", lambda m, z, lab: m.softmax_cross_entropy(z, lab), A(R, 5), LBL5)
case("softmax_cross_entropy-mean", lambda m, z, lab: m.mean(m.softmax_cross_entropy(z, lab)),
     A(R, 5), LBL5)
case("sigmoid_cross_entropy", lambda m, z, lab: m.sigmoid_cross_entropy(z, lab), A(R),
     L(R, high=2))
case("global_norm", lambda m, a, b: m.global_norm([a, (b,)]), X3, A(2))
case("clip_by_norm-dict", lambda m, a, b: m.clip_by_norm({"w": a, "b": b}, 0.5), X3, A(2))
case("clip_by_norm-noclip", lambda m, a, b: m.clip_by_norm((a, [b]), 1e6), X3, A())

# float32 throughout
for _name in ("exp", "tanh", "sigmoid", "relu", "softplus", "square"):
    case(f"f32-{_name}", lambda m, x, _n=_name: getattr(m, _n)(x), X32)
case("f32-log", lambda m, x: m.log(x), A(R, 3, dtype=np.float32, positive=True))
case("f32-binary", lambda m, x, y: m.logaddexp(x, y) + x * y - x / (y * y + 1), X32, X32)
case("f32-python-scalars", lambda m, x: 2.0 * x + 1 - x / 3.0, X32)
case("f32-mean", lambda m, x: (m.mean(x), m.mean(x, axis=0), m.sum(x, axis=1)), X32)
case("f32-logsumexp", lambda m, x: (m.logsumexp(x, axis=-1), m.softmax(x)), X32, tol=1e-5)
case("f32-matmul-f32", lambda m, x: x @ W32_f32, X32)
case("f32-matmul-f64-promotes", lambda m, x: x @ W32, X32)
case("f32-xent", lambda m, z, lab: m.softmax_cross_entropy(z, lab), A(R, 5, dtype=np.float32),
     LBL5, tol=1e-5)
case("f32-clip_by_norm", lambda m, a, b: m.clip_by_norm({"w": a, "b": b}, 0.5), X32,
     A(2, dtype=np.float32), tol=1e-5)

# closures, pytree results, Python control flow
case("closure-const-mlp",
     lambda m, x: m.tanh(x @ W32 + V3[:2]) @ np.ones(2) - m.sum(E53) * 0.01, X3)
case("unrolled-loop", lambda m, x: _unrolled(m, x), X3)
case("python-branch-on-static-shape",
     lambda m, x: m.sum(x, axis=1) if x.shape[-1] == 3 else m.sum(x), X3)


def _unrolled(m, x):
    h = x
    for k in range(4):                       # unrolls: 4 copies of the body
        h = m.tanh(h * (0.5 + k)) + (x if k % 2 else 0.0)
    return h


# --------------------------------------------------------------------------- running cases

def _make(arg: Arg, rows: int, rag: Ragged):
    shape = tuple(rows if d is None else d for d in arg.shape)
    return rag.array(shape, arg.dtype, arg.high, arg.positive)


def _check(got, want, tol=None, what=""):
    got_leaves, got_tree = pytree.flatten(got)
    want_leaves, want_tree = pytree.flatten(want)
    assert got_tree == want_tree, what
    for g, w in zip(got_leaves, want_leaves, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, f"{what}: shape {g.shape} != {w.shape}"
        assert g.dtype == w.dtype, f"{what}: dtype {g.dtype} != {w.dtype}"
        if w.dtype.kind == "f":
            t = tol or (2e-6 if w.dtype == np.float32 else 1e-12)
            np.testing.assert_allclose(g, w, rtol=t, atol=t, err_msg=what)
        else:
            np.testing.assert_array_equal(g, w, err_msg=what)


def _per_client(tree, i):
    leaves, td = pytree.flatten(tree)
    return pytree.unflatten(td, [v[i] for v in leaves])


def run_on_clients(c: Case, num_clients: int, rag: Ragged):
    rows = rag.rows(num_clients)
    members = [[_make(a, n, rag) for n in rows] for a in c.args]
    f = fad.trace(lambda *xs: c.f(F, *xs), name=c.id)
    args = [fad.clients(m) for m in members]
    g = f.graph(*args)
    g.verify()
    got = f.run(*args, backend="reference")
    for i in range(num_clients):
        want = c.f(N, *[m[i] for m in members])
        _check(_per_client(got, i), want, c.tol, f"{c.id}, client {i} of {num_clients}")
    return g


def run_on_server(c: Case, rag: Ragged):
    xs = [_make(a, SERVER_ROWS, rag) for a in c.args]
    f = fad.trace(lambda *xs: c.f(F, *xs), name=c.id)
    g = f.graph(*xs)
    g.verify()
    _check(f.run(*xs, backend="reference"), c.f(N, *xs), c.tol, f"{c.id} at SERVER")
    return g


@pytest.mark.parametrize("num_clients", NUM_CLIENTS)
@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_local_op_on_clients(c, num_clients, ragged):
    g = run_on_clients(c, num_clients, ragged)
    for v, t in zip(g.outputs, g.out_types):
        assert t.placement is fad.CLIENTS or not c.args


@pytest.mark.parametrize("c", [c for c in CASES if c.server], ids=[c.id for c in CASES
                                                                    if c.server])
def test_local_op_on_server(c, ragged):
    g = run_on_server(c, ragged)
    assert all(t.placement is fad.SERVER for t in g.out_types)


def test_ragged_types_and_float32_results(ragged):
    rows = ragged.rows(7)
    x = ragged.clients(rows, 3, dtype=np.float32)
    f = fad.trace(lambda x: (fnp.mean(x, axis=0), fnp.exp(x), x @ W32_f32))
    g = f.graph(x)
    assert [str(t) for t in g.out_types] == ["{f32[3]}@CLIENTS", "{f32[?,3]}@CLIENTS",
                                             "{f32[?,2]}@CLIENTS"]
    m, e, p = f.run(x, backend="reference")
    assert [len(v) for v in (m, e, p)] == [7, 7, 7]
    assert [e[i].shape[0] for i in range(7)] == rows
    assert all(v.dtype == np.float32 for v in (m[0], e[3], p[6]))


def test_unrolled_loop_repeats_the_body(ragged):
    x = ragged.clients([2, 3], 3)
    n1 = len(fad.trace(lambda x: _unrolled(fnp, x)).graph(x))
    n0 = len(fad.trace(lambda x: fnp.tanh(x * 0.5)).graph(x))
    assert n1 >= 4 * n0


# --------------------------------------------------------------------------- pytree arguments

def test_pytree_arguments_and_results(ragged):
    rows = ragged.rows(7)
    X, y = ragged(rows, 3), ragged(rows)
    params = {"W": np.ones((3, 2)) * 0.1, "b": np.array([0.5, -0.5])}

    @fad.trace
    def f(params, data, extras):
        X, y = data
        W, b = fad.broadcast(params["W"]), fad.broadcast(params["b"])
        h = X @ W + b
        loss = fad.mean(fnp.mean((fnp.sum(h, axis=1) - y) ** 2))
        return {"loss": loss, "pred": [h, fnp.sum(h, axis=1)], "scaled": (params["b"] * extras[0],)}

    out = f.run(params, (fad.clients(X), fad.clients(y)), [np.array(3.0)], backend="reference")
    assert sorted(out) == ["loss", "pred", "scaled"]
    hs = [x @ params["W"] + params["b"] for x in X]
    want = np.mean([np.mean((h.sum(1) - t) ** 2) for h, t in zip(hs, y)])
    np.testing.assert_allclose(out["loss"], want, rtol=1e-12)
    assert isinstance(out["pred"], list) and isinstance(out["scaled"], tuple)
    for i in range(7):
        np.testing.assert_allclose(out["pred"][0][i], hs[i], rtol=1e-12)
        np.testing.assert_allclose(out["pred"][1][i], hs[i].sum(1), rtol=1e-12)
    np.testing.assert_allclose(out["scaled"][0], params["b"] * 3.0)


def test_none_leaves_and_nested_containers(ragged):
    X = ragged.clients([2, 4], 3)

    @fad.trace
    def f(tree):
        return {"a": None, "b": [fnp.sum(tree["x"], axis=0), (tree["s"] * 2.0,)]}

    out = f.run({"x": X, "s": np.float64(1.5), "skip": None}, backend="reference")
    assert out["a"] is None
    np.testing.assert_allclose(out["b"][0][1], X[1].sum(0))
    np.testing.assert_allclose(out["b"][1][0], 3.0)


# --------------------------------------------------------------------------- federated primitives

def _data(rag, n):
    rows = rag.rows(n)
    return rows, rag(rows, 3), rag(rows)


@pytest.mark.parametrize("num_clients", NUM_CLIENTS)
def test_broadcast(num_clients, ragged):
    rows, X, _ = _data(ragged, num_clients)
    w = np.array([1.0, -2.0, 0.5])
    f = fad.trace(lambda w, X: (fad.broadcast(w), X @ fad.broadcast(w)))
    g = f.graph(w, fad.clients(X))
    assert str(g.out_types[0]) == "f64[3]@CLIENTS"
    wc, pred = f.run(w, fad.clients(X), backend="reference")
    assert isinstance(wc, fad.ClientValues) and len(wc) == num_clients and wc.all_equal
    for i in range(num_clients):
        np.testing.assert_array_equal(wc[i], w)
        np.testing.assert_allclose(pred[i], X[i] @ w, rtol=1e-12)


@pytest.mark.parametrize("agg", ["sum", "secure_sum", "mean"])
@pytest.mark.parametrize("num_clients", NUM_CLIENTS)
def test_aggregations(agg, num_clients, ragged):
    rows, X, y = _data(ragged, num_clients)
    op = getattr(fad, agg)
    f = fad.trace(lambda X, y: (op(fnp.sum(X, axis=0)), op(fnp.mean(y)), op(fnp.max(X))))
    got = f.run(fad.clients(X), fad.clients(y), backend="reference")
    red = np.sum if agg != "mean" else np.mean
    want = (red([x.sum(0) for x in X], axis=0), red([t.mean() for t in y]),
            red([x.max() for x in X]))
    _check(got, want, what=agg)
    g = f.graph(fad.clients(X), fad.clients(y))
    assert g.primitives()[agg] == 3
    assert all(t.placement is fad.SERVER for t in g.out_types)


@pytest.mark.parametrize("num_clients", NUM_CLIENTS)
def test_integer_sum(num_clients, ragged):
    rows = ragged.rows(num_clients)
    labels = ragged(rows, high=5, dtype=np.int64)
    f = fad.trace(lambda lab: (fad.sum(fnp.sum(lab)), fad.secure_sum(fnp.sum(fnp.one_hot(
        lab, 5, dtype=np.int64), axis=0))))
    total, counts = f.run(fad.clients(labels), backend="reference")
    assert total.dtype == np.int64 and total == sum(int(v.sum()) for v in labels)
    np.testing.assert_array_equal(counts, np.bincount(np.concatenate(labels), minlength=5))


@pytest.mark.parametrize("num_clients", NUM_CLIENTS)
def test_weighted_mean(num_clients, ragged):
    rows, X, _ = _data(ragged, num_clients)
    alpha = ragged.rng.uniform(0.1, 2.0, size=num_clients)
    f = fad.trace(lambda X, a: fad.weighted_mean(fnp.mean(X, axis=0), a))
    got = f.run(fad.clients(X), fad.clients(alpha), backend="reference")
    want = sum(a * x.mean(0) for a, x in zip(alpha, X)) / alpha.sum()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # weights by row count, computed on the clients
    g = fad.trace(lambda X: fad.weighted_mean(fnp.sum(X, axis=0), fnp.sum(X[:, 0] * 0.0 + 1.0)))
    got = g.run(fad.clients(X), backend="reference")
    np.testing.assert_allclose(got, sum(x.sum(0) * len(x) for x in X) / sum(rows), rtol=1e-12)


@pytest.mark.parametrize("num_clients", NUM_CLIENTS)
def test_num_clients(num_clients, ragged):
    rows, X, _ = _data(ragged, num_clients)
    f = fad.trace(lambda X: (fad.num_clients(), fad.sum(fnp.mean(X)) / fad.num_clients()))
    n, avg = f.run(fad.clients(X), backend="reference")
    assert n.dtype == np.float64 and n == num_clients
    np.testing.assert_allclose(avg, np.mean([x.mean() for x in X]), rtol=1e-12)
    g = fad.trace(lambda w: fad.num_clients() * w)
    assert g.run(np.float64(2.0), backend="reference", num_clients=num_clients) == \
        2.0 * num_clients


@pytest.mark.parametrize("num_clients", NUM_CLIENTS)
def test_map(num_clients, ragged):
    rows, X, y = _data(ragged, num_clients)
    w = np.array([0.3, -0.1, 0.2])

    def client_loss(w, X, y):
        r = X @ w - y
        return fnp.mean(r * r)

    f = fad.trace(lambda w, X, y: fad.mean(fad.map(client_loss, fad.broadcast(w), X, y)))
    got = f.run(w, fad.clients(X), fad.clients(y), backend="reference")
    np.testing.assert_allclose(got, np.mean([np.mean((x @ w - t) ** 2) for x, t in zip(X, y)]),
                               rtol=1e-12)


@pytest.mark.parametrize("num_clients", NUM_CLIENTS)
def test_fedavg_round_with_local_steps(num_clients, ragged):
    """A whole round: broadcast, unrolled local steps (hand-written gradient), weighted mean."""
    rows, X, y = _data(ragged, num_clients)
    w0 = np.array([0.1, 0.2, -0.3])
    lr, K = 0.1, 3

    @fad.trace
    def fedavg(w, X, y, n):
        local = fad.broadcast(w)
        for _ in range(K):
            r = X @ local - y
            local = local - lr * (r @ X) * (2.0 / fnp.sum(r * 0.0 + 1.0))
        return w - fad.weighted_mean(fad.broadcast(w) - local, n)

    n = np.array(rows, dtype=np.float64)
    got = fedavg.run(w0, fad.clients(X), fad.clients(y), fad.clients(n), backend="reference")
    deltas = []
    for x, t in zip(X, y):
        loc = w0.copy()
        for _ in range(K):
            r = x @ loc - t
            loc = loc - lr * (r @ x) * (2.0 / len(t))
        deltas.append(w0 - loc)
    want = w0 - sum(d * k for d, k in zip(deltas, n)) / n.sum()
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_all_equal_client_results_stay_all_equal(ragged):
    f = fad.trace(lambda w: fnp.exp(fad.broadcast(w)) * 2.0)
    g = f.graph(np.zeros(2))
    assert str(g.out_types[0]) == "f64[2]@CLIENTS"
    out = f.run(np.array([0.0, 1.0]), backend="reference", num_clients=3)
    assert len(out) == 3 and out.all_equal
    np.testing.assert_allclose(out[2], 2 * np.exp([0.0, 1.0]))


# --------------------------------------------------------------------------- what passes emit

@pytest.mark.parametrize("where", ["server", "clients"])
def test_derivative_only_primitives(where):
    """pad, untake, untake_along_axis: emitted by the derivative passes, not by users."""
    x = np.arange(12.0).reshape(4, 3)
    idx = np.array([2, 0, 2])
    lab = np.array([[1], [0], [2], [1]])

    def f(x):
        return (ops.pad(x[1:3], (5, 3), (1, 0), (3, 3), (1, 1)),
                ops.untake(x[:3], idx, 0, 5),
                ops.untake_along_axis(x[:, :1], lab, 1, 3))

    want_pad = np.zeros((5, 3))
    want_pad[1:3] = x[1:3]
    want_untake = np.zeros((5, 3))
    np.add.at(want_untake, idx, x[:3])
    want_tala = np.zeros((4, 3))
    np.put_along_axis(want_tala, lab, x[:, :1], axis=1)
    want = (want_pad, want_untake, want_tala)
    if where == "server":
        _check(fad.trace(f).run(x, backend="reference"), want)
    else:
        got = fad.trace(f).run(fad.clients([x, 2 * x]), backend="reference")
        _check(_per_client(got, 0), want)
        _check(_per_client(got, 1), tuple(2 * w for w in want))


def test_pad_ragged_rows():
    X = fad.clients([np.ones((4, 2)), np.ones((1, 2)) * 3])
    f = fad.trace(lambda x: ops.pad(x, (None, 3), (0, 1), (None, 3), (1, 1)))
    assert str(f.graph(X).out_types[0]) == "{f64[?,3]}@CLIENTS"
    out = f.run(X, backend="reference")
    np.testing.assert_array_equal(out[1], [[0.0, 3.0, 3.0]])
    assert out[0].shape == (4, 3)


def test_after_orders_without_changing_values(ragged):
    @fad.trace
    def g(w, X):
        s = fad.sum(fnp.sum(X, axis=0))
        return ops.after(w * 2.0, s), s

    X = ragged.clients([3, 2], 3)
    out, s = g.run(np.ones(3), X, backend="reference")
    np.testing.assert_array_equal(out, 2 * np.ones(3))
    np.testing.assert_allclose(s, X[0].sum(0) + X[1].sum(0))
    assert "after" in g.graph(np.ones(3), X).primitives()


def _looped(x):
    """A server and a client loop: x <- tanh(x) * 1.5 + i, three times."""
    return fad.fori_loop(0, 3, lambda i, v: fnp.tanh(v) * 1.5 + fnp.astype(i, fnp.float64), x)


def test_loop_evaluates_like_a_python_loop():
    x = np.linspace(-1.0, 1.0, 6).reshape(2, 3)
    want = x
    for i in range(3):
        want = np.tanh(want) * 1.5 + i
    f = fad.trace(_looped)
    np.testing.assert_allclose(f.run(x, backend="reference"), want, rtol=1e-15)
    got = f.run(fad.clients([x, 2 * x]), backend="reference")
    want2 = 2 * x
    for i in range(3):
        want2 = np.tanh(want2) * 1.5 + i
    np.testing.assert_allclose(got[0], want, rtol=1e-15)
    np.testing.assert_allclose(got[1], want2, rtol=1e-15)


# --------------------------------------------------------------------------- registry walk

def _all_graphs():
    rag = Ragged(np.random.default_rng(0))
    for c in CASES:
        yield run_on_clients(c, 2, rag)
    x = fad.clients([np.ones((2, 3)), np.ones((3, 3))])
    a = fad.clients([np.ones(()), np.ones(())])
    yield fad.trace(lambda w, x, a: (
        fad.sum(fnp.sum(x @ fad.broadcast(w), axis=0)), fad.mean(fnp.mean(x)),
        fad.secure_sum(fnp.max(x)), fad.weighted_mean(fnp.sum(x, axis=0), a),
        fad.num_clients())).graph(np.ones(3), x, a)
    y = np.ones((4, 3))
    yield fad.trace(lambda x: (ops.pad(x, (5, 3), (1, 0), (5, 3), (1, 1)),
                               ops.untake(x, np.array([0, 1, 1, 2]), 0, 3),
                               ops.untake_along_axis(x, np.zeros((4, 3), np.int64), 1, 3),
                               ops.after(x, x))).graph(y)
    yield fad.trace(_looped).graph(y)


def test_every_primitive_is_evaluated():
    used = set()
    for g in _all_graphs():
        used |= set(g.primitives())
    missing = sorted(set(primitives) - used)
    assert not missing, (
        f"primitives without an evaluation test: {missing}; add a case to tests/test_ops_eval.py")


def test_negative_step_slices(rng):
    """x[::-1], x[..., ::-2], x[2:0:-1] follow NumPy (a gather), on the server and at clients."""
    x = np.arange(24.0).reshape(2, 3, 4)
    for key in [(slice(None, None, -1),), (Ellipsis, slice(None, None, -2)),
                (0, slice(2, 0, -1), slice(None)), (slice(None), None, slice(None, None, -1), 1)]:
        np.testing.assert_array_equal(fnp._index(x, key), x[key])
    X = [rng.normal(size=(n, 4)) for n in (2, 5)]
    f = fad.trace(lambda X: X[:, ::-1] * X[:, 1:3][:, ::-1].sum())
    for got, x in zip(f.run(fad.clients(X), backend="reference"), X):
        np.testing.assert_allclose(got, x[:, ::-1] * x[:, 1:3][:, ::-1].sum(), rtol=1e-15)
