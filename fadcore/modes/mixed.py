"""Mixed and auto accumulation: choose, per aggregation boundary, reverse or push-forward.

In the linearized graph every aggregation of tangents is a *boundary*. Reverse mode transposes
it into a server->clients broadcast of the cotangent (an extra round unless that cotangent is
constant, in which case it is fused into the forward round). **Push-forward** instead rewrites
the boundary before transposition: the clients' local linear work between the broadcasts ``b``
feeding the boundary and the aggregation is a Jacobian ``J_i,b`` per client; the clients compute
it in the forward round (local transposes seeded with a basis of the aggregate), the same
aggregation sums it up (``M_b = AGG_i J_i,b``, so closure holds: a secure_sum boundary
aggregates Jacobians with secure_sum), and the tangent of the aggregate becomes the server-side
linear map ``Σ_b M_b · ẇ_b``. Transposing that needs no communication: no extra round, more
bytes up (``size(aggregate) × size(w)`` per client).

Push-forward is possible at a boundary when its client work depends on differentiated values
only through broadcasts (not on differentiated client arguments, whose gradients must be
computed at the clients anyway) and the aggregate is small (``MAX_PUSHFORWARD`` elements).

``mode="mixed"`` pushes forward wherever possible (fewest rounds); ``boundaries=`` overrides per
boundary. ``mode="auto"`` starts from all-reverse and flips boundaries greedily while the
weighted cost (:class:`CostWeights`) falls, then also tries pushing every feasible boundary
forward at once, recording why in ``graph.meta["boundaries"]`` (``fad.explain``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import ops
from ..core import Builder, bind, source_scope
from ..errors import DifferentiationError
from ..ir.checks import checked
from ..ir.graph import Graph, Literal, Var
from ..ir.passes import simplify
from ..ir.primitives import Comm
from ..ir.types import CLIENTS
from .linearize import linearize
from .options import Choice, Seed, State
from .reverse import reverse_from
from .transpose import backpropagate, broadcast_transpose_for

MAX_PUSHFORWARD = 64


@dataclass(frozen=True)
class CostWeights:
    """Weights of the cost model ``auto`` minimises:
    ``rounds * R + (bytes down + bytes up per client) * B + client FLOPs * F + state bytes * S``,
    evaluated at ``clients`` clients holding ``rows`` rows each."""

    rounds: float = 1.0
    bytes: float = 1e-6
    client_flops: float = 1e-9
    state: float = 0.0
    clients: int = 100
    rows: int = 100

    def total(self, report) -> float:
        return (self.rounds * report.rounds + self.bytes * (report.bytes_down + report.bytes_up)
                + self.client_flops * report.client_flops
                + self.state * report.client_state_bytes)


# --------------------------------------------------------------------------- boundaries

@dataclass
class Boundary:
    index: int
    eqn: object
    feasible: bool
    why: str
    sources: list        # broadcast equations feeding the boundary's client work
    region: list         # the client-placed linear equations between them and the boundary
    size: int


def find_boundaries(linear: Graph, lin: set) -> list[Boundary]:
    """Every aggregation of tangents in the linear graph, with whether (and why not) it can be
    pushed forward."""
    producer = {e.out: e for e in linear.eqns}
    order = {eq: k for k, eq in enumerate(linear.eqns)}
    out = []
    for e in linear.eqns:
        if e.prim not in ops.AGGREGATIONS or e.out not in lin:
            continue
        size = e.out.type.tensor.size()
        sources, region, feasible, why = [], [], True, "client work depends on broadcasts only"
        seen: set = set()
        stack = [a for a in e.inputs if isinstance(a, Var) and a in lin]
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            p = producer.get(v)
            if p is None:
                feasible, why = False, "depends on a differentiated client argument"
                break
            if p.prim is ops.broadcast_p:
                sources.append(p)
                continue
            if p.out.type.placement is not CLIENTS:
                feasible, why = False, f"unexpected server equation {p.prim.name} in client work"
                break
            region.append(p)
            stack.extend(a for a in p.inputs if isinstance(a, Var) and a in lin)
        if feasible and any(p.prim.comm is Comm.CONTROL for p in region):
            feasible, why = False, "client work runs a loop (push-forward through a loop " \
                                   "body is not supported yet)"
        if feasible and size > MAX_PUSHFORWARD:
            feasible, why = False, f"aggregate has {size} elements (> {MAX_PUSHFORWARD})"
        region.sort(key=order.__getitem__)
        sources = sorted(set(sources), key=order.__getitem__)
        out.append(Boundary(len(out), e, feasible, why, sources, region, size))
    return out


# --------------------------------------------------------------------------- the rewrite

def pushforward_rewrite(linear: Graph, lin: set, chosen: list[Boundary]) -> Graph:
    """The linear graph with each chosen boundary's tangent replaced by ``Σ_b M_b · ẇ_b`` (see
    the module docstring); same inputs (residuals, tangents) and outputs."""
    by_eqn = {bd.eqn: bd for bd in chosen}
    b = Builder(linear.name)
    with b:
        env = {v: b.new_input(v.type) for v in linear.inputs}

        def read(a):
            return a.value if isinstance(a, Literal) else env[a]

        for e in linear.eqns:
            bd = by_eqn.get(e)
            with source_scope(e.source):
                env[e.out] = (_pushforward(bd, lin, read) if bd is not None
                              else bind(e.prim, *[read(a) for a in e.inputs], **e.params))
        outs = [b.atom(read(a)) for a in linear.outputs]
    return simplify(checked("pushforward",
                            linear.replace(inputs=b.inputs, eqns=b.eqns, outputs=outs)))


def _pushforward(bd: Boundary, lin: set, read):
    agg = bd.eqn
    x = agg.inputs[0]                                # the aggregated tangent (linear)
    xt = x.type.tensor
    m = bd.size
    per_source: dict = {s: [] for s in bd.sources}
    for k in range(m):
        seed = np.zeros(m, dtype=xt.dtype.np)
        seed[k] = 1.0
        ct_env = {x: seed.reshape(xt.shape)}
        backpropagate(bd.region, lin, read, ct_env, mode="mixed (push-forward)")
        for s in bd.sources:
            per_source[s].append(ct_env.get(s.out))
    tangent = None
    for s, cts in per_source.items():
        wt = s.inputs[0].type.tensor
        n = wt.size()
        rows = []
        for c in cts:
            if c is None:
                c = np.zeros(wt.shape, dtype=wt.dtype.np)
            rows.append(ops.reshape(c, (1, n)))
        J = ops.concatenate(rows, 0)                 # [m, n] per client (or a constant)
        M = _aggregate_jacobian(agg, J, read)
        wdot = read(s.inputs[0])
        term = ops.reshape(ops.matvec(M, ops.reshape(wdot, (n,))), xt.shape)
        tangent = term if tangent is None else ops.add(tangent, term)
    if tangent is None:
        return ops.zeros_like(read(agg.inputs[0]))
    return tangent


def _aggregate_jacobian(agg, J, read):
    from ..core import Tracer
    if isinstance(J, Tracer) and J.placement is CLIENTS:
        extra = [read(a) for a in agg.inputs[1:]]    # weighted_mean's weights
        return bind(agg.prim, J, *extra, **agg.params)
    # the same constant Jacobian at every client: aggregate it on the server, no traffic
    if agg.prim in (ops.sum_p, ops.secure_sum_p):
        return ops.mul(J, ops.convert(ops.num_clients(), ops.tensor_type(J).dtype))
    return J


# --------------------------------------------------------------------------- the mode

def mixed_vjp_graph(graph: Graph, mask, *, seed="one", with_value=False, state="stateful",
                    policy=None, auto=False, weights=None, boundaries=None, name=None) -> Graph:
    """The mixed (``auto=False``) or auto derivative graph of ``graph`` w.r.t. ``mask``.

    Linearize once, find the boundaries on the linear graph once, then build candidates by
    pushing the chosen boundaries forward in the linear graph, transposing and assembling
    (:func:`~fadcore.modes.reverse.reverse_from`). The per-boundary choices and their reasons
    are recorded in ``meta["boundaries"]`` (:func:`explain`). Arguments as for
    :func:`~fadcore.modes.reverse.vjp_graph`; ``boundaries`` maps a boundary index to
    ``"reverse"`` or ``"pushforward"``; ``weights`` are the cost weights of ``auto``."""
    seed = Seed.parse(seed, "seed must be 'barrier', 'one' or 'inputs', got {value!r}")
    seed = Seed.ONE if seed in (Seed.ONE, Seed.BARRIER) else seed
    lz = linearize(graph, mask)
    lin = lz.linear_vars()
    bds = find_boundaries(lz.linear, lin)
    for k in boundaries or {}:
        if not 0 <= k < len(bds):
            raise DifferentiationError(f"boundaries: no boundary {k} (have {len(bds)})")

    def build(choice: dict) -> Graph:
        """The derivative graph with the boundaries ``choice`` marks PUSHFORWARD pushed."""
        chosen = [bd for bd in bds if choice.get(bd.index) is Choice.PUSHFORWARD]
        linear = pushforward_rewrite(lz.linear, lin, chosen) if chosen else lz.linear
        agg = broadcast_transpose_for(graph, policy)
        return reverse_from(graph, lz.with_linear(linear), agg, seed=seed,
                            with_value=with_value, state=State.parse(
                                state, "state must be 'stateful' or 'remat', got {value!r}"),
                            name=name)

    if auto:
        g, report = _choose_auto(bds, build, weights or CostWeights())
    else:
        g, report = _choose_mixed(bds, boundaries or {}, build)
    return g.replace(meta={**g.meta, "boundaries": report})


def _choose_mixed(bds: list[Boundary], boundaries: dict, build) -> tuple[Graph, list]:
    """Push forward every feasible boundary, unless ``boundaries`` says otherwise."""
    choice, report = {}, []
    for bd in bds:
        want = boundaries.get(bd.index, Choice.PUSHFORWARD if bd.feasible else Choice.REVERSE)
        try:
            want = Choice(want)
        except ValueError:
            raise DifferentiationError(
                f"boundaries: {want!r} is not 'reverse' or 'pushforward'") from None
        if want is Choice.PUSHFORWARD and not bd.feasible:
            raise DifferentiationError(
                f"boundary {bd.index} ({bd.eqn.prim.name}) cannot be pushed forward: {bd.why}")
        choice[bd.index] = want
        report.append(dict(boundary=bd.index, aggregation=bd.eqn.prim.name,
                           choice=want.value, reason="mixed: push forward where possible"
                           if bd.feasible else bd.why))
    return build(choice), report


def _choose_auto(bds: list[Boundary], build, w: CostWeights) -> tuple[Graph, list]:
    """Start from all-reverse and flip boundaries greedily while the weighted cost falls;
    then also try pushing every feasible boundary forward at once (a round disappears only
    when all its backward broadcasts do, which single flips can miss)."""
    from ..ir.cost import cost
    choice = {bd.index: Choice.REVERSE for bd in bds}
    g = build(choice)
    best = w.total(cost(g, w.clients, w.rows))
    report = []
    for bd in bds:
        entry = dict(boundary=bd.index, aggregation=bd.eqn.prim.name, choice="reverse")
        report.append(entry)
        if not bd.feasible:
            entry["reason"] = bd.why
            continue
        trial = {**choice, bd.index: Choice.PUSHFORWARD}
        tg = build(trial)
        tc = cost(tg, w.clients, w.rows)
        total = w.total(tc)
        entry.update(reverse_cost=best, pushforward_cost=total,
                     pushforward=dict(rounds=tc.rounds, bytes_up=tc.bytes_up,
                                      bytes_down=tc.bytes_down, client_flops=tc.client_flops))
        if total < best:
            choice, g, best = trial, tg, total
            entry["choice"] = "pushforward"
            entry["reason"] = f"weighted cost {total:.6g} < {entry['reverse_cost']:.6g}"
        else:
            entry["reason"] = f"weighted cost {total:.6g} >= {best:.6g}"
    every = {bd.index: Choice.PUSHFORWARD if bd.feasible else Choice.REVERSE for bd in bds}
    if every != choice:
        eg = build(every)
        total = w.total(cost(eg, w.clients, w.rows))
        if total < best:
            for entry in report:
                if (every[entry["boundary"]] is Choice.PUSHFORWARD
                        and entry["choice"] != "pushforward"):
                    entry["choice"] = "pushforward"
                    entry["reason"] = (f"pushed forward together with the other feasible "
                                       f"boundaries: weighted cost {total:.6g} < {best:.6g}")
            g = eg
    return g, report


def explain(graph: Graph) -> str:
    """The per-boundary choices a mixed/auto derivative graph was built with."""
    rep = graph.meta.get("boundaries")
    if rep is None:
        return f"{graph.name}: not a mixed/auto derivative graph"
    if not rep:
        return f"{graph.name}: no aggregation boundary carries a tangent"
    lines = [f"{graph.name}: {len(rep)} aggregation boundar{'y' if len(rep) == 1 else 'ies'}"]
    for r in rep:
        lines.append(f"  boundary {r['boundary']} ({r['aggregation']}): {r['choice']} — "
                     f"{r.get('reason', '')}")
    return "\n".join(lines)
