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
  spec holds the packed array (the scheduler keeps that copy), placed by the scheduler with no
  worker restrictions (a lost worker's data is recomputed on whichever workers are alive, also
  restarted ones on new ports); the key is the content digest, so a later
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

import numpy as np

try:
    import distributed
    from dask.sizeof import sizeof as _dask_sizeof
except ImportError as _err:   # available() skips the backend
    raise ImportError("the dask backend needs dask[distributed]: "
                      "pip install 'fadcore[dask]'") from _err

from ..errors import FadError
from ..ir.graph import Graph
from .executor import (EVALUATORS, Execution, RoundPlan, Runtime, StepResult,
                       run_client_step, subgraph_from_text)
from .executor import plan as _plan
from .inputs import Inputs

__all__ = ["execute", "default_client", "shutdown", "plan", "MIN_CHUNK", "CACHE_BYTES"]

#: Fewest clients per chunk when the chunk size is chosen automatically.
MIN_CHUNK = 256
#: Chunks per worker thread when the chunk size is chosen automatically.
CHUNKS_PER_THREAD = 2
#: Bytes of packed client data whose worker copies are kept for reuse, per dask client.
CACHE_BYTES = 1 << 30


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


#: A chunk task's result (partials travel to the driver; kept client values stay on the worker).
ChunkResult = StepResult


# dask's memory and transfer accounting: the array bytes these objects hold

@_dask_sizeof.register(ChunkData)
def _sizeof_chunk(x):
    return x.nbytes


@_dask_sizeof.register(Payload)
def _sizeof_payload(x):
    return sum(np.asarray(v).nbytes for v in x.values)


@_dask_sizeof.register(StepResult)
def _sizeof_result(x):
    n = sum(int(p.nbytes) for p in x.partials)
    for ms in x.kept:
        # all-equal members (broadcast results) are one array referenced many times
        n += ms[0].nbytes if len({id(m) for m in ms[:2]}) == 1 else sum(m.nbytes for m in ms)
    return n


# --------------------------------------------------------------------------- worker side

def run_chunk(sg: SubgraphText, spec, n: int, bcast, rows, evaluator: str, masking, keys,
              *sources):
    """Task: run a round's client step on one chunk of ``n`` clients (:func:`run_client_step`);
    under secure aggregation each client masks its own contribution here, on the worker, with
    its private key (``keys``, a future that never leaves the workers)."""
    g = subgraph_from_text(sg.key, sg.text)
    ms = [src.members() if j < 0 else src.kept[j] for j, src in zip(spec, sources, strict=True)]
    ctx = None if masking is None else masking.for_group(keys.lo, keys.hi, keys)
    return run_client_step(g, sg.num_partials, list(bcast.values) if bcast is not None else [],
                           ms, n, rows, evaluator, sg.key, ctx)


def _keygen(session, lo: int, hi: int):
    """Task: the private keys of clients ``lo..hi-1`` (kept on the worker)."""
    from .secagg import ClientKeys
    return ClientKeys(session, range(lo, hi))


def _public(keys) -> list:
    return list(keys.public)


def _identity(x):
    return x


def _partials(res: StepResult) -> Payload:
    return Payload(res.partials)


def _kept(res: StepResult, j: int):
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
    """Close the default client and its cluster (if they were made), and the clients made
    for ``client='tcp://...'`` addresses."""
    if not _locked:
        _close_connected()          # first: they may be connected to the default cluster
        with _DEFAULT_LOCK:
            shutdown(_locked=True)
        return None
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


def _leaf(client, value, key):
    """A future of ``value`` whose task spec holds it: if the worker holding it is lost,
    dask recomputes it from the spec (scattered data would be gone). No worker restrictions:
    a task restricted to workers that all died waits in ``no-worker`` for them forever (even
    with ``allow_other_workers``), while restarted workers come back on new ports."""
    with warnings.catch_warnings():
        # data is embedded once, on purpose, not repeated: dask's large-graph hint is moot
        warnings.filterwarnings("ignore", message="Sending large graph")
        warnings.filterwarnings("ignore", message="Large object")
        return client.submit(_identity, value, key=key, pure=False)


def _data_leaves(client, graph, inputs, data_inputs, chunks):
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
    for (k, c), (cd, key) in zip(jobs, done):
        out[k].append(_leaves.get(client, key, lambda cd=cd, key=key: _leaf(client, cd, key),
                                  cd.nbytes))
    return out


def _rows_leaves(client, rows, chunks):
    if rows is None:
        return [None] * len(chunks)
    out = []
    for lo, hi in chunks:
        r = np.ascontiguousarray(rows[lo:hi])
        key = f"fad-rows-{hashlib.sha256(r.data).hexdigest()}"
        out.append(_leaves.get(client, key, lambda r=r, key=key: _leaf(client, r, key),
                               r.nbytes))
    return out


# --------------------------------------------------------------------------- the dask client

#: Seconds a round may take by default before the run fails with an error naming the round and
#: its clients (a lost cluster never hangs a run). ``timeout=None`` waits forever.
ROUND_TIMEOUT = 300.0

_BY_ADDRESS: dict = {}


def resolve_client(client) -> "distributed.Client":
    """``client=``: None (the backend's own cluster), a running ``distributed.Client``, or a
    scheduler address string such as ``'tcp://127.0.0.1:8786'`` (connected to once, reused)."""
    if client is None:
        return default_client()
    if isinstance(client, str):
        with _DEFAULT_LOCK:
            c = _BY_ADDRESS.get(client)
            if c is not None and c.status == "running":
                return c
            try:
                c = distributed.Client(client, timeout=10, set_as_default=False)
            except (OSError, TimeoutError, ValueError) as err:
                raise FadError(
                    f"dask backend: could not connect to the dask scheduler at client={client!r} "
                    f"({type(err).__name__}: {err}); pass a running scheduler's address "
                    "('tcp://host:port') or a distributed.Client") from err
            _BY_ADDRESS[client] = c
            return c
    if not isinstance(client, distributed.Client):
        raise FadError(f"dask backend: client= must be a distributed.Client or a scheduler "
                       f"address string, got {type(client).__name__}")
    if client.status != "running":
        raise FadError(f"dask backend: the distributed.Client passed as client= is "
                       f"{client.status} (closed clients cannot run tasks); pass a running one")
    return client


def _close_connected() -> None:
    with _DEFAULT_LOCK:
        clients = list(_BY_ADDRESS.values())
        _BY_ADDRESS.clear()
    for c in clients:
        _leaves.forget(c)
        try:
            c.close()
        except Exception:   # noqa: BLE001 -- best effort at exit
            pass


atexit.register(_close_connected)


# --------------------------------------------------------------------------- the runtime

def _chunks(n: int, chunk_size, client) -> list:
    if chunk_size is None:
        threads = max(1, sum(client.nthreads().values()))
        count = max(1, min(-(-n // MIN_CHUNK), CHUNKS_PER_THREAD * threads))
        chunk_size = -(-n // count)
    elif (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
          or chunk_size < 1):
        raise FadError(f"dask backend: chunk_size must be a positive integer, got {chunk_size!r}")
    chunk_size = int(chunk_size)
    return [(lo, min(n, lo + chunk_size)) for lo in range(0, n, chunk_size)]


#: What a lost chunk looks like: cancelled or lost futures, a task that killed its workers
#: ``allowed-failures`` times, a round over its ``timeout``, a dropped scheduler connection.
_LOST = (CancelledError, distributed.scheduler.KilledWorker, TimeoutError,
         distributed.comm.CommClosedError)


def _lost(what: str, graph: Graph, chunks, futures, err, timeout) -> FadError:
    bad = [i for i, f in enumerate(futures) if f.status != "finished"]
    where = ""
    if bad:
        clients = ", ".join(f"{chunks[i][0]}..{chunks[i][1] - 1}" for i in bad[:8])
        more = f" and {len(bad) - 8} more chunks" if len(bad) > 8 else ""
        where = f" (chunks {[i + 1 for i in bad[:8]]} of {len(chunks)}: clients {clients}{more})"
    if isinstance(err, distributed.scheduler.KilledWorker):
        why = ("its task took down every worker that ran it (a crash inside the task: see the "
               "worker logs)")
    elif isinstance(err, TimeoutError):
        why = (f"it did not finish within timeout={timeout} seconds (no live workers, or "
               "workers too slow: pass a larger timeout=)")
    elif isinstance(err, distributed.comm.CommClosedError):
        why = "the connection to the dask scheduler was lost"
    else:
        why = ("its client data or the client state kept from earlier rounds was lost and "
               "cannot be recomputed")
    return FadError(f"dask backend: {what} of {graph.name!r} failed{where}: {why} "
                    f"({type(err).__name__}: {err}); rerun the computation")


class DaskRuntime(Runtime):
    """Client steps as tasks over chunks of clients on a ``distributed`` cluster."""

    def __init__(self, client=None, chunk_size=None, evaluator="auto", timeout=ROUND_TIMEOUT,
                 on_round=None):
        if evaluator not in EVALUATORS:
            raise FadError(f"dask backend: evaluator must be 'auto', 'numba' or 'reference', "
                           f"got {evaluator!r}")
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise FadError(f"dask backend: timeout must be a positive number of seconds or "
                           f"None, got {timeout!r}")
        self.client_arg, self.chunk_size = client, chunk_size
        self.evaluator, self.timeout, self.on_round = evaluator, timeout, on_round
        self.kept: dict = {}        # round -> per-chunk task futures holding its kept values
        self.keys: list = []        # per chunk: a future of its clients' private keys

    def start(self, execution: Execution) -> None:
        self.graph, inputs = execution.graph, execution.inputs
        self.client = resolve_client(self.client_arg)
        self.groups = self.chunks = _chunks(inputs.num_clients, self.chunk_size, self.client)
        self.call = uuid.uuid4().hex[:12]
        self.data = _data_leaves(self.client, self.graph, inputs, execution.plan.data_inputs,
                                 self.chunks)
        self.rows = _rows_leaves(self.client, inputs.rows, self.chunks)

    def submit(self, fn, *args, key):
        return self.client.submit(fn, *args, pure=False, key=f"{key}-{self.call}")

    def gather(self, what, futures):
        try:
            if self.timeout is not None:
                with self.client.as_current():
                    distributed.wait(futures, timeout=self.timeout)
            return self.client.gather(futures)
        except _LOST as err:
            raise _lost(what, self.graph, self.chunks, futures, err, self.timeout) from err

    def public_keys(self, session) -> list:
        self.keys = [self.submit(_keygen, session, lo, hi, key=f"fad-keys-c{ci}")
                     for ci, (lo, hi) in enumerate(self.chunks)]
        pub = [self.submit(_public, k, key=f"fad-pub-c{ci}") for ci, k in enumerate(self.keys)]
        return [pk for group in self.gather("the key agreement", pub) for pk in group]

    def client_step(self, rp: RoundPlan, server_values: list, masking=None) -> list:
        c, chunks = self.client, self.chunks
        sg = _leaves.get(c, f"fad-graph-{rp.key}",
                         lambda: _leaf(c, SubgraphText(rp.key, rp.text, rp.num_partials),
                                       f"fad-graph-{rp.key}"), len(rp.text))
        bcast = None
        if rp.server_in:
            bcast = _leaf(c, Payload(server_values), f"fad-bcast-r{rp.index}-{self.call}")
        spec = tuple(-1 if s[0] == "data" else s[2] for s in rp.client_in)
        what = f"round {rp.index}"
        futs = []
        try:
            for ci, (lo, hi) in enumerate(chunks):
                srcs = [self.data[s[1]][ci] if s[0] == "data" else self.kept[s[1]][ci]
                        for s in rp.client_in]
                keys = self.keys[ci] if masking is not None else None
                futs.append(self.submit(run_chunk, sg, spec, hi - lo, bcast, self.rows[ci],
                                        self.evaluator, masking, keys, *srcs,
                                        key=f"fad-r{rp.index}-c{ci}"))
        except _LOST as err:
            raise _lost(what, self.graph, chunks, futs, err, self.timeout) from err
        info = dict(round=rp.index, phase="submitted", client=c, tasks=futs, chunks=chunks,
                    broadcast=bcast, partials=None, keys=self.keys if masking else None)
        if self.on_round is not None:
            self.on_round(info)
        if rp.kept:
            # kept values stay on the workers: fetch only the partials
            self.kept[rp.index] = futs
            pfuts = [self.submit(_partials, f, key=f"fad-p{rp.index}-c{ci}")
                     for ci, f in enumerate(futs)]
            parts = [p.values for p in self.gather(what, pfuts)]
        else:
            pfuts = futs
            parts = [r.partials for r in self.gather(what, futs)]
        if self.on_round is not None:
            self.on_round(dict(info, phase="done", partials=pfuts))
        return parts

    def client_output(self, rp: RoundPlan, j: int) -> list:
        futs = [self.submit(_kept, f, j, key=f"fad-o{rp.index}.{j}-c{ci}")
                for ci, f in enumerate(self.kept[rp.index])]
        return [m for ms in self.gather(f"round {rp.index}", futs) for m in ms]

    def release(self, round_index: int) -> None:
        self.kept.pop(round_index, None)

    def finish(self) -> None:
        self.kept.clear()
        self.keys = []


def plan(graph: Graph, secure: bool = False):
    """The round-by-round plan of ``graph`` (:func:`fadcore.backends.executor.plan`)."""
    return _plan(graph, secure)


def execute(graph: Graph, inputs: Inputs, client=None, chunk_size: int | None = None,
            evaluator: str = "auto", timeout: float | None = ROUND_TIMEOUT, on_round=None,
            secure=None) -> list:
    """Run ``graph`` on a dask cluster; same results and contract as ``reference.execute``.

    ``client``: a ``distributed.Client`` or a scheduler address (default: the backend's own
    2-worker LocalCluster); ``chunk_size``: clients per task (default: about two tasks per
    worker thread, at least :data:`MIN_CHUNK` clients each); ``evaluator``: what tasks run
    client steps with (``"auto"``: numba if importable, else ``"reference"``; or ``"numba"``);
    ``timeout``: seconds allowed per round (default :data:`ROUND_TIMEOUT`; None: no limit);
    ``on_round(info)``: called with a dict (``round``, ``phase`` ``"submitted"``/``"done"``,
    ``client``, ``tasks``, ``chunks``, ``broadcast``, ``partials``, ``keys``: the futures of
    the chunks' private keys under secure aggregation) after each round's tasks are
    submitted and once its partials are in (monitoring, tests); ``secure``: a
    :class:`fadcore.SecureAggregation` (each client masks its secure_sum contributions inside
    its task, with a private key that stays on the workers).
    """
    runtime = DaskRuntime(client, chunk_size, evaluator, timeout, on_round)
    return Execution(graph, inputs, runtime, secure).run()
