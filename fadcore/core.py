"""Binding, tracers and graph builders.

Every operation fadcore knows is a :class:`Primitive` (declared, with its typed metadata, in
:mod:`fadcore.ir.primitives`). Applying one goes through :func:`bind`:
with traced operands it records an equation in the innermost active :class:`Builder`; with
constant operands only (and outside any trace) it evaluates eagerly with the NumPy reference
rule. The rule tables (``impl_rules``, ``jvp_rules``, ``transpose_rules``) are plain dicts
keyed by primitive and filled next to each primitive's definition in :mod:`fadcore.ops`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable

import numpy as np

from .errors import FadError, PlacementError, ShapeError, TracingError
from .ir.checks import checked
from .ir.graph import Eqn, Graph, Literal, Var
from .ir.primitives import Comm, Primitive, check_placements, infer_type, primitives, set_bind
from .ir.types import CLIENTS, SERVER, FederatedType, TensorType

__all__ = [
    "Primitive", "bind", "Tracer", "Builder", "impl_rules", "jvp_rules", "transpose_rules",
    "infer_type", "user_source", "source_scope",
]

# --------------------------------------------------------------------------- rule tables

impl_rules: dict[Primitive, Callable] = {}
jvp_rules: dict[Primitive, Callable] = {}
transpose_rules: dict[Primitive, Callable] = {}


# --------------------------------------------------------------------------- source lines

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


class TraceContext:
    """All tracing state, in one object: the active builders (innermost last) and the source
    lines that passes re-emitting equations attribute them to (innermost last)."""

    __slots__ = ("builders", "sources")

    def __init__(self):
        self.builders: list[Builder] = []
        self.sources: list[str | None] = []

    def current(self) -> "Builder | None":
        """The innermost active builder, where ``bind`` records equations."""
        return self.builders[-1] if self.builders else None

    def is_active(self, builder: "Builder") -> bool:
        return builder in self.builders


#: the one trace context (JAX keeps the same in its thread-local trace state)
trace_context = TraceContext()


def user_source() -> str | None:
    """``file:line (function)`` of the innermost frame outside fadcore and NumPy."""
    if trace_context.sources:
        return trace_context.sources[-1]
    f = sys._getframe(1)
    while f is not None:
        fn = f.f_code.co_filename
        if not (fn.startswith(_PKG_DIR) or "numpy" + os.sep in fn or fn.startswith("<frozen")):
            return f"{os.path.basename(fn)}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return None


@contextlib.contextmanager
def source_scope(source: str | None):
    """Attribute equations emitted inside to ``source`` (used by passes rewriting a graph)."""
    trace_context.sources.append(source)
    try:
        yield
    finally:
        trace_context.sources.pop()


def at_source(source: str | None) -> str:
    return f" at {source}" if source else ""


# --------------------------------------------------------------------------- typing

def atom_in_type(a) -> FederatedType | TensorType:
    """Federated type of a Var, bare tensor type of a Literal (it has no placement)."""
    return a.type


# --------------------------------------------------------------------------- tracers

class Tracer:
    """A traced value: a variable of the graph being built. Behaves like an array."""

    __slots__ = ("var", "builder")
    __array_priority__ = 1000
    __array_ufunc__ = None          # make NumPy defer to our reflected operators

    def __init__(self, var: Var, builder: "Builder"):
        self.var = var
        self.builder = builder

    type = property(lambda self: self.var.type)
    aval = type
    shape = property(lambda self: self.var.type.shape)
    dtype = property(lambda self: self.var.type.dtype)
    ndim = property(lambda self: self.var.type.ndim)
    placement = property(lambda self: self.var.type.placement)

    @property
    def size(self) -> int:
        return self.var.type.tensor.size()

    def __repr__(self) -> str:
        return f"Tracer<{self.var.type}>"

    def __bool__(self):
        raise TracingError(
            f"cannot use the traced value {self.var.type} as a Python bool{at_source(user_source())}"
            ": Python control flow on traced values is not traced. Use fadcore.numpy.where.")

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a traced scalar")
        if self.shape[0] is None:
            raise TracingError("len() of a ragged traced value: its row count is per client")
        return self.shape[0]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __index__(self):
        raise TracingError(f"the traced value {self.var.type} cannot be used as a Python int or "
                           f"index{at_source(user_source())}: its value is known only when the "
                           "graph runs")

    __hash__ = object.__hash__


# --------------------------------------------------------------------------- builders


class Builder:
    """Collects the equations of one trace. Builders nest; values of outer builders used in
    an inner one become extra (captured) inputs of the inner graph."""

    def __init__(self, name: str = "f"):
        self.name = name
        self.inputs: list[Var] = []
        self.eqns: list[Eqn] = []
        self.captured: dict[int, tuple[Tracer, Var]] = {}

    def new_input(self, type: FederatedType) -> Tracer:
        v = Var(type)
        self.inputs.append(v)
        return Tracer(v, self)

    def atom(self, x) -> Var | Literal:
        """The atom for an operand of an equation of this builder."""
        if isinstance(x, Tracer):
            if x.builder is self:
                return x.var
            if trace_context.is_active(x.builder):
                got = self.captured.get(id(x))
                if got is None:
                    got = (x, Var(x.var.type))
                    self.captured[id(x)] = got
                return got[1]
            raise TracingError(
                f"a traced value {x.type} escaped the function it was traced in (a leaked "
                "tracer): return it from that function instead of storing it")
        return to_literal(x)

    def add(self, prim: Primitive, inputs, out_type: FederatedType, params, source) -> Tracer:
        v = Var(out_type)
        self.eqns.append(Eqn(prim, inputs, v, params, source))
        return Tracer(v, self)

    def __enter__(self) -> "Builder":
        trace_context.builders.append(self)
        return self

    def __exit__(self, *exc) -> None:
        popped = trace_context.builders.pop()
        assert popped is self


def current_builder() -> Builder | None:
    return trace_context.current()


def to_literal(x) -> Literal:
    from .values import ClientValues
    if isinstance(x, ClientValues):
        raise PlacementError(
            "client values (fad.clients(...)) can only enter a traced function as arguments"
            f"{at_source(user_source())}; pass them to the traced function instead of closing "
            "over them")
    if isinstance(x, Literal):
        return x
    if isinstance(x, (bool, int, float, np.ndarray, np.generic)):
        arr = np.asarray(x)
        if arr.dtype == np.float16:
            arr = arr.astype(np.float64)
        return Literal(arr)
    if isinstance(x, (list, tuple)):
        return Literal(np.asarray(x))
    raise TracingError(f"cannot use a {type(x).__name__} as an array{at_source(user_source())}")


# --------------------------------------------------------------------------- bind

def bind(prim: Primitive, *args, **params):
    """Apply ``prim``: record an equation when tracing, evaluate eagerly otherwise."""
    builder = None
    if any(isinstance(a, Tracer) for a in args):
        builder = trace_context.current()
        if builder is None:
            raise TracingError(
                f"{prim.name}: a traced value escaped the function it was traced in (a leaked "
                "tracer); return it from that function instead of storing it")
    if builder is None and (prim.comm is not Comm.LOCAL):
        builder = current_builder()
        if builder is None:
            raise TracingError(
                f"fad.{prim.name} moves values between placements and only runs inside a "
                f"traced function (decorate it with @fad.trace){at_source(user_source())}")
    if builder is None and _makes_rows(prim, params):
        builder = current_builder()     # constants to a ragged shape: an equation at CLIENTS
    if builder is None:
        return _eager(prim, args, params)
    source = user_source()
    atoms = [builder.atom(a) for a in args]
    in_types = [a.type for a in atoms]
    out_type = infer_type(prim, in_types, params, source)
    if (prim.comm is Comm.LOCAL and out_type.placement is SERVER
            and all(isinstance(a, Literal) for a in atoms)):
        return _eager(prim, [a.value for a in atoms], params)
    return builder.add(prim, atoms, out_type, params, source)


def _makes_rows(prim: Primitive, params) -> bool:
    """Whether a shape param holds a ragged dimension (the result then lives at CLIENTS)."""
    for k in prim.shape_params:
        v = params.get(k)
        if v is None or (isinstance(v, tuple) and None in v):
            return True
    return False


def _eager(prim: Primitive, args, params):
    """Constant folding / eager NumPy evaluation of a local primitive."""
    lits = [to_literal(a) for a in args]
    t = infer_type(prim, [l.type for l in lits], params, user_source())   # same checks as traced
    if t.placement is CLIENTS:
        raise ShapeError(f"{prim.name}: a ragged dimension (?) is a client's row count; it "
                         "exists only inside a traced function")
    out = impl_rules[prim](*[l.value for l in lits], **params)
    return np.asarray(out)


# --------------------------------------------------------------------------- tracing a function

def trace_to_graph(fun: Callable, in_types: list[FederatedType], in_tree, name: str = "f"):
    """Trace ``fun`` at abstract inputs. Returns (graph, captured outer tracers)."""
    from . import pytree
    builder = Builder(name)
    with builder:
        tracers = [builder.new_input(t) for t in in_types]
        args = pytree.unflatten(in_tree, tracers)
        out = fun(*args)
        out_leaves, out_tree = pytree.flatten(out)
        outputs = []
        for i, x in enumerate(out_leaves):
            try:
                outputs.append(builder.atom(x))
            except TracingError as e:
                raise TracingError(f"output {i} of {name}: {e}") from None
    captured = list(builder.captured.values())
    graph = Graph(builder.inputs + [v for _, v in captured], builder.eqns, outputs,
                  in_tree=in_tree, out_tree=out_tree, name=name, num_captured=len(captured))
    return checked("trace", graph), [t for t, _ in captured]


def inline(graph: Graph, args: list) -> list:
    """Emit ``graph``'s equations into the current trace with ``args`` as inputs."""
    env: dict[Var, Any] = {}
    for v, a in zip(graph.inputs, args, strict=True):
        env[v] = a

    def read(a):
        return a.value if isinstance(a, Literal) else env[a]

    for e in graph.eqns:
        with source_scope(e.source):
            env[e.out] = bind(e.prim, *[read(a) for a in e.inputs], **e.params)
    return [read(a) for a in graph.outputs]


set_bind(bind)
