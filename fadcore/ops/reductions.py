"""Reductions: reduce_sum, reduce_max, argmax: reference implementations, JVP and transpose
rules, op functions."""

from __future__ import annotations

import numpy as np

from ..core import bind, impl_rules, jvp_rules
from ..ir.local_primitives import argmax_p, kept_dims, norm_axes, reduce_max_p, reduce_sum_p
from .elementwise import convert, div, eq, mul
from .rules import Zero, deflinear, is_zero, shape_of, tensor_type
from .shapes import broadcast_in_dim

impl_rules[reduce_sum_p] = lambda x, *, axes: np.asarray(np.sum(x, axis=axes), dtype=x.dtype)
impl_rules[reduce_max_p] = lambda x, *, axes: np.asarray(np.max(x, axis=axes))
impl_rules[argmax_p] = lambda x, *, axis: np.asarray(np.argmax(x, axis=axis), dtype=np.int64)


def reduce_sum(x, axes):
    axes = norm_axes(axes, len(shape_of(x)), "reduce_sum")
    return x if not axes else bind(reduce_sum_p, x, axes=axes)


def reduce_max(x, axes):
    axes = norm_axes(axes, len(shape_of(x)), "reduce_max")
    return x if not axes else bind(reduce_max_p, x, axes=axes)


def argmax(x, axis):
    (axis,) = norm_axes(axis, len(shape_of(x)), "argmax")
    return bind(argmax_p, x, axis=axis)


def _reduce_sum_transpose(ct, x, *, axes):
    xt = x.type
    return [broadcast_in_dim(ct, xt.shape, kept_dims(xt.ndim, axes))]


deflinear(reduce_sum_p, _reduce_sum_transpose)


def _reduce_max_jvp(primals, tangents, *, axes):
    (x,), (t,) = primals, tangents
    out = reduce_max(x, axes)
    if is_zero(t):
        return out, Zero(tensor_type(out))
    xt = tensor_type(x)
    hit = convert(eq(x, broadcast_in_dim(out, xt.shape, kept_dims(xt.ndim, axes))), xt.dtype)
    return out, div(reduce_sum(mul(t, hit), axes), reduce_sum(hit, axes))


jvp_rules[reduce_max_p] = _reduce_max_jvp
