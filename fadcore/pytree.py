"""Minimal pytrees: nested tuples, lists and dicts (and None) of leaves.

A tree definition is a small hashable value, so it can key caches and be serialized:
``("leaf",)``, ``("none",)``, ``("tuple", (child, ...))``, ``("list", (child, ...))``,
``("dict", (key, ...), (child, ...))`` with keys sorted.
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import FadError

__all__ = ["flatten", "unflatten", "tree_map", "tree_leaves", "tree_structure", "tree_str",
           "TreeError"]

LEAF = ("leaf",)
NONE = ("none",)


def flatten(tree: Any) -> tuple[list, tuple]:
    leaves: list = []
    return leaves, _flatten(tree, leaves)


def _flatten(x: Any, leaves: list) -> tuple:
    if x is None:
        return NONE
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return ("tuple", tuple(_flatten(c, leaves) for c in x))
    if isinstance(x, list):
        return ("list", tuple(_flatten(c, leaves) for c in x))
    if isinstance(x, dict):
        keys = tuple(sorted(x))
        return ("dict", keys, tuple(_flatten(x[k], leaves) for k in keys))
    leaves.append(x)
    return LEAF


class TreeError(FadError, ValueError):
    """Pytrees that should share one structure do not."""


def tree_leaves(tree: Any) -> list:
    """The leaves of ``tree`` (tuples, lists, dicts and None are nodes), in order."""
    return flatten(tree)[0]


def tree_structure(tree: Any) -> tuple:
    """The tree definition of ``tree``: a small hashable value (see the module docstring)."""
    return flatten(tree)[1]


def tree_map(fn: Callable, tree: Any, *rest: Any) -> Any:
    """``fn`` applied leaf by leaf: ``tree_map(lambda w, g: w - lr * g, params, grads)``.

    ``rest`` are trees of the same structure as ``tree``; works on NumPy arrays, client values
    and traced values alike (``fad.tree_map``)."""
    leaves, treedef = flatten(tree)
    others = []
    for i, r in enumerate(rest):
        lv, td = flatten(r)
        if td != treedef:
            raise TreeError(f"tree_map: tree {i + 2} has structure {tree_str(td)} but tree 1 has "
                            f"{tree_str(treedef)}")
        others.append(lv)
    return unflatten(treedef, [fn(*xs) for xs in zip(leaves, *others, strict=True)])


def unflatten(treedef: tuple, leaves) -> Any:
    it = iter(leaves)
    out = _unflatten(treedef, it)
    rest = list(it)
    if rest:
        raise ValueError(f"unflatten: {len(rest)} leaves too many for the tree")
    return out


def _unflatten(t: tuple, it) -> Any:
    kind = t[0]
    if kind == "leaf":
        try:
            return next(it)
        except StopIteration:
            raise ValueError("unflatten: too few leaves for the tree") from None
    if kind == "none":
        return None
    if kind == "tuple":
        return tuple(_unflatten(c, it) for c in t[1])
    if kind == "list":
        return [_unflatten(c, it) for c in t[1]]
    if kind == "dict":
        return {k: _unflatten(c, it) for k, c in zip(t[1], t[2], strict=True)}
    raise ValueError(f"unknown tree node {kind!r}")


def num_leaves(treedef: tuple) -> int:
    kind = treedef[0]
    if kind == "leaf":
        return 1
    if kind == "none":
        return 0
    children = treedef[2] if kind == "dict" else treedef[1]
    return sum(num_leaves(c) for c in children)


def tree_str(treedef: tuple) -> str:
    kind = treedef[0]
    if kind == "leaf":
        return "*"
    if kind == "none":
        return "None"
    if kind == "dict":
        return "{" + ", ".join(f"{k!r}: {tree_str(c)}" for k, c in zip(treedef[1], treedef[2])) + "}"
    inner = ", ".join(tree_str(c) for c in treedef[1])
    return f"({inner},)" if kind == "tuple" and len(treedef[1]) == 1 else (
        f"({inner})" if kind == "tuple" else f"[{inner}]")


def to_json(treedef: tuple) -> Any:
    kind = treedef[0]
    if kind in ("leaf", "none"):
        return [kind]
    if kind == "dict":
        return [kind, list(treedef[1]), [to_json(c) for c in treedef[2]]]
    return [kind, [to_json(c) for c in treedef[1]]]


def from_json(obj: Any, depth: int = 0) -> tuple:
    """Rebuild a tree definition from its JSON form; raises ValueError on anything else."""
    if depth > 64:
        raise ValueError("tree definition nested too deeply")
    if not isinstance(obj, list) or not obj or not isinstance(obj[0], str):
        raise ValueError(f"bad tree definition {obj!r:.80}")
    kind = obj[0]
    if kind in ("leaf", "none") and len(obj) == 1:
        return (kind,)
    if kind in ("tuple", "list") and len(obj) == 2 and isinstance(obj[1], list):
        return (kind, tuple(from_json(c, depth + 1) for c in obj[1]))
    if (kind == "dict" and len(obj) == 3 and isinstance(obj[1], list) and isinstance(obj[2], list)
            and len(obj[1]) == len(obj[2]) and all(isinstance(k, str) for k in obj[1])):
        return (kind, tuple(obj[1]), tuple(from_json(c, depth + 1) for c in obj[2]))
    raise ValueError(f"bad tree definition {obj!r:.80}")
