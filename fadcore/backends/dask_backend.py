"""The dask backend: each round's client work runs as tasks over chunks of clients.

A graph runs as its :meth:`~fadcore.ir.graph.Graph.rounds` decomposition, the MapReduce form
federated runtimes execute. Server work (prepare, update, final equations) runs on the driver
with the reference evaluator. For each round, the clients ``[0, n)`` are cut into chunks; one
task per chunk runs that round's *client sub-graph*: a :class:`Graph` holding the round's
broadcasts, its client equations and, in place of each aggregation, the chunk's partial sums
(``sum`` for sum/secure_sum/mean, ``sum(x * w)`` and ``sum(w)`` for weighted_mean). Tasks
evaluate it with the numba backend when it is installed (else the reference evaluator) and the
driver adds the partials up. So what travels per round is one copy of the broadcast operands
per worker and one set of partials per chunk, not per client.

Data placement and faults. Every value a task reads is a dask future with lineage, so a worker
lost mid-run is survived by recomputation and the result is bit-identical:

- client data is packed per (argument, chunk) and submitted once as a tiny identity task whose
  spec holds the packed array (the scheduler keeps that copy), placed round-robin so that a
  chunk's data and hence its tasks share a worker; the key is the content digest, so a later
  call on the same data reuses the worker copy (an LRU of such futures is kept per
  ``distributed.Client``, :data:`CACHE_BYTES`);
- the broadcast operands of a round are one more such leaf;
- client state (values one round makes and a later one uses, :meth:`Rounds.client_state`)
  stays on the workers as the producing tasks' futures; remat graphs have none. Resident
  values (computed from a client's own data alone, e.g. row counts) are not state: a round
  that needs them recomputes them.

A chunk whose inputs can no longer be recomputed (futures cancelled, a task that keeps killing
workers) is reported as a :class:`~fadcore.FadError` naming the round, never a wrong answer.

Sub-graphs travel as their JSON form (:mod:`fadcore.ir.serialize`): primitives are identities,
so pickled graphs would not find their rules on a worker. Workers cache the parsed graphs.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import threading
import uuid
import warnings
from collections import OrderedDict
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

try:
    import distributed
    from dask.sizeof import sizeof as _dask_sizeof
except ImportError as _err:   # available() skips the backend
    raise ImportError("the dask backend needs dask[distributed]: "
                      "pip install 'fadcore[dask]'") from _err

from .. import ops
from ..core import infer_type
from ..errors import FadError, LoweringError
from ..ir.graph import Eqn, Graph, Literal, Var
from ..ir.types import CLIENTS, SERVER, FederatedType
from ..values import ClientValues
from . import reference
from .inputs import Inputs

__all__ = ["execute", "default_client", "shutdown", "plan", "MIN_CHUNK", "CACHE_BYTES"]

#: Fewest clients per chunk when the chunk size is chosen automatically.
MIN_CHUNK = 256
#: Chunks per worker thread when the chunk size is chosen automatically.
CHUNKS_PER_THREAD = 2
#: Bytes of packed client data whose worker copies are kept for reuse, per dask client.
CACHE_BYTES = 1 << 30


# --------------------------------------------------------------------------- the plan

@dataclass
class RoundPlan:
    """What the driver and the tasks do in one round."""

    index: int
    prepare: Graph | None           # server equations before the broadcasts
    update: Graph | None            # server equations after the aggregations
    subgraph: Graph                 # client sub-graph: broadcasts, client eqns, partials
    text: str                       # its JSON, what tasks receive
    key: str                        # digest of ``text``
    server_in: list                 # Vars: sub-graph SERVER inputs (the broadcast operands)
    client_in: list                 # ("data", k) graph input k | ("state", r, j) kept j of r
    aggregations: list              # (eqn, position of its first partial output)
    num_partials: int
    kept: list = field(default_factory=list)    # client Vars output for later use
    last_use: int = 0               # last round reading this round's kept values


@dataclass
class Plan:
    rounds: list
    final: Graph | None
    data_inputs: list               # graph input indices the tasks read
    outputs: list                   # per graph output: ("server", atom) | ("data", k) |
    #                                 ("kept", round, j)


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
    """Per-chunk partial sums standing in for aggregation ``e``."""
    def summed(v):
        out = Var(FederatedType(v.type.tensor, SERVER, True))
        return Eqn(ops.sum_p, [v], out, {}, e.source)
    if e.prim is ops.weighted_mean_p:
        xw = Var(infer_type(ops.mul_p, [x.type, w.type], {}))
        return [Eqn(ops.mul_p, [x, w], xw, {}, e.source), summed(xw), summed(w)]
    return [summed(x)]


def _resident(graph: Graph) -> set:
    """Client values computed from the clients' own data alone (see :mod:`fadcore.ir.rounds`)."""
    from ..ir import rounds as _rounds
    if hasattr(_rounds, "resident"):
        return _rounds.resident(graph)
    return set()


def plan(graph: Graph) -> Plan:
    """The round-by-round execution plan of ``graph`` (cached on the graph)."""
    cached = graph._lowered.get("dask")
    if cached is not None:
        return cached
    rs = graph.rounds()
    # client ``after`` only orders rounds; inside a task it is its operand
    alias: dict = {}

    def res(a):
        while isinstance(a, Var) and a in alias:
            a = alias[a]
        return a

    for e in graph.eqns:
        if e.prim is ops.after_p and e.out.type.placement is CLIENTS:
            alias[e.out] = res(e.inputs[0])
    input_index = {v: k for k, v in enumerate(graph.inputs)}
    # values a client computes from its own data alone are recomputed where needed, not kept
    resident = {e.out: e for e in graph.eqns if e.out in _resident(graph)}
    made_in: dict = {}              # client Var -> round whose sub-graph defines it
    rounds = []
    for r in rs:
        defined, server_in, client_vars, eqns = set(), [], [], []

        def use(a):
            a = res(a)
            if isinstance(a, Literal) or a in defined:
                return a
            if a in resident and r.index > 1:
                e = resident[a]
                eqns.append(Eqn(e.prim, [use(b) for b in e.inputs], e.out, e.params, e.source))
                defined.add(a)
                return a
            group = server_in if a.type.placement is SERVER else client_vars
            if a not in group:
                group.append(a)
            return a

        for e in r.broadcasts + [e for e in r.client if e.out not in alias]:
            if e.out in defined:        # a resident value already recomputed here
                continue
            ins = [use(a) for a in e.inputs]
            eqns.append(Eqn(e.prim, ins, e.out, e.params, e.source))
            defined.add(e.out)
        partials, aggs = [], []
        for e in r.aggregations:
            x = use(e.inputs[0])
            w = use(e.inputs[1]) if e.prim is ops.weighted_mean_p else None
            new = _partial_eqns(e, x, w)
            eqns += new
            aggs.append((e, len(partials)))
            partials += [q.out for q in new if q.out.type.placement is SERVER]
        for v in defined:
            made_in[v] = r.index
        client_in = []
        for v in client_vars:
            if v in input_index:
                client_in.append(("data", input_index[v]))
            else:
                client_in.append(("state", made_in[v], v))   # position fixed below
        sub = Graph(server_in + client_vars, eqns, partials, name=f"{graph.name}.round{r.index}")
        rounds.append(RoundPlan(r.index, _server_graph(r.prepare, f"{graph.name}.prepare{r.index}"),
                                _server_graph(r.update, f"{graph.name}.update{r.index}"),
                                sub, "", "", server_in, client_in, aggs, len(partials)))
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
    for a, t in zip(graph.outputs, graph.out_types):
        a = res(a)
        if t.placement is SERVER or isinstance(a, Literal):
            outputs.append(("server", a))
        elif a in input_index:
            outputs.append(("data", input_index[a]))
        else:
            outputs.append(("kept", made_in[a], keep(made_in[a], a, len(rounds) + 1)))
    for rp in rounds:
        sub = rp.subgraph
        rp.subgraph = Graph(sub.inputs, sub.eqns, sub.outputs + rp.kept, name=sub.name)
        rp.text = rp.subgraph.to_json()
        rp.key = hashlib.sha256(rp.text.encode()).hexdigest()
    data = sorted({s[1] for rp in rounds for s in rp.client_in if s[0] == "data"})
    p = Plan(rounds, _server_graph(rs.final, f"{graph.name}.final"), data, outputs)
    graph._lowered["dask"] = p
    return p


# --------------------------------------------------------------------------- task payloads

class ChunkData:
    """One client argument for one chunk of clients, packed into one contiguous array.

    ``kind`` is ``"stack"`` (members of one shape, stacked), ``"rows"`` (ragged on axis 0
    only: concatenated, ``offsets`` cut it) or ``"flat"`` (raveled, ``shapes`` rebuild them).
    The member views are rebuilt lazily on the worker and never pickled.
    """

    __slots__ = ("kind", "array", "offsets", "shapes", "_members")

    def __init__(self, kind, array, offsets=None, shapes=None):
        self.kind, self.array, self.offsets, self.shapes = kind, array, offsets, shapes
        self._members = None

    def __reduce__(self):
        return ChunkData, (self.kind, self.array, self.offsets, self.shapes)

    @property
    def nbytes(self) -> int:
        return self.array.nbytes + sum(x.nbytes for x in (self.offsets, self.shapes)
                                       if x is not None)

    def members(self) -> list:
        if self._members is None:
            a, off = self.array, self.offsets
            if self.kind == "stack":
                ms = list(a) if a.ndim > 1 else [a[i:i + 1].reshape(()) for i in range(len(a))]
            elif self.kind == "rows":
                ms = [a[off[i]:off[i + 1]] for i in range(len(off) - 1)]
            else:
                ms = [a[off[i]:off[i + 1]].reshape(s) for i, s in enumerate(self.shapes)]
            self._members = ms
        return self._members

    def digest(self) -> str:
        h = hashlib.sha256()        # hardware-accelerated here; releases the GIL on big buffers
        h.update(f"{self.kind}|{self.array.dtype.str}|{self.array.shape}".encode())
        h.update(memoryview(self.array).cast("B"))
        for x in (self.offsets, self.shapes):
            if x is not None:
                h.update(np.ascontiguousarray(x).data)
        return h.hexdigest()


def pack(members: list, tensor, rows=None) -> ChunkData:
    """Pack the per-client arrays of one chunk (``tensor`` is the argument's member type;
    ``rows``, the chunk's row counts, saves reading them off the members)."""
    nones = [d for d, s in enumerate(tensor.shape) if s is None]
    if not nones:
        return ChunkData("stack", np.stack(members))
    if rows is None:
        rows = np.fromiter((m.shape[nones[0]] for m in members), np.int64, len(members))
    rows = np.asarray(rows, dtype=np.int64)
    offsets = np.zeros(len(members) + 1, dtype=np.int64)
    if nones == [0]:
        np.cumsum(rows, out=offsets[1:])            # in rows of the concatenated array
        return ChunkData("rows", np.concatenate(members, axis=0), offsets)
    static = int(np.prod([s for s in tensor.shape if s is not None], dtype=np.int64))
    np.cumsum(rows ** len(nones) * static, out=offsets[1:])
    shapes = np.array([tensor.concrete_shape(int(r)) for r in rows], dtype=np.int64)
    return ChunkData("flat", np.concatenate([m.reshape(-1) for m in members]), offsets,
                     shapes.reshape(len(members), tensor.ndim))


class Payload:
    """An opaque bundle (dask does not look inside task arguments wrapped in it)."""

    __slots__ = ("values",)

    def __init__(self, values):
        self.values = values

    def __reduce__(self):
        return Payload, (self.values,)


class SubgraphText:
    __slots__ = ("key", "text", "num_partials")

    def __init__(self, key, text, num_partials):
        self.key, self.text, self.num_partials = key, text, num_partials

    def __reduce__(self):
        return SubgraphText, (self.key, self.text, self.num_partials)


class ChunkResult:
    """A chunk task's result: partial sums (travel to the driver) and kept client values
    (stay on the worker for later rounds, or are gathered when they are graph outputs)."""

    __slots__ = ("partials", "kept")

    def __init__(self, partials, kept):
        self.partials, self.kept = partials, kept

    def __reduce__(self):
        return ChunkResult, (self.partials, self.kept)


# dask's memory and transfer accounting: the array bytes these objects hold

@_dask_sizeof.register(ChunkData)
def _sizeof_chunk(x):
    return x.nbytes


@_dask_sizeof.register(Payload)
def _sizeof_payload(x):
    return sum(np.asarray(v).nbytes for v in x.values)


@_dask_sizeof.register(ChunkResult)
def _sizeof_result(x):
    n = sum(p.nbytes for p in x.partials)
    for ms in x.kept:
        # all-equal members (broadcast results) are one array referenced many times
        n += ms[0].nbytes if len({id(m) for m in ms[:2]}) == 1 else sum(m.nbytes for m in ms)
    return n


# --------------------------------------------------------------------------- worker side

_SUBGRAPHS: OrderedDict = OrderedDict()
_NO_NUMBA: set = set()
_WORKER_LOCK = threading.Lock()


def _subgraph(sg: SubgraphText) -> Graph:
    with _WORKER_LOCK:
        g = _SUBGRAPHS.get(sg.key)
        if g is not None:
            _SUBGRAPHS.move_to_end(sg.key)
            return g
    g = Graph.from_json(sg.text)
    with _WORKER_LOCK:
        _SUBGRAPHS[sg.key] = g
        while len(_SUBGRAPHS) > 256:
            _SUBGRAPHS.popitem(last=False)
    return g


def _evaluate(g: Graph, inputs: Inputs, evaluator: str, key: str) -> list:
    if evaluator != "reference" and key not in _NO_NUMBA:
        from . import available
        run = available().get("numba")
        if run is None:
            if evaluator == "numba":
                raise FadError("dask backend: the numba backend is not importable on this worker")
        else:
            try:
                return run(g, inputs)
            except LoweringError:
                if evaluator == "numba":
                    raise
                _NO_NUMBA.add(key)
    return reference.execute(g, inputs)


def run_chunk(sg: SubgraphText, spec, n: int, bcast, rows, evaluator: str, *sources):
    """Task: run a round's client sub-graph on one chunk of ``n`` clients."""
    g = _subgraph(sg)
    values = list(bcast.values) if bcast is not None else []
    for j, src in zip(spec, sources, strict=True):
        ms = src.members() if j < 0 else src.kept[j]
        values.append(ms)
    outs = _evaluate(g, Inputs(values, n, rows), evaluator, sg.key)
    k = sg.num_partials
    kept = []
    for cv in outs[k:]:
        kept.append([m if m.flags.c_contiguous else np.ascontiguousarray(m) for m in cv.members])
    return ChunkResult([np.asarray(o) for o in outs[:k]], kept)


def _identity(x):
    return x


def _partials(res: ChunkResult) -> Payload:
    return Payload(res.partials)


def _kept(res: ChunkResult, j: int):
    return res.kept[j]


# --------------------------------------------------------------------------- the default cluster

_DEFAULT: dict = {}
_DEFAULT_LOCK = threading.Lock()


def default_client() -> "distributed.Client":
    """The backend's own client: a 2-worker ``LocalCluster`` on loopback, made on first use
    and shut down at exit."""
    with _DEFAULT_LOCK:
        c = _DEFAULT.get("client")
        if c is not None and c.status == "running":
            return c
        shutdown(_locked=True)
        try:
            cluster = distributed.LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, env={"NUMBA_NUM_THREADS": "1"},
                # no dashboard; the scheduler's health/metrics HTTP routes on a free loopback port
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
        except Exception as err:
            raise FadError(
                "backend='dask' could not start its default LocalCluster (worker processes "
                f"failed to start: {type(err).__name__}: {err}). Worker processes re-import "
                "the main script: put the code that runs the graph under "
                "`if __name__ == \"__main__\":`, or pass your own cluster with "
                "fad.run(..., backend='dask', client=distributed.Client(processes=False))"
            ) from err
        c = distributed.Client(cluster, set_as_default=False)
        _DEFAULT.update(cluster=cluster, client=c)
        if not _DEFAULT.get("atexit"):
            atexit.register(shutdown)
            _DEFAULT["atexit"] = True
        return c


def shutdown(_locked: bool = False) -> None:
    """Close the default client and its cluster (if they were made)."""
    if not _locked:
        with _DEFAULT_LOCK:
            return shutdown(_locked=True)
    c, cluster = _DEFAULT.pop("client", None), _DEFAULT.pop("cluster", None)
    if c is not None:
        _leaves.forget(c)
    for x in (c, cluster):
        if x is not None:
            try:
                x.close()
            except Exception:   # noqa: BLE001 -- best effort at exit
                pass


# --------------------------------------------------------------------------- data leaves

class _LeafCache:
    """Futures of packed client data, keyed by content digest, LRU-bounded in bytes."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_client: dict = {}       # id(client) -> (client, OrderedDict key -> (fut, n))

    def get(self, client, key, make, nbytes):
        with self.lock:
            entry = self.by_client.get(id(client))
            if entry is None or entry[0] is not client:
                entry = self.by_client[id(client)] = (client, OrderedDict())
                for cid in [k for k, (c, _) in self.by_client.items() if c.status != "running"]:
                    del self.by_client[cid]
            lru = entry[1]
            hit = lru.get(key)
            if hit is not None and hit[0].status not in ("cancelled", "error"):
                lru.move_to_end(key)
                return hit[0]
        fut = make()
        with self.lock:
            lru[key] = (fut, nbytes)
            total = sum(n for _, n in lru.values())
            while total > CACHE_BYTES and len(lru) > 1:
                _, (_, n) = lru.popitem(last=False)
                total -= n
        return fut

    def forget(self, client):
        with self.lock:
            entry = self.by_client.get(id(client))
            if entry is not None and entry[0] is client:
                del self.by_client[id(client)]


_leaves = _LeafCache()


def _leaf(client, value, key, worker=None):
    """A future of ``value`` whose task spec holds it: if the worker holding it is lost,
    dask recomputes it from the spec (scattered data would be gone)."""
    with warnings.catch_warnings():
        # data is embedded once, on purpose, not repeated: dask's large-graph hint is moot
        warnings.filterwarnings("ignore", message="Sending large graph")
        warnings.filterwarnings("ignore", message="Large object")
        return client.submit(_identity, value, key=key, pure=False,
                             workers=None if worker is None else [worker],
                             allow_other_workers=worker is not None)


def _homes(client, chunks) -> list:
    """A worker per chunk, round-robin: a chunk's data leaves start on one worker, so its
    tasks (which follow their data) find everything there."""
    addrs = sorted(client.nthreads())
    return [addrs[i % len(addrs)] if addrs else None for i in range(len(chunks))]


def _data_leaves(client, graph, inputs, data_inputs, chunks, homes):
    """Per data input, per chunk: a future of its packed members (reused across calls)."""
    def packed(job):
        k, (lo, hi) = job
        rows = None if inputs.rows is None else inputs.rows[lo:hi]
        cd = pack(inputs.values[k][lo:hi], graph.inputs[k].type.tensor, rows)
        return cd, f"fad-data-{cd.digest()}"

    jobs = [(k, c) for k in data_inputs for c in chunks]
    if len(jobs) > 1 and inputs.num_clients >= 4 * MIN_CHUNK:
        with ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            done = list(pool.map(packed, jobs))     # copies and hashes run without the GIL
    else:
        done = [packed(j) for j in jobs]
    out = {k: [] for k in data_inputs}
    for (k, c), (cd, key), home in zip(jobs, done, homes * len(data_inputs)):
        out[k].append(_leaves.get(client, key,
                                  lambda cd=cd, key=key, home=home: _leaf(client, cd, key, home),
                                  cd.nbytes))
    return out


def _rows_leaves(client, rows, chunks, homes):
    if rows is None:
        return [None] * len(chunks)
    out = []
    for (lo, hi), home in zip(chunks, homes):
        r = np.ascontiguousarray(rows[lo:hi])
        key = f"fad-rows-{hashlib.sha256(r.data).hexdigest()}"
        out.append(_leaves.get(client, key,
                               lambda r=r, key=key, home=home: _leaf(client, r, key, home),
                               r.nbytes))
    return out


# --------------------------------------------------------------------------- driver

def _chunks(n: int, chunk_size, client) -> list:
    if chunk_size is None:
        threads = max(1, sum(client.nthreads().values()))
        count = max(1, min(-(-n // MIN_CHUNK), CHUNKS_PER_THREAD * threads))
        chunk_size = -(-n // count)
    elif not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise FadError(f"dask backend: chunk_size must be a positive integer, got {chunk_size!r}")
    chunk_size = int(chunk_size)
    return [(lo, min(n, lo + chunk_size)) for lo in range(0, n, chunk_size)]


def _run_server(g: Graph | None, env: dict, n) -> None:
    if g is None:
        return
    outs = reference.execute(g, Inputs([env[v] for v in g.inputs], n, None))
    env.update(zip(g.outputs, outs))


def _reduce(rp: RoundPlan, parts: list, n: int, env: dict) -> None:
    def total(j):
        acc = parts[0][j]
        for p in parts[1:]:
            acc = acc + p[j]
        return acc

    for e, j in rp.aggregations:
        if e.prim is ops.weighted_mean_p:
            val = total(j) / total(j + 1)
        elif e.prim is ops.mean_p:
            val = total(j) / n
        else:
            val = total(j)
        env[e.out] = np.asarray(val, dtype=e.out.type.dtype.np)


def _lost(rp: RoundPlan, graph: Graph, chunks, futures, err) -> FadError:
    bad = next((i for i, f in enumerate(futures) if f.status != "finished"), None)
    where = "" if bad is None else (
        f" (chunk {bad + 1} of {len(chunks)}: clients {chunks[bad][0]}..{chunks[bad][1] - 1})")
    if isinstance(err, distributed.scheduler.KilledWorker):
        why = ("its task took down every worker that ran it (a crash inside the task: see the "
               "worker logs)")
    elif isinstance(err, TimeoutError):
        why = "it did not finish within timeout= (no workers, or workers too slow)"
    elif isinstance(err, distributed.comm.CommClosedError):
        why = "the connection to the dask scheduler was lost"
    else:
        why = ("its client data or the client state kept from earlier rounds was lost and "
               "cannot be recomputed")
    return FadError(f"dask backend: round {rp.index} of {graph.name!r} failed{where}: {why} "
                    f"({type(err).__name__}: {err}); rerun the computation")


def execute(graph: Graph, inputs: Inputs, client=None, chunk_size: int | None = None,
            evaluator: str = "auto", timeout: float | None = None, on_round=None) -> list:
    """Run ``graph`` on a dask cluster; same results and contract as ``reference.execute``.

    ``client``: a ``distributed.Client`` (default: the backend's own 2-worker LocalCluster);
    ``chunk_size``: clients per task (default: about two tasks per worker thread, at least
    :data:`MIN_CHUNK` clients each); ``evaluator``: what tasks run sub-graphs with
    (``"auto"``: numba if importable, else ``"reference"``; or ``"numba"``); ``timeout``:
    seconds allowed per round (None: no limit); ``on_round(info)``: called with a dict
    (``round``, ``phase`` ``"submitted"``/``"done"``, ``client``, ``tasks``, ``chunks``,
    ``broadcast``, ``partials``) after each round's tasks are submitted and once its partials
    are in (monitoring, tests).
    """
    if evaluator not in ("auto", "numba", "reference"):
        raise FadError(f"dask backend: evaluator must be 'auto', 'numba' or 'reference', "
                       f"got {evaluator!r}")
    p = plan(graph)
    run = _Run(graph, p, inputs, client, chunk_size, evaluator, timeout, on_round)
    for rp in p.rounds:
        _run_server(rp.prepare, run.env, run.n)
        run.round(rp)
        _run_server(rp.update, run.env, run.n)
    _run_server(p.final, run.env, run.n)
    return run.outputs()


#: What a lost chunk looks like: cancelled or lost futures, a task that killed its workers
#: ``allowed-failures`` times, a round over its ``timeout``, a dropped scheduler connection.
_LOST = (CancelledError, distributed.scheduler.KilledWorker, TimeoutError,
         distributed.comm.CommClosedError)


class _Run:
    """The driver's state while one graph runs."""

    def __init__(self, graph, p, inputs, client, chunk_size, evaluator, timeout, on_round):
        self.graph, self.plan, self.inputs = graph, p, inputs
        self.n = inputs.num_clients
        self.evaluator, self.timeout, self.on_round = evaluator, timeout, on_round
        self.env = {v: x for v, x in zip(graph.inputs, inputs.values)
                    if v.type.placement is SERVER}
        self.kept: dict = {}        # round -> per-chunk task futures holding its kept values
        self.out: dict = {}         # (round, j) -> per-chunk futures of member lists
        self.chunks: list = []
        if p.rounds:
            self.client = client if client is not None else default_client()
            self.chunks = _chunks(self.n, chunk_size, self.client)
            homes = _homes(self.client, self.chunks)
            self.data = _data_leaves(self.client, graph, inputs, p.data_inputs, self.chunks,
                                     homes)
            self.rows = _rows_leaves(self.client, inputs.rows, self.chunks, homes)
            self.call = uuid.uuid4().hex[:12]

    def submit(self, fn, *args, key):
        return self.client.submit(fn, *args, pure=False, key=f"{key}-{self.call}")

    def gather(self, rp, futures):
        try:
            if self.timeout is not None:
                with self.client.as_current():
                    distributed.wait(futures, timeout=self.timeout)
            return self.client.gather(futures)
        except _LOST as err:
            raise _lost(rp, self.graph, self.chunks, futures, err) from err

    def round(self, rp: RoundPlan) -> None:
        c, chunks = self.client, self.chunks
        sg = _leaves.get(c, f"fad-graph-{rp.key}",
                         lambda: _leaf(c, SubgraphText(rp.key, rp.text, rp.num_partials),
                                       f"fad-graph-{rp.key}"), len(rp.text))
        bcast = None
        if rp.server_in:
            bcast = _leaf(c, Payload([self.env[v] for v in rp.server_in]),
                          f"fad-bcast-r{rp.index}-{self.call}")
        spec = tuple(-1 if s[0] == "data" else s[2] for s in rp.client_in)
        futs = []
        try:
            for ci, (lo, hi) in enumerate(chunks):
                srcs = [self.data[s[1]][ci] if s[0] == "data" else self.kept[s[1]][ci]
                        for s in rp.client_in]
                futs.append(self.submit(run_chunk, sg, spec, hi - lo, bcast, self.rows[ci],
                                        self.evaluator, *srcs, key=f"fad-r{rp.index}-c{ci}"))
        except _LOST as err:
            raise _lost(rp, self.graph, chunks, futs, err) from err
        info = dict(round=rp.index, phase="submitted", client=c, tasks=futs, chunks=chunks,
                    broadcast=bcast, partials=None)
        if self.on_round is not None:
            self.on_round(info)
        if rp.kept:
            # kept values stay on the workers: fetch only the partials
            self.kept[rp.index] = futs
            pfuts = [self.submit(_partials, f, key=f"fad-p{rp.index}-c{ci}")
                     for ci, f in enumerate(futs)]
            parts = [p.values for p in self.gather(rp, pfuts)]
        else:
            pfuts = futs
            parts = [r.partials for r in self.gather(rp, futs)]
        _reduce(rp, parts, self.n, self.env)
        for kind, *ref in self.plan.outputs:
            if kind == "kept" and ref[0] == rp.index and tuple(ref) not in self.out:
                self.out[tuple(ref)] = [
                    self.submit(_kept, f, ref[1], key=f"fad-o{rp.index}.{ref[1]}-c{ci}")
                    for ci, f in enumerate(futs)]
        for q in self.plan.rounds:
            if q.index in self.kept and q.last_use <= rp.index:
                del self.kept[q.index]
        if self.on_round is not None:
            self.on_round(dict(info, phase="done", partials=pfuts))

    def outputs(self) -> list:
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
                lists = self.gather(self.plan.rounds[ref[0] - 1], self.out[tuple(ref)])
                outs.append(ClientValues([m for ms in lists for m in ms],
                                         all_equal=t.all_equal))
        return outs
