"""Rounds: the MapReduce form of a graph, as federated runtimes execute it.

Stages come from data flow: inputs are at stage 0; an aggregation's result is one stage after
its operand; every other equation is at the latest stage of its operands. A client value at
stage ``s`` is computed in round ``s + 1``; a server value at stage ``s`` is available after
round ``s``. ``after(x, token)`` ties a value to a later stage, which is how modes fix their
schedules (reverse mode's backward sweep, remat's re-broadcasts). Client values produced in one
round and used in a later one are *client state*: the clients must keep them in between.
Client data (the graph's client inputs) is *resident*, and so is everything a client computes
from its own data alone (row counts, normalised features...): it needs nothing received and can
be recomputed in any round, so it is not state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .graph import Eqn, Graph, Literal, Var
from .primitives import Comm
from .types import CLIENTS


def stages(g: Graph) -> dict[Var, int]:
    st: dict[Var, int] = {v: 0 for v in g.inputs}
    for e in g.eqns:
        s = max((st[a] for a in e.inputs if isinstance(a, Var)), default=0)
        if e.prim.is_aggregation:
            s += 1
        elif isinstance(e.params.get("body"), Graph):     # a loop: its body's rounds, per step
            d = body_depth(e.params["body"])
            s += d * (trips(e) or 0) if d else 0
        st[e.out] = s
    return st


def trips(e) -> int | None:
    """A loop equation's static trip count (None: known only at run time, e.g. per client)."""
    if e.params.get("length") is not None:
        return e.params["length"]
    lo, hi = e.inputs[0], e.inputs[1]
    if isinstance(lo, Literal) and isinstance(hi, Literal):
        return max(0, int(hi.value) - int(lo.value))
    return None


def body_depth(body: Graph) -> int:
    """The rounds one step of a loop body takes (0 for local work)."""
    hit = body._lowered.get("rounds-depth")
    if hit is None:
        st = stages(body)
        hit = body._lowered["rounds-depth"] = max(
            (st[a] for a in body.outputs if isinstance(a, Var)), default=0)
    return hit


def resident(g: Graph) -> set:
    """Client values computed from the clients' own data alone (and the data itself)."""
    out = {v for v in g.inputs if v.type.placement is CLIENTS}
    for e in g.eqns:
        if (e.prim.comm is Comm.LOCAL and e.out.type.placement is CLIENTS
                and all(not isinstance(a, Var) or a in out for a in e.inputs)):
            out.add(e.out)
    return out


def eqn_round(e: Eqn, st: dict) -> int:
    """The round an equation runs in (0: server work before any round)."""
    if e.prim.is_aggregation:
        return st[e.out]
    body = e.params.get("body")
    if isinstance(body, Graph) and body_depth(body) and e.out.type.placement is not CLIENTS:
        return st[e.out]            # a loop whose body communicates ends in its last round
    if e.out.type.placement is CLIENTS or e.prim.comm is Comm.BROADCAST:
        return st[e.out] + 1
    return 0


@dataclass
class Round:
    """One round: server prepare -> broadcast -> client work -> aggregation -> server update."""

    index: int
    prepare: list = field(default_factory=list)      # server equations before the broadcasts
    broadcasts: list = field(default_factory=list)
    client: list = field(default_factory=list)       # client-placed equations
    aggregations: list = field(default_factory=list)
    update: list = field(default_factory=list)       # server equations using this round's aggregates
    state_in: list = field(default_factory=list)     # client vars kept from earlier rounds

    def __repr__(self) -> str:
        return (f"Round({self.index}: {len(self.prepare)} prepare, {len(self.broadcasts)} "
                f"broadcast, {len(self.client)} client, {len(self.aggregations)} aggregate, "
                f"{len(self.update)} update, {len(self.state_in)} state)")


@dataclass
class Rounds:
    rounds: list
    final: list          # server equations after the last round (or all, if there is none)
    stages: dict

    def __len__(self) -> int:
        return len(self.rounds)

    def __iter__(self):
        return iter(self.rounds)

    def __getitem__(self, i):
        return self.rounds[i]

    def client_state(self) -> list[tuple[Var, int, int]]:
        """(var, round produced, last round used) for every client value kept across rounds."""
        out = []
        for r in self.rounds:
            for v, made in r.state_in:
                out.append((v, made, r.index))
        best: dict = {}
        for v, made, used in out:
            best[v] = (v, made, max(used, best.get(v, (v, made, 0))[2]))
        return list(best.values())

    def __repr__(self) -> str:
        return "Rounds(" + ", ".join(map(repr, self.rounds)) + ")"


def rounds(g: Graph) -> Rounds:
    st = stages(g)
    n = 0
    for e in g.eqns:
        n = max(n, eqn_round(e, st))
    rs = [Round(i + 1) for i in range(n)]
    final = []
    produced_round: dict[Var, int] = {}
    local_data = resident(g)
    for e in g.eqns:
        r = eqn_round(e, st)
        if e.prim.comm is Comm.BROADCAST:
            rs[r - 1].broadcasts.append(e)
        elif e.prim.is_aggregation:
            rs[r - 1].aggregations.append(e)
        elif e.out.type.placement is CLIENTS:
            rs[r - 1].client.append(e)
        else:
            # server work at stage s runs after round s: it prepares round s + 1
            s = st[e.out]
            if s < n:
                rs[s].prepare.append(e)
            else:
                (rs[s - 1].update if s >= 1 else final).append(e)
        if e.out.type.placement is CLIENTS and e.out not in local_data:
            produced_round[e.out] = r
        if r >= 1:
            for a in e.inputs:
                if isinstance(a, Var) and a in produced_round and produced_round[a] < r:
                    entry = (a, produced_round[a])
                    if entry not in rs[r - 1].state_in:
                        rs[r - 1].state_in.append(entry)
    if n == 0:
        final = list(g.eqns)
    return Rounds(rs, final, st)
