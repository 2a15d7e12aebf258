"""Communication and compute cost of a graph, per the rounds it decomposes into.

Figures are per client unless named ``total``: bytes down are what one client receives
(every broadcast operand, in every round it is sent), bytes up what one client sends (every
aggregation operand; a weighted mean also sends its weight), client state the largest amount a
client keeps between two rounds, FLOPs a simple count (one per element for elementwise work,
2mkn for products). float64 counts 8 bytes, float32 and int32 4, bool 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import CardinalityError, FadError, ShapeError
from .graph import Graph, Literal
from .primitives import COMMUNICATION, Comm, CostClass
from .rounds import rounds as decompose
from .rounds import body_depth, trips
from .types import CLIENTS


@dataclass
class CostReport:
    rounds: int
    bytes_down: int
    bytes_up: int
    client_state_bytes: int
    server_flops: int
    client_flops: int
    primitives: dict
    clients: int = 1
    rows: int | None = None
    per_round: list = field(default_factory=list)   # (round, bytes_down, bytes_up, state_in)
    name: str = ""
    secure: dict = field(default_factory=dict)      # what secure aggregation adds (if on)
    # one entry per loop: trips (an int, or "per client"/"run time" as given) and one step's
    # cost; the totals above include trips x step (one step for counts known only at run time)
    loops: list = field(default_factory=list)

    @property
    def bytes_down_total(self) -> int:
        return self.bytes_down * self.clients

    @property
    def bytes_up_total(self) -> int:
        return self.bytes_up * self.clients

    @property
    def needs_same_clients(self) -> bool:
        """Whether every client must come back for the later rounds (it keeps state between
        rounds: stateful reverse). Otherwise a runtime may re-sample clients between rounds
        (cross-device deployments: remat, mixed/auto, forward)."""
        return self.client_state_bytes > 0

    def as_dict(self) -> dict:
        return dict(rounds=self.rounds, bytes_down=self.bytes_down, bytes_up=self.bytes_up,
                    client_state_bytes=self.client_state_bytes, server_flops=self.server_flops,
                    client_flops=self.client_flops, primitives=dict(self.primitives))

    def __str__(self) -> str:
        return cost_table({self.name or "graph": self})


FIELDS = [("rounds", "rounds"), ("bytes down / client", "bytes_down"),
          ("bytes up / client", "bytes_up"), ("client state bytes", "client_state_bytes"),
          ("client FLOPs / client", "client_flops"), ("server FLOPs", "server_flops")]


def cost_table(reports: dict) -> str:
    """Several cost reports side by side, one column each."""
    names = list(reports)
    w0 = max(len(f[0]) for f in FIELDS) + 2
    prims = ["+".join(sorted(set(reports[n].primitives) & _COMM)) for n in names]
    widths = [max(12, len(n) + 2, len(p) + 2) for n, p in zip(names, prims)]
    lines = ["".ljust(w0) + "".join(n.rjust(w) for n, w in zip(names, widths))]
    for label, attr in FIELDS:
        lines.append(label.ljust(w0) + "".join(
            f"{getattr(reports[n], attr):,}".rjust(w) for n, w in zip(names, widths)))
    lines.append("clients across rounds".ljust(w0) + "".join(
        ("same" if reports[n].needs_same_clients else "any").rjust(w)
        for n, w in zip(names, widths)))
    lines.append("communication".ljust(w0) + "".join(p.rjust(w) for p, w in zip(prims, widths)))
    any_r = next(iter(reports.values()))
    lines.append(f"(clients={any_r.clients}, rows={any_r.rows})")
    return "\n".join(lines)


_COMM = frozenset(p.name for p in COMMUNICATION)


def _count(name: str, v, least: int, error) -> int:
    """An int >= ``least``; bools, floats and strings are mistakes, not counts."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise error(f"fad.cost: {name}= must be an int, got {type(v).__name__} {v!r}")
    if v < least:
        raise error(f"fad.cost: {name}={v} must be at least {least}")
    return int(v)


def _nbytes(t, rows) -> int:
    tt = getattr(t, "tensor", t)
    if tt.ragged and rows is None:
        raise ShapeError(f"cost: the ragged value {t} needs a row count: pass rows=")
    return tt.nbytes(rows)


def _size(t, rows) -> int:
    tt = getattr(t, "tensor", t)
    if tt.ragged and rows is None:
        raise ShapeError(f"cost: the ragged value {t} needs a row count: pass rows=")
    return tt.size(rows)


def eqn_flops(e, rows) -> int:
    """FLOPs of one equation, by its primitive's cost class."""
    cls = e.prim.cost
    if cls in (CostClass.FREE, CostClass.COMMUNICATION):
        return 0
    if cls is CostClass.CONTRACTION:
        # the first operand's last axis is the contracted one (matmul, matvec, vecmat, vdot)
        k = getattr(e.inputs[0].type, "tensor", e.inputs[0].type).shape[-1]
        k = rows if k is None else k
        return 2 * k * _size(e.out.type, rows)
    if cls is CostClass.REDUCTION:
        return _size(e.inputs[0].type, rows)
    n = _size(e.out.type, rows)
    return n * (4 if cls is CostClass.TRANSCENDENTAL else 1)


#: Bytes of a client's public key in secure aggregation's key agreement (X25519).
SECURE_KEY_BYTES = 32
#: Bytes per element of a masked secure_sum contribution (a word modulo 2**k, k <= 64).
SECURE_WORD_BYTES = 8


def cost(graph: Graph, clients: int = 1, rows: int | None = None,
         secure_aggregation=None) -> CostReport:
    """``fad.cost(graph, clients=N, rows=R)``: rounds, bytes, client state and FLOPs.

    ``secure_aggregation`` (as in ``fad.run``; None: on under a ``secure_sum`` policy): when
    on and the graph has secure sums, one key agreement round is added (each client sends its
    public key, ``SECURE_KEY_BYTES``, and receives everyone's) and masked contributions count
    ``SECURE_WORD_BYTES`` per element; :attr:`CostReport.secure` itemizes it."""
    if not isinstance(graph, Graph):
        raise FadError(f"fad.cost: expected a fad.Graph (e.g. f.graph(*args)), got "
                       f"{type(graph).__name__}")
    clients = _count("clients", clients, 1, CardinalityError)
    rows = None if rows is None else _count("rows", rows, 0, ShapeError)
    if secure_aggregation is None:
        secure_aggregation = graph.meta.get("policy") == "secure_sum"
    secure_on = secure_aggregation is not False and any(
        e.prim.comm is Comm.SECURE_AGGREGATE for e in graph.eqns)
    rs = decompose(graph)
    down = up = 0
    per_round = []
    for r in rs:
        d = sum(_nbytes(e.inputs[0].type, rows) for e in r.broadcasts)
        u = 0
        for e in r.aggregations:
            if secure_on and e.prim.comm is Comm.SECURE_AGGREGATE:
                u += SECURE_WORD_BYTES * _size(e.inputs[0].type, rows)
                continue
            # every operand goes up (a weighted mean also sends its weight)
            u += sum(_nbytes(a.type, rows) for a in e.inputs)
        per_round.append((r.index, d, u, sum(_nbytes(v.type, rows) for v, _ in r.state_in)))
        down += d
        up += u
    secure = {}
    if secure_on:
        key_down, key_up = SECURE_KEY_BYTES * clients, SECURE_KEY_BYTES
        secure = dict(rounds=1, bytes_down=key_down, bytes_up=key_up)
        per_round.insert(0, (0, key_down, key_up, 0))
        down += key_down
        up += key_up
    # client state: the most a client holds across one round boundary
    state = 0
    kept = rs.client_state()
    for boundary in range(1, len(rs)):
        state = max(state, sum(_nbytes(v.type, rows) for v, made, used in kept
                               if made <= boundary < used))
    cflops = sflops = 0
    for e in graph.eqns:
        f = eqn_flops(e, rows)
        if e.prim.is_aggregation:
            sflops += clients * _size(e.out.type, rows)
        elif e.prim.comm is Comm.BROADCAST:
            pass
        elif e.out.type.placement is CLIENTS:
            cflops += f
        else:
            sflops += f
    loops = []
    seen = set()
    for k, e in enumerate(graph.eqns):        # loops: trips x one step of their body
        body = e.params.get("body")
        if not isinstance(body, Graph):
            continue
        key = (id(body), tuple(a.key() if isinstance(a, Literal) else id(a)
                               for a in e.inputs))        # one loop, several results
        if key in seen:
            continue
        seen.add(key)
        step = cost(body, clients, rows)
        n = trips(e)
        per_client = e.inputs[1].type.placement is CLIENTS if hasattr(e.inputs[1].type,
                                                                      "placement") else False
        given = n if n is not None else ("per client" if per_client else "run time")
        times = n if n is not None else 1
        down += times * step.bytes_down
        up += times * step.bytes_up
        cflops += times * step.client_flops
        sflops += times * step.server_flops
        loops.append(dict(equation=k, trips=given, rounds_per_step=body_depth(body),
                          bytes_down_per_step=step.bytes_down, bytes_up_per_step=step.bytes_up,
                          client_flops_per_step=step.client_flops,
                          server_flops_per_step=step.server_flops))
    return CostReport(len(rs) + (1 if secure_on else 0), down, up, state, sflops, cflops,
                      graph.primitives(), clients, rows, per_round, graph.name, secure, loops)
