"""The primitive table.

Each primitive is defined once, and right below it its rules: the shape (or type) rule, the
NumPy reference implementation (``impl_rules``), the JVP rule (``jvp_rules``) and, for linear
primitives, the transpose rule (``transpose_rules``). Rules are written with the small op
functions of this module, so a rule applied to traced values records equations: that is how
the derivative passes rewrite graphs into graphs of the same primitives.

Conventions: ``jvp(primals, tangents, **params) -> (out, tangent_out)``, with :class:`Zero`
for symbolic zero tangents. ``transpose(ct, *args, **params) -> [ct_arg or None]``, where linear
arguments arrive as :class:`UndefinedPrimal` and known ones as values.

Elementwise binary primitives take operands of equal shape or one scalar operand; NumPy-style
broadcasting is done by :mod:`fadcore.numpy` with explicit ``broadcast_in_dim``.
"""

from __future__ import annotations

import numpy as np

from .core import Tracer, bind, impl_rules, jvp_rules, transpose_rules
from .errors import DTypeError, ShapeError
from .ir.primitives import (AGGREGATIONS, Comm, CostClass, Primitive, after_p,  # noqa: F401
                            broadcast_p, mean_p, need_float, need_numeric, num_clients_p,
                            secure_sum_p, sum_p, weighted_mean_p)
from .ir.graph import Literal
from .ir.types import (CLIENTS, SERVER, FederatedType, TensorType, bool_, dtype_of, f64, i64)

# --------------------------------------------------------------------------- helpers


class Zero:
    """A symbolic zero tangent or cotangent of the given type."""

    __slots__ = ("type",)

    def __init__(self, type):
        self.type = type

    def __repr__(self) -> str:
        return f"Zero({self.type})"


class UndefinedPrimal:
    """Marks a linear argument of an equation being transposed."""

    __slots__ = ("type",)

    def __init__(self, type):
        self.type = type

    def __repr__(self) -> str:
        return f"UndefinedPrimal({self.type})"


def is_zero(x) -> bool:
    return isinstance(x, Zero)


def is_undefined(x) -> bool:
    return isinstance(x, UndefinedPrimal)


def tensor_type(x) -> TensorType:
    """Tensor type of a tracer, Zero, UndefinedPrimal, literal or array."""
    t = getattr(x, "type", None)
    if isinstance(t, FederatedType):
        return t.tensor
    if isinstance(t, TensorType):
        return t
    if isinstance(x, Literal):
        return x.type
    arr = np.asarray(x)
    return TensorType(dtype_of(arr.dtype), tuple(arr.shape))


def shape_of(x) -> tuple:
    return tensor_type(x).shape


def dtype(x):
    return tensor_type(x).dtype


def _norm_axes(axes, ndim: int, name: str) -> tuple:
    if isinstance(axes, int):
        axes = (axes,)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ShapeError(f"{name}: axis {a} out of range for a {ndim}-d operand")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ShapeError(f"{name}: repeated axis in {axes}")
    return tuple(sorted(out))


_need_float, _need_numeric = need_float, need_numeric


def _common_shape(name: str, *ts: TensorType) -> tuple:
    """Equal shapes, or scalars beside one common shape."""
    shapes = {t.shape for t in ts if t.shape != ()}
    if len(shapes) > 1:
        raise ShapeError(
            f"{name}: operand shapes {', '.join(str(t) for t in ts)} differ (IR elementwise "
            "ops need equal shapes or scalar operands; fadcore.numpy inserts broadcast_in_dim)")
    return shapes.pop() if shapes else ()


def _same_dtype(name: str, *ts: TensorType):
    dts = {t.dtype for t in ts}
    if len(dts) > 1:
        raise DTypeError(f"{name}: operand dtypes differ: {', '.join(str(t) for t in ts)}")
    return dts.pop()


def zeros_like(x):
    return bind(zeros_like_p, x)


def instantiate(t, primal):
    """A tangent as a value: symbolic zeros become zeros shaped like ``primal``."""
    return zeros_like(primal) if is_zero(t) else t


def _fit(t, out_tensor: TensorType):
    """Broadcast a scalar tangent/cotangent up to the result shape of an elementwise op."""
    if shape_of(t) == out_tensor.shape:
        return t
    return broadcast_in_dim(t, out_tensor.shape, ())


def _unfit(ct, t: TensorType):
    """Transpose of :func:`_fit`: sum a cotangent down to a scalar operand's shape."""
    if shape_of(ct) == t.shape:
        return ct
    return reduce_sum(ct, tuple(range(len(shape_of(ct)))))


def linear_jvp(p: Primitive) -> None:
    """Register the JVP of a primitive linear in its first operand (the others are indices or
    static): the tangent goes through the same primitive."""
    def jvp(primals, tangents, **params):
        out = bind(p, *primals, **params)
        if is_zero(tangents[0]):
            return out, Zero(tensor_type(out))
        return out, bind(p, tangents[0], *primals[1:], **params)
    jvp_rules[p] = jvp


def _add_tangents(a, b):
    if is_zero(a):
        return b
    if is_zero(b):
        return a
    return add(a, b)


# --------------------------------------------------------------------------- elementwise unary

def _unary_shape(name, float_only=True):
    def rule(x: TensorType) -> TensorType:
        (_need_float if float_only else _need_numeric)(name, x)
        return x
    return rule


def _unary(name: str, impl, deriv=None, float_only=True,
           cost=CostClass.TRANSCENDENTAL) -> Primitive:
    """An elementwise unary primitive; ``deriv(x, out)`` is its derivative (None: zero)."""
    p = Primitive(name, shape_rule=_unary_shape(name, float_only), cost=cost,
                  differentiable=deriv is not None)
    impl_rules[p] = impl

    def jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        out = bind(p, x)
        if deriv is None or is_zero(t):
            return out, Zero(tensor_type(out))
        return out, mul(t, deriv(x, out))
    jvp_rules[p] = jvp
    return p


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))),
                        np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x)))).astype(x.dtype)


neg_p = Primitive("neg", shape_rule=_unary_shape("neg", float_only=False))
impl_rules[neg_p] = np.negative
jvp_rules[neg_p] = lambda p, t: (neg(p[0]), t[0] if is_zero(t[0]) else neg(t[0]))
transpose_rules[neg_p] = lambda ct, x: [neg(ct)]

exp_p = _unary("exp", np.exp, lambda x, y: y)
log_p = _unary("log", np.log, lambda x, y: div(1.0, x))
log1p_p = _unary("log1p", np.log1p, lambda x, y: div(1.0, add(x, 1.0)))
expm1_p = _unary("expm1", np.expm1, lambda x, y: add(y, 1.0))
sqrt_p = _unary("sqrt", np.sqrt, lambda x, y: div(0.5, y))
tanh_p = _unary("tanh", np.tanh, lambda x, y: sub(1.0, mul(y, y)))
logistic_p = _unary("logistic", _sigmoid, lambda x, y: mul(y, sub(1.0, y)))
sin_p = _unary("sin", np.sin, lambda x, y: cos(x))
cos_p = _unary("cos", np.cos, lambda x, y: neg(sin(x)))
sign_p = _unary("sign", np.sign, None, float_only=False, cost=CostClass.ELEMENTWISE)
abs_p = _unary("abs", np.abs, lambda x, y: sign(x), float_only=False,
               cost=CostClass.ELEMENTWISE)


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


# --------------------------------------------------------------------------- elementwise binary

def _binary_shape(name, float_only=False, out_dtype=None):
    def rule(x: TensorType, y: TensorType) -> TensorType:
        dt = _same_dtype(name, x, y)
        (_need_float if float_only else _need_numeric)(name, x, y)
        return TensorType(out_dtype or dt, _common_shape(name, x, y))
    return rule


def _binary(name, impl, float_only=False, cost=CostClass.ELEMENTWISE) -> Primitive:
    p = Primitive(name, shape_rule=_binary_shape(name, float_only), cost=cost)
    impl_rules[p] = impl
    return p


add_p = _binary("add", np.add)
sub_p = _binary("sub", np.subtract)
mul_p = _binary("mul", np.multiply)
div_p = _binary("div", np.divide, float_only=True)
pow_p = _binary("pow", np.power, float_only=True, cost=CostClass.TRANSCENDENTAL)
max_p = _binary("max", np.maximum)
min_p = _binary("min", np.minimum)
logaddexp_p = _binary("logaddexp", np.logaddexp, float_only=True,
                      cost=CostClass.TRANSCENDENTAL)


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


def _add_jvp(primals, tangents):
    x, y = primals
    tx, ty = tangents
    out = add(x, y)
    ot = tensor_type(out)
    if is_zero(tx) and is_zero(ty):
        return out, Zero(ot)
    if is_zero(ty):
        return out, _fit(tx, ot)
    if is_zero(tx):
        return out, _fit(ty, ot)
    return out, add(tx, ty)


def _sub_jvp(primals, tangents):
    x, y = primals
    tx, ty = tangents
    out = sub(x, y)
    ot = tensor_type(out)
    if is_zero(tx) and is_zero(ty):
        return out, Zero(ot)
    if is_zero(ty):
        return out, _fit(tx, ot)
    if is_zero(tx):
        return out, _fit(neg(ty), ot)
    return out, sub(tx, ty)


jvp_rules[add_p] = _add_jvp
jvp_rules[sub_p] = _sub_jvp


def _add_transpose(ct, x, y):
    return [_unfit(ct, tensor_type(x)) if is_undefined(x) else None,
            _unfit(ct, tensor_type(y)) if is_undefined(y) else None]


def _sub_transpose(ct, x, y):
    return [_unfit(ct, tensor_type(x)) if is_undefined(x) else None,
            neg(_unfit(ct, tensor_type(y))) if is_undefined(y) else None]


transpose_rules[add_p] = _add_transpose
transpose_rules[sub_p] = _sub_transpose


def _mul_jvp(primals, tangents):
    x, y = primals
    tx, ty = tangents
    out = mul(x, y)
    ot = tensor_type(out)
    if x is y and not is_zero(tx):               # x * x: one term, 2 x t
        return out, mul(tx, mul(x, 2.0))
    t = Zero(ot)
    if not is_zero(tx):
        t = _fit(mul(tx, y), ot)
    if not is_zero(ty):
        t = _add_tangents(t, _fit(mul(x, ty), ot))
    return out, t


def _mul_transpose(ct, x, y):
    if is_undefined(x) and is_undefined(y):
        raise _nonlinear("mul")
    if is_undefined(x):
        return [_unfit(mul(ct, y), tensor_type(x)), None]
    return [None, _unfit(mul(x, ct), tensor_type(y))]


jvp_rules[mul_p] = _mul_jvp
transpose_rules[mul_p] = _mul_transpose


def _div_jvp(primals, tangents):
    x, y = primals
    tx, ty = tangents
    out = div(x, y)
    ot = tensor_type(out)
    t = Zero(ot)
    if not is_zero(tx):
        t = _fit(div(tx, y), ot)
    if not is_zero(ty):
        t = _add_tangents(t, _fit(neg(mul(ty, div(out, y))), ot))
    return out, t


def _div_transpose(ct, x, y):
    if is_undefined(y):
        raise _nonlinear("div (in its denominator)")
    return [_unfit(div(ct, y), tensor_type(x)), None]


jvp_rules[div_p] = _div_jvp
transpose_rules[div_p] = _div_transpose


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


def _pow_jvp(primals, tangents):
    x, y = primals
    tx, ty = tangents
    out = pow(x, y)
    ot = tensor_type(out)
    t = Zero(ot)
    if not is_zero(tx):
        n = _integer_exponent(y)
        if n == 0:
            pass                                    # x ** 0 = 1: no tangent
        elif n == 1:
            t = _fit(tx, ot)
        elif n is not None:
            # n x^(n-1) with the exponent a constant again, so every higher derivative
            # also ends at x^1 and x^0 instead of forming 0 * 0^-1 = nan at x = 0
            dx = mul(x, float(n)) if n == 2 else mul(float(n), pow(x, float(n - 1)))
            t = _fit(mul(tx, dx), ot)
        else:
            t = _fit(mul(tx, mul(y, pow(x, sub(y, 1.0)))), ot)
    if not is_zero(ty):
        # d/dy x**y = log(x) x**y, taken as 0 where x == 0 (as JAX does)
        safe_log = select(eq(x, 0.0), 0.0, log(select(eq(x, 0.0), 1.0, x)))
        t = _add_tangents(t, _fit(mul(ty, mul(safe_log, out)), ot))
    return out, t


jvp_rules[pow_p] = _pow_jvp


def _minmax_jvp(prim, first_wins):
    def jvp(primals, tangents):
        x, y = primals
        tx, ty = tangents
        out = bind(prim, x, y)
        ot = tensor_type(out)
        # balanced at ties, as JAX: each operand gets half of the tangent
        s = sign(sub(x, y))
        wx = mul(add(1.0, s), 0.5) if first_wins else mul(sub(1.0, s), 0.5)
        t = Zero(ot)
        if not is_zero(tx):
            t = _fit(mul(tx, wx), ot)
        if not is_zero(ty):
            t = _add_tangents(t, _fit(mul(ty, sub(1.0, wx)), ot))
        return out, t
    return jvp


jvp_rules[max_p] = _minmax_jvp(max_p, True)
jvp_rules[min_p] = _minmax_jvp(min_p, False)


def _logaddexp_jvp(primals, tangents):
    x, y = primals
    tx, ty = tangents
    out = logaddexp(x, y)
    ot = tensor_type(out)
    t = Zero(ot)
    if not is_zero(tx):
        t = _fit(mul(tx, exp(sub(x, out))), ot)
    if not is_zero(ty):
        t = _add_tangents(t, _fit(mul(ty, exp(sub(y, out))), ot))
    return out, t


jvp_rules[logaddexp_p] = _logaddexp_jvp


def _nonlinear(what):
    from .errors import DifferentiationError
    return DifferentiationError(
        f"transpose of {what}: the equation is not linear in its tangent operands (a JVP rule "
        "produced a non-linear tangent computation; this is a bug in that rule)")


# --------------------------------------------------------------------------- comparisons, select

def _cmp(name, impl):
    p = Primitive(name, shape_rule=_binary_shape(name, out_dtype=bool_), differentiable=False)
    impl_rules[p] = impl
    jvp_rules[p] = lambda primals, tangents: _no_tangent(p, primals)
    return p


def _no_tangent(p, primals, **params):
    out = bind(p, *primals, **params)
    return out, Zero(tensor_type(out))


lt_p = _cmp("lt", np.less)
le_p = _cmp("le", np.less_equal)
gt_p = _cmp("gt", np.greater)
ge_p = _cmp("ge", np.greater_equal)
eq_p = _cmp("eq", np.equal)
ne_p = _cmp("ne", np.not_equal)


def lt(x, y): return bind(lt_p, *_weak(x, y))
def le(x, y): return bind(le_p, *_weak(x, y))
def gt(x, y): return bind(gt_p, *_weak(x, y))
def ge(x, y): return bind(ge_p, *_weak(x, y))
def eq(x, y): return bind(eq_p, *_weak(x, y))
def ne(x, y): return bind(ne_p, *_weak(x, y))


def _select_shape(pred: TensorType, x: TensorType, y: TensorType) -> TensorType:
    if pred.dtype is not bool_:
        raise DTypeError(f"select: the condition must be bool, got {pred}")
    dt = _same_dtype("select", x, y)
    return TensorType(dt, _common_shape("select", pred, x, y))


select_p = Primitive("select", shape_rule=_select_shape)
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
    return out, _fit(select(p, tx, ty), ot)


def _select_transpose(ct, p, x, y):
    if is_undefined(p):
        raise _nonlinear("select (in its condition)")
    zero = np.zeros((), dtype=dtype(ct).np)
    return [None,
            _unfit(select(p, ct, zero), tensor_type(x)) if is_undefined(x) else None,
            _unfit(select(p, zero, ct), tensor_type(y)) if is_undefined(y) else None]


jvp_rules[select_p] = _select_jvp
transpose_rules[select_p] = _select_transpose


# --------------------------------------------------------------------------- dtype and grads

def _convert_shape(x: TensorType, *, dtype) -> TensorType:
    return TensorType(dtype, x.shape)


convert_p = Primitive("convert", shape_rule=_convert_shape)
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

stop_gradient_p = Primitive("stop_gradient", shape_rule=lambda x: x, differentiable=False,
                            alias=True, cost=CostClass.FREE)
impl_rules[stop_gradient_p] = lambda x: x
jvp_rules[stop_gradient_p] = lambda primals, tangents: _no_tangent(stop_gradient_p, primals)


def stop_gradient(x):
    return bind(stop_gradient_p, x)


zeros_like_p = Primitive("zeros_like", shape_rule=lambda x: x, differentiable=False,
                         cost=CostClass.FREE)
impl_rules[zeros_like_p] = np.zeros_like
jvp_rules[zeros_like_p] = lambda primals, tangents: _no_tangent(zeros_like_p, primals)


# --------------------------------------------------------------------------- reductions

def _reduce_shape(name):
    def rule(x: TensorType, *, axes) -> TensorType:
        _need_numeric(name, x)
        if axes != _norm_axes(axes, x.ndim, name):
            raise ShapeError(f"{name}: axes {axes} must be sorted, distinct and non-negative")
        return TensorType(x.dtype, tuple(d for i, d in enumerate(x.shape) if i not in axes))
    return rule


reduce_sum_p = Primitive("reduce_sum", shape_rule=_reduce_shape("reduce_sum"),
                         cost=CostClass.REDUCTION)
impl_rules[reduce_sum_p] = lambda x, *, axes: np.asarray(np.sum(x, axis=axes), dtype=x.dtype)
reduce_max_p = Primitive("reduce_max", shape_rule=_reduce_shape("reduce_max"),
                         cost=CostClass.REDUCTION)
impl_rules[reduce_max_p] = lambda x, *, axes: np.asarray(np.max(x, axis=axes))


def reduce_sum(x, axes):
    axes = _norm_axes(axes, len(shape_of(x)), "reduce_sum")
    return x if not axes else bind(reduce_sum_p, x, axes=axes)


def reduce_max(x, axes):
    axes = _norm_axes(axes, len(shape_of(x)), "reduce_max")
    return x if not axes else bind(reduce_max_p, x, axes=axes)


def _kept_dims(ndim, axes):
    return tuple(i for i in range(ndim) if i not in axes)


def _reduce_sum_transpose(ct, x, *, axes):
    xt = x.type
    return [broadcast_in_dim(ct, xt.shape, _kept_dims(xt.ndim, axes))]


linear_jvp(reduce_sum_p)
transpose_rules[reduce_sum_p] = _reduce_sum_transpose


def _reduce_max_jvp(primals, tangents, *, axes):
    (x,), (t,) = primals, tangents
    out = reduce_max(x, axes)
    if is_zero(t):
        return out, Zero(tensor_type(out))
    xt = tensor_type(x)
    hit = convert(eq(x, broadcast_in_dim(out, xt.shape, _kept_dims(xt.ndim, axes))), xt.dtype)
    return out, div(reduce_sum(mul(t, hit), axes), reduce_sum(hit, axes))


jvp_rules[reduce_max_p] = _reduce_max_jvp


def _argmax_shape(x: TensorType, *, axis) -> TensorType:
    _need_numeric("argmax", x)
    if not 0 <= axis < x.ndim:
        raise ShapeError(f"argmax: axis {axis} out of range for {x}")
    return TensorType(i64, tuple(d for i, d in enumerate(x.shape) if i != axis))


argmax_p = Primitive("argmax", shape_rule=_argmax_shape, differentiable=False,
                     cost=CostClass.REDUCTION)
impl_rules[argmax_p] = lambda x, *, axis: np.asarray(np.argmax(x, axis=axis), dtype=np.int64)
jvp_rules[argmax_p] = lambda p, t, *, axis: _no_tangent(argmax_p, p, axis=axis)


def argmax(x, axis):
    (axis,) = _norm_axes(axis, len(shape_of(x)), "argmax")
    return bind(argmax_p, x, axis=axis)


# --------------------------------------------------------------------------- shapes

def _resolve(shape, rows):
    if isinstance(shape, tuple):
        return tuple(rows if d is None else d for d in shape)
    return rows if shape is None else shape


def _bid_shape(x: TensorType, *, shape, dims) -> TensorType:
    if len(dims) != x.ndim or any(b <= a for a, b in zip(dims, dims[1:])):
        raise ShapeError(f"broadcast_in_dim: dims {dims} do not map a {x.ndim}-d operand")
    for i, d in enumerate(dims):
        if not 0 <= d < len(shape) or (x.shape[i] != 1 and x.shape[i] != shape[d]):
            raise ShapeError(f"broadcast_in_dim: cannot broadcast {x} to [{shape}] "
                             f"(operand axis {i} -> {d})")
    return TensorType(x.dtype, tuple(shape))


broadcast_in_dim_p = Primitive("broadcast_in_dim", shape_rule=_bid_shape, shape_params=("shape",))


def _bid_impl(x, *, shape, dims):
    x = np.asarray(x)
    expanded = x.reshape(tuple(x.shape[dims.index(i)] if i in dims else 1
                               for i in range(len(shape))))
    return np.broadcast_to(expanded, shape).copy()


impl_rules[broadcast_in_dim_p] = _bid_impl


def broadcast_in_dim(x, shape, dims):
    shape = tuple(shape)
    dims = tuple(dims)
    if shape_of(x) == shape and dims == tuple(range(len(shape))):
        return x
    return bind(broadcast_in_dim_p, x, shape=shape, dims=dims)


def _bid_transpose(ct, x, *, shape, dims):
    xt = x.type
    new = tuple(i for i in range(len(shape)) if i not in dims)
    stretched = tuple(d for i, d in enumerate(dims) if xt.shape[i] == 1 and shape[d] != 1)
    summed = reduce_sum(ct, tuple(sorted(new + stretched)))
    return [reshape(summed, xt.shape)]


linear_jvp(broadcast_in_dim_p)
transpose_rules[broadcast_in_dim_p] = _bid_transpose


def _static_size(shape):
    n = 1
    for d in shape:
        if d is not None:
            n *= d
    return n


def _reshape_shape(x: TensorType, *, shape) -> TensorType:
    if (x.shape.count(None) != shape.count(None)
            or _static_size(x.shape) != _static_size(shape)):
        raise ShapeError(f"reshape: cannot reshape {x} to [{','.join('?' if d is None else str(d) for d in shape)}]"
                         " (the static sizes must agree and the ragged dimensions (?) be kept)")
    return TensorType(x.dtype, tuple(shape))


reshape_p = Primitive("reshape", shape_rule=_reshape_shape, shape_params=("shape",),
                      alias=True, cost=CostClass.FREE)
impl_rules[reshape_p] = lambda x, *, shape: np.reshape(x, shape)


def reshape(x, shape):
    shape = tuple(shape)
    if shape_of(x) == shape:
        return x
    return bind(reshape_p, x, shape=shape)


linear_jvp(reshape_p)
transpose_rules[reshape_p] = lambda ct, x, *, shape: [reshape(ct, x.type.shape)]


def _transpose_shape(x: TensorType, *, perm) -> TensorType:
    if sorted(perm) != list(range(x.ndim)):
        raise ShapeError(f"transpose: {perm} is not a permutation of the axes of {x}")
    return TensorType(x.dtype, tuple(x.shape[i] for i in perm))


transpose_p = Primitive("transpose", shape_rule=_transpose_shape)
impl_rules[transpose_p] = lambda x, *, perm: np.ascontiguousarray(np.transpose(x, perm))


def transpose(x, perm):
    perm = tuple(perm)
    if perm == tuple(range(len(perm))):
        return x
    return bind(transpose_p, x, perm=perm)


linear_jvp(transpose_p)
transpose_rules[transpose_p] = lambda ct, x, *, perm: [transpose(ct, tuple(np.argsort(perm).tolist()))]


# --------------------------------------------------------------------------- products

def _contract(name, a, b, ka, kb):
    da, db = a.shape[ka], b.shape[kb]
    if da != db:
        raise ShapeError(f"{name}: contracted dimensions differ: {a} and {b}")
    _need_float(name, a, b)
    return _same_dtype(name, a, b)


def _matmul_shape(a, b):
    if a.ndim != 2 or b.ndim != 2:
        raise ShapeError(f"matmul: needs 2-d operands, got {a} and {b}")
    return TensorType(_contract("matmul", a, b, 1, 0), (a.shape[0], b.shape[1]))


def _matvec_shape(a, x):
    if a.ndim != 2 or x.ndim != 1:
        raise ShapeError(f"matvec: needs a 2-d and a 1-d operand, got {a} and {x}")
    return TensorType(_contract("matvec", a, x, 1, 0), (a.shape[0],))


def _vecmat_shape(x, a):
    if x.ndim != 1 or a.ndim != 2:
        raise ShapeError(f"vecmat: needs a 1-d and a 2-d operand, got {x} and {a}")
    return TensorType(_contract("vecmat", x, a, 0, 0), (a.shape[1],))


def _vdot_shape(a, b):
    if a.ndim != 1 or b.ndim != 1:
        raise ShapeError(f"vdot: needs 1-d operands, got {a} and {b}")
    return TensorType(_contract("vdot", a, b, 0, 0), ())


def _outer_shape(a, b):
    if a.ndim != 1 or b.ndim != 1:
        raise ShapeError(f"outer: needs 1-d operands, got {a} and {b}")
    _need_float("outer", a, b)
    return TensorType(_same_dtype("outer", a, b), (a.shape[0], b.shape[0]))


matmul_p = Primitive("matmul", shape_rule=_matmul_shape, cost=CostClass.CONTRACTION)
matvec_p = Primitive("matvec", shape_rule=_matvec_shape, cost=CostClass.CONTRACTION)
vecmat_p = Primitive("vecmat", shape_rule=_vecmat_shape, cost=CostClass.CONTRACTION)
vdot_p = Primitive("vdot", shape_rule=_vdot_shape, cost=CostClass.CONTRACTION)
outer_p = Primitive("outer", shape_rule=_outer_shape)
for _p in (matmul_p, matvec_p, vecmat_p, vdot_p):
    impl_rules[_p] = lambda a, b: np.asarray(np.dot(a, b))
impl_rules[outer_p] = np.outer


def matmul(a, b): return bind(matmul_p, a, b)
def matvec(a, x): return bind(matvec_p, a, x)
def vecmat(x, a): return bind(vecmat_p, x, a)
def vdot(a, b): return bind(vdot_p, a, b)
def outer(a, b): return bind(outer_p, a, b)


def _bilinear(p, transpose_a, transpose_b):
    def jvp(primals, tangents):
        a, b = primals
        ta, tb = tangents
        out = bind(p, a, b)
        t = Zero(tensor_type(out))
        if not is_zero(ta):
            t = bind(p, ta, b)
        if not is_zero(tb):
            t = _add_tangents(t, bind(p, a, tb))
        return out, t

    def transpose(ct, a, b):
        if is_undefined(a) and is_undefined(b):
            raise _nonlinear(p.name)
        if is_undefined(a):
            return [transpose_a(ct, b), None]
        return [None, transpose_b(ct, a)]

    jvp_rules[p] = jvp
    transpose_rules[p] = transpose


_bilinear(matmul_p, lambda ct, b: matmul(ct, transpose(b, (1, 0))),
          lambda ct, a: matmul(transpose(a, (1, 0)), ct))
_bilinear(matvec_p, lambda ct, x: outer(ct, x), lambda ct, a: vecmat(ct, a))
_bilinear(vecmat_p, lambda ct, a: matvec(a, ct), lambda ct, x: outer(x, ct))
_bilinear(vdot_p, lambda ct, b: mul(b, ct), lambda ct, a: mul(a, ct))
_bilinear(outer_p, lambda ct, b: matvec(ct, b), lambda ct, a: vecmat(a, ct))


# --------------------------------------------------------------------------- slicing

def _slice_shape(x: TensorType, *, starts, limits, strides) -> TensorType:
    if not len(starts) == len(limits) == len(strides) == x.ndim:
        raise ShapeError(f"slice: needs one start/limit/stride per axis of {x}")
    out = []
    for d, s, l, k in zip(x.shape, starts, limits, strides):
        if d is None:
            if (s, l, k) != (0, None, 1):
                raise ShapeError(f"slice: a ragged dimension (?) of {x} can only be taken whole")
            out.append(None)
        else:
            if not (0 <= s <= l <= d and k >= 1):
                raise ShapeError(f"slice: [{s}:{l}:{k}] out of range for a dimension of {d}")
            out.append(len(range(s, l, k)))
    return TensorType(x.dtype, tuple(out))


slice_p = Primitive("slice", shape_rule=_slice_shape)
impl_rules[slice_p] = lambda x, *, starts, limits, strides: np.ascontiguousarray(
    x[tuple(slice(s, l, k) for s, l, k in zip(starts, limits, strides))])


def slice_(x, starts, limits, strides):
    starts, limits, strides = tuple(starts), tuple(limits), tuple(strides)
    xt = tensor_type(x)
    if all((s, l, k) in ((0, d, 1), (0, None, 1)) for s, l, k, d in
           zip(starts, limits, strides, xt.shape)):
        return x
    return bind(slice_p, x, starts=starts, limits=limits, strides=strides)


def _pad_shape(ct: TensorType, *, shape, starts, limits, strides) -> TensorType:
    want = _slice_shape(TensorType(ct.dtype, tuple(shape)), starts=starts, limits=limits,
                        strides=strides)
    if want.shape != ct.shape:
        raise ShapeError(f"pad: operand {ct} does not fit slice of [{shape}]")
    return TensorType(ct.dtype, tuple(shape))


pad_p = Primitive("pad", shape_rule=_pad_shape, shape_params=("shape",))


def _pad_impl(ct, *, shape, starts, limits, strides):
    out = np.zeros(shape, dtype=np.asarray(ct).dtype)
    out[tuple(slice(s, l, k) for s, l, k in zip(starts, limits, strides))] = ct
    return out


impl_rules[pad_p] = _pad_impl


def pad(ct, shape, starts, limits, strides):
    return bind(pad_p, ct, shape=tuple(shape), starts=tuple(starts), limits=tuple(limits),
                strides=tuple(strides))


linear_jvp(slice_p)
transpose_rules[slice_p] = lambda ct, x, **kw: [pad(ct, x.type.shape, **kw)]
linear_jvp(pad_p)
transpose_rules[pad_p] = lambda ct, x, *, shape, **kw: [slice_(ct, **kw)]


def _concat_shape(*xs: TensorType, axis) -> TensorType:
    if not xs:
        raise ShapeError("concatenate: needs at least one operand")
    dt = _same_dtype("concatenate", *xs)
    nd = xs[0].ndim
    if any(x.ndim != nd for x in xs) or not 0 <= axis < nd:
        raise ShapeError(f"concatenate: operands {', '.join(map(str, xs))} along axis {axis}")
    for x in xs:
        if x.shape[axis] is None:
            raise ShapeError(f"concatenate: cannot join along a ragged dimension (?) of {x}")
        if any(x.shape[i] != xs[0].shape[i] for i in range(nd) if i != axis):
            raise ShapeError(f"concatenate: shapes {', '.join(map(str, xs))} differ off axis {axis}")
    shape = list(xs[0].shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    return TensorType(dt, tuple(shape))


concatenate_p = Primitive("concatenate", shape_rule=_concat_shape)
impl_rules[concatenate_p] = lambda *xs, axis: np.concatenate(xs, axis=axis)


def concatenate(xs, axis):
    xs = list(xs)
    return xs[0] if len(xs) == 1 else bind(concatenate_p, *xs, axis=axis)


def _concat_jvp(primals, tangents, *, axis):
    out = concatenate(primals, axis)
    if all(is_zero(t) for t in tangents):
        return out, Zero(tensor_type(out))
    return out, concatenate([instantiate(t, p) for p, t in zip(primals, tangents)], axis)


def _concat_transpose(ct, *xs, axis):
    cts, start = [], 0
    ctt = tensor_type(ct)
    for x in xs:
        xt = tensor_type(x)
        n = xt.shape[axis]
        if is_undefined(x):
            starts = tuple(start if i == axis else 0 for i in range(ctt.ndim))
            limits = tuple(start + n if i == axis else d for i, d in enumerate(ctt.shape))
            cts.append(slice_(ct, starts, limits, (1,) * ctt.ndim))
        else:
            cts.append(None)
        start += n
    return cts


jvp_rules[concatenate_p] = _concat_jvp
transpose_rules[concatenate_p] = _concat_transpose


# --------------------------------------------------------------------------- gathers

def _need_int(name, t):
    if not t.dtype.is_int:
        raise DTypeError(f"{name}: indices must be integers, got {t}")


def _take_shape(x: TensorType, idx: TensorType, *, axis) -> TensorType:
    _need_int("take", idx)
    if not 0 <= axis < x.ndim:
        raise ShapeError(f"take: axis {axis} out of range for {x}")
    return TensorType(x.dtype, x.shape[:axis] + idx.shape + x.shape[axis + 1:])


take_p = Primitive("take", shape_rule=_take_shape)
impl_rules[take_p] = lambda x, idx, *, axis: np.take(x, idx, axis=axis)


def _untake_shape(ct: TensorType, idx: TensorType, *, axis, dim) -> TensorType:
    _need_int("untake", idx)
    k = idx.ndim
    if not 0 <= axis <= ct.ndim - k or ct.shape[axis:axis + k] != idx.shape:
        raise ShapeError(f"untake: {ct} does not fit indices {idx} at axis {axis}")
    return TensorType(ct.dtype, ct.shape[:axis] + (dim,) + ct.shape[axis + k:])


untake_p = Primitive("untake", shape_rule=_untake_shape, shape_params=("dim",))


def _untake_impl(ct, idx, *, axis, dim):
    ct = np.asarray(ct)
    k = np.ndim(idx)
    out = np.zeros(ct.shape[:axis] + (dim,) + ct.shape[axis + k:], dtype=ct.dtype)
    moved = np.moveaxis(out, axis, 0)
    # the indexed axes flattened (spelled out: -1 is ambiguous when another axis is 0)
    ctm = ct.reshape(ct.shape[:axis] + (int(np.size(idx)),) + ct.shape[axis + k:])
    np.add.at(moved, np.ravel(idx), np.moveaxis(ctm, axis, 0))
    return out


impl_rules[untake_p] = _untake_impl


def take(x, idx, axis):
    return bind(take_p, x, idx, axis=axis)


def untake(ct, idx, axis, dim):
    return bind(untake_p, ct, idx, axis=axis, dim=dim)


linear_jvp(take_p)
transpose_rules[take_p] = lambda ct, x, idx, *, axis: [
    untake(ct, idx, axis, x.type.shape[axis]), None]
linear_jvp(untake_p)
transpose_rules[untake_p] = lambda ct, c, idx, *, axis, dim: [take(ct, idx, axis), None]


def _tala_shape(x: TensorType, idx: TensorType, *, axis) -> TensorType:
    _need_int("take_along_axis", idx)
    if idx.ndim != x.ndim or not 0 <= axis < x.ndim or any(
            idx.shape[i] != x.shape[i] for i in range(x.ndim) if i != axis):
        raise ShapeError(f"take_along_axis: indices {idx} do not fit {x} along axis {axis}")
    return TensorType(x.dtype, idx.shape)


take_along_axis_p = Primitive("take_along_axis", shape_rule=_tala_shape)
impl_rules[take_along_axis_p] = lambda x, idx, *, axis: np.take_along_axis(x, idx, axis=axis)


def _untala_shape(ct: TensorType, idx: TensorType, *, axis, dim) -> TensorType:
    _need_int("untake_along_axis", idx)
    if ct.shape != idx.shape or not 0 <= axis < ct.ndim:
        raise ShapeError(f"untake_along_axis: {ct} does not fit indices {idx} along axis {axis}")
    return TensorType(ct.dtype, ct.shape[:axis] + (dim,) + ct.shape[axis + 1:])


untake_along_axis_p = Primitive("untake_along_axis", shape_rule=_untala_shape,
                                shape_params=("dim",))


def _untala_impl(ct, idx, *, axis, dim):
    ct = np.asarray(ct)
    out = np.zeros(ct.shape[:axis] + (dim,) + ct.shape[axis + 1:], dtype=ct.dtype)
    # accumulate (indices may repeat): loop over the index axis positions
    for j in range(idx.shape[axis]):
        sl = [slice(None)] * ct.ndim
        sl[axis] = slice(j, j + 1)
        np.put_along_axis(out, idx[tuple(sl)],
                          np.take_along_axis(out, idx[tuple(sl)], axis=axis) + ct[tuple(sl)],
                          axis=axis)
    return out


impl_rules[untake_along_axis_p] = _untala_impl


def take_along_axis(x, idx, axis):
    return bind(take_along_axis_p, x, idx, axis=axis)


def untake_along_axis(ct, idx, axis, dim):
    return bind(untake_along_axis_p, ct, idx, axis=axis, dim=dim)


linear_jvp(take_along_axis_p)
transpose_rules[take_along_axis_p] = lambda ct, x, idx, *, axis: [
    untake_along_axis(ct, idx, axis, x.type.shape[axis]), None]
linear_jvp(untake_along_axis_p)
transpose_rules[untake_along_axis_p] = lambda ct, c, idx, *, axis, dim: [
    take_along_axis(ct, idx, axis), None]


def _one_hot_shape(labels: TensorType, *, depth, dtype) -> TensorType:
    _need_int("one_hot", labels)
    return TensorType(dtype, labels.shape + (depth,))


one_hot_p = Primitive("one_hot", shape_rule=_one_hot_shape, differentiable=False)
impl_rules[one_hot_p] = lambda l, *, depth, dtype: (
    np.asarray(l)[..., None] == np.arange(depth)).astype(dtype.np)
jvp_rules[one_hot_p] = lambda p, t, **kw: _no_tangent(one_hot_p, p, **kw)


# --------------------------------------------------------------------------- row counts

def _rows_shape(x: TensorType, *, axis) -> TensorType:
    if not 0 <= axis < x.ndim or x.shape[axis] is not None:
        raise ShapeError(f"rows: axis {axis} of {x} is not ragged")
    return TensorType(f64, ())


rows_p = Primitive("rows", shape_rule=_rows_shape, differentiable=False, cost=CostClass.FREE)
impl_rules[rows_p] = lambda x, *, axis: np.asarray(float(np.shape(x)[axis]))
jvp_rules[rows_p] = lambda p, t, *, axis: _no_tangent(rows_p, p, axis=axis)


def rows(x):
    """The client's row count (f64 scalar), from a ragged client value."""
    return bind(rows_p, x, axis=shape_of(x).index(None))


# --------------------------------------------------------------------------- federated primitives

def atom_type(a) -> FederatedType:
    from .ir.graph import atom_type as _at
    return _at(a)


# declared, with their type rules and communication kinds, in fadcore.ir.primitives


def broadcast(x): return bind(broadcast_p, x)
def fsum(x): return bind(sum_p, x)
def fmean(x): return bind(mean_p, x)
def secure_sum(x): return bind(secure_sum_p, x)
def weighted_mean(x, w): return bind(weighted_mean_p, x, w)
def num_clients(): return bind(num_clients_p)


def after(x, token):
    """``x``, available only once ``token`` is: a scheduling edge that fixes rounds."""
    return bind(after_p, x, token)


# the aggregation used for transposed broadcasts; set by the reverse pass (closure rule)
transpose_aggregation: list = [sum_p]


for _p in (broadcast_p, sum_p, mean_p, secure_sum_p):
    linear_jvp(_p)

transpose_rules[broadcast_p] = lambda ct, x: [bind(transpose_aggregation[-1], ct)]
transpose_rules[sum_p] = lambda ct, x: [broadcast(ct)]
transpose_rules[secure_sum_p] = lambda ct, x: [broadcast(ct)]
transpose_rules[mean_p] = lambda ct, x: [
    broadcast(div(ct, convert(num_clients(), dtype(ct))))]
jvp_rules[num_clients_p] = lambda p, t: _no_tangent(num_clients_p, p)


def _weighted_mean_jvp(primals, tangents):
    x, w = primals
    tx, tw = tangents
    out = weighted_mean(x, w)
    t = Zero(tensor_type(out))
    if not is_zero(tx):
        t = weighted_mean(tx, w)
    if not is_zero(tw):
        # d s = (sum(dw x) - s sum(dw)) / sum(w): same round, aggregations only
        t = _add_tangents(t, div(sub(fsum(mul(x, tw)), mul(out, fsum(tw))), fsum(w)))
    return out, t


def _weighted_mean_transpose(ct, x, w):
    if is_undefined(w):
        raise _nonlinear("weighted_mean (in its weights)")
    return [mul(broadcast(div(ct, fsum(w))), w), None]


jvp_rules[weighted_mean_p] = _weighted_mean_jvp
transpose_rules[weighted_mean_p] = _weighted_mean_transpose


linear_jvp(after_p)          # the tangent waits for the same token
transpose_rules[after_p] = lambda ct, x, token: [ct, None]
