"""Transpose: a linear graph run backwards, from output cotangents to input cotangents.

Each linear equation's transpose rule (``transpose_rules``) maps the cotangent of its result to
cotangents of its linear operands; known operands arrive as values, linear ones as
:class:`~fadcore.ops.UndefinedPrimal`. Transposes of federated primitives move cotangents the
other way: broadcastᵀ = sum (or secure_sum: the :class:`~fadcore.ops.TransposeContext` says
which), sumᵀ = secure_sumᵀ = broadcast, meanᵀ = broadcast then ÷ num_clients,
weighted_meanᵀ = broadcast(ct / Σw) · w.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from ..core import Builder, bind, source_scope, transpose_rules
from ..errors import ClosureError, DifferentiationError
from ..ir.checks import checked
from ..ir.graph import Graph, Literal, Var, atom_type
from ..ir.primitives import PLAIN_AGGREGATIONS, Primitive
from ..ops import TransposeContext, UndefinedPrimal, call_transpose, is_zero
from .linearize import linear_vars
from .options import AggregationClass

# --------------------------------------------------------------------------- aggregation class


def aggregation_class(g: Graph) -> AggregationClass:
    """SECURE when every clients->server flow of ``g`` is a secure_sum (or there is none)."""
    for e, _ in g.walk():                   # loop bodies included
        if e.prim in PLAIN_AGGREGATIONS:
            return AggregationClass.PLAIN
    return AggregationClass.SECURE


def broadcast_transpose_for(graph: Graph, policy) -> Primitive:
    """What the transposed broadcasts of ``graph``'s derivative aggregate with (the closure
    rule), or :class:`ClosureError` if ``policy`` cannot be met."""
    secure = policy is not None and policy.secure
    cls = aggregation_class(graph)
    if secure and cls is not AggregationClass.SECURE:
        bad = sorted({e.prim.name for e, _ in graph.walk() if e.prim in PLAIN_AGGREGATIONS})
        raise ClosureError(
            f"policy {policy} allows only secure_sum for clients->server flows, but {graph.name} "
            f"already aggregates with {', '.join(bad)}; no derivative can satisfy the policy")
    return ops.secure_sum_p if cls is AggregationClass.SECURE else ops.sum_p


# --------------------------------------------------------------------------- backpropagation

def transpose_rule_for(prim, mode="reverse"):
    rule = transpose_rules.get(prim)
    if rule is None:
        raise DifferentiationError(
            f"Transpose rule for primitive '{prim.name}' not implemented (needed by {mode} "
            "mode): it is not linear in its tangent operands")
    return rule


def add_cotangents(a, b):
    return b if a is None else ops.add(a, b)


def backpropagate(eqns, lin: set, read_known, ct_env: dict, mode="reverse",
                  ctx: TransposeContext = TransposeContext()) -> dict:
    """Transpose the linear equations ``eqns`` (in forward order) given output cotangents.

    ``ct_env`` maps linear vars to cotangent values and is updated in place; ``ctx`` is what
    the transpose rules may need to know (which aggregation a transposed broadcast becomes)."""
    for e in reversed(eqns):
        ct = ct_env.pop(e.out, None)
        if ct is None:
            continue
        args = [UndefinedPrimal(a.type) if isinstance(a, Var) and a in lin else read_known(a)
                for a in e.inputs]
        with source_scope(e.source):
            cts = call_transpose(transpose_rule_for(e.prim, mode), ctx, ct, args, e.params)
            for a, c in zip(e.inputs, cts, strict=True):
                if isinstance(a, Var) and a in lin and c is not None and not is_zero(c):
                    ct_env[a] = add_cotangents(ct_env.get(a), c)
    return ct_env


# --------------------------------------------------------------------------- transpose

@dataclass(frozen=True)
class Transposed:
    """A transposed linear graph. ``graph``'s inputs are the linear graph's residuals, then
    one cotangent per linear output; its outputs are the cotangents of the tangent inputs that
    get one (``nonzero[k]``: tangent input k does)."""

    graph: Graph
    nonzero: tuple[bool, ...]


def transpose(linear: Graph, num_residuals: int, ctx: TransposeContext = TransposeContext(),
              mode: str = "reverse") -> Transposed:
    """Transpose ``linear`` (inputs: ``num_residuals`` residuals, then the tangents).

    Equations that do not depend on the tangents (a push-forward's client Jacobians) are
    evaluated forward first; the others are transposed in reverse order."""
    tangent_in = linear.inputs[num_residuals:]
    lin = linear_vars(linear, tangent_in)
    b = Builder(f"transpose_{linear.name}")
    with b:
        env = {v: b.new_input(v.type) for v in linear.inputs[:num_residuals]}
        cts_in = [b.new_input(atom_type(o)) for o in linear.outputs]

        def read(a):
            return a.value if isinstance(a, Literal) else env[a]

        for e in linear.eqns:
            if e.out not in lin:
                with source_scope(e.source):
                    env[e.out] = bind(e.prim, *[read(a) for a in e.inputs], **e.params)
        ct_env: dict = {}
        for o, ct in zip(linear.outputs, cts_in):
            if isinstance(o, Var) and o in lin:
                ct_env[o] = add_cotangents(ct_env.get(o), ct)
        backpropagate([e for e in linear.eqns if e.out in lin], lin, read, ct_env, mode, ctx)
        cts = [ct_env.get(v) for v in tangent_in]
        outs = [b.atom(c) for c in cts if c is not None]
    g = checked("transpose", Graph(b.inputs, b.eqns, outs, name=b.name))
    return Transposed(g, tuple(c is not None for c in cts))
