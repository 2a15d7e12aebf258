"""Gathers and their transposes (scatter-adds): take/untake, take_along_axis/untake_along_axis,
one_hot: reference implementations, JVP and transpose rules, op functions."""

from __future__ import annotations

import numpy as np

from ..core import bind, impl_rules
from ..ir.local_primitives import (one_hot_p, take_along_axis_p, take_p, untake_along_axis_p,
                                   untake_p)
from .rules import deflinear

# --------------------------------------------------------------------------- gathers and scatter-adds


def _defgather(gather_p, scatter_p, gather_impl, scatter_impl):
    """Register a gather ``gather(x, idx, axis)`` (linear in ``x``; the indices are data) and
    its transpose, the scatter-add ``scatter(ct, idx, axis, dim)`` into ``dim`` rows; returns
    the two op functions."""
    impl_rules[gather_p] = gather_impl
    impl_rules[scatter_p] = scatter_impl

    def gather(x, idx, axis):
        return bind(gather_p, x, idx, axis=axis)

    def scatter(ct, idx, axis, dim):
        return bind(scatter_p, ct, idx, axis=axis, dim=dim)

    deflinear(gather_p, lambda ct, x, idx, *, axis: [
        scatter(ct, idx, axis, x.type.shape[axis]), None])
    deflinear(scatter_p, lambda ct, c, idx, *, axis, dim: [gather(ct, idx, axis), None])
    return gather, scatter


def _untake_impl(ct, idx, *, axis, dim):
    ct = np.asarray(ct)
    k = np.ndim(idx)
    out = np.zeros(ct.shape[:axis] + (dim,) + ct.shape[axis + k:], dtype=ct.dtype)
    moved = np.moveaxis(out, axis, 0)
    # the indexed axes flattened (spelled out: -1 is ambiguous when another axis is 0)
    ctm = ct.reshape(ct.shape[:axis] + (int(np.size(idx)),) + ct.shape[axis + k:])
    np.add.at(moved, np.ravel(idx), np.moveaxis(ctm, axis, 0))
    return out


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


take, untake = _defgather(take_p, untake_p,
                          lambda x, idx, *, axis: np.take(x, idx, axis=axis), _untake_impl)
take_along_axis, untake_along_axis = _defgather(
    take_along_axis_p, untake_along_axis_p,
    lambda x, idx, *, axis: np.take_along_axis(x, idx, axis=axis), _untala_impl)


# --------------------------------------------------------------------------- one_hot

impl_rules[one_hot_p] = lambda l, *, depth, dtype: (
    np.asarray(l)[..., None] == np.arange(depth)).astype(dtype.np)
