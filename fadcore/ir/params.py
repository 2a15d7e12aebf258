"""Every parameter of every primitive is checked before its type rule reads it.

One table, :data:`PARAM_CHECKS`, keyed by primitive name: a check receives the operand tensor
types and the params, and raises a typed fad error for a param the rule must not see. An int
is an int (a float or a bool is refused, never truncated: ``axes=(0.0,)``,
``perm=(True, False)``); an axis lies in ``[0, ndim)`` (``fadcore.numpy`` normalizes negative
axes before binding, so the IR has one spelling); a tuple has one entry per axis; a size lies
in ``[0, 2**31 - 1]``; a stride is at least 1. :func:`fadcore.ir.primitives.infer_type` runs
the check, then the rule, then bounds the result's shape (``check_shape``). Together with the
rules' checks on operand shapes this makes *verifies* imply *every kernel stays inside its
buffers*. ``tests/test_param_validation.py`` enumerates the registry and hits every parameter
of every primitive with hostile values.
"""

from __future__ import annotations

from ..errors import DTypeError, ShapeError
from .primitives import MAX_DIM, check_shape, is_int
from .types import DType, TensorType

__all__ = ["PARAM_CHECKS", "int_param", "axis_param", "ints_param", "shape_param",
           "dim_param", "dtype_param"]

_INT64_MAX = 2**63 - 1


# --------------------------------------------------------------------------- helpers

def int_param(name: str, pname: str, v, lo: int = 0, hi: int = _INT64_MAX) -> int:
    if not is_int(v):
        raise ShapeError(f"{name}: {pname}={v!r} must be an int")
    if not lo <= v <= hi:
        raise ShapeError(f"{name}: {pname}={v} must be at least {lo} and at most {hi}")
    return int(v)


def axis_param(name: str, v, ndim: int, pname: str = "axis") -> int:
    if not is_int(v):
        raise ShapeError(f"{name}: {pname}={v!r} must be an int")
    if not 0 <= v < ndim:
        raise ShapeError(f"{name}: {pname} {v} out of range for a {ndim}-d operand (graph "
                         f"params take axes in [0, {ndim}); fadcore.numpy normalizes negative "
                         "ones)")
    return int(v)


def ints_param(name: str, pname: str, v, length: int | None = None,
               none_ok: bool = False) -> tuple:
    if not isinstance(v, tuple) or not all(is_int(x) or (none_ok and x is None) for x in v):
        raise ShapeError(f"{name}: {pname}={v!r} must be a tuple of ints"
                         + (" (None for a ragged dimension)" if none_ok else ""))
    if length is not None and len(v) != length:
        raise ShapeError(f"{name}: {pname}={v!r} needs {length} entries, one per axis")
    return v


def shape_param(name: str, pname: str, v) -> tuple:
    """A shape: ints in [0, 2**31 - 1], None for the client's row count."""
    ints_param(name, pname, v, none_ok=True)
    check_shape(name, v, what=pname)
    return v


def dim_param(name: str, pname: str, v) -> int | None:
    """One dimension: an int in [0, 2**31 - 1], or None (the client's row count)."""
    return None if v is None else int_param(name, pname, v, 0, MAX_DIM)


def dtype_param(name: str, v, pname: str = "dtype") -> DType:
    if not isinstance(v, DType):
        raise DTypeError(f"{name}: {pname}={v!r} must be a fad dtype (fad.f64, fad.f32, "
                         "fad.i64, fad.i32 or fad.bool_)")
    return v


# --------------------------------------------------------------------------- the table

PARAM_CHECKS: dict = {}


def _check(*names):
    def register(fn):
        for n in names:
            PARAM_CHECKS[n] = fn
        return fn
    return register


@_check("reduce_sum", "reduce_max")
def _reduce(name, ts, axes):
    ints_param(name, "axes", axes)


@_check("argmax")
def _argmax(name, ts, axis):
    axis_param(name, axis, ts[0].ndim)


@_check("broadcast_in_dim")
def _broadcast_in_dim(name, ts, shape, dims):
    shape_param(name, "shape", shape)
    ints_param(name, "dims", dims, ts[0].ndim)


@_check("reshape")
def _reshape(name, ts, shape):
    shape_param(name, "shape", shape)


@_check("transpose")
def _transpose(name, ts, perm):
    ints_param(name, "perm", perm, ts[0].ndim)


def _window(name, shape, starts, limits, strides):
    nd = len(shape)
    ints_param(name, "starts", starts, nd)
    ints_param(name, "limits", limits, nd, none_ok=True)
    ints_param(name, "strides", strides, nd)
    for d, s, l, k in zip(shape, starts, limits, strides):
        if (l is None) != (d is None):
            raise ShapeError(f"{name}: limit {l} for a dimension {'?' if d is None else d} "
                             "(None, and only None, is the limit of a ragged dimension)")
        if not 1 <= k <= _INT64_MAX:
            raise ShapeError(f"{name}: stride {k} must be at least 1 (and fit in 64 bits)")
        if s < 0:
            raise ShapeError(f"{name}: start {s} must be at least 0")


@_check("slice")
def _slice(name, ts, starts, limits, strides):
    _window(name, ts[0].shape, starts, limits, strides)


@_check("pad")
def _pad(name, ts, shape, starts, limits, strides):
    shape_param(name, "shape", shape)
    _window(name, shape, starts, limits, strides)


@_check("concatenate")
def _concatenate(name, ts, axis):
    if ts:
        axis_param(name, axis, ts[0].ndim)


@_check("rows")
def _rows(name, ts, axis):
    axis_param(name, axis, ts[0].ndim)


@_check("take", "take_along_axis")
def _take(name, ts, axis):
    axis_param(name, axis, ts[0].ndim)


@_check("untake")
def _untake(name, ts, axis, dim):
    ct, idx = ts
    axis_param(name, axis, ct.ndim - idx.ndim + 1)
    dim_param(name, "dim", dim)


@_check("untake_along_axis")
def _untake_along_axis(name, ts, axis, dim):
    axis_param(name, axis, ts[0].ndim)
    dim_param(name, "dim", dim)


@_check("one_hot")
def _one_hot(name, ts, depth, dtype):
    int_param(name, "depth", depth, 0, MAX_DIM)
    dtype_param(name, dtype)


@_check("convert")
def _convert(name, ts, dtype):
    dtype_param(name, dtype)


def check_params(name: str, tensors: list[TensorType], params: dict) -> None:
    """Run the param check of primitive ``name`` (if it has params)."""
    check = PARAM_CHECKS.get(name)
    if check is not None:
        check(name, tensors, **params)
