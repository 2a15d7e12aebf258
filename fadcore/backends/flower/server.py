"""The Flower server side: run a graph's rounds on a Flower ``Grid``.

:class:`FlowerRuntime` is a runtime of the round executor (:mod:`fadcore.backends.executor`):
the executor plans the rounds, runs the server work and combines partials; this runtime sends
each round's client step to the nodes of the cohort as ``query.fad`` messages
(:mod:`.protocol`) and hands back their contributions, one group per node, in client order.
Used by fadcore's simulation (:mod:`.simulation`) and by an exported ServerApp alike.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from ...errors import FadError
from ...ir.graph import Graph
from ...ir.types import SERVER
from ..executor import Execution, Runtime, plan
from ..inputs import Inputs
from . import protocol as P

__all__ = ["FlowerRoundError", "FlowerRuntime", "RoundTraffic", "Session", "hello", "run_graph"]


class FlowerRoundError(FadError):
    """A round failed on Flower: a node missing its data, a sub-graph failing on a node, a node
    that did not reply in time, a node lost while it holds client state."""


@dataclass
class RoundTraffic:
    """What one round moved, read off the messages themselves."""

    round: int
    nodes: int
    down_values: int = 0        # bytes of broadcast values sent, per node
    up_values: int = 0          # bytes of contributions received, per node (mean over nodes)
    down_bytes: int = 0         # bytes of all records sent (graph JSON, config, npy headers)
    up_bytes: int = 0           # bytes of all records received
    graphs_sent: int = 0        # sub-graph JSON copies sent (first time per node)
    seconds: float = 0.0
    resampled: list = field(default_factory=list)


@dataclass
class Session:
    """Server-side memory across graph runs on one Flower run: which node has which
    sub-graph, and which node is which partition."""

    sent: dict = field(default_factory=dict)        # node id -> set of sub-graph hashes
    partitions: dict = field(default_factory=dict)  # partition id -> node id


def hello(grid, timeout: float | None = 120.0) -> dict:
    """Ask every node for its partition id: ``{partition: node id}`` (nodes without one are
    numbered after the others, by node id)."""
    nodes = sorted(grid.get_node_ids())
    msgs = [Message(RecordDict({P.CONFIG: ConfigRecord({})}), dst_node_id=n,
                    message_type=P.HELLO_TYPE) for n in nodes]
    got = {}
    for m in grid.send_and_receive(msgs, timeout=timeout):
        if not m.has_error():
            got[m.metadata.src_node_id] = int(m.content.config_records[P.REPLY][P.PARTITION])
    known = {p: n for n, p in got.items() if p >= 0}
    rest = [n for n in nodes if n in got and got[n] < 0]
    base = max(known, default=-1) + 1
    known.update({base + i: n for i, n in enumerate(rest)})
    return dict(sorted(known.items()))


def _message(grid, node: int, cfg: dict, bcast: ArrayRecord | None) -> Message:
    content = RecordDict({P.CONFIG: ConfigRecord(cfg)})
    if bcast is not None:
        content[P.BROADCAST] = bcast
    return Message(content, dst_node_id=node, message_type=P.MESSAGE_TYPE)


def _state_live(rp, rounds) -> list:
    """Rounds before ``rp`` whose kept client values are still needed at or after ``rp``."""
    return [q.index for q in rounds if q.index < rp.index and q.kept and q.last_use >= rp.index]


class FlowerRuntime(Runtime):
    """The round executor's runtime on Flower: one client per node, client i on
    ``cohort[i]``; each round's client step travels as a ``query.fad`` message (see
    :func:`run_graph` for the parameters)."""

    def __init__(self, grid, session: Session, cohort: list, spares=(), data: str = "",
                 timeout=None, evaluator: str = "auto", on_dropout: str = "fail",
                 on_round=None):
        self.grid, self.session = grid, session
        self.cohort, self.spares = list(cohort), list(spares)
        self.data, self.timeout, self.evaluator = data, timeout, evaluator
        self.on_dropout, self.on_round = on_dropout, on_round
        self.traffic: list = []
        self.kept_out: dict = {}            # (round, j) -> per-client arrays

    def start(self, execution: Execution) -> None:
        self.graph, self.plan, self.n = execution.graph, execution.plan, execution.n
        if len(self.cohort) != self.n:
            raise FadError(f"flower backend: {self.n} clients but {len(self.cohort)} nodes")
        self.groups = [(i, i + 1) for i in range(self.n)]
        self.call = uuid.uuid4().hex[:12]
        self.data_inputs = [k for k, v in enumerate(self.graph.inputs)
                            if v.type.placement is not SERVER]
        # a ragged graph's steps may need the row count where no ragged input is read
        self.rows = next(([k, t.shape.index(None)] for k, t in
                          ((k, self.graph.inputs[k].type) for k in self.data_inputs)
                          if None in t.shape), None)

    # ----------------------------------------------------------------------- one round

    def _cfg(self, rp, node: int) -> dict:
        last = rp.index == len(self.plan.rounds)
        drop = [q.index for q in self.plan.rounds
                if q.kept and (q.last_use == rp.index or (last and q.last_use > rp.index))]
        wanted = sorted({ref[1] for kind, *ref in self.plan.outputs
                         if kind == "kept" and ref[0] == rp.index})
        cfg = {P.CALL: self.call, P.ROUND: rp.index, P.GRAPH: rp.key,
               P.INPUTS: [f"d{s[1]}" if s[0] == "data" else f"s{s[1]}.{s[2]}"
                          for s in rp.client_in],
               P.DATA_INPUTS: list(self.data_inputs), P.NUM_PARTIALS: rp.num_partials,
               P.RETURN: wanted, P.DROP: drop, P.EVALUATOR: self.evaluator}
        if self.data:
            cfg[P.DATA] = self.data
        if self.rows is not None:
            cfg[P.ROWS] = list(self.rows)
        if rp.key not in self.session.sent.get(node, ()):
            cfg[P.GRAPH_TEXT] = rp.text
        # Flower's ConfigRecord cannot count (nor needs) empty lists: leave them out
        return {k: v for k, v in cfg.items() if not (isinstance(v, list) and not v)}

    def _send(self, rp, nodes: list, bcast, traffic: RoundTraffic) -> dict:
        msgs = []
        for node in nodes:
            cfg = self._cfg(rp, node)
            traffic.graphs_sent += P.GRAPH_TEXT in cfg
            m = _message(self.grid, node, cfg, bcast)
            traffic.down_bytes += P.record_bytes(m.content)
            msgs.append(m)
        replies = self.grid.send_and_receive(msgs, timeout=self.timeout)
        out = {}
        for m in replies:
            out[m.metadata.src_node_id] = m
        for node in nodes:
            m = out.get(node)
            if m is not None and not m.has_error():
                self.session.sent.setdefault(node, set()).add(rp.key)
        return out

    def _fail(self, rp, i: int, node: int, why: str) -> FlowerRoundError:
        return FlowerRoundError(
            f"flower backend: round {rp.index} of {len(self.plan.rounds)} of "
            f"{self.graph.name!r} failed on client node {node} (client {i} of {self.n}): {why}")

    def client_step(self, rp, server_values: list, masking=None) -> list:
        if masking is not None:
            raise FadError("flower backend: secure aggregation (masked secure_sum) is not "
                           "implemented on Flower yet; run with secure_aggregation=False or "
                           "on backend='dask'")
        t0 = time.perf_counter()
        tr = RoundTraffic(rp.index, self.n)
        bcast = None
        if rp.server_in:
            bcast = ArrayRecord({str(i): P.array(x) for i, x in enumerate(server_values)})
            tr.down_values = P.value_bytes(bcast)
        replies = self._send(rp, self.cohort, bcast, tr)
        # a node that no longer has the sub-graph asks for it again (a restarted node)
        again = [node for node in self.cohort if node in replies and not replies[node].has_error()
                 and replies[node].content.config_records[P.REPLY][P.STATUS] == P.NEED_GRAPH]
        if again:
            for node in again:
                self.session.sent.get(node, set()).discard(rp.key)
            replies.update(self._send(rp, again, bcast, tr))
        for i, node in enumerate(list(self.cohort)):
            if node not in replies:
                replies.update(self._dropped(rp, i, node, bcast, tr))
        parts, ups = [], []
        for i, node in enumerate(self.cohort):
            m = replies[node]
            if m.has_error():
                raise self._fail(rp, i, node, f"the ClientApp raised: {m.error.reason}")
            rep = m.content.config_records[P.REPLY]
            if rep[P.STATUS] != P.OK:
                raise self._fail(rp, i, node, str(rep.get(P.ERROR, rep[P.STATUS])))
            rec = m.content.array_records[P.PARTIALS]
            parts.append([rec[str(j)].numpy() for j in range(rp.num_partials)])
            ups.append(P.value_bytes(rec))
            tr.up_bytes += P.record_bytes(m.content)
            outs = m.content.array_records.get(P.OUTPUTS)
            if outs is not None:
                for j in outs:
                    self.kept_out.setdefault((rp.index, int(j)), [None] * self.n)[i] = \
                        outs[j].numpy()
        tr.up_values = int(round(sum(ups) / max(1, len(ups))))
        tr.seconds = time.perf_counter() - t0
        self.traffic.append(tr)
        if self.on_round is not None:
            self.on_round(tr)
        return parts

    def _dropped(self, rp, i: int, node: int, bcast, tr: RoundTraffic) -> dict:
        timeout = f"did not reply within timeout={self.timeout}s"
        live = _state_live(rp, self.plan.rounds)
        if live:
            raise self._fail(rp, i, node, (
                f"{timeout}, and it holds client state kept from round(s) {live}: this graph "
                "needs the same clients back in later rounds (a stateful reverse graph); run "
                "a graph without client state (state='remat', mode='mixed'/'forward'/'auto') "
                "to allow re-sampling"))
        if self.on_dropout != "resample":
            raise self._fail(rp, i, node, f"{timeout} (on_dropout='resample' would replace it "
                             "by a spare node: this graph keeps no client state across it)")
        while self.spares:
            spare = self.spares.pop(0)
            got = self._send(rp, [spare], bcast, tr)
            if spare in got:
                self.cohort[i] = spare
                tr.resampled.append((node, spare))
                return got
        raise self._fail(rp, i, node, f"{timeout} and no spare node is left to re-sample")

    def client_output(self, rp, j: int) -> list:
        return self.kept_out[(rp.index, j)]


def run_graph(grid, graph: Graph, server_values: list, cohort: list, *, session=None,
              spares=(), data: str = "", client_values=None, timeout=None,
              evaluator: str = "auto", on_dropout: str = "fail", on_round=None, secure=None):
    """Run ``graph`` with its client work on the Flower nodes ``cohort`` (client i is node
    ``cohort[i]``); returns ``(outputs, traffic)``.

    ``server_values``: one value per graph input (None for client-placed inputs, which the
    nodes load themselves); ``data``: the directory of staged client data (simulation), or ""
    (each node's ``client-data`` function); ``client_values``: the client inputs when the
    caller has them (only needed when the graph returns a client input unchanged);
    ``timeout``: seconds a round waits for replies (None: no limit); ``on_dropout``: "fail" or
    "resample" (replace a node that did not reply by one of ``spares``, allowed only where no
    client state is live); ``on_round(traffic)``: called after each round; ``secure``: a
    ``fad.SecureAggregation`` (not supported on Flower yet: a clear error).
    """
    if on_dropout not in ("fail", "resample"):
        raise FadError(f"flower backend: on_dropout must be 'fail' or 'resample', got "
                       f"{on_dropout!r}")
    if client_values is None and any(k == "data" for k, *_ in plan(graph).outputs):
        raise FadError(f"flower backend: {graph.name} returns a client argument unchanged; "
                       "that data stays on the nodes")
    values = [x if v.type.placement is SERVER else
              (client_values[k] if client_values is not None else None)
              for k, (v, x) in enumerate(zip(graph.inputs, server_values))]
    runtime = FlowerRuntime(grid, session if session is not None else Session(), cohort,
                            spares, data, timeout, evaluator, on_dropout, on_round)
    outs = Execution(graph, Inputs(values, len(cohort), None), runtime, secure).run()
    return outs, runtime.traffic
