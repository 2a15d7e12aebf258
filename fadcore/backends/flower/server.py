"""The Flower server side: run a graph's rounds on a Flower ``Grid``.

Used by fadcore's simulation (:mod:`.simulation`) and by an exported ServerApp alike: server
work runs here with the reference evaluator; each round sends every node of the cohort a
``query.fad`` message (:mod:`.protocol`) and combines the contributions the nodes send back, in
client order, exactly as the dask backend combines its chunks' partials.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from ...errors import FadError
from ...ir.graph import Graph, Literal
from ...ir.types import SERVER
from ...values import ClientValues
from . import protocol as P
from .plan import plan as make_plan, reduce_partials, run_server

__all__ = ["FlowerRoundError", "RoundTraffic", "Session", "hello", "run_graph"]


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


class _Call:
    """One graph run: the cohort of nodes, the server environment, the traffic."""

    def __init__(self, grid, session: Session, graph: Graph, server_values: dict, cohort: list,
                 spares: list, data: str, timeout, evaluator, on_dropout, on_round, data_inputs):
        self.grid, self.session, self.graph = grid, session, graph
        self.plan = make_plan(graph)
        self.env = dict(server_values)
        self.cohort, self.spares = list(cohort), list(spares)
        self.n = len(cohort)
        self.data, self.timeout, self.evaluator = data, timeout, evaluator
        self.on_dropout, self.on_round = on_dropout, on_round
        self.data_inputs = data_inputs
        # a ragged graph's sub-graphs may need the row count where no ragged input is read
        self.rows = next(([k, t.shape.index(None)] for k, t in
                          ((k, graph.inputs[k].type) for k in data_inputs)
                          if None in t.shape), None)
        self.call = uuid.uuid4().hex[:12]
        self.traffic: list = []
        self.kept_out: dict = {}            # (round, j) -> list of per-client arrays

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
        # Flower's ConfigRecord cannot count (nor needs) empty lists: leave them out
        cfg = {k: v for k, v in cfg.items() if not (isinstance(v, list) and not v)}
        if rp.key not in self.session.sent.get(node, ()):
            cfg[P.GRAPH_TEXT] = rp.text
        return cfg

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

    def round(self, rp) -> None:
        t0 = time.perf_counter()
        tr = RoundTraffic(rp.index, self.n)
        bcast = None
        if rp.server_in:
            bcast = ArrayRecord({str(i): P.array(self.env[v])
                                 for i, v in enumerate(rp.server_in)})
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
        reduce_partials(rp, parts, self.n, self.env)
        tr.seconds = time.perf_counter() - t0
        self.traffic.append(tr)
        if self.on_round is not None:
            self.on_round(tr)

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

    # ----------------------------------------------------------------------- the run

    def run(self) -> list:
        for rp in self.plan.rounds:
            run_server(rp.prepare, self.env, self.n)
            self.round(rp)
            run_server(rp.update, self.env, self.n)
        run_server(self.plan.final, self.env, self.n)
        return self.env


def run_graph(grid, graph: Graph, server_values: list, cohort: list, *, session=None,
              spares=(), data: str = "", client_values=None, timeout=None,
              evaluator: str = "auto", on_dropout: str = "fail", on_round=None):
    """Run ``graph`` with its client work on the Flower nodes ``cohort`` (client i is node
    ``cohort[i]``); returns ``(outputs, traffic)``.

    ``server_values``: one value per graph input (None for client-placed inputs, which the
    nodes load themselves); ``data``: the directory of staged client data (simulation), or ""
    (each node's ``client-data`` function); ``client_values``: the client inputs when the
    caller has them (only needed when the graph returns a client input unchanged);
    ``timeout``: seconds a round waits for replies (None: no limit); ``on_dropout``: "fail" or
    "resample" (replace a node that did not reply by one of ``spares``, allowed only where no
    client state is live); ``on_round(traffic)``: called after each round.
    """
    if on_dropout not in ("fail", "resample"):
        raise FadError(f"flower backend: on_dropout must be 'fail' or 'resample', got "
                       f"{on_dropout!r}")
    if not cohort and any(v.type.placement is not SERVER for v in graph.inputs):
        raise FadError("flower backend: no client nodes to run on")
    data_inputs = [k for k, v in enumerate(graph.inputs) if v.type.placement is not SERVER]
    server = {v: x for v, x in zip(graph.inputs, server_values) if v.type.placement is SERVER}
    call = _Call(grid, session if session is not None else Session(), graph, server, cohort,
                 list(spares), data, timeout, evaluator, on_dropout, on_round, data_inputs)
    env = call.run()
    outs = []
    for (kind, *ref), t in zip(call.plan.outputs, graph.out_types):
        if kind == "server":
            a = ref[0]
            outs.append(np.asarray(a.value if isinstance(a, Literal) else env[a],
                                   dtype=t.dtype.np))
        elif kind == "data":
            if client_values is None:
                raise FadError(f"flower backend: {graph.name} returns its client argument "
                               f"{ref[0]} unchanged; that data stays on the nodes")
            outs.append(ClientValues([np.asarray(m) for m in client_values[ref[0]]],
                                     all_equal=t.all_equal))
        else:
            outs.append(ClientValues(call.kept_out[tuple(ref)], all_equal=t.all_equal))
    return outs, call.traffic
