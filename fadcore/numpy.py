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
from .core import Tracer, at_source, check_placements, to_literal, user_source
from .errors import DTypeError, ShapeError, TracingError
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
    "float64", "float32", "int64", "int32", "shape", "ndim", "size", "rows",
    "var", "std", "prod", "cumsum", "einsum", "linalg", "arange", "zeros", "ones", "argmin",
    "sort",
]


# --------------------------------------------------------------------------- operand handling

def _is_weak(x) -> bool:
    return isinstance(x, (builtins.int, builtins.float)) and not isinstance(x, builtins.bool)


def _type(x) -> TensorType:
    if isinstance(x, (list, tuple)) and builtins.any(
            isinstance(m, (Tracer, np.ndarray)) for m in x):
        _list_operand(x)
    return ops.tensor_type(x)


def _list_operand(x) -> None:
    """A Python list of arrays or traced values used as one operand: almost always client data
    passed as a plain list instead of ``fad.clients(list)``."""
    traced = builtins.sum(isinstance(m, Tracer) for m in x)
    what = (f"a Python {type(x).__name__} of {len(x)} traced values" if traced else
            f"a Python {type(x).__name__} of {len(x)} arrays")
    raise DTypeError(
        f"{what} used as an array{at_source(user_source())}. A list argument of a traced "
        "function is a pytree: each member is a separate SERVER value. If it holds one array per "
        "client, pass fad.clients(the_list) instead; to make one array from traced values use "
        "fadcore.numpy.stack or concatenate")


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

def _axes(x, axis, name="axis"):
    nd = _type(x).ndim
    if axis is None:
        return tuple(range(nd))
    if isinstance(axis, (builtins.float, builtins.bool, Tracer)) or (
            isinstance(axis, (tuple, list)) and not builtins.all(
                isinstance(a, (builtins.int, np.integer)) and not isinstance(a, builtins.bool)
                for a in axis)):
        raise ShapeError(f"{name}: axis must be an int or a tuple of ints, got {axis!r}"
                         f"{at_source(user_source())}")
    return ops._norm_axes(axis, nd, name)


def _keep(x, out, axes, keepdims):
    if not keepdims:
        return out
    shape = tuple(1 if i in axes else d for i, d in enumerate(_type(x).shape))
    return ops.reshape(out, shape)


def sum(x, axis=None, keepdims=False):  # noqa: A001
    axes = _axes(x, axis, "sum")
    if _type(x).dtype is bool_:
        x = astype(x, i64)
    return _keep(x, ops.reduce_sum(x, axes), axes, keepdims)


def _counts(x, axes) -> tuple[int, int]:
    """(static element count, number of ragged axes) of the axes ``axes`` of ``x``."""
    shape = _type(x).shape
    count, ragged = 1, 0
    for a in axes:
        if shape[a] is None:
            ragged += 1
        else:
            count *= shape[a]
    return count, ragged


def mean(x, axis=None, keepdims=False):
    (x,) = _promote(x, floating=True)
    axes = _axes(x, axis, "mean")
    count, ragged = _counts(x, axes)
    out = ops.reduce_sum(x, axes)
    if count != 1:
        out = ops.div(out, np.asarray(count, dtype=_type(x).dtype.np))
    if ragged:
        n = _cast(ops.rows(x), _type(x).dtype)
        for _ in range(ragged):
            out = divide(out, n)
    return _keep(x, out, axes, keepdims)


def var(x, axis=None, keepdims=False, ddof=0):
    """Variance, ``mean(|x - mean(x)|**2)`` over ``axis``, divided by ``N - ddof``, as NumPy."""
    (x,) = _promote(x, floating=True)
    axes = _axes(x, axis, "var")
    centered = subtract(x, mean(x, axes, keepdims=True))
    out = mean(multiply(centered, centered), axes, keepdims)
    if ddof:
        count, ragged = _counts(x, axes)
        n = np.asarray(count, dtype=_type(x).dtype.np)
        if ragged:
            r = _cast(ops.rows(x), _type(x).dtype)
            for _ in range(ragged):
                n = multiply(n, r)
        out = multiply(out, divide(n, subtract(n, ddof)))
    return out


def std(x, axis=None, keepdims=False, ddof=0):
    """Standard deviation, ``sqrt(var(x, axis, keepdims, ddof))``."""
    return sqrt(var(x, axis, keepdims, ddof))


def _axis_slice(x, axis, start, stop):
    key = [slice(None)] * _type(x).ndim
    key[axis] = slice(start, stop)
    return _index(x, tuple(key))


def _static_axis(x, axis, name):
    n = _type(x).shape[axis]
    if n is None:
        raise ShapeError(f"{name}: axis {axis} of {_type(x)} is ragged (?, the client's row "
                         f"count); {name} needs an axis of static length"
                         f"{at_source(user_source())}")
    return n


def prod(x, axis=None, keepdims=False):
    """Product over ``axis``: pairwise products of halves (exact multiplications, log2(n)
    equations per axis; the rounding order may differ from NumPy's in the last bit)."""
    if _type(x).dtype is bool_:
        x = astype(x, i64)
    axes = _axes(x, axis, "prod")
    out = x
    for a in sorted(axes, reverse=True):
        n = _static_axis(out, a, "prod")
        if n == 0:
            out = add(ops.reduce_sum(out, (a,)), np.ones((), dtype=_type(out).dtype.np))
            continue
        while n > 1:
            h = n // 2
            part = multiply(_axis_slice(out, a, 0, h), _axis_slice(out, a, h, 2 * h))
            out = part if n == 2 * h else concatenate([part, _axis_slice(out, a, 2 * h, n)], a)
            n = n - h
        out = squeeze(out, a)
    return _keep(x, out, axes, keepdims)


def cumsum(x, axis=None):
    """Cumulative sum along ``axis`` (``None``: of the flattened array), as NumPy. A
    Hillis-Steele scan: log2(n) shifted additions (the rounding order may differ from NumPy's
    sequential sum in the last bits)."""
    if _type(x).dtype is bool_:
        x = astype(x, i64)
    if axis is None:
        x, axis = reshape(x, (-1,)), 0
    (axis,) = _axes(x, axis, "cumsum")
    n = _static_axis(x, axis, "cumsum")
    s = 1
    while s < n:
        head = ops.zeros_like(_axis_slice(x, axis, 0, s))
        x = add(x, concatenate([head, _axis_slice(x, axis, 0, n - s)], axis))
        s *= 2
    return x


def max(x, axis=None, keepdims=False):  # noqa: A001
    axes = _axes(x, axis, "max")
    return _keep(x, ops.reduce_max(x, axes), axes, keepdims)


def min(x, axis=None, keepdims=False):  # noqa: A001
    return negative(max(negative(x), axis, keepdims))


def argmax(x, axis=-1):
    return ops.argmax(x, axis)


def argmin(x, axis=-1):
    """Index of the first minimum along ``axis``: ``argmax`` of an order-reversing map
    (``-x`` for floats, ``-1 - x`` for integers, which never overflows)."""
    dt = _type(x).dtype
    if dt is bool_:
        x, dt = astype(x, i64), i64
    flipped = negative(x) if dt.is_float else subtract(np.asarray(-1, dtype=dt.np), x)
    return ops.argmax(flipped, axis)


def _batcher_stages(n: int) -> list[list[tuple[int, int]]]:
    """Batcher's odd-even merge sorting network for ``n`` keys, as stages of disjoint
    comparators (i, j), i < j: built for the next power of two, dropping comparators that
    touch a position >= n (those keys act as +inf and never move)."""
    size = 1
    while size < n:
        size *= 2
    stages = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            stage = []
            for j in range(k % p, size - k, 2 * k):
                for i in range(builtins.min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        stage.append((i + j, i + j + k))
            if stage:
                stages.append(stage)
            k //= 2
        p *= 2
    return stages


def sort(x, axis=-1):
    """Sorted copy along ``axis`` (a static axis; ``None`` sorts the flattened array), as NumPy
    for inputs without NaN. A sorting network of ``minimum``/``maximum`` stages (Batcher), so
    it is differentiable: the tangent is permuted with the values (averaged over ties)."""
    if axis is None:
        x, axis = reshape(x, (-1,)), 0
    (axis,) = _axes(x, axis, "sort")
    if _type(x).dtype is bool_:
        raise DTypeError(f"sort: bool operands are not supported (sort fnp.astype(x, "
                         f"fnp.int64)){at_source(user_source())}")
    n = _static_axis(x, axis, "sort")
    for stage in _batcher_stages(n):
        lo = np.array([i for i, _ in stage], dtype=np.int64)
        hi = np.array([j for _, j in stage], dtype=np.int64)
        rest = np.setdiff1d(np.arange(n), np.concatenate([lo, hi])).astype(np.int64)
        a, b = ops.take(x, lo, axis), ops.take(x, hi, axis)
        parts = [minimum(a, b), maximum(a, b)] + ([ops.take(x, rest, axis)] if len(rest) else [])
        order = np.concatenate([lo, hi, rest])
        x = ops.take(concatenate(parts, axis), np.argsort(order).astype(np.int64), axis)
    return x


def logsumexp(x, axis=None, keepdims=False):
    (x,) = _promote(x, floating=True)
    axes = _axes(x, axis, "logsumexp")
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


def einsum(subscripts, *operands):
    """Einstein summation over explicit subscripts (``"ij,jk->ik"``, ``"ij,j->i"``,
    ``"i,i->"``, ``"ij->ji"``; implicit output as NumPy). Two operands of rank <= 2 sharing at
    most one summed index lower to ``matmul``/``dot``/``outer``; otherwise the operands are
    broadcast against each other, multiplied and summed. No ``...`` and no repeated index
    within one operand (diagonals)."""
    if not isinstance(subscripts, str):
        raise TracingError("einsum: give the subscripts as a string (e.g. \"ij,jk->ik\")"
                           f"{at_source(user_source())}")
    spec = subscripts.replace(" ", "")
    if "." in spec:
        raise ShapeError(f"einsum: '...' is not supported{at_source(user_source())}")
    ins, arrow, out = spec.partition("->")
    terms = ins.split(",")
    if len(terms) != len(operands):
        raise ShapeError(f"einsum: {subscripts!r} names {len(terms)} operands, got "
                         f"{len(operands)}{at_source(user_source())}")
    if not arrow:
        once = [c for c in ins.replace(",", "") if ins.count(c) == 1]
        out = "".join(sorted(once))
    operands = _promote(*operands)
    sizes: dict = {}
    for term, op in zip(terms, operands, strict=True):
        shp = _type(op).shape
        if len(term) != len(shp) or len(set(term)) != len(term) or not term.isalpha() and term:
            raise ShapeError(f"einsum: subscripts {term!r} do not fit an operand of type "
                             f"{_type(op)} (one distinct letter per axis){at_source(user_source())}")
        for c, d in zip(term, shp, strict=True):
            if sizes.setdefault(c, d) != d:
                raise ShapeError(f"einsum: index {c!r} has sizes {sizes[c]} and {d}"
                                 f"{at_source(user_source())}")
    if len(set(out)) != len(out) or builtins.any(c not in sizes for c in out):
        raise ShapeError(f"einsum: bad output subscripts {out!r}{at_source(user_source())}")
    if len(terms) == 2 and builtins.max(len(terms[0]), len(terms[1])) <= 2:
        ta, tb = terms
        summed = [c for c in ta if c in tb and c not in out]
        batch = [c for c in ta if c in tb and c in out]
        lone = [c for c in ta + tb if c not in out and (c in ta) != (c in tb)]
        if len(summed) <= 1 and not batch and not lone:
            fa = [c for c in ta if c not in summed]
            fb = [c for c in tb if c not in summed]
            a = transpose(operands[0], [ta.index(c) for c in fa + summed]) if ta else operands[0]
            b = transpose(operands[1], [tb.index(c) for c in summed + fb]) if tb else operands[1]
            if summed:
                res = matmul(a, b)
            elif fa and fb:
                res = ops.outer(a, b)
            else:
                res = multiply(a, b)
            got = fa + fb
            return res if "".join(got) == out else transpose(res, [got.index(c) for c in out])
    order = list(out) + [c for c in sizes if c not in out]
    full = None
    for term, op in zip(terms, operands, strict=True):
        present = [c for c in order if c in term]
        if len(term) > 1:
            op = transpose(op, [term.index(c) for c in present])
        op = reshape(op, tuple(sizes[c] if c in term else 1 for c in order))
        full = op if full is None else multiply(full, op)
    summed_axes = tuple(range(len(out), len(order)))
    return sum(full, summed_axes) if summed_axes else full


def outer(a, b):
    a, b = _promote(a, b, floating=True)
    return ops.outer(reshape(a, (-1,)), reshape(b, (-1,)))


# --------------------------------------------------------------------------- shapes

def shape(x) -> tuple:
    return _type(x).shape


def ndim(x) -> int:
    return _type(x).ndim


def size(x):
    """Number of elements (an int). For a value with ragged rows (``?``) inside a trace it is
    a traced ``int64`` scalar at CLIENTS: each client's own count."""
    t = _type(x)
    if not t.ragged or not isinstance(x, Tracer):
        return t.size()
    n = rows(x)
    out = n
    for _ in range(t.shape.count(None) - 1):
        out = multiply(out, n)
    out = astype(out, i64)
    static = t.size(rows=1)
    return out if static == 1 else multiply(out, np.asarray(static, dtype=np.int64))


def rows(x, axis=None, dtype=f64):
    """A client's row count inside a trace: the length of the ragged axis (``?``) of a client
    value, as a ``dtype`` (default float64) scalar at CLIENTS, one per client. The count for
    FedAvg's weights: ``fad.weighted_mean(update, fnp.rows(X))``."""
    t = _type(x)
    if not isinstance(x, Tracer) or not t.ragged:
        raise ShapeError(
            f"rows: {getattr(x, 'type', t)} has no ragged dimension (?){at_source(user_source())};"
            " only client data with a per-client row count has one (static lengths are in "
            "fnp.shape(x); fad.clients(..., ragged=True) types equal-size clients' rows ?)")
    if axis is None:
        axis = t.shape.index(None)
    (axis,) = ops._norm_axes(axis, t.ndim, "rows")
    if t.shape[axis] is not None:
        raise ShapeError(f"rows: axis {axis} of {t} is not ragged{at_source(user_source())}")
    n = ops.bind(ops.rows_p, x, axis=axis)
    dt = _as_dtype(dtype)
    return n if dt is f64 else astype(n, dt)


def zeros(shape, dtype=f64):
    """Zeros of ``shape``; a ``None`` (ragged) dimension inside a trace makes one array per
    client with the client's row count."""
    return _filled(shape, dtype, 0)


def ones(shape, dtype=f64):
    """Ones of ``shape`` (``None`` dimensions as in :func:`zeros`)."""
    return _filled(shape, dtype, 1)


def _filled(shape, dtype, value):
    if isinstance(shape, (builtins.int, np.integer)) or shape is None:
        shape = (shape,)
    shape = tuple(shape)
    for d in shape:
        if isinstance(d, Tracer):
            raise TracingError(f"zeros/ones: the shape {shape} holds a traced value"
                               f"{at_source(user_source())}; shapes are static (None for a "
                               "client's rows)")
    dt = _as_dtype(dtype)
    scalar = np.asarray(value, dtype=dt.np)
    if None in shape:
        return ops.broadcast_in_dim(scalar, shape, ())
    return np.full(shape, scalar)


def arange(start, stop=None, step=None, dtype=None):
    """``np.arange``: a constant array (its length is part of its type, so the bounds are
    Python numbers)."""
    for v in (start, stop, step):
        if isinstance(v, Tracer):
            raise TracingError(
                f"arange: the bound {v.type} is a traced value{at_source(user_source())}; the "
                "length of an array is part of its type, so arange needs Python numbers")
    return np.arange(start, stop, step, dtype=None if dtype is None else _as_dtype(dtype).np)


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


def _int_indices(name, indices):
    t = _type(indices)
    if t.dtype is bool_:
        raise DTypeError(
            f"{name}: a boolean mask {t} selects a data-dependent number of elements, which a "
            f"typed graph cannot hold{at_source(user_source())}; keep the shape and zero the "
            "rest: fnp.where(mask, x, 0) (fnp.sum(mask) counts the selected elements)")
    if t.dtype.is_float:
        raise DTypeError(
            f"{name}: indices (labels) must be integers, got {t}{at_source(user_source())}; "
            "pass integer labels (y.astype(np.int64)) or convert them inside the trace with "
            "fnp.astype(y, fnp.int64)")


def take(x, indices, axis=None):
    if not isinstance(indices, (builtins.int, np.integer)):
        _int_indices("take", indices)
    if axis is None:
        x, axis = reshape(x, (-1,)), 0
    axis = axis % _type(x).ndim
    if isinstance(indices, (builtins.int, np.integer)):
        return _index(x, tuple([slice(None)] * axis + [builtins.int(indices)]))
    idx = indices if isinstance(indices, Tracer) else np.asarray(indices)
    return ops.take(x, idx, axis)


def take_along_axis(x, indices, axis):
    _int_indices("take_along_axis", indices)
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
        for k in key:
            if isinstance(k, (Tracer, np.ndarray, list)):
                _int_indices("indexing", k)
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
                    raise ShapeError(
                        f"slicing a ragged dimension (?) of {xt}: each client holds its own "
                        f"number of rows, so take it whole{at_source(user_source())}")
                starts.append(0), limits.append(None), strides.append(1)
                out_shape.append(None)
            else:
                s, l, st = k.indices(d)
                l = builtins.max(l, s)
                starts.append(s), limits.append(l), strides.append(st)
                out_shape.append(len(range(s, l, st)))
        elif isinstance(k, (builtins.int, np.integer)):
            if d is None:
                raise ShapeError(
                    f"integer index into a ragged dimension (?) of {xt}{at_source(user_source())}:"
                    " each client holds its own number of rows, so row k may not exist; reduce "
                    "over the rows (fnp.sum(X, axis=0)) or index a static axis (X[:, 0])")
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


# --------------------------------------------------------------------------- linalg

def _norm(x, ord=None, axis=None, keepdims=False):  # noqa: A002
    """``np.linalg.norm`` for vectors (``ord`` None/2, 1, inf, -inf, or a positive number) and,
    over two axes or a whole 2-d array, the Frobenius norm (``ord`` None or ``"fro"``)."""
    (x,) = _promote(x, floating=True)
    nd = _type(x).ndim
    if axis is None:
        if ord is not None and not (ord == "fro" and nd == 2) and nd != 1:
            raise ShapeError(f"linalg.norm: ord={ord!r} of a {nd}-d array needs axis="
                             f"{at_source(user_source())}")
        axes = tuple(range(nd))
    else:
        axes = _axes(x, axis)
    if len(axes) > 1:
        if ord not in (None, "fro"):
            raise ShapeError(f"linalg.norm: only the Frobenius norm (ord=None or 'fro') is "
                             f"supported over several axes, got ord={ord!r}"
                             f"{at_source(user_source())}")
        ord = 2  # noqa: A001
    if ord is None or ord == 2:
        return sqrt(sum(multiply(x, x), axes, keepdims))
    if ord == np.inf:
        return max(abs(x), axes, keepdims)
    if ord == -np.inf:
        return min(abs(x), axes, keepdims)
    if ord == 1:
        return sum(abs(x), axes, keepdims)
    if isinstance(ord, (builtins.int, builtins.float)) and ord > 0:
        return power(sum(power(abs(x), ord), axes, keepdims), 1.0 / ord)
    raise ShapeError(f"linalg.norm: ord={ord!r} is not supported (None, 1, 2, inf, -inf, p > 0 "
                     f"or 'fro'){at_source(user_source())}")


class _Linalg:
    """``fadcore.numpy.linalg``: ``norm``."""

    norm = staticmethod(_norm)


linalg = _Linalg()
_norm.__name__ = "norm"


# --------------------------------------------------------------------------- NumPy dispatch
#
# NumPy functions and ufuncs called on a traced value dispatch here (``np.exp(x)``,
# ``np.mean(x, axis=0)``, ``x + np.ones(3)``...): to the fadcore.numpy function of the same
# semantics when there is one, else a TracingError naming what to use and the user's line.

def _ufunc_table() -> dict:
    return {
        np.add: add, np.subtract: subtract, np.multiply: multiply, np.divide: divide,
        np.power: power, np.maximum: maximum, np.minimum: minimum, np.logaddexp: logaddexp,
        np.less: less, np.less_equal: less_equal, np.greater: greater,
        np.greater_equal: greater_equal, np.equal: equal, np.not_equal: not_equal,
        np.exp: exp, np.log: log, np.log1p: log1p, np.expm1: expm1, np.sqrt: sqrt,
        np.tanh: tanh, np.sin: sin, np.cos: cos, np.negative: negative, np.absolute: abs,
        np.sign: sign, np.square: square, np.matmul: matmul, np.positive: lambda x: x,
    }


# name -> (fadcore.numpy function, positional arguments that mean the same in NumPy)
_FUNCTIONS = {
    "sum": (sum, 2), "mean": (mean, 2), "max": (max, 2), "amax": (max, 2), "min": (min, 2),
    "amin": (min, 2), "var": (var, 2), "std": (std, 2), "prod": (prod, 2),
    "cumsum": (cumsum, 2), "dot": (dot, 2), "matmul": (matmul, 2), "outer": (outer, 2),
    "reshape": (reshape, 2), "transpose": (transpose, 2), "expand_dims": (expand_dims, 2),
    "squeeze": (squeeze, 2), "broadcast_to": (broadcast_to, 2),
    "concatenate": (concatenate, 2), "stack": (stack, 2), "take": (take, 3),
    "take_along_axis": (take_along_axis, 3), "where": (where, 3), "clip": (clip, 3),
    "zeros_like": (zeros_like, 1), "ones_like": (ones_like, 1), "shape": (shape, 1),
    "ndim": (ndim, 1), "size": (size, 1), "sort": (sort, 2), "einsum": (einsum, 64),
    "exp": (exp, 1), "log": (log, 1), "sqrt": (sqrt, 1), "tanh": (tanh, 1),
    "abs": (abs, 1), "absolute": (abs, 1), "maximum": (maximum, 2), "minimum": (minimum, 2),
    "logaddexp": (logaddexp, 2), "square": (square, 1), "sign": (sign, 1),
    "astype": (astype, 2),
}
_RENAMED = {"clip": {"a_min": "lo", "a_max": "hi", "min": "lo", "max": "hi"},
            "reshape": {"shape": "newshape"}}
_AXIS_REQUIRED = {"argmax": argmax, "argmin": argmin}


def _no_numpy(what: str, instead: str | None):
    hint = (f"use fadcore.numpy.{instead} (import fadcore.numpy as fnp)" if instead else
            "fadcore.numpy has no equivalent; see docs/ops.md for the supported operations")
    raise TracingError(f"{what} was called on a traced value{at_source(user_source())}: NumPy "
                       f"cannot compute on traced values; {hint}")


def _array_ufunc(self, ufunc, method, *inputs, **kwargs):
    name = getattr(ufunc, "__name__", str(ufunc))
    f = _ufunc_table().get(ufunc)
    if method != "__call__":
        instead = {"add": "sum", "maximum": "max", "minimum": "min", "multiply": "prod"}.get(
            name) if method == "reduce" else ("cumsum" if (name, method) == ("add", "accumulate")
                                              else None)
        _no_numpy(f"np.{name}.{method}", instead)
    if f is None:
        _no_numpy(f"np.{name}", name if name in __all__ else None)
    for k, v in kwargs.items():
        if k == "out" and builtins.all(o is None for o in (v if isinstance(v, tuple) else (v,))):
            continue
        if k == "dtype" and v is not None:
            return astype(f(*inputs), v)
        if v is not None:
            raise TracingError(f"np.{name}(..., {k}=...) on a traced value is not supported"
                               f"{at_source(user_source())}: traced values are immutable; use "
                               f"fadcore.numpy.{name if name in __all__ else '...'} and "
                               "fadcore.numpy.where")
    return f(*inputs)


def _array_function(self, func, types, args, kwargs):
    name = func.__name__
    module = getattr(func, "__module__", "numpy") or "numpy"
    if module.endswith("linalg"):
        if name != "norm":
            _no_numpy(f"np.linalg.{name}", None)
        target, npos, name = _norm, 4, "linalg.norm"
    elif name in _AXIS_REQUIRED:
        target, npos = _AXIS_REQUIRED[name], 2
        axis = args[1] if len(args) > 1 else kwargs.get("axis")
        if axis is None and _type(args[0]).ndim > 1:
            raise TracingError(f"np.{name} without axis flattens the array: give axis= (as "
                               f"fadcore.numpy.{name}(x, axis)){at_source(user_source())}")
        if axis is None:
            args, kwargs = args[:1], {k: v for k, v in kwargs.items() if k != "axis"}
    elif name in _FUNCTIONS:
        target, npos = _FUNCTIONS[name]
    else:
        _no_numpy(f"np.{name}", name if name in __all__ else None)
    if len(args) > npos:
        raise TracingError(f"np.{name} on a traced value: pass the arguments after the first "
                           f"{npos} by keyword (fadcore.numpy.{name}){at_source(user_source())}")
    import inspect
    params = inspect.signature(target).parameters
    renamed = _RENAMED.get(name, {})
    kw = {}
    for k, v in kwargs.items():
        if v is np._NoValue or (v is None and k in ("out", "dtype", "where")):
            continue
        k = renamed.get(k, k)
        if k not in params or k in ("out", "where"):
            raise TracingError(f"np.{name}(..., {k}=...) is not supported on traced values"
                               f"{at_source(user_source())}; fadcore.numpy.{name} takes "
                               f"{', '.join(params)}")
        kw[k] = v
    try:
        inspect.signature(target).bind(*args, **kw)
    except TypeError as e:
        raise TracingError(f"np.{name} on a traced value: {e}{at_source(user_source())}; "
                           f"fadcore.numpy.{name} takes ({', '.join(params)})") from None
    return target(*args, **kw)


# --------------------------------------------------------------------------- tracer methods

def _len(x) -> int:
    """``len(x)`` of a traced value: its static first dimension."""
    t = _type(x)
    if not t.shape:
        raise TracingError(f"len() of a traced scalar {x.type}{at_source(user_source())}")
    if t.shape[0] is None:
        raise TracingError(
            f"len() of a ragged traced value {x.type}: its first dimension (?) is each "
            f"client's own row count, known only when the graph runs{at_source(user_source())}; use "
            "fnp.rows(x) for the count as a traced value (e.g. FedAvg weights)")
    return t.shape[0]


def _install_tracer_methods():
    def r(f):
        return lambda self, other: f(other, self)
    T = Tracer
    T.__array_ufunc__ = _array_ufunc
    T.__array_function__ = _array_function
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
    T.__len__ = _len
    T.T = property(lambda self: transpose(self))
    T.sum = lambda self, axis=None, keepdims=False: sum(self, axis, keepdims)
    T.mean = lambda self, axis=None, keepdims=False: mean(self, axis, keepdims)
    T.max = lambda self, axis=None, keepdims=False: max(self, axis, keepdims)
    T.min = lambda self, axis=None, keepdims=False: min(self, axis, keepdims)
    T.prod = lambda self, axis=None, keepdims=False: prod(self, axis, keepdims)
    # no .var method: Tracer.var is the graph variable (use fnp.var)
    T.std = lambda self, axis=None, keepdims=False, ddof=0: std(self, axis, keepdims, ddof)
    T.cumsum = lambda self, axis=None: cumsum(self, axis)
    T.argmax = lambda self, axis=-1: argmax(self, axis)
    T.argmin = lambda self, axis=-1: argmin(self, axis)
    T.reshape = lambda self, *s: reshape(self, s[0] if len(s) == 1 else s)
    T.astype = astype
    T.dot = dot


_install_tracer_methods()
