"""The local primitives: each one's declaration, metadata and shape rule, by family.

A local primitive runs where its operands live (per client at CLIENTS). Its shape rule maps
operand tensor types (and static params) to the result's tensor type and raises a typed fad
error for operands it does not accept. What makes a primitive compute or differentiate (its
reference implementation, JVP and transpose rules) lives above the IR, in the family module of
:mod:`fadcore.ops` with the same name as the section here.

Elementwise binary primitives take operands of equal shape or one scalar operand; NumPy-style
broadcasting is done by :mod:`fadcore.numpy` with explicit ``broadcast_in_dim``.
"""

from __future__ import annotations

from ..errors import DTypeError, ShapeError
from .primitives import CostClass, Primitive, need_float, need_numeric
from .types import TensorType, bool_, f64, i64

TRANSCENDENTAL, ELEMENTWISE = CostClass.TRANSCENDENTAL, CostClass.ELEMENTWISE

# --------------------------------------------------------------------------- helpers


def norm_axes(axes, ndim: int, name: str) -> tuple:
    """``axes`` (an int or a sequence) as sorted, distinct, non-negative axes of an ndim array."""
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


def common_shape(name: str, *ts: TensorType) -> tuple:
    """Equal shapes, or scalars beside one common shape."""
    shapes = {t.shape for t in ts if t.shape != ()}
    if len(shapes) > 1:
        raise ShapeError(
            f"{name}: operand shapes {', '.join(str(t) for t in ts)} differ (IR elementwise "
            "ops need equal shapes or scalar operands; fadcore.numpy inserts broadcast_in_dim)")
    return shapes.pop() if shapes else ()


def same_dtype(name: str, *ts: TensorType):
    dts = {t.dtype for t in ts}
    if len(dts) > 1:
        raise DTypeError(f"{name}: operand dtypes differ: {', '.join(str(t) for t in ts)}")
    return dts.pop()


def need_int(name, t):
    if not t.dtype.is_int:
        raise DTypeError(f"{name}: indices must be integers, got {t}")


def kept_dims(ndim, axes):
    return tuple(i for i in range(ndim) if i not in axes)


def static_size(shape):
    n = 1
    for d in shape:
        if d is not None:
            n *= d
    return n


# --------------------------------------------------------------------------- elementwise

def _unary_shape(name, float_only=True):
    def rule(x: TensorType) -> TensorType:
        (need_float if float_only else need_numeric)(name, x)
        return x
    return rule


def _unary(name: str, float_only=True, cost=TRANSCENDENTAL, differentiable=True) -> Primitive:
    return Primitive(name, shape_rule=_unary_shape(name, float_only), cost=cost,
                     differentiable=differentiable)


neg_p = _unary("neg", float_only=False, cost=ELEMENTWISE)
exp_p, log_p, log1p_p, expm1_p, sqrt_p, tanh_p, logistic_p, sin_p, cos_p = map(_unary, (
    "exp", "log", "log1p", "expm1", "sqrt", "tanh", "logistic", "sin", "cos"))
sign_p = _unary("sign", float_only=False, cost=ELEMENTWISE, differentiable=False)
abs_p = _unary("abs", float_only=False, cost=ELEMENTWISE)


def _binary_shape(name, float_only=False, out_dtype=None):
    def rule(x: TensorType, y: TensorType) -> TensorType:
        dt = same_dtype(name, x, y)
        (need_float if float_only else need_numeric)(name, x, y)
        return TensorType(out_dtype or dt, common_shape(name, x, y))
    return rule


def _binary(name, float_only=False, cost=ELEMENTWISE) -> Primitive:
    return Primitive(name, shape_rule=_binary_shape(name, float_only), cost=cost)


add_p, sub_p, mul_p = map(_binary, ("add", "sub", "mul"))
div_p = _binary("div", float_only=True)
pow_p = _binary("pow", float_only=True, cost=TRANSCENDENTAL)
max_p = _binary("max")
min_p = _binary("min")
logaddexp_p = _binary("logaddexp", float_only=True, cost=TRANSCENDENTAL)


def _cmp(name) -> Primitive:
    return Primitive(name, shape_rule=_binary_shape(name, out_dtype=bool_), differentiable=False)


lt_p, le_p, gt_p, ge_p, eq_p, ne_p = map(_cmp, ("lt", "le", "gt", "ge", "eq", "ne"))


def _select_shape(pred: TensorType, x: TensorType, y: TensorType) -> TensorType:
    if pred.dtype is not bool_:
        raise DTypeError(f"select: the condition must be bool, got {pred}")
    dt = same_dtype("select", x, y)
    return TensorType(dt, common_shape("select", pred, x, y))


select_p = Primitive("select", shape_rule=_select_shape)


def _convert_shape(x: TensorType, *, dtype) -> TensorType:
    return TensorType(dtype, x.shape)


convert_p = Primitive("convert", shape_rule=_convert_shape)
stop_gradient_p = Primitive("stop_gradient", shape_rule=lambda x: x, differentiable=False,
                            alias=True, cost=CostClass.FREE)
zeros_like_p = Primitive("zeros_like", shape_rule=lambda x: x, differentiable=False,
                         cost=CostClass.FREE)


# --------------------------------------------------------------------------- reductions

def _reduce_shape(name):
    def rule(x: TensorType, *, axes) -> TensorType:
        need_numeric(name, x)
        if axes != norm_axes(axes, x.ndim, name):
            raise ShapeError(f"{name}: axes {axes} must be sorted, distinct and non-negative")
        return TensorType(x.dtype, tuple(d for i, d in enumerate(x.shape) if i not in axes))
    return rule


reduce_sum_p = Primitive("reduce_sum", shape_rule=_reduce_shape("reduce_sum"),
                         cost=CostClass.REDUCTION)
reduce_max_p = Primitive("reduce_max", shape_rule=_reduce_shape("reduce_max"),
                         cost=CostClass.REDUCTION)


def _argmax_shape(x: TensorType, *, axis) -> TensorType:
    need_numeric("argmax", x)
    if not 0 <= axis < x.ndim:
        raise ShapeError(f"argmax: axis {axis} out of range for {x}")
    return TensorType(i64, tuple(d for i, d in enumerate(x.shape) if i != axis))


argmax_p = Primitive("argmax", shape_rule=_argmax_shape, differentiable=False,
                     cost=CostClass.REDUCTION)


# --------------------------------------------------------------------------- shapes

def _bid_shape(x: TensorType, *, shape, dims) -> TensorType:
    if len(dims) != x.ndim or any(b <= a for a, b in zip(dims, dims[1:])):
        raise ShapeError(f"broadcast_in_dim: dims {dims} do not map a {x.ndim}-d operand")
    for i, d in enumerate(dims):
        if not 0 <= d < len(shape) or (x.shape[i] != 1 and x.shape[i] != shape[d]):
            raise ShapeError(f"broadcast_in_dim: cannot broadcast {x} to [{shape}] "
                             f"(operand axis {i} -> {d})")
    return TensorType(x.dtype, tuple(shape))


broadcast_in_dim_p = Primitive("broadcast_in_dim", shape_rule=_bid_shape, shape_params=("shape",))


def _reshape_shape(x: TensorType, *, shape) -> TensorType:
    if (x.shape.count(None) != shape.count(None)
            or static_size(x.shape) != static_size(shape)):
        raise ShapeError(f"reshape: cannot reshape {x} to [{','.join('?' if d is None else str(d) for d in shape)}]"
                         " (the static sizes must agree and the ragged dimensions (?) be kept)")
    return TensorType(x.dtype, tuple(shape))


reshape_p = Primitive("reshape", shape_rule=_reshape_shape, shape_params=("shape",),
                      alias=True, cost=CostClass.FREE)


def _transpose_shape(x: TensorType, *, perm) -> TensorType:
    if sorted(perm) != list(range(x.ndim)):
        raise ShapeError(f"transpose: {perm} is not a permutation of the axes of {x}")
    return TensorType(x.dtype, tuple(x.shape[i] for i in perm))


transpose_p = Primitive("transpose", shape_rule=_transpose_shape)


def slice_shape(x: TensorType, *, starts, limits, strides) -> TensorType:
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


slice_p = Primitive("slice", shape_rule=slice_shape)


def _pad_shape(ct: TensorType, *, shape, starts, limits, strides) -> TensorType:
    want = slice_shape(TensorType(ct.dtype, tuple(shape)), starts=starts, limits=limits,
                       strides=strides)
    if want.shape != ct.shape:
        raise ShapeError(f"pad: operand {ct} does not fit slice of [{shape}]")
    return TensorType(ct.dtype, tuple(shape))


pad_p = Primitive("pad", shape_rule=_pad_shape, shape_params=("shape",))


def _concat_shape(*xs: TensorType, axis) -> TensorType:
    if not xs:
        raise ShapeError("concatenate: needs at least one operand")
    dt = same_dtype("concatenate", *xs)
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


def _rows_shape(x: TensorType, *, axis) -> TensorType:
    if not 0 <= axis < x.ndim or x.shape[axis] is not None:
        raise ShapeError(f"rows: axis {axis} of {x} is not ragged")
    return TensorType(f64, ())


rows_p = Primitive("rows", shape_rule=_rows_shape, differentiable=False, cost=CostClass.FREE)


# --------------------------------------------------------------------------- products

def _contract(name, a, b, ka, kb):
    da, db = a.shape[ka], b.shape[kb]
    if da != db:
        raise ShapeError(f"{name}: contracted dimensions differ: {a} and {b}")
    need_float(name, a, b)
    return same_dtype(name, a, b)


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
    need_float("outer", a, b)
    return TensorType(same_dtype("outer", a, b), (a.shape[0], b.shape[0]))


# the contracted axis is the first operand's last one (what ir.cost counts)
matmul_p = Primitive("matmul", shape_rule=_matmul_shape, cost=CostClass.CONTRACTION)
matvec_p = Primitive("matvec", shape_rule=_matvec_shape, cost=CostClass.CONTRACTION)
vecmat_p = Primitive("vecmat", shape_rule=_vecmat_shape, cost=CostClass.CONTRACTION)
vdot_p = Primitive("vdot", shape_rule=_vdot_shape, cost=CostClass.CONTRACTION)
outer_p = Primitive("outer", shape_rule=_outer_shape)


# --------------------------------------------------------------------------- gathers

def _take_shape(x: TensorType, idx: TensorType, *, axis) -> TensorType:
    need_int("take", idx)
    if not 0 <= axis < x.ndim:
        raise ShapeError(f"take: axis {axis} out of range for {x}")
    return TensorType(x.dtype, x.shape[:axis] + idx.shape + x.shape[axis + 1:])


take_p = Primitive("take", shape_rule=_take_shape)


def _untake_shape(ct: TensorType, idx: TensorType, *, axis, dim) -> TensorType:
    need_int("untake", idx)
    k = idx.ndim
    if not 0 <= axis <= ct.ndim - k or ct.shape[axis:axis + k] != idx.shape:
        raise ShapeError(f"untake: {ct} does not fit indices {idx} at axis {axis}")
    return TensorType(ct.dtype, ct.shape[:axis] + (dim,) + ct.shape[axis + k:])


untake_p = Primitive("untake", shape_rule=_untake_shape, shape_params=("dim",))


def _tala_shape(x: TensorType, idx: TensorType, *, axis) -> TensorType:
    need_int("take_along_axis", idx)
    if idx.ndim != x.ndim or not 0 <= axis < x.ndim or any(
            idx.shape[i] != x.shape[i] for i in range(x.ndim) if i != axis):
        raise ShapeError(f"take_along_axis: indices {idx} do not fit {x} along axis {axis}")
    return TensorType(x.dtype, idx.shape)


take_along_axis_p = Primitive("take_along_axis", shape_rule=_tala_shape)


def _untala_shape(ct: TensorType, idx: TensorType, *, axis, dim) -> TensorType:
    need_int("untake_along_axis", idx)
    if ct.shape != idx.shape or not 0 <= axis < ct.ndim:
        raise ShapeError(f"untake_along_axis: {ct} does not fit indices {idx} along axis {axis}")
    return TensorType(ct.dtype, ct.shape[:axis] + (dim,) + ct.shape[axis + 1:])


untake_along_axis_p = Primitive("untake_along_axis", shape_rule=_untala_shape,
                                shape_params=("dim",))


def _one_hot_shape(labels: TensorType, *, depth, dtype) -> TensorType:
    need_int("one_hot", labels)
    return TensorType(dtype, labels.shape + (depth,))


one_hot_p = Primitive("one_hot", shape_rule=_one_hot_shape, differentiable=False)
