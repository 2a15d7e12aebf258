"""Shape primitives: broadcast_in_dim, reshape, transpose, slice/pad, concatenate and the
client's row count: reference implementations, JVP and transpose rules, op functions."""

from __future__ import annotations

import numpy as np

from ..core import bind, impl_rules, jvp_rules, transpose_rules
from ..ir.local_primitives import (broadcast_in_dim_p, concatenate_p, pad_p, reshape_p, rows_p,
                                   slice_p, transpose_p)
from .rules import Zero, deflinear, instantiate, is_undefined, is_zero, shape_of, tensor_type

# --------------------------------------------------------------------------- broadcasting


def _resolve(shape, rows):
    """A shape param with its ragged dimensions (None) set to a client's row count."""
    if isinstance(shape, tuple):
        return tuple(rows if d is None else d for d in shape)
    return rows if shape is None else shape


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
    from .reductions import reduce_sum      # reductions' rules use broadcast_in_dim
    xt = x.type
    new = tuple(i for i in range(len(shape)) if i not in dims)
    stretched = tuple(d for i, d in enumerate(dims) if xt.shape[i] == 1 and shape[d] != 1)
    summed = reduce_sum(ct, tuple(sorted(new + stretched)))
    return [reshape(summed, xt.shape)]


deflinear(broadcast_in_dim_p, _bid_transpose)


# --------------------------------------------------------------------------- reshape, transpose

impl_rules[reshape_p] = lambda x, *, shape: np.reshape(x, shape)


def reshape(x, shape):
    shape = tuple(shape)
    if shape_of(x) == shape:
        return x
    return bind(reshape_p, x, shape=shape)


deflinear(reshape_p, lambda ct, x, *, shape: [reshape(ct, x.type.shape)])

impl_rules[transpose_p] = lambda x, *, perm: np.ascontiguousarray(np.transpose(x, perm))


def transpose(x, perm):
    perm = tuple(perm)
    if perm == tuple(range(len(perm))):
        return x
    return bind(transpose_p, x, perm=perm)


deflinear(transpose_p,
          lambda ct, x, *, perm: [transpose(ct, tuple(np.argsort(perm).tolist()))])


# --------------------------------------------------------------------------- slicing

impl_rules[slice_p] = lambda x, *, starts, limits, strides: np.ascontiguousarray(
    x[tuple(slice(s, l, k) for s, l, k in zip(starts, limits, strides))])


def slice_(x, starts, limits, strides):
    starts, limits, strides = tuple(starts), tuple(limits), tuple(strides)
    xt = tensor_type(x)
    if all((s, l, k) in ((0, d, 1), (0, None, 1)) for s, l, k, d in
           zip(starts, limits, strides, xt.shape)):
        return x
    return bind(slice_p, x, starts=starts, limits=limits, strides=strides)


def _pad_impl(ct, *, shape, starts, limits, strides):
    out = np.zeros(shape, dtype=np.asarray(ct).dtype)
    out[tuple(slice(s, l, k) for s, l, k in zip(starts, limits, strides))] = ct
    return out


impl_rules[pad_p] = _pad_impl


def pad(ct, shape, starts, limits, strides):
    return bind(pad_p, ct, shape=tuple(shape), starts=tuple(starts), limits=tuple(limits),
                strides=tuple(strides))


deflinear(slice_p, lambda ct, x, **kw: [pad(ct, x.type.shape, **kw)])
deflinear(pad_p, lambda ct, x, *, shape, **kw: [slice_(ct, **kw)])


# --------------------------------------------------------------------------- concatenate

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


# --------------------------------------------------------------------------- row counts

impl_rules[rows_p] = lambda x, *, axis: np.asarray(float(np.shape(x)[axis]))


def rows(x):
    """The client's row count (f64 scalar), from a ragged client value."""
    return bind(rows_p, x, axis=shape_of(x).index(None))
