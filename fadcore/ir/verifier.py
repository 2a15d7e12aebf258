"""Type-check a whole graph: SSA order, placements, shapes and dtypes of every equation.

A failure names the equation, prints it with a few equations around it and, when a pass's
output is being checked (:mod:`fadcore.ir.checks`), the pass that produced it."""

from __future__ import annotations

from ..errors import FadError, VerificationError
from ..pytree import num_leaves
from .graph import Graph, Literal, Var
from .primitives import infer_type, primitives
from .printer import Namer, pp_context
from .types import FederatedType


class _EqnError(Exception):
    """An ill-formed equation (the message says what); verify adds the context."""


def verify(g: Graph, pass_name: str | None = None) -> None:
    """Raise :class:`VerificationError` naming the first ill-typed equation of ``g`` (and the
    pass ``pass_name`` that produced ``g``, if given)."""
    after = f"after pass {pass_name!r}: " if pass_name else ""
    name = Namer()
    defined: set[Var] = set()
    for v in g.inputs:
        _check_var(v, "input")
        if v in defined:
            raise VerificationError(f"{after}input {name(v)} is listed twice")
        name(v)
        defined.add(v)
    for k, e in enumerate(g.eqns):
        try:
            _check_eqn(e, defined)
            if e.out in defined:
                raise _EqnError(f"redefines variable {name(e.out)}")
        except _EqnError as err:
            where = f"equation {k} ({e.prim.name})" + (f" from {e.source}" if e.source else "")
            raise VerificationError(f"{after}{where}: {err}\n{pp_context(g, k)}") from None
        defined.add(e.out)
        name(e.out)
    for a in g.outputs:
        if isinstance(a, Var) and a not in defined:
            raise VerificationError(f"{after}an output is not defined by the graph")
    if num_leaves(g.in_tree) != g.num_user_inputs:
        raise VerificationError(f"{after}the input tree does not match the number of inputs")
    if num_leaves(g.out_tree) != len(g.outputs):
        raise VerificationError(f"{after}the output tree does not match the number of outputs")


def _check_eqn(e, defined: set) -> None:
    if primitives.get(e.prim.name) is not e.prim:
        raise _EqnError(f"unknown primitive {e.prim.name!r}")
    for a in e.inputs:
        if isinstance(a, Var):
            if a not in defined:
                raise _EqnError("operand used before it is defined")
        elif not isinstance(a, Literal):
            raise _EqnError(f"operand {a!r} is neither a Var nor a Literal")
    try:
        _check_var(e.out, "its result")
    except VerificationError as err:
        raise _EqnError(str(err)) from None
    try:
        want = infer_type(e.prim, [a.type for a in e.inputs], e.params)
    except FadError as err:
        raise _EqnError(str(err)) from None
    except Exception as err:   # a malformed params dict from a hand-made graph
        raise _EqnError(f"bad parameters {e.params}: {err}") from None
    if want != e.out.type:
        raise _EqnError(f"result declared {e.out.type} but the operands give {want}")


def _check_var(v, where) -> None:
    if not isinstance(v, Var) or not isinstance(v.type, FederatedType):
        raise VerificationError(f"{where}: {v!r} is not a typed variable")
