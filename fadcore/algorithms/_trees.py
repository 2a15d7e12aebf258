"""Pytree helpers for parameter dicts: map, federated broadcast and weighted mean, copies.

``tree_map``, ``broadcast`` and ``weighted_mean`` work inside traces (on tracers) and, for
``tree_map``, eagerly on NumPy arrays; ``zeros_like`` and ``np_copy`` are NumPy only.
"""

from __future__ import annotations

import numpy as np

import fadcore as fad
from fadcore import pytree


def tree_map(fn, tree, *rest):
    """``fn`` applied leaf by leaf to trees of the same structure."""
    leaves, treedef = pytree.flatten(tree)
    others = []
    for r in rest:
        lv, td = pytree.flatten(r)
        if td != treedef:
            raise ValueError(f"tree_map: structures differ: {pytree.tree_str(treedef)} vs "
                             f"{pytree.tree_str(td)}")
        others.append(lv)
    return pytree.unflatten(treedef, [fn(*xs) for xs in zip(leaves, *others, strict=True)])


def broadcast(tree):
    """``fad.broadcast`` of every leaf (SERVER -> CLIENTS)."""
    return tree_map(fad.broadcast, tree)


def weighted_mean(tree, weights):
    """``fad.weighted_mean`` of every leaf with one weight per client (CLIENTS -> SERVER)."""
    return tree_map(lambda x: fad.weighted_mean(x, weights), tree)


def zeros_like(tree):
    return tree_map(lambda x: np.zeros_like(np.asarray(x)), tree)


def np_copy(tree):
    return tree_map(lambda x: np.array(x, dtype=np.float64, copy=True), tree)
