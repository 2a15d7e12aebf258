"""``mode="auto"`` for gradients: cost every accumulation mode, per argument group, and keep
the cheapest.

The candidates are the explicit modes (forward; reverse with stateful or remat clients; mixed,
pushing forward every boundary where that is possible, stateful or remat, and every subset of
those boundaries when there are few, a greedy per-boundary search when there are many) and, when several arguments are differentiated, combinations: a
group of small server arguments (hyperparameters) by forward mode and the others by one of the
reverse-side modes, in one graph (CSE shares their primal work, so the forward directions ride
in the rounds the reverse sweep needs anyway). Each candidate is costed with
:func:`fad.cost` under the :class:`CostWeights` and the lowest weighted cost wins (ties go to
the earlier candidate: fewer rounds first, then the simpler mode). Forward mode's cost is
affine in its number of directions (each direction is a copy of the same tangent equations), so
it is extrapolated from one- and two-direction graphs and built for real only if chosen.

``fad.explain(graph)`` prints the candidates as a table and why the winner won.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

from ..errors import DifferentiationError
from ..ir.cost import CostReport, cost
from ..ir.types import SERVER

__all__ = ["auto_grad_graph", "explain", "MAX_FORWARD_DIRECTIONS"]

#: forward mode is a candidate for at most this many directions (elements of the arguments)
MAX_FORWARD_DIRECTIONS = 256
#: up to this many pushable boundaries every subset is costed (beyond: a greedy search)
MAX_BOUNDARY_SUBSETS = 4
#: up to this many directions the forward candidate is built and costed exactly
EXACT_FORWARD_DIRECTIONS = 16


#: why remat is not built when client state carries no weight: it has the stateful schedule's
#: rounds, sends what the clients would have kept again (bytes down >=) and recomputes it
#: (client FLOPs >=), so its weighted cost is never lower
REMAT_DOMINATED = "not lower than stateful when client state has no weight (CostWeights.state=0)"


class _Estimate:
    """A cost report extrapolated affinely from forward graphs with 1 and 2 directions."""

    def __init__(self, c1: CostReport, c2: CostReport, n: int):
        def at(a, b):
            return a + (b - a) * (n - 1)
        self.rounds = c1.rounds
        self.bytes_down = at(c1.bytes_down, c2.bytes_down)
        self.bytes_up = at(c1.bytes_up, c2.bytes_up)
        self.client_state_bytes = at(c1.client_state_bytes, c2.client_state_bytes)
        self.client_flops = at(c1.client_flops, c2.client_flops)


def _row(name, report, weights, note=""):
    return dict(candidate=name, rounds=report.rounds, bytes_down=report.bytes_down,
                bytes_up=report.bytes_up, state=report.client_state_bytes,
                client_flops=report.client_flops, cost=weights.total(report), note=note)


def forward_eligible(g, leaves) -> str | None:
    """Why forward mode cannot take these argument leaves (None: it can)."""
    local = not any(e.prim.kind == "federated" for e in g.eqns)
    n = 0
    for k in leaves:
        t = g.inputs[k].type
        if t.placement is not SERVER and not local:
            return f"the client argument {t} (forward mode cannot separate clients)"
        if None in t.shape:
            return f"the ragged argument {t}"
        n += t.tensor.size()
    if n > MAX_FORWARD_DIRECTIONS:
        return f"{n} directions > {MAX_FORWARD_DIRECTIONS}"
    return None


def auto_grad_graph(g, mask, arg_leaves: dict, *, weights, with_value, policy,
                    name, forward_graph, reverse_graph, mixed_graph, combine):
    """Choose and build the cheapest gradient graph of ``g`` w.r.t. ``mask``.

    ``arg_leaves``: ``{"arg 1": [leaf, ...], ...}``, the input leaves of each differentiated
    argument (the groups forward mode may take alone). The builders: ``forward_graph(mask, ndirs=None)``,
    ``reverse_graph(mask, state)``, ``mixed_graph(mask, state, greedy, boundaries=None)``, and
    ``combine(fwd_graph, fwd_mask, rev_graph, rev_mask)`` merging two gradient graphs.
    """
    from .mixed import CostWeights
    w = weights or CostWeights()
    t0 = time.perf_counter()
    rows, built = [], {}

    def consider(label, make, note=""):
        try:
            graph = make()
        except DifferentiationError as e:
            rows.append(dict(candidate=label, skipped=str(e).split(";")[0][:90]))
            return
        built[label] = graph
        rows.append(_row(label, cost(graph, w.clients, w.rows), w, note))

    sel = [k for k, m in enumerate(mask) if m]
    why_not = forward_eligible(g, sel)
    nfwd = 0 if why_not else sum(g.inputs[k].type.tensor.size() for k in sel)
    if why_not is None and nfwd <= EXACT_FORWARD_DIRECTIONS:
        consider("forward", lambda: forward_graph(mask),
                 f"{nfwd} direction{'s' if nfwd > 1 else ''}")
    elif why_not is None:
        # cost is affine in the number of directions: measure 1 and 2, extrapolate
        c1 = cost(forward_graph(mask, ndirs=1), w.clients, w.rows)
        c2 = cost(forward_graph(mask, ndirs=2), w.clients, w.rows) if nfwd > 1 else c1
        est = _Estimate(c1, c2, nfwd) if nfwd > 1 else c1
        rows.append(_row("forward", est, w,
                         f"{nfwd} direction{'s' if nfwd > 1 else ''}"
                         + (" (extrapolated from 1 and 2)" if nfwd > 2 else "")))
        built["forward"] = None                          # built if chosen
    else:
        rows.append(dict(candidate="forward", skipped=why_not))
    for kind in ("reverse", "mixed"):
        note = "push forward where possible" if kind == "mixed" else ""
        make = reverse_graph if kind == "reverse" else (
            lambda m, st: mixed_graph(m, st, False))
        consider(f"{kind}/stateful", lambda: make(mask, "stateful"), note)
        stateful = built.get(f"{kind}/stateful")
        if stateful is not None and rows[-1]["state"] == 0:
            # no client state to give up: remat would build the same rounds
            rows.append(dict(candidate=f"{kind}/remat",
                             skipped="same as stateful (it keeps no client state)"))
        elif stateful is not None and w.state == 0:
            rows.append(dict(candidate=f"{kind}/remat", skipped=REMAT_DOMINATED))
        else:
            consider(f"{kind}/remat", lambda: make(mask, "remat"), note)
    pushed = [b for b in (built.get("mixed/stateful") or _NoGraph).meta.get("boundaries", [])
              if b["choice"] == "pushforward"]
    if 1 < len(pushed) <= MAX_BOUNDARY_SUBSETS:
        # every proper subset of the pushable boundaries, pushed forward (the rest reverse)
        idx = [b["boundary"] for b in pushed]
        for r in range(1, len(idx)):
            for sub in itertools.combinations(idx, r):
                choice = {i: "pushforward" if i in sub else "reverse" for i in idx}
                for state in ("stateful", "remat"):
                    label = f"mixed/{state} pushing {{{', '.join(map(str, sub))}}}"
                    consider(label, lambda c=choice, st=state: mixed_graph(mask, st, False, c),
                             "boundaries pushed forward; the others reverse")
                    if rows[-1].get("state") == 0 or w.state == 0:
                        break        # remat keeps the same nothing, or is dominated (above)
    elif len(pushed) > 1:
        consider("mixed/greedy", lambda: mixed_graph(mask, "stateful", True),
                 "per-boundary greedy search")
    # combinations: small server argument groups forward, the rest by a reverse-side mode
    arg_names = {tuple(lv): n for n, lv in arg_leaves.items()}
    groups = [lv for lv in arg_leaves.values() if forward_eligible(g, lv) is None]
    if len(arg_leaves) > 1:
        for r in range(1, len(groups) + 1):
            for fw in itertools.combinations(groups, r):
                fleaves = {k for lv in fw for k in lv}
                if fleaves == set(sel):
                    continue
                fmask = [k in fleaves for k in range(len(mask))]
                rmask = [m and not f for m, f in zip(mask, fmask)]
                for rev in ("reverse/stateful", "reverse/remat", "mixed/stateful"):
                    if rev not in built or (rev.endswith("remat") and w.state == 0):
                        continue
                    label = f"forward({_group_names(arg_names, fw)}) + {rev}"

                    def make(fmask=fmask, rmask=rmask, rev=rev):
                        kind, state = rev.split("/")
                        rg = (reverse_graph(rmask, state) if kind == "reverse"
                              else mixed_graph(rmask, state, False))
                        return combine(forward_graph(fmask), fmask, rg, rmask)
                    consider(label, make)
    ranked = [r for r in rows if "cost" in r]
    if not ranked:
        raise DifferentiationError(f"auto: no mode can differentiate {g.name}: " + "; ".join(
            f"{r['candidate']}: {r.get('skipped')}" for r in rows))
    best = min(ranked, key=lambda r: r["cost"])            # first of equals: listed order
    label = best["candidate"]
    graph = built[label] if built[label] is not None else forward_graph(mask)
    if label == "forward":
        real = cost(graph, w.clients, w.rows)
        best.update(_row(label, real, w, best["note"]))
    search = time.perf_counter() - t0
    runner = min((r for r in ranked if r is not best), key=lambda r: r["cost"], default=None)
    if runner is None:
        why = "the only candidate"
    elif runner["cost"] == best["cost"]:
        why = (f"ties with {runner['candidate']} at weighted cost {best['cost']:.10g}; the "
               "earlier candidate is kept")
    else:
        why = (f"lowest weighted cost: {best['cost']:.10g} < {runner['cost']:.10g} "
               f"({runner['candidate']})")
    graph.meta["auto"] = dict(candidates=rows, chosen=label, why=why,
                              weights=dataclasses.asdict(w), search_seconds=search)
    return graph


class _NoGraph:
    meta: dict = {}


def _group_names(arg_names, groups) -> str:
    return ", ".join(arg_names[tuple(lv)] for lv in groups)


def explain(graph) -> str:
    """Why an ``auto`` derivative graph is what it is (the candidates it costed, as a table), or
    the per-boundary choices of a ``mixed`` one."""
    rep = graph.meta.get("auto")
    if rep is None:
        from .mixed import explain as explain_boundaries
        return explain_boundaries(graph)
    w = ", ".join(f"{k}={v}" for k, v in rep["weights"].items())
    head = ("candidate", "rounds", "bytes down", "bytes up", "client state", "client FLOPs",
            "weighted cost")
    body = []
    for r in rep["candidates"]:
        mark = "*" if r["candidate"] == rep["chosen"] else " "
        if "cost" not in r:
            body.append((mark + r["candidate"], "-", "-", "-", "-", "-",
                         f"n/a: {r['skipped']}"))
            continue
        body.append((mark + r["candidate"], str(r["rounds"]), str(r["bytes_down"]),
                     str(r["bytes_up"]), str(r["state"]), str(r["client_flops"]),
                     f"{r['cost']:.10g}" + (f"  ({r['note']})" if r["note"] else "")))
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) for i in range(6)]
    lines = [f"{graph.name}: mode='auto' with CostWeights({w})",
             "  ".join(h.ljust(widths[i]) if i < 6 else h for i, h in enumerate(head))]
    for b in body:
        lines.append("  ".join(c.ljust(widths[i]) if i < 6 else c for i, c in enumerate(b)))
    lines.append(f"chose {rep['chosen']}: {rep['why']}")
    bd = graph.meta.get("boundaries")
    if bd:
        from .mixed import explain as explain_boundaries
        lines.append(explain_boundaries(graph))
    return "\n".join(lines)
