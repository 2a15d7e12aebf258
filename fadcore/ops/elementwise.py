"""Elementwise primitives: unary math, binary arithmetic, comparisons, select, convert,
stop_gradient and zeros_like: their reference implementations, JVP and transpose rules, and the
op functions that bind them (declared, with their shape rules, in
:mod:`fadcore.ir.local_primitives`)."""

from __future__ import annotations

import numpy as np

from ..core import Tracer, bind, impl_rules, jvp_rules, transpose_rules
from ..ir.local_primitives import (abs_p, add_p, convert_p, cos_p, div_p, eq_p, exp_p, expm1_p,
                                   ge_p, gt_p, le_p, log1p_p, log_p, logaddexp_p, logistic_p,
                                   lt_p, max_p, min_p, mul_p, ne_p, neg_p, pow_p, select_p,
                                   sign_p, sin_p, sqrt_p, stop_gradient_p, sub_p, tanh_p,
                                   zeros_like_p)
from .rules import (Zero, defjvp, deflinear2, dtype, fit, identity, is_undefined, is_zero,
                    nonlinear, tensor_type, unfit, zeros_like)  # noqa: F401

# --------------------------------------------------------------------------- unary


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))),
                        np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x)))).astype(x.dtype)


def neg(x): return bind(neg_p, x)
def exp(x): return bind(exp_p, x)
def log(x): return bind(log_p, x)
def log1p(x): return bind(log1p_p, x)
def expm1(x): return bind(expm1_p, x)
def sqrt(x): return bind(sqrt_p, x)
def tanh(x): return bind(tanh_p, x)
def logistic(x): return bind(logistic_p, x)
def sin(x): return bind(sin_p, x)
def cos(x): return bind(cos_p, x)
def sign(x): return bind(sign_p, x)
def abs(x): return bind(abs_p, x)  # noqa: A001


def _unary(p, impl, deriv=None) -> None:
    """Register an elementwise unary primitive; ``deriv(x, out)`` is its derivative
    (None: not differentiable, the tangent is zero)."""
    impl_rules[p] = impl
    if deriv is not None:
        defjvp(p, lambda t, out, x: mul(t, deriv(x, out)))


impl_rules[neg_p] = np.negative
jvp_rules[neg_p] = lambda p, t: (neg(p[0]), t[0] if is_zero(t[0]) else neg(t[0]))
transpose_rules[neg_p] = lambda ct, x: [neg(ct)]

_unary(exp_p, np.exp, lambda x, y: y)
_unary(log_p, np.log, lambda x, y: div(1.0, x))
_unary(log1p_p, np.log1p, lambda x, y: div(1.0, add(x, 1.0)))
_unary(expm1_p, np.expm1, lambda x, y: add(y, 1.0))
_unary(sqrt_p, np.sqrt, lambda x, y: div(0.5, y))
_unary(tanh_p, np.tanh, lambda x, y: sub(1.0, mul(y, y)))
_unary(logistic_p, _sigmoid, lambda x, y: mul(y, sub(1.0, y)))
_unary(sin_p, np.sin, lambda x, y: cos(x))
_unary(cos_p, np.cos, lambda x, y: neg(sin(x)))
_unary(sign_p, np.sign)
_unary(abs_p, np.abs, lambda x, y: sign(x))


# --------------------------------------------------------------------------- binary

def _weak(x, y):
    """Python scalars are weakly typed: they take the other operand's dtype (so rules written
    with 2.0 or 1.0 work on float32 values too)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        if not isinstance(y, (int, float)) or isinstance(y, bool):
            x = np.asarray(x, dtype=dtype(y).np)
    if isinstance(y, (int, float)) and not isinstance(y, bool):
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            y = np.asarray(y, dtype=dtype(x).np)
    return x, y


def add(x, y): return bind(add_p, *_weak(x, y))
def sub(x, y): return bind(sub_p, *_weak(x, y))
def mul(x, y): return bind(mul_p, *_weak(x, y))
def div(x, y): return bind(div_p, *_weak(x, y))
def pow(x, y): return bind(pow_p, *_weak(x, y))  # noqa: A001
def maximum(x, y): return bind(max_p, *_weak(x, y))
def minimum(x, y): return bind(min_p, *_weak(x, y))
def logaddexp(x, y): return bind(logaddexp_p, *_weak(x, y))


for _p, _impl in ((add_p, np.add), (sub_p, np.subtract), (mul_p, np.multiply),
                  (div_p, np.divide), (pow_p, np.power), (max_p, np.maximum),
                  (min_p, np.minimum), (logaddexp_p, np.logaddexp)):
    impl_rules[_p] = _impl

deflinear2(add_p, identity, identity)
deflinear2(sub_p, identity, neg)

defjvp(mul_p, lambda tx, out, x, y: mul(tx, y), lambda ty, out, x, y: mul(x, ty))
_mul_jvp_terms = jvp_rules[mul_p]


def _mul_jvp(primals, tangents):
    x, y = primals
    if x is y and not is_zero(tangents[0]):         # x * x: one term, 2 x t
        return mul(x, y), mul(tangents[0], mul(x, 2.0))
    return _mul_jvp_terms(primals, tangents)


def _mul_transpose(ct, x, y):
    if is_undefined(x) and is_undefined(y):
        raise nonlinear("mul")
    if is_undefined(x):
        return [unfit(mul(ct, y), tensor_type(x)), None]
    return [None, unfit(mul(x, ct), tensor_type(y))]


jvp_rules[mul_p] = _mul_jvp
transpose_rules[mul_p] = _mul_transpose

defjvp(div_p, lambda tx, out, x, y: div(tx, y),
       lambda ty, out, x, y: neg(mul(ty, div(out, y))))


def _div_transpose(ct, x, y):
    if is_undefined(y):
        raise nonlinear("div (in its denominator)")
    return [unfit(div(ct, y), tensor_type(x)), None]


transpose_rules[div_p] = _div_transpose


def _safe_log(x):
    """log(x), taken as 0 where x == 0 (d/dy x**y = log(x) x**y there is 0, as in JAX)."""
    return select(eq(x, 0.0), 0.0, log(select(eq(x, 0.0), 1.0, x)))


def _integer_exponent(y):
    """The exponent as a Python int when it is a constant integer (a literal such as the 2 of
    ``x ** 2``, all elements equal), else None."""
    if isinstance(y, Tracer) or is_zero(y):
        return None
    a = np.asarray(y)
    if a.size == 0 or a.dtype.kind not in "fiu":
        return None
    v = a.flat[0]
    if not np.all(a == v) or not np.isfinite(v) or float(v) != int(v):
        return None
    return int(v)


def _pow_dx(tx, out, x, y):
    """d/dx x**y. For a constant integer exponent n it is n x^(n-1) with the exponent a
    constant again (x^1 and x^0 written out), so every higher derivative of ``x ** 2`` or
    ``x ** 3`` at 0 is exact instead of forming 0 * 0^-1 = nan."""
    n = _integer_exponent(y)
    if n == 0:
        return Zero(tensor_type(out))               # x ** 0 = 1: no tangent
    if n == 1:
        return tx
    if n is not None:
        return mul(tx, mul(x, float(n)) if n == 2 else mul(float(n), pow(x, float(n - 1))))
    return mul(tx, mul(y, pow(x, sub(y, 1.0))))


defjvp(pow_p, _pow_dx, lambda ty, out, x, y: mul(ty, mul(_safe_log(x), out)))


def _first_wins(x, y, first: bool):
    """Where the first operand is the max (min) one: 1, 0, or 1/2 at ties (balanced, as JAX)."""
    s = sign(sub(x, y))
    return mul(add(1.0, s), 0.5) if first else mul(sub(1.0, s), 0.5)


defjvp(max_p, lambda tx, out, x, y: mul(tx, _first_wins(x, y, True)),
       lambda ty, out, x, y: mul(ty, sub(1.0, _first_wins(x, y, True))))
defjvp(min_p, lambda tx, out, x, y: mul(tx, _first_wins(x, y, False)),
       lambda ty, out, x, y: mul(ty, sub(1.0, _first_wins(x, y, False))))
defjvp(logaddexp_p, lambda tx, out, x, y: mul(tx, exp(sub(x, out))),
       lambda ty, out, x, y: mul(ty, exp(sub(y, out))))


# --------------------------------------------------------------------------- comparisons, select

for _p, _impl in ((lt_p, np.less), (le_p, np.less_equal), (gt_p, np.greater),
                  (ge_p, np.greater_equal), (eq_p, np.equal), (ne_p, np.not_equal)):
    impl_rules[_p] = _impl


def lt(x, y): return bind(lt_p, *_weak(x, y))
def le(x, y): return bind(le_p, *_weak(x, y))
def gt(x, y): return bind(gt_p, *_weak(x, y))
def ge(x, y): return bind(ge_p, *_weak(x, y))
def eq(x, y): return bind(eq_p, *_weak(x, y))
def ne(x, y): return bind(ne_p, *_weak(x, y))


impl_rules[select_p] = lambda p, x, y: np.where(p, x, y)


def select(pred, x, y):
    return bind(select_p, pred, *_weak(x, y))


def _select_jvp(primals, tangents):
    p, x, y = primals
    _, tx, ty = tangents
    out = select(p, x, y)
    ot = tensor_type(out)
    if is_zero(tx) and is_zero(ty):
        return out, Zero(ot)
    zero = np.zeros((), dtype=ot.dtype.np)
    tx = zero if is_zero(tx) else tx
    ty = zero if is_zero(ty) else ty
    return out, fit(select(p, tx, ty), ot)


def _select_transpose(ct, p, x, y):
    if is_undefined(p):
        raise nonlinear("select (in its condition)")
    zero = np.zeros((), dtype=dtype(ct).np)
    return [None,
            unfit(select(p, ct, zero), tensor_type(x)) if is_undefined(x) else None,
            unfit(select(p, zero, ct), tensor_type(y)) if is_undefined(y) else None]


jvp_rules[select_p] = _select_jvp
transpose_rules[select_p] = _select_transpose


# --------------------------------------------------------------------------- dtype and grads

impl_rules[convert_p] = lambda x, *, dtype: np.asarray(x).astype(dtype.np)


def convert(x, dtype):
    if tensor_type(x).dtype is dtype:
        return x
    return bind(convert_p, x, dtype=dtype)


def _convert_jvp(primals, tangents, *, dtype):
    (x,), (t,) = primals, tangents
    out = convert(x, dtype)
    if is_zero(t) or not dtype.is_float or not tensor_type(x).dtype.is_float:
        return out, Zero(tensor_type(out))
    return out, convert(t, dtype)


jvp_rules[convert_p] = _convert_jvp
transpose_rules[convert_p] = lambda ct, x, *, dtype: [convert(ct, x.type.dtype)]

impl_rules[stop_gradient_p] = lambda x: x


def stop_gradient(x):
    return bind(stop_gradient_p, x)


impl_rules[zeros_like_p] = np.zeros_like
