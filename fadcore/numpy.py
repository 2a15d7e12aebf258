"""``fadcore.numpy``: the NumPy-like local ops of traced programs.

Functions follow NumPy's semantics (broadcasting, type promotion with Python scalars taking the
array's dtype, ``axis``/``keepdims``) and lower to the primitives of :mod:`fadcore.ops`,
inserting ``broadcast_in_dim`` and ``convert`` where NumPy would broadcast or promote. They run
where their operands live: on the server, or on every client. Outside a trace they evaluate
eagerly on NumPy arrays.
"""

from __future__ import annotations

import builtins

import numpy as np

from . import ops
from .core import Tracer, check_placements, to_literal, user_source
from .errors import ShapeError
from .ir.types import DType, TensorType, bool_, dtype_of, f32, f64, i32, i64

float64, float32, int64, int32 = f64, f32, i64, i32
bool = bool_  # noqa: A001

__all__ = [
    "add", "subtract", "multiply", "divide", "true_divide", "negative", "power", "square",
    "exp", "log", "log1p", "expm1", "sqrt", "tanh", "sigmoid", "relu", "abs", "sign", "sin",
    "cos", "maximum", "minimum", "where", "clip", "less", "less_equal", "greater",
    "greater_equal", "equal", "not_equal", "sum", "mean", "max", "min", "argmax", "logaddexp",
    "softplus", "dot", "matmul", "reshape", "transpose", "expand_dims", "squeeze",
    "broadcast_to", "concatenate", "stack", "take", "take_along_axis", "one_hot", "logsumexp",
    "softmax", "log_softmax", "zeros_like", "ones_like", "astype", "stop_gradient", "outer",
    "float64", "float32", "int64", "int32", "shape", "ndim", "size",
]


# --------------------------------------------------------------------------- operand handling

def _is_weak(x) -> bool:
    return isinstance(x, (builtins.int, builtins.float)) and not isinstance(x, builtins.bool)


def _type(x) -> TensorType:
    return ops.tensor_type(x)


def _as_dtype(d) -> DType:
    return d if isinstance(d, DType) else dtype_of(np.dtype(d))


def _cast(x, dt: DType):
    if isinstance(x, Tracer):
        return ops.convert(x, dt)
    return np.asarray(to_literal(x).value, dtype=dt.np)   # refuses client values, objects


def _result_dtype(xs) -> DType:
    strong = [_type(x).dtype for x in xs if not _is_weak(x)]
    if not strong:
        return f64 if builtins.any(isinstance(x, builtins.float) for x in xs) else i64
    dt = strong[0]
    for d in strong[1:]:
        dt = dtype_of(np.promote_types(dt.np, d.np))
    if not dt.is_float and builtins.any(isinstance(x, builtins.float) for x in xs):
        dt = f64
    return dt


def _promote(*xs, floating=False):
    dt = _result_dtype(xs)
    if floating and not dt.is_float:
        dt = f64
    return [_cast(x, dt) for x in xs]


def broadcast_shapes(*shapes) -> tuple:
    nd = builtins.max(len(s) for s in shapes)
    out = []
    for i in range(nd):
        dims = {s[i - nd + len(s)] for s in shapes if i - nd + len(s) >= 0}
        dims.discard(1)
        if len(dims) > 1:
            raise ShapeError(
                "operands could not be broadcast together with shapes "
                + " ".join("[" + ",".join("?" if d is None else str(d) for d in s) + "]"
                           for s in shapes)
                + (" (a ragged ? dimension, a client's row count, only broadcasts with 1 or ?: "
                   "align the row axes, e.g. y[:, None]; per-row data whose clients happen to "
                   "agree on their sizes is typed ? with fad.clients(..., ragged=True))"
                   if None in dims else ""))
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _broadcast_to_shape(x, shape):
    xs = _type(x).shape
    if xs == shape or xs == ():
        return x
    nd = len(shape)
    dims = tuple(range(nd - len(xs), nd))
    return ops.broadcast_in_dim(x, shape, dims)


def _elementwise(*xs, floating=False, name="elementwise"):
    check_placements(name, [x.type for x in xs if isinstance(x, Tracer)], user_source())
    xs = _promote(*xs, floating=floating)
    shape = broadcast_shapes(*[_type(x).shape for x in xs])
    return [_broadcast_to_shape(x, shape) for x in xs]


def _binary(op, floating=False):
    def f(x, y):
        return op(*_elementwise(x, y, floating=floating, name=op.__name__))
    f.__name__ = op.__name__
    return f


def _unary(op):
    def f(x):
        (x,) = _promote(x, floating=True)
        return op(x)
    f.__name__ = op.__name__
    return f


# --------------------------------------------------------------------------- elementwise

add = _binary(ops.add)
subtract = _binary(ops.sub)
multiply = _binary(ops.mul)
divide = true_divide = _binary(ops.div, floating=True)
power = _binary(ops.pow, floating=True)
maximum = _binary(ops.maximum)
minimum = _binary(ops.minimum)
logaddexp = _binary(ops.logaddexp, floating=True)
less = _binary(ops.lt)
less_equal = _binary(ops.le)
greater = _binary(ops.gt)
greater_equal = _binary(ops.ge)
equal = _binary(ops.eq)
not_equal = _binary(ops.ne)

exp = _unary(ops.exp)
log = _unary(ops.log)
log1p = _unary(ops.log1p)
expm1 = _unary(ops.expm1)
sqrt = _unary(ops.sqrt)
tanh = _unary(ops.tanh)
sigmoid = _unary(ops.logistic)
sin = _unary(ops.sin)
cos = _unary(ops.cos)


def negative(x):
    return ops.neg(x)


def abs(x):  # noqa: A001
    return ops.abs(x)


def sign(x):
    return ops.sign(x)


def square(x):
    return multiply(x, x)


def relu(x):
    """max(x, 0), with derivative 0 at 0 (as jax.nn.relu)."""
    (x,) = _promote(x, floating=True)
    return ops.select(ops.gt(x, _zero(x)), x, _zero(x))


def softplus(x):
    return logaddexp(x, 0.0)


def _zero(x):
    return np.zeros((), dtype=_type(x).dtype.np)


def where(cond, x, y):
    check_placements("where", [v.type for v in (cond, x, y) if isinstance(v, Tracer)],
                     user_source())
    x, y = _promote(x, y)
    cond = cond if _type(cond).dtype is bool_ else not_equal(cond, 0)
    shape = broadcast_shapes(_type(cond).shape, _type(x).shape, _type(y).shape)
    return ops.select(*[_broadcast_to_shape(v, shape) for v in (cond, x, y)])


def clip(x, lo=None, hi=None):
    if lo is not None:
        x = maximum(x, lo)
    if hi is not None:
        x = minimum(x, hi)
    return x


def astype(x, dtype):
    return _cast(x, _as_dtype(dtype))


def stop_gradient(x):
    return ops.stop_gradient(x)


def zeros_like(x):
    return ops.zeros_like(x)


def ones_like(x):
    return add(ops.zeros_like(x), np.ones((), dtype=_type(x).dtype.np))


# --------------------------------------------------------------------------- reductions

def _axes(x, axis):
    nd = _type(x).ndim
    if axis is None:
        return tuple(range(nd))
    return ops._norm_axes(axis, nd, "axis")


def _keep(x, out, axes, keepdims):
    if not keepdims:
        return out
    shape = tuple(1 if i in axes else d for i, d in enumerate(_type(x).shape))
    return ops.reshape(out, shape)


def sum(x, axis=None, keepdims=False):  # noqa: A001
    axes = _axes(x, axis)
    if _type(x).dtype is bool_:
        x = astype(x, i64)
    return _keep(x, ops.reduce_sum(x, axes), axes, keepdims)


def mean(x, axis=None, keepdims=False):
    (x,) = _promote(x, floating=True)
    axes = _axes(x, axis)
    shape = _type(x).shape
    count = 1
    ragged = 0
    for a in axes:
        if shape[a] is None:
            ragged += 1
        else:
            count *= shape[a]
    out = ops.reduce_sum(x, axes)
    if count != 1:
        out = ops.div(out, np.asarray(count, dtype=_type(x).dtype.np))
    if ragged:
        n = _cast(ops.rows(x), _type(x).dtype)
        for _ in range(ragged):
            out = divide(out, n)
    return _keep(x, out, axes, keepdims)


def max(x, axis=None, keepdims=False):  # noqa: A001
    axes = _axes(x, axis)
    return _keep(x, ops.reduce_max(x, axes), axes, keepdims)


def min(x, axis=None, keepdims=False):  # noqa: A001
    return negative(max(negative(x), axis, keepdims))


def argmax(x, axis=-1):
    return ops.argmax(x, axis)


def logsumexp(x, axis=None, keepdims=False):
    (x,) = _promote(x, floating=True)
    axes = _axes(x, axis)
    m = ops.stop_gradient(max(x, axes, keepdims=True))
    out = add(log(sum(exp(subtract(x, m)), axes, keepdims=True)), m)
    return out if keepdims else ops.reshape(out, tuple(
        d for i, d in enumerate(_type(x).shape) if i not in axes))


def log_softmax(x, axis=-1):
    return subtract(x, logsumexp(x, axis, keepdims=True))


def softmax(x, axis=-1):
    return exp(log_softmax(x, axis))


# --------------------------------------------------------------------------- products

def matmul(a, b):
    a, b = _promote(a, b, floating=True)
    na, nb = _type(a).ndim, _type(b).ndim
    if na == 0 or nb == 0:
        raise ShapeError("matmul: operands must not be scalars (use *)")
    if na == 2 and nb == 2:
        return ops.matmul(a, b)
    if na == 2 and nb == 1:
        return ops.matvec(a, b)
    if na == 1 and nb == 2:
        return ops.vecmat(a, b)
    if na == 1 and nb == 1:
        return ops.vdot(a, b)
    raise ShapeError(f"matmul: fadcore supports 1-d and 2-d operands, got {_type(a)} @ {_type(b)}")


def dot(a, b):
    if _type(a).ndim == 0 or _type(b).ndim == 0:
        return multiply(a, b)
    return matmul(a, b)


def outer(a, b):
    a, b = _promote(a, b, floating=True)
    return ops.outer(reshape(a, (-1,)), reshape(b, (-1,)))


# --------------------------------------------------------------------------- shapes

def shape(x) -> tuple:
    return _type(x).shape


def ndim(x) -> int:
    return _type(x).ndim


def size(x) -> int:
    return _type(x).size()


def reshape(x, newshape):
    if isinstance(newshape, (builtins.int, np.integer)) or newshape is None:
        newshape = (newshape,)
    newshape = tuple(newshape)
    old = _type(x).shape
    if newshape.count(-1) > 1:
        raise ShapeError("reshape: only one -1 dimension is allowed")
    if -1 in newshape:
        known = 1
        for d in newshape:
            if d not in (-1, None):
                known *= d
        total = 1
        for d in old:
            if d is not None:
                total *= d
        if known == 0 or total % known:
            raise ShapeError(f"reshape: cannot reshape {_type(x)} to {newshape}")
        fill = total // known
        if None in old and None not in newshape:
            if fill != 1:
                raise ShapeError(f"reshape: cannot reshape {_type(x)} to {newshape}: the -1 "
                                 "would mix the ragged rows (?) with other dimensions")
            fill = None             # -1 stands for the ragged rows
        newshape = tuple(fill if d == -1 else d for d in newshape)
    return ops.reshape(x, newshape)


def transpose(x, axes=None):
    nd = _type(x).ndim
    axes = tuple(reversed(range(nd))) if axes is None else tuple(a % nd for a in axes)
    return ops.transpose(x, axes)


def expand_dims(x, axis):
    s = list(_type(x).shape)
    axes = [axis] if isinstance(axis, (builtins.int, np.integer)) else list(axis)
    nd = len(s) + len(axes)
    for a in sorted(a % nd for a in axes):
        s.insert(a, 1)
    return ops.reshape(x, tuple(s))


def squeeze(x, axis=None):
    s = _type(x).shape
    axes = [i for i, d in enumerate(s) if d == 1] if axis is None else list(_axes(x, axis))
    for a in axes:
        if s[a] != 1:
            raise ShapeError(f"squeeze: axis {a} of {_type(x)} is not of size 1")
    return ops.reshape(x, tuple(d for i, d in enumerate(s) if i not in axes))


def broadcast_to(x, shape):
    shape = tuple(shape)
    out = broadcast_shapes(_type(x).shape, shape)
    if out != shape:
        raise ShapeError(f"broadcast_to: cannot broadcast {_type(x)} to {shape}")
    x_shape = _type(x).shape
    if x_shape == () and shape != ():
        return ops.broadcast_in_dim(x, shape, ())
    return _broadcast_to_shape(x, shape)


def concatenate(xs, axis=0):
    xs = _promote(*xs)
    nd = _type(xs[0]).ndim
    return ops.concatenate(xs, axis % nd if nd else 0)


def stack(xs, axis=0):
    xs = list(xs)
    nd = _type(xs[0]).ndim + 1
    return concatenate([expand_dims(x, axis % nd) for x in xs], axis % nd)


def take(x, indices, axis=None):
    if axis is None:
        x, axis = reshape(x, (-1,)), 0
    axis = axis % _type(x).ndim
    if isinstance(indices, (builtins.int, np.integer)):
        return _index(x, tuple([slice(None)] * axis + [builtins.int(indices)]))
    idx = indices if isinstance(indices, Tracer) else np.asarray(indices)
    return ops.take(x, idx, axis)


def take_along_axis(x, indices, axis):
    idx = indices if isinstance(indices, Tracer) else np.asarray(indices)
    axis = axis % _type(x).ndim
    return ops.take_along_axis(x, idx, axis)


def one_hot(labels, num_classes, dtype=f64):
    return ops.bind(ops.one_hot_p, labels, depth=builtins.int(num_classes), dtype=_as_dtype(dtype))


def _index(x, key):
    """Basic indexing: ints, slices, None and Ellipsis; one integer array -> take."""
    if not isinstance(key, tuple):
        key = (key,)
    if builtins.any(isinstance(k, (Tracer, np.ndarray, list)) for k in key):
        if len(key) == 1:
            return take(x, key[0], 0)
        raise ShapeError("indexing: only a single integer-array index is supported "
                         "(use fnp.take / fnp.take_along_axis)")
    xt = _type(x)
    n_real = builtins.sum(1 for k in key if k is not None and k is not Ellipsis)
    if n_real > xt.ndim:
        raise ShapeError(f"too many indices for {xt}")
    if Ellipsis in key:
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (xt.ndim - n_real) + key[i + 1:]
    else:
        key = key + (slice(None),) * (xt.ndim - n_real)
    # negative steps (x[::-1]) gather the positions they select along that axis
    axis, rebuilt = 0, []
    for k in key:
        if k is not None:
            d = xt.shape[axis]
            if isinstance(k, slice) and d is not None and k.indices(d)[2] < 0:
                x = ops.take(x, np.arange(d, dtype=np.int64)[k], axis)
                k = slice(None)
            axis += 1
        rebuilt.append(k)
    key, xt = tuple(rebuilt), _type(x)
    starts, limits, strides, out_shape = [], [], [], []
    axis = 0
    for k in key:
        if k is None:
            out_shape.append(1)
            continue
        d = xt.shape[axis]
        if isinstance(k, slice):
            if d is None:
                if k != slice(None):
                    raise ShapeError(f"slicing a ragged dimension (?) of {xt}: take it whole")
                starts.append(0), limits.append(None), strides.append(1)
                out_shape.append(None)
            else:
                s, l, st = k.indices(d)
                l = builtins.max(l, s)
                starts.append(s), limits.append(l), strides.append(st)
                out_shape.append(len(range(s, l, st)))
        elif isinstance(k, (builtins.int, np.integer)):
            if d is None:
                raise ShapeError(f"integer index into a ragged dimension (?) of {xt}")
            k = builtins.int(k)
            if not -d <= k < d:
                raise ShapeError(f"index {k} out of range for a dimension of size {d}")
            k %= d
            starts.append(k), limits.append(k + 1), strides.append(1)
        else:
            raise ShapeError(f"unsupported index {k!r}")
        axis += 1
    out = ops.slice_(x, starts, limits, strides)
    return ops.reshape(out, tuple(out_shape))


# --------------------------------------------------------------------------- tracer methods

def _install_tracer_methods():
    def r(f):
        return lambda self, other: f(other, self)
    T = Tracer
    T.__add__, T.__radd__ = add, r(add)
    T.__sub__, T.__rsub__ = subtract, r(subtract)
    T.__mul__, T.__rmul__ = multiply, r(multiply)
    T.__truediv__, T.__rtruediv__ = divide, r(divide)
    T.__pow__, T.__rpow__ = power, r(power)
    T.__matmul__, T.__rmatmul__ = matmul, r(matmul)
    T.__neg__ = negative
    T.__pos__ = lambda self: self
    T.__abs__ = abs
    T.__lt__, T.__le__, T.__gt__, T.__ge__ = less, less_equal, greater, greater_equal
    T.__eq__, T.__ne__ = equal, not_equal
    T.__getitem__ = _index
    T.T = property(lambda self: transpose(self))
    T.sum = lambda self, axis=None, keepdims=False: sum(self, axis, keepdims)
    T.mean = lambda self, axis=None, keepdims=False: mean(self, axis, keepdims)
    T.max = lambda self, axis=None, keepdims=False: max(self, axis, keepdims)
    T.reshape = lambda self, *s: reshape(self, s[0] if len(s) == 1 else s)
    T.astype = astype
    T.dot = dot


_install_tracer_methods()
