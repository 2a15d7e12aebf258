"""``fad.vmap``: a batching rule for every local primitive, per-example gradients inside a
client (DP-SGD clipping), differentiation through vmap.

Oracles: each function run example by example (unbatched: no batching rule involved) and
stacked; closed-form per-example gradients in NumPy; central differences (check_grads).
"""

from __future__ import annotations

import numpy as np
import pytest

import fadcore as fad
from fadcore import numpy as fnp
from fadcore.batching import batch_rules
from fadcore.ir.primitives import primitives

B = 4


def _x(rng, *shape):
    return rng.normal(size=(B,) + shape)


def _pos(rng, *shape):
    return rng.uniform(0.5, 2.0, size=(B,) + shape)


def _lab(rng, *shape, high=3):
    return rng.integers(0, high, size=(B,) + shape)


# One entry per local primitive: (function, argument makers, in_axes variants). Each argument
# maker returns a batch of B examples; an in_axes entry None passes example 0 to every call.
CASES = {
    "neg": (lambda x: -x, [_x], [0]),
    "exp": (fnp.exp, [_x], [0]),
    "log": (fnp.log, [_pos], [0]),
    "log1p": (fnp.log1p, [_pos], [0]),
    "expm1": (fnp.expm1, [_x], [0]),
    "sqrt": (fnp.sqrt, [_pos], [0]),
    "tanh": (fnp.tanh, [_x], [0]),
    "logistic": (fnp.sigmoid, [_x], [0]),
    "sin": (lambda x: fnp.sin(x), [_x], [0]),
    "cos": (lambda x: fnp.cos(x), [_x], [0]),
    "sign": (fnp.sign, [_x], [0]),
    "abs": (fnp.abs, [_x], [0]),
    "add": (lambda x, y: x + y, [_x, _x], [(0, 0), (0, None), (None, 0)]),
    "sub": (lambda x, y: x - y[0], [lambda r: _x(r, 3), lambda r: _x(r, 2)],
            [(0, 0), (0, None), (None, 0)]),
    "mul": (lambda x, y: x * y, [_x, lambda r: _x(r, 3)], [(0, 0), (0, None), (None, 0)]),
    "div": (lambda x, y: x / y, [_x, _pos], [(0, 0), (0, None), (None, 0)]),
    "pow": (lambda x, y: x ** y, [_pos, _x], [(0, 0), (0, None), (None, 0)]),
    "max": (fnp.maximum, [_x, _x], [(0, 0), (None, 0)]),
    "min": (fnp.minimum, [_x, _x], [(0, 0), (0, None)]),
    "logaddexp": (fnp.logaddexp, [_x, _x], [(0, 0), (0, None)]),
    "lt": (lambda x, y: x < y, [_x, _x], [(0, 0), (0, None)]),
    "le": (lambda x, y: x <= y, [_x, _x], [(0, 0), (None, 0)]),
    "gt": (lambda x, y: x > y, [_x, _x], [(0, 0)]),
    "ge": (lambda x, y: x >= y, [_x, _x], [(0, 0)]),
    "eq": (lambda x, y: fnp.where(x == x, y, x), [_x, _x], [(0, 0), (0, None)]),
    "ne": (lambda x, y: x != y, [_x, _x], [(0, 0)]),
    "select": (lambda p, x, y: fnp.where(p > 0, x, y), [_x, _x, lambda r: _x(r, 3)],
               [(0, 0, 0), (0, None, 0), (None, None, 0), (None, 0, None)]),
    "convert": (lambda x: fnp.sum(x > 0.0, axis=0), [lambda r: _x(r, 3, 2)], [0]),
    "stop_gradient": (lambda x: fad.numpy.stop_gradient(x) if hasattr(fad.numpy, "stop_gradient")
                      else x, [_x], [0]),
    "zeros_like": (lambda x: fnp.zeros_like(x) + x, [_x], [0]),
    "reduce_sum": (lambda x: fnp.sum(x, axis=1), [lambda r: _x(r, 2, 3)], [0, 1, 2]),
    "reduce_max": (lambda x: fnp.max(x, axis=0), [lambda r: _x(r, 2, 3)], [0, 2]),
    "argmax": (lambda x: fnp.argmax(x, axis=1), [lambda r: _x(r, 2, 3)], [0]),
    "broadcast_in_dim": (lambda x: fnp.broadcast_to(x, (2, 3)), [lambda r: _x(r, 3)], [0]),
    "reshape": (lambda x: fnp.reshape(x, (3, 2)), [lambda r: _x(r, 2, 3)], [0, 1]),
    "transpose": (lambda x: fnp.transpose(x), [lambda r: _x(r, 2, 3)], [0]),
    "matmul": (lambda a, b: a @ b, [lambda r: _x(r, 2, 3), lambda r: _x(r, 3, 2)],
               [(0, 0), (0, None), (None, 0), (1, 2)]),
    "matvec": (lambda a, x: a @ x, [lambda r: _x(r, 2, 3), lambda r: _x(r, 3)],
               [(0, 0), (0, None), (None, 0)]),
    "vecmat": (lambda x, a: x @ a, [lambda r: _x(r, 2), lambda r: _x(r, 2, 3)],
               [(0, 0), (0, None), (None, 0)]),
    "vdot": (lambda a, b: fnp.dot(a, b), [lambda r: _x(r, 3), lambda r: _x(r, 3)],
             [(0, 0), (0, None), (None, 0)]),
    "outer": (lambda a, b: fnp.outer(a, b) if hasattr(fnp, "outer") else
              a[:, None] * b[None, :], [lambda r: _x(r, 2), lambda r: _x(r, 3)],
              [(0, 0), (0, None), (None, 0)]),
    "slice": (lambda x: x[1:, ::2], [lambda r: _x(r, 3, 4)], [0, 1]),
    "concatenate": (lambda x, y: fnp.concatenate([x, y], axis=0),
                    [lambda r: _x(r, 2), lambda r: _x(r, 3)], [(0, 0), (0, None)]),
    "take": (lambda x, i: fnp.take(x, i, axis=0), [lambda r: _x(r, 3, 2), lambda r: _lab(r, 2)],
             [(0, 0), (0, None), (None, 0)]),
    "take_along_axis": (lambda x, i: fnp.take_along_axis(x, i, axis=1),
                        [lambda r: _x(r, 2, 3), lambda r: _lab(r, 2, 1)],
                        [(0, 0), (0, None), (None, 0)]),
    "one_hot": (lambda i: fnp.one_hot(i, 3), [lambda r: _lab(r, 2)], [0]),
}

# primitives reached through another entry (transposes and internal helpers): the case that
# exercises them, whose vmap of grad emits them
VIA_GRAD = {"pad": "slice", "untake": "take", "untake_along_axis": "take_along_axis"}
NOT_BATCHED = {"rows"}      # a client's row count: checked by the DP-SGD test below


def _example(arg, ax, b):
    return arg if ax is None else np.take(arg, b, axis=ax)


def _check(f, args, in_axes):
    got = fad.vmap(f, in_axes=in_axes)(*args)
    single = fad.trace(f)
    want = np.stack([np.asarray(single(*[_example(a, ax, b) for a, ax in zip(args, in_axes)]))
                     for b in range(B)])
    np.testing.assert_allclose(np.asarray(got, dtype=float), want.astype(float), rtol=1e-12,
                               atol=1e-12)


def test_every_local_primitive_has_a_batching_rule_and_a_case():
    local = {n for n, p in primitives.items() if p.kind == "local"}
    assert local <= {p.name for p in batch_rules}, sorted(local - {p.name for p in batch_rules})
    assert local <= set(CASES) | set(VIA_GRAD) | NOT_BATCHED, sorted(
        local - set(CASES) - set(VIA_GRAD) - NOT_BATCHED)


@pytest.mark.parametrize("name", sorted(CASES))
def test_vmap_matches_example_by_example(name, rng):
    f, makers, variants = CASES[name]
    for in_axes in variants:
        axes = in_axes if isinstance(in_axes, tuple) else (in_axes,)
        args = []
        for m, ax in zip(makers, axes):
            a = m(rng)
            if ax not in (None, 0):
                a = np.moveaxis(a, 0, ax)
            args.append(a)
        # None: one shared example, the batch taken from the other operands
        args = [a[0] if ax is None else a for a, ax in zip(args, axes)]
        example = [_example(a, ax, 0) for a, ax in zip(args, axes)]
        assert name in fad.trace(f).graph(*example).primitives()     # the case uses it
        _check(f, args, axes)


@pytest.mark.parametrize("name", sorted(VIA_GRAD))
def test_vmap_of_grad_reaches_transposed_primitives(name, rng):
    f, makers, variants = CASES[VIA_GRAD[name]]
    args = [m(rng) for m in makers]
    floats = [k for k, a in enumerate(args) if a.dtype.kind == "f"]

    def loss(*xs):
        return fnp.sum(fnp.sin(f(*xs)))

    g = fad.grad(loss, argnums=floats[0])
    assert name in str(g.graph(*[a[0] for a in args]))
    _check(g, args, tuple(0 for _ in args))


def test_vmap_out_axes_and_errors(rng):
    x = _x(rng, 3)
    got = fad.vmap(lambda v: v * 2.0, out_axes=1)(x)
    np.testing.assert_allclose(got, 2 * x.T)
    got = fad.vmap(lambda v, c: c + 0.0, in_axes=(0, None))(x, np.array(5.0))
    np.testing.assert_allclose(got, np.full(B, 5.0))         # an unbatched output is repeated
    with pytest.raises(fad.BatchingError, match="no argument is batched"):
        fad.vmap(lambda v: v, in_axes=None)(x)
    with pytest.raises(fad.BatchingError, match="batch sizes differ"):
        fad.vmap(lambda a, b: a + b)(x, x[:2])

    @fad.trace
    def communicates(w, X):
        return fad.vmap(lambda r: fad.sum(r))(X)

    with pytest.raises(fad.BatchingError, match="moves values between placements"):
        communicates.graph(np.zeros(3), fad.clients([np.zeros((2, 3))]))


# --------------------------------------------------------------------------- per-example grads

def _logistic(w, x, y):
    z = fnp.dot(x, w)
    return fnp.logaddexp(0.0, z) - y * z


def _np_per_example(w, X, y):
    p = 1.0 / (1.0 + np.exp(-X @ w))
    return (p - y)[:, None] * X


def test_vmap_of_grad_is_per_example_gradients(rng):
    w, X = rng.normal(size=3), rng.normal(size=(6, 3))
    y = (rng.random(6) > 0.5).astype(float)
    got = fad.vmap(fad.grad(_logistic), in_axes=(None, 0, 0))(w, X, y)
    np.testing.assert_allclose(got, _np_per_example(w, X, y), rtol=1e-12)


@fad.trace
def dp_round(w, X, y):
    """One DP-SGD step per client: per-example gradients over the client's own (ragged) rows,
    each clipped to norm 0.5, averaged; the server averages the clients' updates."""
    G = fad.vmap(fad.grad(_logistic), in_axes=(None, 0, 0))(fad.broadcast(w), X, y)
    norms = fnp.sqrt(fnp.sum(G * G, axis=1, keepdims=True))
    clipped = G * fnp.minimum(1.0, 0.5 / norms)
    return w - 0.1 * fad.mean(fnp.mean(clipped, axis=0))


def test_dp_sgd_per_example_clipping_inside_clients(rng):
    sizes = (4, 1, 6)
    w = rng.normal(size=3)
    Xs = [rng.normal(size=(n, 3)) * 3 for n in sizes]
    ys = [(rng.random(n) > 0.5).astype(float) for n in sizes]
    got = dp_round(w, fad.clients(Xs), fad.clients(ys))
    upd = []
    for X, y in zip(Xs, ys):
        G = _np_per_example(w, X, y)
        n = np.linalg.norm(G, axis=1, keepdims=True)
        upd.append(np.mean(G * np.minimum(1.0, 0.5 / n), axis=0))
    np.testing.assert_allclose(got, w - 0.1 * np.mean(upd, axis=0), rtol=1e-12)
    # and the round is differentiable through vmap (grad of a per-example grad), every mode
    loss = fad.trace(lambda w, X, y: fnp.sum(dp_round(w, X, y) ** 2))
    fad.check_grads(loss, (w, fad.clients(Xs), fad.clients(ys)), order=1,
                    modes=("forward", "reverse"))
