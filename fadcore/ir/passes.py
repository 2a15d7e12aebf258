"""Graph clean-up passes: dead-code elimination and common-subexpression elimination.

Both keep the graph's inputs and output structure. Every primitive is pure, so an equation
whose result is not needed can go, and two equations applying the same primitive with the same
params to the same operands compute the same value. ``after`` is a real data edge (it fixes
the round a value becomes available), so it is kept like any other operand.
"""

from __future__ import annotations

from .checks import checked
from .graph import Eqn, Graph, Literal, Var


def dce(g: Graph) -> Graph:
    live = {a for a in g.outputs if isinstance(a, Var)}
    kept = []
    for e in reversed(g.eqns):
        if e.out in live:
            kept.append(e)
            live.update(a for a in e.inputs if isinstance(a, Var))
    kept.reverse()
    return g if len(kept) == len(g.eqns) else g.replace(eqns=kept)


def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def cse(g: Graph) -> Graph:
    subst: dict[Var, Var] = {}
    seen: dict[tuple, Var] = {}
    eqns = []

    def key_of(a):
        if isinstance(a, Literal):
            return ("lit",) + a.key()
        return id(subst.get(a, a))

    def sub(a):
        return subst.get(a, a) if isinstance(a, Var) else a

    for e in g.eqns:
        k = (e.prim.name, tuple(key_of(a) for a in e.inputs), _freeze(e.params))
        hit = seen.get(k)
        if hit is not None and hit.type == e.out.type:
            subst[e.out] = hit
            continue
        seen[k] = e.out
        inputs = tuple(sub(a) for a in e.inputs)
        eqns.append(e if inputs == e.inputs else Eqn(e.prim, inputs, e.out, e.params, e.source))
    if not subst:
        return g
    return g.replace(eqns=eqns, outputs=[sub(a) for a in g.outputs])


def canonical_rows(g: Graph) -> Graph:
    """Every ``rows`` equation reads the row count off one resident client input.

    All ragged dimensions of a client are its row count, so any ragged value gives the same
    answer; reading it off an input lets CSE merge them all and keeps no value alive (or in
    client state) just for its row count."""
    src = next(((v, v.type.shape.index(None)) for v in g.inputs
                if v.type.placement.name == "CLIENTS" and None in v.type.shape), None)
    if src is None or not any(e.prim.name == "rows" for e in g.eqns):
        return g
    var, axis = src
    eqns = [Eqn(e.prim, (var,), e.out, {"axis": axis}, e.source)
            if e.prim.name == "rows" and (e.inputs[0] is not var or e.params["axis"] != axis)
            else e for e in g.eqns]
    return g.replace(eqns=eqns)


def simplify(g: Graph) -> Graph:
    """CSE then DCE, until nothing changes; also inside loop bodies."""
    g = checked("canonical_rows", canonical_rows(g))
    while True:
        n = len(g.eqns)
        g = checked("dce", dce(checked("cse", cse(g))))
        if len(g.eqns) == n:
            return simplify_bodies(g)


def simplify_bodies(g: Graph, memo: dict | None = None) -> Graph:
    """Simplify the body graph of every equation holding one (loops), keeping its inputs and
    outputs; equations sharing a body keep sharing the simplified one."""
    memo = {} if memo is None else memo
    changed = False
    eqns = []
    for e in g.eqns:
        body = e.params.get("body")
        if isinstance(body, Graph):
            hit = memo.get(id(body))
            if hit is None:
                hit = memo[id(body)] = (body, _simplify_body(body))
            new = hit[1]
            if new is not body:
                e = Eqn(e.prim, e.inputs, e.out, {**e.params, "body": new}, e.source)
                changed = True
        eqns.append(e)
    return g.replace(eqns=eqns) if changed else g


def _simplify_body(body: Graph) -> Graph:
    g = body
    while True:
        n = len(g.eqns)
        g = dce(cse(g))
        if len(g.eqns) == n:
            break
    g = simplify_bodies(g)
    if len(g.eqns) == len(body.eqns) and all(a is b for a, b in zip(g.eqns, body.eqns)):
        return body
    return g
