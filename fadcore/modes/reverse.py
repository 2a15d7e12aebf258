"""Reverse mode: linearize → transpose → assemble.

1. **Linearize** (:mod:`.linearize`): the JVP graph split into a *known* graph (the primal work;
   it outputs the residuals) and a *linear* graph (linear in the tangent inputs).
2. **Transpose** (:mod:`.transpose`): the linear graph run backwards, from output cotangents to
   input cotangents. broadcastᵀ = sum (secure_sum when the primal aggregates only with
   secure_sum, or under a secure policy), sumᵀ = secure_sumᵀ = broadcast, meanᵀ = broadcast
   then ÷ num_clients, weighted_meanᵀ = broadcast(ct / Σw) · w.
3. **Assemble** (:func:`assemble`): one graph running the known graph, seeding the output
   cotangents, and running the transposed graph on the residuals and seeds.

The schedule: a forward sweep (every round of the primal, its output aggregations included),
then a backward sweep. The output cotangent is seeded as ``after(1.0, out)``, so the backward
broadcasts come after the forward rounds even when the cotangent is constant. ``state="remat"``
then rewrites the assembled graph so clients keep nothing between rounds (:func:`remat`).
Mixed modes rewrite the linear graph between steps 1 and 2 (:mod:`.mixed`).
"""

from __future__ import annotations

import numpy as np

from .. import ops
from ..core import Builder, Tracer, inline
from ..ir.checks import checked
from ..ir.graph import Eqn, Graph, Var
from ..ir.passes import simplify
from ..ir.rounds import eqn_round, resident, stages
from ..ir.types import CLIENTS, SERVER
from ..ops import TransposeContext
from .linearize import Linearized, linear_vars, linearize  # noqa: F401  (re-exported)
from .options import Seed, State
from .transpose import (Transposed, add_cotangents, aggregation_class,  # noqa: F401
                        backpropagate, broadcast_transpose_for, transpose, transpose_rule_for)

# --------------------------------------------------------------------------- the VJP graph


def vjp_graph(graph: Graph, mask: list[bool], *, seed: str = "barrier", with_value: bool = False,
              state: str = "stateful", policy=None, name: str | None = None) -> Graph:
    """The reverse-mode derivative graph of ``graph`` w.r.t. the inputs selected by ``mask``.

    ``seed``: ``"barrier"`` (grad; output cotangent ``after(1.0, out)``), ``"one"`` (grad with
    the constant seed 1.0, used by mixed modes) or ``"inputs"`` (vjp: output cotangents are extra
    inputs after the primals). Outputs: [primal outputs if ``with_value``] + one cotangent per
    selected input.
    """
    state = State.parse(state, "state must be 'stateful' or 'remat', got {value!r}")
    agg = broadcast_transpose_for(graph, policy)
    return reverse_from(graph, linearize(graph, mask), agg, seed=seed, with_value=with_value,
                        state=state, name=name)


def reverse_from(graph: Graph, lz: Linearized, agg, *, seed, with_value: bool, state,
                 name: str | None = None) -> Graph:
    """Transpose ``lz``'s linear graph (transposed broadcasts aggregate with ``agg``), assemble
    it with the known graph, and rewrite the result for ``state``."""
    seed = Seed.parse(seed, "seed must be 'barrier', 'one' or 'inputs', got {value!r}")
    tg = transpose(lz.linear, lz.num_residuals, TransposeContext(agg))
    g = simplify(assemble(graph, lz, tg, seed=seed, with_value=with_value,
                          name=name or f"vjp_{graph.name}"))
    return simplify(remat(g)) if State(state) is State.REMAT else g


def assemble(graph: Graph, lz: Linearized, tg: Transposed, *, seed: Seed, with_value: bool,
             name: str) -> Graph:
    """One graph: the known graph, the output cotangent seeds, then the transposed graph.

    Inputs: ``graph``'s user inputs, [the output cotangents if ``seed`` is INPUTS], the
    captured values. Outputs: [primal outputs if ``with_value``] + one cotangent per selected
    input (zeros where the transposed graph has none)."""
    nuser, nout = graph.num_user_inputs, lz.num_outputs
    b = Builder(name)
    with b:
        prim_in = [b.new_input(v.type) for v in graph.inputs[:nuser]]
        ct_in = ([b.new_input(t) for t in graph.out_types] if seed is Seed.INPUTS else None)
        cap_in = [b.new_input(v.type) for v in graph.inputs[nuser:]]
        known = inline(lz.known, prim_in + cap_in)
        outs, residuals = known[:nout], known[nout:]
        seeds = [ct_in[k] if seed is Seed.INPUTS else _seed(o, seed) for k, o in enumerate(outs)]
        cts = iter(inline(tg.graph, residuals + seeds))
        selected = [p for p, m in zip(prim_in, lz.mask) if m]
        grads = [_placed_like(next(cts), x) if nz else ops.zeros_like(x)
                 for x, nz in zip(selected, tg.nonzero, strict=True)]
        out_atoms = [b.atom(r) for r in (outs if with_value else []) + grads]
    return checked("assemble", Graph(b.inputs, b.eqns, out_atoms, name=b.name,
                                     num_captured=graph.num_captured))


def _seed(out, seed: Seed):
    """The output cotangent of a grad: 1.0, after the output is computed (BARRIER) or not."""
    one = np.ones((), dtype=ops.tensor_type(out).dtype.np)
    return ops.after(one, out) if seed is Seed.BARRIER else one


def _placed_like(ct, x):
    """A constant cotangent (no equation produced it) placed and shaped like its primal."""
    if isinstance(ct, Tracer):
        return ct
    return ops.add(ops.zeros_like(x), np.asarray(ct, dtype=ops.tensor_type(x).dtype.np))


# --------------------------------------------------------------------------- remat

def remat(g: Graph) -> Graph:
    """Rewrite ``g`` so no client value crosses a round: every client value used in a later
    round is recomputed there from re-broadcast server values and resident client data.

    Resident client data (the graph's client inputs) is not state; re-sent values cost bytes
    down, recomputation costs client FLOPs."""
    return checked("remat", _Remat(g).run())


class _Remat:
    """The remat rewrite of one graph (see :func:`remat`)."""

    def __init__(self, g: Graph):
        self.g = g
        self.st = stages(g)
        self.producer = {e.out: e for e in g.eqns}
        self.client_inputs = {v for v in g.inputs if v.type.placement is CLIENTS}
        self.rnd = self._client_rounds()
        self.token = self._round_tokens()
        self.eqns: list[Eqn] = []
        self.memo: dict = {}

    def _client_rounds(self) -> dict:
        """The round each client value is computed in; None for resident values (computed from
        the client's own data alone: not state) and server values."""
        local_data = resident(self.g)
        rnd = {}
        for e in self.g.eqns:
            rnd[e.out] = eqn_round(e, self.st) if e.out.type.placement is CLIENTS else None
            if e.out in local_data:
                rnd[e.out] = None
        return rnd

    def _round_tokens(self) -> dict[int, Var]:
        """A server value available at the start of each round: the token re-sends wait for."""
        token: dict[int, Var] = {}
        for v in list(self.g.inputs) + [e.out for e in self.g.eqns]:
            if v.type.placement is SERVER:
                token.setdefault(self.st[v] + 1, v)
        return token

    def emit(self, prim, inputs, type_, params, source) -> Var:
        out = Var(type_)
        self.eqns.append(Eqn(prim, inputs, out, params, source))
        return out

    def is_state(self, a, r: int) -> bool:
        """Whether operand ``a`` of a round-``r`` equation is a client value kept from an
        earlier round."""
        return (isinstance(a, Var) and a.type.placement is CLIENTS and a not in self.client_inputs
                and self.rnd[a] is not None and self.rnd[a] < r)

    def clone(self, a, r: int):
        """A var holding ``a``'s value, computed in round ``r``."""
        if not isinstance(a, Var) or a.type.placement is not CLIENTS:
            return a
        if a not in self.client_inputs and self.rnd[a] in (None, r):
            return a
        key = (a, r)
        if key not in self.memo:
            self.memo[key] = self._recompute(a, r)
        return self.memo[key]

    def _recompute(self, a: Var, r: int) -> Var:
        if a in self.client_inputs:
            return self.emit(ops.after_p, (a, self.token[r]), a.type, {}, None)
        e = self.producer[a]
        if e.prim is ops.broadcast_p:
            src = e.inputs[0]
            # pinned to round r even when it is a literal: an unpinned re-broadcast is the
            # original one, which CSE would merge back (client state again)
            late = self.emit(ops.after_p, (src, self.token[r]), ops.atom_type(src), {}, e.source)
            return self.emit(ops.broadcast_p, (late,), e.out.type, e.params, e.source)
        if e.prim is ops.after_p:
            return self.clone(e.inputs[0], r)
        ins = tuple(self.clone(x, r) for x in e.inputs)
        return self.emit(e.prim, ins, e.out.type, e.params, e.source)

    def run(self) -> Graph:
        for e in self.g.eqns:
            r = eqn_round(e, self.st)
            if r >= 1 and (e.out.type.placement is CLIENTS or e.prim.is_aggregation):
                ins = tuple(self.clone(a, r) if self.is_state(a, r) else a for a in e.inputs)
                if e.prim is ops.after_p:
                    ins = (ins[0], e.inputs[1])
                self.eqns.append(e if ins == e.inputs
                                 else Eqn(e.prim, ins, e.out, e.params, e.source))
            else:
                self.eqns.append(e)
        return self.g.replace(eqns=self.eqns)
