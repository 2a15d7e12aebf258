"""Forward mode: the JVP rewrite of a graph.

Every equation is re-emitted through its JVP rule (``jvp_rules``) with traced primals and
tangents (a primitive declared ``differentiable=False`` gets a zero tangent, no rule needed), so the tangent computation is recorded as ordinary equations of the same primitives:
the JVP of a broadcast is a broadcast, of an aggregation the same aggregation. Same rounds as
the primal, more bytes per round, no client state. Several tangent directions are handled in one
graph (primal work is shared by CSE).
"""

from __future__ import annotations

import numpy as np

from ..core import Builder, jvp_rules, source_scope, bind
from ..errors import DifferentiationError
from ..ir.checks import checked
from ..ir.graph import Graph, Literal, Var
from ..ir.passes import simplify
from ..ops import Zero, instantiate, is_zero


def jvp_rule_for(prim, mode: str = "forward"):
    rule = jvp_rules.get(prim)
    if rule is None:
        raise DifferentiationError(
            f"JVP rule for primitive '{prim.name}' not implemented (needed by {mode} mode)")
    return rule


def emit_jvp(graph: Graph, primals: list, tangents_by_dir: list[list]) -> tuple[list, list[list]]:
    """Emit the JVP of ``graph`` into the current builder.

    ``primals`` holds one value per graph input; ``tangents_by_dir[k]`` one tangent (or Zero)
    per input for direction k. Returns (primal outputs, tangent outputs per direction), with
    Zero where a tangent output is zero.
    """
    penv: dict[Var, object] = dict(zip(graph.inputs, primals, strict=True))
    tenvs = [dict(zip(graph.inputs, ts, strict=True)) for ts in tangents_by_dir]

    def p(a):
        return a.value if isinstance(a, Literal) else penv[a]

    def t(env, a):
        return Zero(a.type) if isinstance(a, Literal) else env[a]

    for e in graph.eqns:
        ins = [p(a) for a in e.inputs]
        with source_scope(e.source):
            tans = [[t(env, a) for a in e.inputs] for env in tenvs]
            if not e.prim.differentiable or all(is_zero(x) for ts in tans for x in ts):
                penv[e.out] = bind(e.prim, *ins, **e.params)
                for env in tenvs:
                    env[e.out] = Zero(e.out.type)
                continue
            rule = jvp_rule_for(e.prim)
            out = None
            for env, ts in zip(tenvs, tans):
                if all(is_zero(x) for x in ts):
                    env[e.out] = Zero(e.out.type)
                    continue
                o, tout = rule(ins, ts, **e.params)
                out = o if out is None else out
                env[e.out] = tout
            penv[e.out] = out if out is not None else bind(e.prim, *ins, **e.params)
    outs = [p(a) for a in graph.outputs]
    touts = [[t(env, a) for a in graph.outputs] for env in tenvs]
    return outs, touts


def jvp_graph(graph: Graph, mask: list[bool], ndirs: int = 1, *, instantiate_zeros=True,
              name: str | None = None) -> Graph:
    """The JVP graph: inputs (primals, tangents of masked inputs per direction, captures),
    outputs (primal outputs, tangent outputs per direction)."""
    ncap = graph.num_captured
    nuser = len(graph.inputs) - ncap
    if any(mask[nuser:]):
        raise DifferentiationError("captured values of an enclosing trace are held fixed")
    b = Builder(name or f"jvp_{graph.name}")
    with b:
        prim_in = [b.new_input(v.type) for v in graph.inputs[:nuser]]
        tan_in = [[b.new_input(v.type) if m else None for v, m in zip(graph.inputs, mask)]
                  for _ in range(ndirs)]
        cap_in = [b.new_input(v.type) for v in graph.inputs[nuser:]]
        primals = prim_in + cap_in
        tangents = [[t if t is not None else Zero(v.type) for t, v in zip(ts, graph.inputs)]
                    for ts in tan_in]
        outs, touts = emit_jvp(graph, primals, tangents)
        if instantiate_zeros:
            touts = [[instantiate(t, o) for t, o in zip(ts, outs)] for ts in touts]
        out_atoms = [b.atom(x) for x in outs] + [b.atom(x) for ts in touts for x in ts]
    inputs = b.inputs
    g = Graph(inputs, b.eqns, out_atoms, name=b.name, num_captured=ncap)
    return simplify(checked("jvp", g))


def strong_zero_tangents(graph: Graph, tangent_inputs) -> Graph:
    """``graph`` with every tangent-by-coefficient product made a *strong zero*: a zero tangent
    times anything (``inf``, ``nan``) is 0, as in ``select(t == 0, 0, t * c)``.

    A JVP along ``e_j`` multiplies each partial derivative by a tangent entry, and IEEE gives
    ``0 * inf = nan``: ``grad(sum(log(x)))`` at ``x = [0, 1]`` by one-hot directions would be
    ``[inf, nan]`` where reverse mode (which multiplies cotangents, all 1 here) gives
    ``[inf, 1]``. Forward-mode ``grad`` runs its JVP graph through this rewrite so that a
    component only sees the partials on its own paths. ``tangent_inputs`` are the positions of
    the tangent inputs; a product is rewritten when exactly one operand depends on them (a
    ``mul``, or a ``div`` with the tangent on top).
    """
    from .. import ops
    tan = {graph.inputs[i] for i in tangent_inputs}
    b = Builder(graph.name)
    with b:
        env: dict[Var, object] = {v: b.new_input(v.type) for v in graph.inputs}

        def read(a):
            return a.value if isinstance(a, Literal) else env[a]

        for e in graph.eqns:
            dep = [isinstance(a, Var) and a in tan for a in e.inputs]
            args = [read(a) for a in e.inputs]
            with source_scope(e.source):
                out = bind(e.prim, *args, **e.params)
                if (e.prim.name == "mul" and dep[0] != dep[1]) or (
                        e.prim.name == "div" and dep[0] and not dep[1]):
                    t, c = (args[0], e.inputs[1]) if dep[0] else (args[1], e.inputs[0])
                    if not (isinstance(c, Literal) and np.isfinite(c.value).all()
                            and (e.prim.name == "mul" or (c.value != 0).all())):
                        out = ops.select(ops.eq(t, 0), 0.0, out)
            env[e.out] = out
            if any(dep):
                tan.add(e.out)
        outs = [b.atom(read(a)) for a in graph.outputs]
    g = Graph(b.inputs, b.eqns, outs, in_tree=graph.in_tree, out_tree=graph.out_tree,
              name=graph.name, meta=dict(graph.meta), num_captured=graph.num_captured)
    return simplify(checked("strong_zero_tangents", g))
