"""``fad.check_grads``: one gradient checker for every mode, placement-aware.

JVPs are checked against central differences in a random direction; VJPs by the inner-product
identity ``<u, J v> = <Jᵀ u, v>`` with ``J v`` from central differences (independent of
fadcore's own forward mode). Directions and cotangents live where their values live: client
arguments get per-client random directions with each client's own shape (ragged rows
included). ``order=2`` checks the derivative functions themselves, which exercises grad of
grad through the derivative graphs.
"""

from __future__ import annotations

import numpy as np

from .. import pytree
from ..values import ClientValues

__all__ = ["check_grads", "check_jvp", "check_vjp", "numerical_jvp"]


# --------------------------------------------------------------------------- vector spaces

def _is_float_leaf(x) -> bool:
    if isinstance(x, ClientValues):
        return x.dtype.kind == "f"
    return np.asarray(x).dtype.kind == "f"


def _random_like(x, rng):
    if isinstance(x, ClientValues):
        return ClientValues([rng.standard_normal(m.shape).astype(m.dtype) for m in x.members])
    a = np.asarray(x)
    return rng.standard_normal(a.shape).astype(a.dtype)


def _axpy(a, x, y):
    """a * x + y, for matching leaves (x may be None: y unchanged)."""
    if x is None:
        return y
    if isinstance(y, ClientValues):
        return ClientValues([a * xm + ym for xm, ym in zip(x.members, y.members, strict=True)])
    return a * np.asarray(x) + np.asarray(y)


def _vdot(x, y) -> float:
    if x is None or y is None:
        return 0.0
    if isinstance(x, ClientValues) or isinstance(y, ClientValues):
        xs = x.members if isinstance(x, ClientValues) else [x] * len(y)
        ys = y.members if isinstance(y, ClientValues) else [y] * len(x)
        return float(sum(np.vdot(np.asarray(a, np.float64), np.asarray(b, np.float64))
                         for a, b in zip(xs, ys, strict=True)))
    return float(np.vdot(np.asarray(x, np.float64), np.asarray(y, np.float64)))


def _flat(x) -> np.ndarray:
    if isinstance(x, ClientValues):
        return np.concatenate([np.ravel(m).astype(np.float64) for m in x.members]) \
            if len(x) else np.zeros(0)
    return np.ravel(np.asarray(x, np.float64))


def _tangents_for(args, rng, fixed):
    """One random tangent per argument; None for held-fixed or non-float arguments."""
    out = []
    for i, a in enumerate(args):
        leaves, tree = pytree.flatten(a)
        if i in fixed or not leaves or not all(_is_float_leaf(x) for x in leaves):
            out.append(None)
        else:
            out.append(pytree.unflatten(tree, [_random_like(x, rng) for x in leaves]))
    return tuple(out)


def _shift(args, tangents, eps):
    out = []
    for a, t in zip(args, tangents):
        if t is None:
            out.append(a)
            continue
        la, tree = pytree.flatten(a)
        lt, _ = pytree.flatten(t)
        out.append(pytree.unflatten(tree, [_axpy(eps, x, y) for x, y in zip(lt, la)]))
    return tuple(out)


def _tree_vdot(x, y) -> float:
    lx, _ = pytree.flatten(x)
    ly, _ = pytree.flatten(y)
    return sum(_vdot(a, b) for a, b in zip(lx, ly, strict=True))


def numerical_jvp(f, args, tangents, eps: float):
    """Central difference ``(f(x + eps v) - f(x - eps v)) / 2 eps`` for every output leaf."""
    hi = pytree.flatten(f(*_shift(args, tangents, eps)))[0]
    lo = pytree.flatten(f(*_shift(args, tangents, -eps)))[0]
    return [(_flat(a) - _flat(b)) / (2 * eps) for a, b in zip(hi, lo, strict=True)]


def _close(name, got, want, atol, rtol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    if not err <= atol * scale + rtol * scale:
        raise AssertionError(
            f"{name}: max abs error {err:.3e} exceeds tolerance {atol * scale + rtol * scale:.3e}"
            f"\n  got      {np.array2string(got.ravel()[:8], precision=8)}"
            f"\n  expected {np.array2string(want.ravel()[:8], precision=8)}")


# --------------------------------------------------------------------------- checks

def check_jvp(f, args, *, eps=1e-6, atol=1e-6, rtol=1e-5, seed=0, fixed=()):
    """Forward mode: ``fad.jvp`` against central differences in a random direction."""
    from ..api import jvp
    rng = np.random.default_rng(seed)
    tangents = _tangents_for(args, rng, set(fixed))
    _, tout = jvp(f, args, tangents)
    want = numerical_jvp(f, args, tangents, eps)
    got = [_flat(t) for t in pytree.flatten(tout)[0]]
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        _close(f"JVP of {_name(f)} (output leaf {k})", g, w, atol, rtol)


def check_vjp(f, args, *, mode="reverse", eps=1e-6, atol=1e-6, rtol=1e-5, seed=0, fixed=()):
    """Reverse-type modes: ``<u, J v> = <Jᵀ u, v>`` with ``J v`` from central differences."""
    from ..api import vjp
    rng = np.random.default_rng(seed + 1)
    tangents = _tangents_for(args, rng, set(fixed))
    out, pullback = vjp(f, *args, mode=mode)
    leaves, tree = pytree.flatten(out)
    u = pytree.unflatten(tree, [_random_like(x, rng) for x in leaves])
    cts = pullback(u)
    lhs = sum(_vdot(_ravel_like(a), b) for a, b in
              zip(pytree.flatten(u)[0], numerical_jvp(f, args, tangents, eps), strict=True))
    rhs = 0.0
    for t, c in zip(tangents, cts):
        if t is not None and c is not None:
            rhs += _tree_vdot(t, c)
    _close(f"VJP of {_name(f)} ({mode}): <u, Jv> vs <J^T u, v>", rhs, lhs, atol, rtol)


def _ravel_like(x):
    return _flat(x)


def _name(f) -> str:
    return getattr(f, "__name__", "f")


def check_grads(f, args, order: int = 1, modes=("forward", "reverse"), *, eps=1e-6,
                atol=1e-6, rtol=1e-5, seed=0, fixed=()):
    """Check ``f``'s derivatives at ``args`` in every mode of ``modes`` up to ``order``.

    ``modes`` may contain "forward", "reverse", "mixed" and "auto". Arguments whose leaves are
    not all floating point, and the indices in ``fixed``, are held fixed (e.g. labels, client
    data). Raises AssertionError with the measured error on failure."""
    from ..api import jvp, vjp
    from ..tracing import trace
    args = tuple(args)
    fixed = set(fixed)
    for m in modes:
        if m == "forward":
            check_jvp(f, args, eps=eps, atol=atol, rtol=rtol, seed=seed, fixed=fixed)
        elif m in ("reverse", "mixed", "auto"):
            check_vjp(f, args, mode=m, eps=eps, atol=atol, rtol=rtol, seed=seed, fixed=fixed)
        else:
            raise ValueError(f"unknown mode {m!r}")
    if order <= 1:
        return
    rng = np.random.default_rng(seed + 2)
    tangents = _tangents_for(args, rng, fixed)
    n = len(args)
    # the derivative functions, with the direction / cotangent passed as held-fixed arguments
    if "forward" in modes:
        @trace(name=f"jvp_{_name(f)}")
        def f_jvp(*a):
            return jvp(f, a[:n], a[n:])[1]
        check_grads(f_jvp, args + tangents, order - 1, ("forward",), eps=eps, atol=atol * 10,
                    rtol=rtol * 10, seed=seed + 3, fixed=fixed | set(range(n, 2 * n)))
    for m in modes:
        if m == "forward":
            continue
        out = f(*args)
        leaves, tree = pytree.flatten(out)
        u = pytree.unflatten(tree, [_random_like(x, rng) for x in leaves])

        @trace(name=f"vjp_{_name(f)}")
        def f_vjp(*a, _m=m):
            res = vjp(f, *a[:n], mode=_m)[1](a[n])
            return tuple(r for r, t in zip(res, tangents) if t is not None)
        check_grads(f_vjp, args + (u,), order - 1, (m,), eps=eps, atol=atol * 10,
                    rtol=rtol * 10, seed=seed + 4, fixed=fixed | {n})
