"""Reverse mode: linearize, then transpose.

1. **Linearize**: the JVP graph (``forward.jvp_graph``) split by partial evaluation into
   *known* equations (no tangent operand: the primal work and the residuals) and *linear*
   equations (linear in the tangent inputs).
2. **Transpose**: walk the linear equations backwards, applying each primitive's transpose rule
   to the incoming cotangent. Transposes of federated primitives move cotangents the other way:
   broadcastᵀ = sum (secure_sum when the primal aggregates only with secure_sum, or under a
   secure policy), sumᵀ = secure_sumᵀ = broadcast, meanᵀ = broadcast then ÷ num_clients,
   weighted_meanᵀ = broadcast(ct / Σw) · w.

The schedule: a forward sweep (every round of the primal, its output aggregations included),
then a backward sweep. The output cotangent is seeded as ``after(1.0, out)``, so the backward
broadcasts come after the forward rounds even when the cotangent is constant. ``state="remat"``
then rewrites the graph so clients keep nothing between rounds (:func:`remat`).
"""

from __future__ import annotations

import contextlib

import numpy as np

from .. import ops
from ..core import Builder, bind, source_scope, transpose_rules
from ..errors import ClosureError, DifferentiationError
from ..ir.graph import Eqn, Graph, Literal, Var
from ..ir.passes import simplify
from ..ir.primitives import PLAIN_AGGREGATIONS
from ..ir.types import CLIENTS, SERVER
from ..ops import UndefinedPrimal, is_zero
from ..loops import partial_eval_loops
from .forward import jvp_graph


# --------------------------------------------------------------------------- aggregation class

def aggregation_class(g: Graph) -> str:
    """"secure" when every clients->server flow of ``g`` is a secure_sum (or there is none)."""
    for e, _ in g.walk():                   # loop bodies included
        if e.prim in PLAIN_AGGREGATIONS:
            return "plain"
    return "secure"


@contextlib.contextmanager
def transposed_broadcasts_as(prim):
    ops.transpose_aggregation.append(prim)
    try:
        yield
    finally:
        ops.transpose_aggregation.pop()


def broadcast_transpose_for(graph: Graph, policy) -> "ops.Primitive":
    secure = policy is not None and policy.secure
    if secure and aggregation_class(graph) != "secure":
        bad = sorted({e.prim.name for e, _ in graph.walk()
                      if e.prim in PLAIN_AGGREGATIONS})
        raise ClosureError(
            f"policy {policy} allows only secure_sum for clients->server flows, but {graph.name} "
            f"already aggregates with {', '.join(bad)}; no derivative can satisfy the policy")
    return ops.secure_sum_p if aggregation_class(graph) == "secure" else ops.sum_p


# --------------------------------------------------------------------------- linearize

def linear_vars(jg: Graph, tangent_inputs) -> set:
    lin = set(tangent_inputs)
    for e in jg.eqns:
        if any(isinstance(a, Var) and a in lin for a in e.inputs):
            lin.add(e.out)
    return lin


def transpose_rule_for(prim, mode="reverse"):
    rule = transpose_rules.get(prim)
    if rule is None:
        raise DifferentiationError(
            f"Transpose rule for primitive '{prim.name}' not implemented (needed by {mode} "
            "mode): it is not linear in its tangent operands")
    return rule


def add_cotangents(a, b):
    return b if a is None else ops.add(a, b)


def backpropagate(eqns, lin: set, read_known, ct_env: dict, mode="reverse") -> dict:
    """Transpose the linear equations ``eqns`` (in forward order) given output cotangents.

    ``ct_env`` maps linear vars to cotangent values and is updated in place."""
    for e in reversed(eqns):
        ct = ct_env.pop(e.out, None)
        if ct is None:
            continue
        args = [UndefinedPrimal(a.type) if isinstance(a, Var) and a in lin else read_known(a)
                for a in e.inputs]
        with source_scope(e.source):
            cts = transpose_rule_for(e.prim, mode)(ct, *args, **e.params)
            for a, c in zip(e.inputs, cts, strict=True):
                if isinstance(a, Var) and a in lin and c is not None and not is_zero(c):
                    ct_env[a] = add_cotangents(ct_env.get(a), c)
    return ct_env


# --------------------------------------------------------------------------- the VJP graph

def vjp_graph(graph: Graph, mask: list[bool], *, seed: str = "barrier", with_value: bool = False,
              state: str = "stateful", policy=None, rewrite=None, name: str | None = None):
    """The reverse-mode derivative graph of ``graph`` w.r.t. the inputs selected by ``mask``.

    ``seed``: ``"barrier"`` (grad; output cotangent ``after(1.0, out)``), ``"one"`` (grad with
    the constant seed 1.0, used by mixed modes) or ``"inputs"`` (vjp: output cotangents are extra
    inputs after the primals). Outputs: [primal outputs if ``with_value``] + one cotangent per
    selected input. ``rewrite(jg, lin)`` may transform the linearized graph first (mixed modes).
    """
    if state not in ("stateful", "remat"):
        from ..errors import OptionError
        raise OptionError(f"state must be 'stateful' or 'remat', got {state!r}")
    ncap = graph.meta.get("num_captured", 0)
    nuser = len(graph.inputs) - ncap
    nout = len(graph.outputs)
    agg = broadcast_transpose_for(graph, policy)

    jg = jvp_graph(graph, mask)
    n_t = sum(mask)
    tan_vars = jg.inputs[nuser:nuser + n_t]
    jg = partial_eval_loops(jg, tan_vars)      # loops: a known loop and a linear loop each
    if rewrite is not None:
        jg = rewrite(jg, nuser, n_t, nout)
        tan_vars = jg.inputs[nuser:nuser + n_t]
    lin = linear_vars(jg, tan_vars)

    b = Builder(name or f"vjp_{graph.name}")
    with b, transposed_broadcasts_as(agg):
        prim_in = [b.new_input(v.type) for v in graph.inputs[:nuser]]
        ct_in = ([b.new_input(graph.out_types[k]) for k in range(nout)]
                 if seed == "inputs" else None)
        cap_in = [b.new_input(v.type) for v in graph.inputs[nuser:]]
        env: dict = {}
        for v, x in zip(jg.inputs[:nuser], prim_in):
            env[v] = x
        for v, x in zip(jg.inputs[nuser + n_t:], cap_in):
            env[v] = x

        def read(a):
            return a.value if isinstance(a, Literal) else env[a]

        linear_eqns = []
        for e in jg.eqns:
            if e.out in lin:
                linear_eqns.append(e)
            else:
                with source_scope(e.source):
                    env[e.out] = bind(e.prim, *[read(a) for a in e.inputs], **e.params)
        outs = [read(a) for a in jg.outputs[:nout]]
        touts = jg.outputs[nout:]
        ct_env: dict = {}
        for k, (o, t) in enumerate(zip(outs, touts)):
            if seed == "inputs":
                ct = ct_in[k]
            else:
                one = np.ones((), dtype=ops.tensor_type(o).dtype.np)
                ct = ops.after(one, o) if seed == "barrier" else one
            if isinstance(t, Var) and t in lin:
                ct_env[t] = add_cotangents(ct_env.get(t), ct)
        backpropagate(linear_eqns, lin, read, ct_env)
        grads = []
        for v, x in zip(tan_vars, [p for p, m in zip(prim_in, mask) if m]):
            c = ct_env.get(v)
            grads.append(ops.zeros_like(x) if c is None else _placed_like(c, x))
        results = (outs if with_value else []) + grads
        out_atoms = [b.atom(r) for r in results]
    g = Graph(b.inputs, b.eqns, out_atoms, name=b.name,
              meta={"num_captured": ncap} if ncap else {})
    g = simplify(g)
    if state == "remat":
        g = simplify(remat(g))
    return g


def _placed_like(ct, x):
    """A constant cotangent (no equation produced it) placed and shaped like its primal."""
    from ..core import Tracer
    if isinstance(ct, Tracer):
        return ct
    return ops.add(ops.zeros_like(x), np.asarray(ct, dtype=ops.tensor_type(x).dtype.np))


# --------------------------------------------------------------------------- remat

def remat(g: Graph) -> Graph:
    """Rewrite ``g`` so no client value crosses a round: every client value used in a later
    round is recomputed there from re-broadcast server values and resident client data.

    Resident client data (the graph's client inputs) is not state; re-sent values cost bytes
    down, recomputation costs client FLOPs."""
    from ..ir.rounds import eqn_round, resident, stages
    st = stages(g)
    local_data = resident(g)
    producer = {e.out: e for e in g.eqns}
    client_inputs = {v for v in g.inputs if v.type.placement is CLIENTS}
    rnd = {}
    for e in g.eqns:
        rnd[e.out] = eqn_round(e, st) if e.out.type.placement is CLIENTS else None
        if e.out in local_data:
            rnd[e.out] = None         # computed from the client's own data: not state

    # a server value available at the start of each round: the token re-sends wait for
    token: dict[int, Var] = {}
    for v in list(g.inputs) + [e.out for e in g.eqns]:
        if v.type.placement is SERVER:
            token.setdefault(st[v] + 1, v)

    new_eqns: list[Eqn] = []
    memo: dict = {}

    def emit(prim, inputs, type_, params, source):
        out = Var(type_)
        new_eqns.append(Eqn(prim, inputs, out, params, source))
        return out

    def clone(a, r):
        """A var holding ``a``'s value, computed in round ``r``."""
        if not isinstance(a, Var) or a.type.placement is not CLIENTS:
            return a
        if a not in client_inputs and rnd[a] in (None, r):
            return a
        key = (a, r)
        if key in memo:
            return memo[key]
        if a in client_inputs:
            out = emit(ops.after_p, (a, token[r]), a.type, {}, None)
        else:
            e = producer[a]
            if e.prim is ops.broadcast_p:
                src = e.inputs[0]
                # pinned to round r even when it is a literal: an unpinned re-broadcast is the
                # original one, which CSE would merge back (client state again)
                late = emit(ops.after_p, (src, token[r]), ops.atom_type(src), {}, e.source)
                out = emit(ops.broadcast_p, (late,), e.out.type, e.params, e.source)
            elif e.prim is ops.after_p:
                out = clone(e.inputs[0], r)
            else:
                ins = tuple(clone(x, r) for x in e.inputs)
                out = emit(e.prim, ins, e.out.type, e.params, e.source)
        memo[key] = out
        return out

    for e in g.eqns:
        r = eqn_round(e, st)
        if r >= 1 and (e.out.type.placement is CLIENTS or e.prim in ops.AGGREGATIONS):
            ins = tuple(
                clone(a, r) if (isinstance(a, Var) and a.type.placement is CLIENTS
                                and a not in client_inputs and rnd[a] is not None
                                and rnd[a] < r) else a
                for a in e.inputs)
            if e.prim is ops.after_p:
                ins = (ins[0], e.inputs[1])
            new_eqns.append(e if ins == e.inputs else Eqn(e.prim, ins, e.out, e.params, e.source))
        else:
            new_eqns.append(e)
    return g.replace(eqns=new_eqns)
