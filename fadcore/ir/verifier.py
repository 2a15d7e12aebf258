"""Type-check a whole graph: SSA order, placements, shapes and dtypes of every equation."""

from __future__ import annotations

from ..errors import FadError, VerificationError
from ..pytree import num_leaves
from .graph import Graph, Literal, Var
from .primitives import infer_type, primitives
from .printer import Namer
from .types import FederatedType


def verify(g: Graph) -> None:
    """Raise :class:`VerificationError` naming the first ill-typed equation of ``g``."""
    name = Namer()
    defined: set[Var] = set()
    for v in g.inputs:
        _check_var(v, "input")
        if v in defined:
            raise VerificationError(f"input {name(v)} is listed twice")
        name(v)
        defined.add(v)
    for k, e in enumerate(g.eqns):
        where = f"equation {k} ({e.prim.name})" + (f" from {e.source}" if e.source else "")
        if primitives.get(e.prim.name) is not e.prim:
            raise VerificationError(f"{where}: unknown primitive {e.prim.name!r}")
        for a in e.inputs:
            if isinstance(a, Var):
                if a not in defined:
                    raise VerificationError(f"{where}: operand used before it is defined")
            elif not isinstance(a, Literal):
                raise VerificationError(f"{where}: operand {a!r} is neither a Var nor a Literal")
        _check_var(e.out, where)
        if e.out in defined:
            raise VerificationError(f"{where}: redefines variable {name(e.out)}")
        try:
            want = infer_type(e.prim, [a.type for a in e.inputs], e.params)
        except FadError as err:
            raise VerificationError(f"{where}: {err}") from None
        except Exception as err:   # a malformed params dict from a hand-made graph
            raise VerificationError(f"{where}: bad parameters {e.params}: {err}") from None
        if want != e.out.type:
            raise VerificationError(
                f"{where}: result declared {e.out.type} but the operands give {want}")
        defined.add(e.out)
        name(e.out)
    for a in g.outputs:
        if isinstance(a, Var) and a not in defined:
            raise VerificationError("an output is not defined by the graph")
    if num_leaves(g.in_tree) != g.num_user_inputs:
        raise VerificationError("the input tree does not match the number of inputs")
    if num_leaves(g.out_tree) != len(g.outputs):
        raise VerificationError("the output tree does not match the number of outputs")


def _check_var(v, where) -> None:
    if not isinstance(v, Var) or not isinstance(v.type, FederatedType):
        raise VerificationError(f"{where}: {v!r} is not a typed variable")
