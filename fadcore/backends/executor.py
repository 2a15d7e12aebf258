"""The runtime-neutral round executor: plan a graph's rounds, run them on some runtime.

A graph runs as its :meth:`~fadcore.ir.graph.Graph.rounds` decomposition, the MapReduce form
federated runtimes execute. This module owns everything about that which does not depend on
*where* the clients are; a :class:`Runtime` supplies the rest (the dask backend runs client
steps as tasks, :mod:`.inprocess` in this process, a Flower runtime as messages to nodes). It
imports no third-party runtime (only NumPy and fadcore itself), so any runtime can use it.

The pieces, in the order a run uses them:

- :func:`plan` (server side, once per graph): per round, the server's *prepare* graph (before
  the broadcasts), its *update* graph (after the aggregations) and the round's **client step**
  (:class:`RoundPlan`): a :class:`~fadcore.ir.graph.Graph` holding the round's broadcasts, its
  client equations and, in place of each aggregation, a group of clients' *partial* aggregate
  (``sum`` for sum/mean, ``sum(x * w)`` and ``sum(w)`` for weighted_mean). Under secure
  aggregation a ``secure_sum`` partial is instead each client's own contribution, which the
  client masks (:mod:`.secagg`). The step's inputs are the broadcast operands
  (``server_in``) then client values; ``client_in`` says where each client value comes from:
  ``("data", k)`` graph input ``k``, or ``("state", r, j)`` the ``j``-th value kept by round
  ``r``'s step (client state: residuals of a stateful reverse pass). The step's outputs are
  its ``num_partials`` partials then the values it keeps (``kept``) for later rounds or as
  client-placed graph outputs.
- :func:`run_client_step` (client side, where the clients' data is): evaluate a step on a
  group of clients with the numba or reference backend, mask secure contributions, and return
  a :class:`StepResult` (partials travel to the server; kept values stay with the clients).
- :class:`Execution` (server side): runs server work with the reference evaluator, asks the
  runtime for each round's client step, combines the groups' partials (:func:`combine`, exact
  byte accounting in :attr:`Execution.received`) and assembles the outputs.

Client groups. A runtime cuts the clients ``[0, n)`` into groups (``Runtime.groups``): one
client per group (a Flower node, a device) or chunks of many (a dask task). Partials of a
group are summed inside it, except secure contributions, which stay one per client, masked.

Writing a runtime: subclass :class:`Runtime`; see its methods and ``docs/runtimes.md``.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .. import ops
from ..errors import FadError, LoweringError
from ..ir.graph import Eqn, Graph, Literal, Var
from ..ir.primitives import Comm, after_p, infer_type, mean_p, sum_p, weighted_mean_p
from ..ir.types import CLIENTS, SERVER, FederatedType
from ..values import ClientValues
from . import reference
from .inputs import Inputs

__all__ = ["RoundPlan", "Plan", "plan", "StepResult", "SecurePartial", "run_client_step",
           "Runtime", "Execution", "execute", "combine", "subgraph_from_text", "EVALUATORS"]

#: What a client step can be evaluated with ("auto": numba if it imports, else reference).
EVALUATORS = ("auto", "numba", "reference")


# --------------------------------------------------------------------------- the plan

@dataclass
class RoundPlan:
    """One round: what the server does before and after it, and the clients' step."""

    index: int
    prepare: Graph | None           # server equations before the broadcasts
    update: Graph | None            # server equations after the aggregations
    subgraph: Graph                 # the client step: broadcasts, client eqns, partials, kept
    text: str                       # its JSON, what travels to the clients
    key: str                        # sha256 of ``text``
    server_in: list                 # Vars: the step's SERVER inputs (the broadcast operands)
    client_in: list                 # ("data", k) graph input k | ("state", r, j) kept j of r
    aggregations: list              # (eqn, position of its first partial output)
    num_partials: int
    kept: list = field(default_factory=list)    # client Vars output for later use
    last_use: int = 0               # last round reading this round's kept values
    secure: tuple = ()              # partial positions that are masked per client

    @property
    def state_in(self) -> list:
        """(round, j) of every kept value this step reads."""
        return [(s[1], s[2]) for s in self.client_in if s[0] == "state"]


@dataclass
class Plan:
    rounds: list
    final: Graph | None
    data_inputs: list               # graph input indices the client steps read
    outputs: list                   # per graph output: ("server", atom) | ("data", k) |
    #                                 ("kept", round, j)
    secure: bool = False

    @property
    def secure_rounds(self) -> list:
        return [rp.index for rp in self.rounds if rp.secure]


def _server_graph(eqns, name) -> Graph | None:
    """The equations as a graph whose inputs are the server values they read."""
    if not eqns:
        return None
    defined, inputs = set(), []
    for e in eqns:
        for a in e.inputs:
            if isinstance(a, Var) and a not in defined and a not in inputs:
                inputs.append(a)
        defined.add(e.out)
    return Graph(inputs, eqns, [e.out for e in eqns], name=name)


def _partial_eqns(e: Eqn, x, w=None) -> list:
    """A group's partial sums standing in for aggregation ``e``."""
    def summed(v):
        out = Var(FederatedType(v.type.tensor, SERVER, True))
        return Eqn(sum_p, [v], out, {}, e.source)
    if e.prim is weighted_mean_p:
        xw = Var(infer_type(ops.mul_p, [x.type, w.type], {}))
        return [Eqn(ops.mul_p, [x, w], xw, {}, e.source), summed(xw), summed(w)]
    return [summed(x)]


def _resident(graph: Graph) -> set:
    """Client values computed from the clients' own data alone (see :mod:`fadcore.ir.rounds`)."""
    from ..ir import rounds as _rounds
    return _rounds.resident(graph)


class _Planner:
    """Builds a :class:`Plan`: one client step per round, then who keeps what for whom."""

    def __init__(self, graph: Graph, secure: bool):
        self.graph, self.secure = graph, secure
        # client ``after`` only orders rounds; inside a step it is its operand
        self.alias: dict = {}
        for e in graph.eqns:
            if e.prim is after_p and e.out.type.placement is CLIENTS:
                self.alias[e.out] = self.res(e.inputs[0])
        self.input_index = {v: k for k, v in enumerate(graph.inputs)}
        # values a client computes from its own data alone are recomputed where needed
        resident = _resident(graph)
        self.resident = {e.out: e for e in graph.eqns if e.out in resident}
        self.made_in: dict = {}     # client Var -> round whose step defines it

    def res(self, a):
        while isinstance(a, Var) and a in self.alias:
            a = self.alias[a]
        return a

    def round(self, r) -> RoundPlan:
        """Round ``r``'s client step: its equations, what it reads, its partials."""
        name = self.graph.name
        defined, server_in, client_vars, eqns = set(), [], [], []

        def use(a):
            a = self.res(a)
            if isinstance(a, Literal) or a in defined:
                return a
            if a in self.resident and r.index > 1:
                e = self.resident[a]
                eqns.append(Eqn(e.prim, [use(b) for b in e.inputs], e.out, e.params, e.source))
                defined.add(a)
                return a
            group = server_in if a.type.placement is SERVER else client_vars
            if a not in group:
                group.append(a)
            return a

        for e in r.broadcasts + [e for e in r.client if e.out not in self.alias]:
            if e.out in defined:        # a resident value already recomputed here
                continue
            ins = [use(a) for a in e.inputs]
            eqns.append(Eqn(e.prim, ins, e.out, e.params, e.source))
            defined.add(e.out)
        partials, aggs, masked = [], [], []
        for e in r.aggregations:
            x = use(e.inputs[0])
            aggs.append((e, len(partials)))
            if self.secure and e.prim.comm is Comm.SECURE_AGGREGATE:
                masked.append(len(partials))
                partials.append(x)          # each client's own contribution
                continue
            w = use(e.inputs[1]) if e.prim is weighted_mean_p else None
            new = _partial_eqns(e, x, w)
            eqns += new
            partials += [q.out for q in new if q.out.type.placement is SERVER]
        for v in defined:
            self.made_in[v] = r.index
        client_in = [("data", self.input_index[v]) if v in self.input_index
                     else ("state", self.made_in[v], v)      # position fixed by keep()
                     for v in client_vars]
        sub = Graph(server_in + client_vars, eqns, partials, name=f"{name}.round{r.index}")
        return RoundPlan(r.index, _server_graph(r.prepare, f"{name}.prepare{r.index}"),
                         _server_graph(r.update, f"{name}.update{r.index}"), sub, "", "",
                         server_in, client_in, aggs, len(partials), secure=tuple(masked))

    def finish(self, rounds: list, final: list) -> Plan:
        """Number the kept values, find the outputs, freeze each step (JSON, key)."""
        by_index = {rp.index: rp for rp in rounds}

        def keep(r, v, user):
            rp = by_index[r]
            if v not in rp.kept:
                rp.kept.append(v)
            rp.last_use = max(rp.last_use, user)
            return rp.kept.index(v)

        for rp in rounds:
            rp.client_in = [s if s[0] == "data" else ("state", s[1], keep(s[1], s[2], rp.index))
                            for s in rp.client_in]
        outputs = []
        for a, t in zip(self.graph.outputs, self.graph.out_types):
            a = self.res(a)
            if t.placement is SERVER or isinstance(a, Literal):
                outputs.append(("server", a))
            elif a in self.input_index:
                outputs.append(("data", self.input_index[a]))
            else:
                made = self.made_in[a]
                outputs.append(("kept", made, keep(made, a, len(rounds) + 1)))
        for rp in rounds:
            sub = rp.subgraph
            rp.subgraph = Graph(sub.inputs, sub.eqns, sub.outputs + rp.kept, name=sub.name)
            rp.text = rp.subgraph.to_json()
            rp.key = hashlib.sha256(rp.text.encode()).hexdigest()
        data = sorted({s[1] for rp in rounds for s in rp.client_in if s[0] == "data"})
        return Plan(rounds, _server_graph(final, f"{self.graph.name}.final"), data, outputs,
                    self.secure)


def plan(graph: Graph, secure: bool = False) -> Plan:
    """The round-by-round execution plan of ``graph`` (cached on the graph).

    ``secure``: ``secure_sum`` partials are the clients' own contributions (to be masked by
    each client) instead of a group's plain sum.
    """
    cache_key = "executor-secure" if secure else "executor"
    cached = graph._lowered.get(cache_key)
    if cached is not None:
        return cached
    rs = graph.rounds()
    planner = _Planner(graph, secure)
    p = planner.finish([planner.round(r) for r in rs], rs.final)
    graph._lowered[cache_key] = p
    return p


# --------------------------------------------------------------------------- the client side

class StepResult:
    """A client step's result on one group of clients: ``partials`` (one per partial position:
    an array, or a :class:`SecurePartial` at secure positions) travel to the server; ``kept``
    (per kept value, the group's member arrays) stay with the clients."""

    __slots__ = ("partials", "kept")

    def __init__(self, partials, kept):
        self.partials, self.kept = partials, kept

    def __reduce__(self):
        return StepResult, (self.partials, self.kept)


class SecurePartial:
    """Masked contributions of a group's clients to one ``secure_sum``: ``rows[i]`` (uint64,
    fixed point modulo 2^k plus pairwise masks) is client ``clients[i]``'s."""

    __slots__ = ("clients", "rows")

    def __init__(self, clients, rows):
        self.clients, self.rows = clients, rows

    def __reduce__(self):
        return SecurePartial, (self.clients, self.rows)

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes)


_SUBGRAPHS: OrderedDict = OrderedDict()
_NO_NUMBA: set = set()
_LOCK = threading.Lock()


def subgraph_from_text(key: str, text: str) -> Graph:
    """Parse a client step's JSON (cached by key: a runtime's clients parse each step once)."""
    with _LOCK:
        g = _SUBGRAPHS.get(key)
        if g is not None:
            _SUBGRAPHS.move_to_end(key)
            return g
    g = Graph.from_json(text)
    with _LOCK:
        _SUBGRAPHS[key] = g
        while len(_SUBGRAPHS) > 256:
            _SUBGRAPHS.popitem(last=False)
    return g


def _evaluate(g: Graph, inputs: Inputs, evaluator: str, key: str) -> list:
    if evaluator != "reference" and key not in _NO_NUMBA:
        from . import _load
        run = _load("numba")
        if run is None:
            if evaluator == "numba":
                raise FadError("round executor: the numba backend is not importable here")
        else:
            try:
                return run(g, inputs)
            except LoweringError:
                if evaluator == "numba":
                    raise
                _NO_NUMBA.add(key)
    return reference.execute(g, inputs)


def run_client_step(step: Graph, num_partials: int, server_values: list, client_values: list,
                    n: int, rows=None, evaluator: str = "auto", key: str = "",
                    secure=None) -> StepResult:
    """Run a round's client step on one group of ``n`` clients (where their data is).

    ``server_values``: the broadcast operands (``RoundPlan.server_in`` order);
    ``client_values``: per client input of the step, the group's member arrays (its data
    chunk or the state it kept); ``rows``: the group's row counts when the graph is ragged;
    ``secure``: a :class:`~fadcore.backends.secagg.MaskingContext` when the step has secure
    positions (each client masks its own contribution before the result leaves the group).
    """
    values = list(server_values) + [list(ms) for ms in client_values]
    outs = _evaluate(step, Inputs(values, n, rows), evaluator, key)
    partials = []
    for j, o in enumerate(outs[:num_partials]):
        if secure is not None and j in secure.positions:
            partials.append(secure.mask(j, o.members))
        else:
            partials.append(np.asarray(o))
    kept = [[m if m.flags.c_contiguous else np.ascontiguousarray(m) for m in cv.members]
            for cv in outs[num_partials:]]
    return StepResult(partials, kept)


# --------------------------------------------------------------------------- runtimes

class Runtime:
    """Where client steps run. Subclass it to run fadcore graphs on a new runtime.

    The :class:`Execution` calls, in this order:

    - :meth:`start` once, before the first round (place the clients' data, open connections);
    - :meth:`public_keys` once, when the graph has secure sums under secure aggregation;
    - per round: :meth:`client_step`, then :meth:`release` for rounds whose kept values no
      later round reads;
    - :meth:`client_output` for each client-placed graph output a round kept (after the
      last round: kept outputs are never released);
    - :meth:`finish` at the end, also after an error.

    A runtime keeps each group's :attr:`StepResult.kept` values with those clients (a worker's
    memory, a node's state) and hands them back to the steps that read them
    (``RoundPlan.client_in`` entries ``("state", r, j)``).
    """

    #: (lo, hi) client ranges, set by :meth:`start`; each group's partials come back summed.
    groups: list

    def start(self, execution: "Execution") -> None:
        """Prepare to run ``execution.graph`` on ``execution.inputs``; set :attr:`groups`."""
        raise NotImplementedError

    def public_keys(self, session) -> list:
        """Key agreement, first message: every client makes a key pair for ``session`` (a
        :class:`~fadcore.backends.secagg.Session`), keeps the private key and returns its
        public key; the list is in client order."""
        raise FadError(f"{type(self).__name__} does not support secure aggregation")

    def client_step(self, rp: RoundPlan, server_values: list, masking=None) -> list:
        """Run round ``rp``'s step on every group; return each group's ``StepResult.partials``
        in group order. ``masking`` (a :class:`~fadcore.backends.secagg.RoundMasking`, or None)
        goes to :func:`run_client_step` with the group's private keys
        (``masking.for_group(lo, hi, keys)``)."""
        raise NotImplementedError

    def client_output(self, rp: RoundPlan, j: int) -> list:
        """The member arrays of kept value ``j`` of round ``rp``, for all clients in order."""
        raise NotImplementedError

    def release(self, round_index: int) -> None:
        """Round ``round_index``'s kept values are no longer needed."""

    def finish(self) -> None:
        """The run is over (also after an error)."""


# --------------------------------------------------------------------------- the server side

def combine(rp: RoundPlan, parts: list, n: int, env: dict, unmask=None) -> None:
    """Combine the groups' partials of round ``rp`` into its aggregates (into ``env``).

    ``parts[g][j]``: group ``g``'s partial ``j``; ``unmask(rp, position, secure_partials)``
    decodes a secure position (:meth:`~fadcore.backends.secagg.ServerSession.unmask`).
    """
    def total(j):
        acc = parts[0][j]
        for p in parts[1:]:
            acc = acc + p[j]
        return acc

    for e, j in rp.aggregations:
        if j in rp.secure:
            val = unmask(rp, e, [p[j] for p in parts])
        elif e.prim is weighted_mean_p:
            val = total(j) / total(j + 1)
        elif e.prim is mean_p:
            val = total(j) / n
        else:
            val = total(j)
        env[e.out] = np.asarray(val, dtype=e.out.type.dtype.np)


def _run_server(g: Graph | None, env: dict, n) -> None:
    if g is None:
        return
    outs = reference.execute(g, Inputs([env[v] for v in g.inputs], n, None))
    env.update(zip(g.outputs, outs))


def _nbytes(p) -> int:
    return p.nbytes if isinstance(p, SecurePartial) else int(np.asarray(p).nbytes)


class Execution:
    """The server's side of one run of ``graph`` on ``runtime``.

    ``secure``: a :class:`~fadcore.backends.secagg.SecureAggregation` to mask every
    ``secure_sum`` (None: plain sums). After :meth:`run`, :attr:`received` lists per round the
    bytes of partials the server received (``{"round", "groups", "bytes"}``), and
    :attr:`sent` the bytes of broadcast operands per round (one copy; each group gets one).
    """

    def __init__(self, graph: Graph, inputs: Inputs, runtime: Runtime, secure=None):
        self.graph, self.inputs, self.runtime = graph, inputs, runtime
        self.secure = secure
        self.plan = plan(graph, secure=secure is not None)
        self.n = inputs.num_clients
        self.env = {v: x for v, x in zip(graph.inputs, inputs.values)
                    if v.type.placement is SERVER}
        self.received: list = []
        self.sent: list = []
        self.session = None

    def run(self) -> list:
        p = self.plan
        if not p.rounds:
            for kind, *_ in p.outputs:
                if kind == "kept":      # pragma: no cover - kept values need a round
                    raise FadError("round executor: a kept output without rounds")
            _run_server(p.final, self.env, self.n)
            return self.outputs()
        if p.secure_rounds:
            from .secagg import ServerSession
            self.session = ServerSession(self.secure, self.graph, self.n, p.secure_rounds)
        self.runtime.start(self)
        try:
            if self.session is not None:
                self.session.agree(self.runtime)
            for rp in p.rounds:
                _run_server(rp.prepare, self.env, self.n)
                self.round(rp)
                _run_server(rp.update, self.env, self.n)
            _run_server(p.final, self.env, self.n)
            return self.outputs()
        finally:
            self.runtime.finish()

    def round(self, rp: RoundPlan) -> None:
        server_values = [self.env[v] for v in rp.server_in]
        self.sent.append({"round": rp.index,
                          "bytes": sum(int(np.asarray(x).nbytes) for x in server_values)})
        masking = self.session.masking(rp) if (self.session is not None and rp.secure) else None
        parts = self.runtime.client_step(rp, server_values, masking)
        self.received.append({"round": rp.index, "groups": len(parts),
                              "bytes": sum(_nbytes(x) for p in parts for x in p)})
        unmask = None if self.session is None else self.session.unmask
        combine(rp, parts, self.n, self.env, unmask)
        for q in self.plan.rounds:
            if q.last_use == rp.index:
                self.runtime.release(q.index)

    def outputs(self) -> list:
        """The graph's outputs (client-placed ones a round kept come from the runtime, which
        holds them until :meth:`Runtime.finish`)."""
        outs = []
        for (kind, *ref), t in zip(self.plan.outputs, self.graph.out_types):
            if kind == "server":
                a = ref[0]
                outs.append(np.asarray(a.value if isinstance(a, Literal) else self.env[a],
                                       dtype=t.dtype.np))
            elif kind == "data":
                outs.append(ClientValues([np.asarray(m) for m in self.inputs.values[ref[0]]],
                                         all_equal=t.all_equal))
            else:
                members = self.runtime.client_output(self.plan.rounds[ref[0] - 1], ref[1])
                outs.append(ClientValues(list(members), all_equal=t.all_equal))
        return outs


def execute(graph: Graph, inputs: Inputs, runtime: Runtime, secure=None) -> list:
    """Run ``graph`` round by round on ``runtime``; same results as ``reference.execute``."""
    return Execution(graph, inputs, runtime, secure).run()
