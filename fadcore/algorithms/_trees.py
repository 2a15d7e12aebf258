"""Pytree helpers for parameter dicts: map, federated broadcast and weighted mean, copies.

``tree_map``, ``broadcast`` and ``weighted_mean`` work inside traces (on tracers) and, for
``tree_map``, eagerly on NumPy arrays; ``zeros_like`` and ``np_copy`` are NumPy only.
"""

from __future__ import annotations

import numpy as np

import fadcore as fad
from fadcore import pytree  # noqa: F401
from fadcore.pytree import tree_map


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
