"""The IR: a flat SSA graph of equations over typed variables.

Lean nodes, as in JAX's jaxprs: a :class:`Var` holds only its type (names are made when
printing), a :class:`Literal` holds a constant and its tensor type (literals take the placement
of the equation using them), an :class:`Eqn` applies one primitive to atoms and defines one
variable. A :class:`Graph` lists its input variables, its equations in a valid order and its
output atoms, plus the pytree structure of its arguments and results.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .. import pytree
from .types import SERVER, FederatedType, TensorType, dtype_of

__all__ = ["Var", "Literal", "Eqn", "Graph", "Atom"]


class Var:
    __slots__ = ("type",)

    def __init__(self, type: FederatedType):
        self.type = type

    def __repr__(self) -> str:
        return f"Var({self.type})"


class Literal:
    """A constant. Its placement is that of the equation that uses it."""

    __slots__ = ("value", "type")

    def __init__(self, value):
        value = np.asarray(value)
        self.value = value
        self.type = TensorType(dtype_of(value.dtype), tuple(int(d) for d in value.shape))

    def key(self):
        return (self.type, self.value.tobytes())

    def __repr__(self) -> str:
        return f"Literal({self.value!r})"


Atom = Var | Literal


class Eqn:
    __slots__ = ("prim", "inputs", "out", "params", "source")

    def __init__(self, prim, inputs, out: Var, params: dict, source: str | None = None):
        self.prim = prim
        self.inputs = tuple(inputs)
        self.out = out
        self.params = params
        self.source = source

    def __repr__(self) -> str:
        return f"Eqn({self.prim.name}, {len(self.inputs)} inputs -> {self.out.type})"


def atom_type(a: Atom) -> FederatedType:
    """The federated type of an atom; literals standing alone are server values."""
    return a.type if isinstance(a, Var) else FederatedType(a.type, SERVER, True)


class FrozenList(list):
    """A list that cannot be changed in place (a graph's inputs, equations and outputs).
    Slicing and ``+`` give ordinary lists, so new graphs are built from old ones as usual."""

    __slots__ = ()

    def _immutable(self, *args, **kw):
        raise TypeError("a fad.Graph is immutable: build a new one with graph.replace(...)")

    append = extend = insert = pop = remove = clear = sort = reverse = _immutable
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _immutable

    def __reduce__(self):
        return (FrozenList, (list(self),))


class GraphMeta(dict):
    """A graph's annotations. ``num_captured`` is not one of them any more: it is the field
    ``Graph.num_captured``, and asking ``meta`` for it is an error rather than a silent 0."""

    __slots__ = ()

    def _moved(self):
        raise KeyError("num_captured is the field Graph.num_captured (graph.num_user_inputs "
                       "counts the others), not a meta key")

    def get(self, key, default=None):
        if key == "num_captured":
            self._moved()
        return dict.get(self, key, default)

    def __getitem__(self, key):
        if key == "num_captured":
            self._moved()
        return dict.__getitem__(self, key)

    def __reduce__(self):
        return (GraphMeta, (dict(self),))


class Graph:
    """A traced federated computation. ``str(graph)`` is its text form.

    Immutable after construction (``graph.replace(...)`` makes a changed copy), so backends
    may cache what they derive from it (``_lowered``); ``meta`` is a dict of annotations
    (mode, boundary choices...) that no backend reads. The last ``num_captured`` inputs are
    values captured from an enclosing trace (they are not in ``in_tree``)."""

    __slots__ = ("inputs", "eqns", "outputs", "in_tree", "out_tree", "name", "meta",
                 "num_captured", "_lowered")

    def __init__(self, inputs, eqns, outputs, in_tree=None, out_tree=None, name="f",
                 meta=None, num_captured: int = 0):
        init = object.__setattr__
        init(self, "inputs", FrozenList(inputs))
        init(self, "eqns", FrozenList(eqns))
        init(self, "outputs", FrozenList(outputs))
        init(self, "in_tree", in_tree if in_tree is not None else (
            "tuple", tuple(pytree.LEAF for _ in range(len(self.inputs) - num_captured))))
        init(self, "out_tree", out_tree if out_tree is not None else (
            pytree.LEAF if len(self.outputs) == 1 else
            ("tuple", tuple(pytree.LEAF for _ in self.outputs))))
        init(self, "name", name)
        meta = GraphMeta(meta or {})
        if dict.__contains__(meta, "num_captured"):
            raise ValueError("Graph: num_captured is a field, not a meta key")
        init(self, "meta", meta)         # annotations (mode, boundaries...): not computed on
        init(self, "num_captured", int(num_captured))
        init(self, "_lowered", {})       # backend caches, keyed by backend

    def __setattr__(self, name, value):
        raise AttributeError(f"a fad.Graph is immutable (cannot set {name}): build a new one "
                             "with graph.replace(...)")

    __delattr__ = __setattr__

    def __reduce__(self):
        # pickled by its fields, with the backend caches (a worker need not lower it again)
        return (_graph, (list(self.inputs), list(self.eqns), list(self.outputs), self.in_tree,
                         self.out_tree, self.name, dict(self.meta), self.num_captured),
                self._lowered)

    def __setstate__(self, lowered: dict) -> None:
        self._lowered.update(lowered)

    @property
    def num_user_inputs(self) -> int:
        """The inputs the caller passes (the captured ones excluded)."""
        return len(self.inputs) - self.num_captured

    # -- types ---------------------------------------------------------------------------
    @property
    def in_types(self) -> list[FederatedType]:
        return [v.type for v in self.inputs]

    @property
    def out_types(self) -> list[FederatedType]:
        return [atom_type(a) for a in self.outputs]

    def __iter__(self) -> Iterator[Eqn]:
        return iter(self.eqns)

    def __len__(self) -> int:
        return len(self.eqns)

    # -- views ---------------------------------------------------------------------------
    def __str__(self) -> str:
        from .printer import pp_graph
        return pp_graph(self)

    def __repr__(self) -> str:
        return (f"<fad.Graph {self.name}: {len(self.inputs)} inputs, {len(self.eqns)} eqns, "
                f"{len(self.outputs)} outputs>")

    def primitives(self) -> dict[str, int]:
        """Primitive name -> number of equations using it (loop bodies included, each once)."""
        counts: dict[str, int] = {}
        for e, _ in self.walk():
            counts[e.prim.name] = counts.get(e.prim.name, 0) + 1
        return dict(sorted(counts.items()))

    def walk(self, _path: str = "", _seen: set | None = None):
        """Every equation with where it is: ``""`` at the top, ``"body of equation 3"`` (and
        so on, nested) inside the graphs equations hold (loop bodies, each visited once)."""
        seen = set() if _seen is None else _seen
        for k, e in enumerate(self.eqns):
            yield e, _path
            body = e.params.get("body")
            if isinstance(body, Graph) and id(body) not in seen:
                seen.add(id(body))
                inner = f"body of equation {k} ({e.prim.name})" + (f", {_path}" if _path else "")
                yield from body.walk(inner, seen)

    def verify(self) -> "Graph":
        from .verifier import verify
        verify(self)
        return self

    def to_networkx(self):
        from .export import to_networkx
        return to_networkx(self)

    def to_dot(self) -> str:
        from .export import to_dot
        return to_dot(self)

    def to_json(self, indent: int | None = None) -> str:
        from .serialize import to_json
        return to_json(self, indent=indent)

    @staticmethod
    def from_json(text: str | bytes, *, clients: int | None = None,
                  rows: int | None = None) -> "Graph":
        from .serialize import from_json
        return from_json(text, clients=clients, rows=rows)

    def rounds(self):
        from .rounds import rounds
        return rounds(self)

    # -- structure helpers ---------------------------------------------------------------
    def replace(self, **kw: Any) -> "Graph":
        fields = dict(inputs=self.inputs, eqns=self.eqns, outputs=self.outputs,
                      in_tree=self.in_tree, out_tree=self.out_tree, name=self.name,
                      meta=self.meta, num_captured=self.num_captured)
        fields.update(kw)
        return Graph(**fields)


def _graph(inputs, eqns, outputs, in_tree, out_tree, name, meta, num_captured) -> Graph:
    return Graph(inputs, eqns, outputs, in_tree, out_tree, name, meta, num_captured)
