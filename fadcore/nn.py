"""Neural-network helpers built from :mod:`fadcore.numpy`."""

from __future__ import annotations

from . import numpy as fnp
from . import ops, pytree

__all__ = ["softmax_cross_entropy", "clip_by_norm", "global_norm", "sigmoid_cross_entropy"]


def softmax_cross_entropy(logits, labels):
    """Per-row loss ``logsumexp(logits) - logits[label]`` for integer labels (one per row)."""
    lt = ops.tensor_type(labels)
    if not lt.dtype.is_int:
        from .core import at_source, user_source
        from .errors import DTypeError
        raise DTypeError(
            f"softmax_cross_entropy: labels must be integer class indices, got {lt}"
            f"{at_source(user_source())}; pass integer labels (y.astype(np.int64)), or use "
            "fad.nn.sigmoid_cross_entropy for 0/1 float targets")
    lse = fnp.logsumexp(logits, axis=-1)
    idx = fnp.expand_dims(labels, -1)
    picked = fnp.take_along_axis(logits, idx, axis=-1)
    return lse - fnp.squeeze(picked, -1)


def sigmoid_cross_entropy(logits, labels):
    """Per-element logistic loss for 0/1 labels: ``log(1 + e^z) - y z``."""
    labels = fnp.astype(labels, ops.tensor_type(logits).dtype)
    return fnp.softplus(logits) - labels * logits


def global_norm(tree):
    leaves, _ = pytree.flatten(tree)
    total = fnp.sum(fnp.square(leaves[0]))
    for leaf in leaves[1:]:
        total = total + fnp.sum(fnp.square(leaf))
    return fnp.sqrt(total)


def clip_by_norm(x, c):
    """``x * min(1, c / ||x||)`` with the global norm over all leaves of a pytree ``x``."""
    leaves, tree = pytree.flatten(x)
    total = fnp.sum(fnp.square(leaves[0]))
    for leaf in leaves[1:]:
        total = total + fnp.sum(fnp.square(leaf))
    # min(1, c / ||x||) = c / max(||x||, c), with the max taken on squares: sqrt and the
    # division stay away from 0, so the derivative at x = 0 is the identity (not NaN)
    scale = c / fnp.sqrt(fnp.maximum(total, c * c))
    return pytree.unflatten(tree, [leaf * scale for leaf in leaves])
