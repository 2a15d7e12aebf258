"""Running a lowered program: binding arguments (read in place when they are float64),
sizing the workspace, choosing serial or parallel execution, building the outputs and
turning the interpreter's status codes into fadcore errors naming the line and the client.
"""

from __future__ import annotations

import sys

import numpy as np

from ...errors import CardinalityError, DTypeError, LoweringError, ShapeError
from ...ir.graph import Graph
from ...ir.types import CLIENTS, TensorType, bool_, f64
from ...values import ClientValues
from ..inputs import Inputs
from . import kernels as K
from ._notice import compiling
from .lowering import Program, lower
from .opcodes import static_size as _static

__all__ = ["execute", "PARALLEL_MIN_WORK"]

_CHUNKS_PER_THREAD = 4
_ALIGN = 8                       # work slots start on 64-byte boundaries

# --------------------------------------------------------------------------- run-time binding

def _fields_layout_ok() -> bool:
    """Whether ``array_fields`` reads this interpreter's ndarray structs correctly."""
    if sys.implementation.name != "cpython":
        return False
    try:
        base = np.arange(60.0).reshape(3, 4, 5)
        arrs = [base, base[1], base[2, 1:3], base[:, ::2], np.zeros((0, 2)), np.ones(())]
        ids = np.asarray([id(a) for a in arrs], dtype=np.int64)
        for nd in (0, 1, 2, 3):
            out = np.zeros((len(arrs), 4), dtype=np.int64)
            dims = np.zeros((len(arrs), max(nd, 1)), dtype=np.int64)
            K.array_fields(ids, nd, dims, out)
            for j, a in enumerate(arrs):
                if out[j, 0] != a.ctypes.data or out[j, 1] != a.ndim:
                    return False
                if out[j, 3] != id(a.dtype):
                    return False
                if bool(out[j, 2] & 1) != a.flags.c_contiguous:
                    return False
                if a.ndim == nd and tuple(dims[j, :nd]) != a.shape:
                    return False
        return True
    except Exception:       # pragma: no cover - any surprise disables the fast path
        return False


_FAST_FIELDS: list = []


def _fast_fields() -> bool:
    if not _FAST_FIELDS:
        _FAST_FIELDS.append(_fields_layout_ok())
    return _FAST_FIELDS[0]


_MAX_EXACT_INT = 2 ** 53


def _client_storage(members, t: TensorType, rows, n, what):
    """Per-client addresses of a client argument, read in place when it is float64.

    Returns (addresses, keep-alive object). Non-float64 arguments are converted into one
    flat float64 buffer with per-client offsets.
    """
    nd = t.ndim
    if t.dtype is f64 and _fast_fields() and n > 0 and set(map(type, members)) == {np.ndarray}:
        ids = np.fromiter(map(id, members), dtype=np.int64, count=n)
        info = np.empty((n, 4), dtype=np.int64)
        dims = np.empty((n, max(nd, 1)), dtype=np.int64)
        K.array_fields(ids, nd, dims, info)
        ok = (members[0].dtype == np.float64 and (info[:, 1] == nd).all()
              and (info[:, 3] == id(members[0].dtype)).all()
              and ((info[:, 2] & 0x101) == 0x101).all() and (info[:, 0] % 8 == 0).all())
        if ok:
            for a, d in enumerate(t.shape):
                want = rows if d is None else d
                if not (dims[:, a] == want).all():
                    ok = False
                    break
        if ok:
            return info[:, 0].copy(), members
    # general path: check each member, copy into one flat float64 buffer
    sizes = np.empty(n, dtype=np.int64)
    for i, m in enumerate(members):
        m = np.asarray(m)
        want = t.concrete_shape(None if rows is None else int(rows[i]))
        if m.shape != want:
            raise ShapeError(f"{what}: client {i} has shape {m.shape}, expected {want}")
        if m.dtype != t.dtype.np:
            raise DTypeError(f"{what}: client {i} has dtype {m.dtype}, expected {t.dtype.np}")
        sizes[i] = m.size
    flat = np.empty(int(sizes.sum()), dtype=np.float64)
    if flat.size:
        np.concatenate([np.asarray(m).ravel() for m in members], out=flat, casting="unsafe")
    if t.dtype.is_int and flat.size and np.abs(flat).max() >= _MAX_EXACT_INT:
        raise DTypeError(f"{what}: integer values beyond +-2**53 cannot be held exactly by the "
                         "numba backend")
    offs = np.zeros(n, dtype=np.int64)
    np.cumsum(sizes[:-1], out=offs[1:])
    return flat.ctypes.data + 8 * offs, flat


def _server_storage(x, t: TensorType, what):
    arr = np.asarray(x)
    if arr.shape != t.shape:
        raise ShapeError(f"{what}: got shape {arr.shape}, expected {t.shape}")
    if arr.dtype != np.float64 or not arr.flags.c_contiguous or not arr.flags.aligned:
        if t.dtype.is_int and arr.size and np.abs(arr).max() >= _MAX_EXACT_INT:
            raise DTypeError(f"{what}: integer values beyond +-2**53 cannot be held exactly "
                             "by the numba backend")
        arr = np.ascontiguousarray(arr, dtype=np.float64)
        if arr.ndim == 0:
            arr = arr.reshape(1)
    return arr


def _to_dtype(a: np.ndarray, t: TensorType) -> np.ndarray:
    dt = t.dtype
    if dt is f64:
        return a
    if dt is bool_:
        return a != 0
    return a.astype(dt.np)


def execute(graph: Graph, inputs: Inputs) -> list:
    """Run ``graph`` on checked inputs; same results as the reference evaluator."""
    prog = lower(graph)
    g = graph
    n = inputs.num_clients
    if n is None:
        if prog.uses_n:
            raise CardinalityError(
                f"{g.name}: the number of clients is not known: pass num_clients= to fad.run")
        n = 0
    if len(inputs.values) != len(g.inputs):
        raise ShapeError(f"{g.name}: expected {len(g.inputs)} inputs, got {len(inputs.values)}")
    rows = inputs.rows
    if rows is None:
        if prog.ragged and n:
            raise ShapeError(f"{g.name}: the graph has ragged values (?) but no ragged "
                             "argument fixes the clients' row counts")
        rows = np.zeros(max(n, 1), dtype=np.int64)
    else:
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if rows.shape != (n,) or (rows < 0).any():
            raise ShapeError(f"{g.name}: bad row counts {rows!r} for {n} clients")
    loc = prog.loc.copy()
    keep = []
    ctab = np.zeros((max(prog.n_ctab, 1), max(n, 1)), dtype=np.int64)
    for b, k in prog.server_inputs:
        t = g.inputs[k].type.tensor
        arr = _server_storage(inputs.values[k], t, f"argument {k} of {g.name} ({t}@SERVER)")
        keep.append(arr)
        loc[b] = arr.ctypes.data
    for b, row, k in prog.client_inputs:
        t = g.inputs[k].type.tensor
        members = inputs.values[k]
        what = f"argument {k} of {g.name} ({g.inputs[k].type})"
        if isinstance(members, ClientValues):
            members = members.members
        if len(members) != n:
            raise CardinalityError(f"{what}: has {len(members)} clients, expected {n}")
        addrs, alive = _client_storage(members, t, rows, n, what)
        keep.append(alive)
        ctab[row, :n] = addrs
    arena = np.empty(prog.arena_size, dtype=np.float64)
    loc[prog.arena_bufs] = arena.ctypes.data + 8 * prog.arena_off
    # persistent client buffers: one flat buffer, per-client offsets
    pers_total = 0
    pers_off = []
    for b, row, st, kk in prog.persistent:
        sizes = st * rows[:n] ** kk if kk else np.full(n, st, dtype=np.int64)
        offs = np.empty(n, dtype=np.int64)
        offs[0:1] = 0
        np.cumsum(sizes[:-1], out=offs[1:])
        pers_off.append((pers_total + offs, sizes))
        pers_total += int(sizes.sum())
    pers = np.empty(max(pers_total, 1), dtype=np.float64)
    for (b, row, st, kk), (offs, _) in zip(prog.persistent, pers_off):
        ctab[row, :n] = pers.ctypes.data + 8 * offs
    nchunks = max(1, min(n, _CHUNKS_PER_THREAD * _num_threads()))
    acc = np.zeros((nchunks, prog.acc_size), dtype=np.float64)
    err = np.zeros((nchunks + 1, 5), dtype=np.int64)
    work = sum(int(np.sum(rows[:n] ** kk)) * st if kk else n * st
               for _, _, st, kk in prog.persistent) + n * len(prog.sources) * 64 + sum(
        int(np.sum(rows[:n] ** g.inputs[k].type.tensor.ragged)) * _static(
            g.inputs[k].type.shape)[0] for _, _, k in prog.client_inputs)
    serial = n <= 1 or work < PARALLEL_MIN_WORK or nchunks == 1
    plan = _cached_plan(prog, rows, n, nchunks, serial)
    ws = np.empty(plan.ws_size, dtype=np.float64)
    wtab = plan.woff + ws.ctypes.data
    run = _run_serial if serial else _run_parallel
    if run in _RAN:
        ok = run(prog, loc, ctab, rows, n, plan, wtab, acc, err)
    else:                   # the first run of each path compiles it (or loads the cache)
        with compiling():
            ok = run(prog, loc, ctab, rows, n, plan, wtab, acc, err)
        _RAN.add(run)
    del keep, ws
    if not ok:
        _raise(prog, err, g)
    # results
    outs = []
    for how, ref, t in prog.outputs:
        outs.append(_output(prog, how, ref, t, inputs, n, rows, arena, pers, pers_off))
    return outs


def _output(prog, how, ref, t, inputs, n, rows, arena, pers, pers_off):
    tt = t.tensor
    if how == "client":
        j = [p[0] for p in prog.persistent].index(ref)
        offs, sizes = pers_off[j]
        st, kk = prog.persistent[j][2], prog.persistent[j][3]
        if kk == 0:
            base = int(offs[0])
            stacked = _to_dtype(pers[base:base + n * st].reshape((n,) + tt.shape), tt)
            return ClientValues._trusted(list(stacked), t.all_equal)
        # ragged: one view per client, shaped by its row count (shapes built without a loop)
        r = rows[:n]
        shapes = np.empty((n, tt.ndim), dtype=np.int64)
        for d, dim in enumerate(tt.shape):
            shapes[:, d] = r if dim is None else dim
        flat = pers if tt.dtype is f64 else _to_dtype(pers, tt)
        members = [flat[o:o + s].reshape(shp)
                   for o, s, shp in zip(offs.tolist(), sizes.tolist(), map(tuple, shapes.tolist()))]
        return ClientValues._trusted(members, t.all_equal, shapes)
    if how == "input" and prog.g_inputs[ref].placement is CLIENTS:
        members = inputs.values[ref]
        members = members.members if isinstance(members, ClientValues) else members
        return ClientValues(
            [np.asarray(m).reshape(tt.concrete_shape(r)).astype(tt.dtype.np, copy=False)
             for m, r in zip(members, rows[:n].tolist())], all_equal=t.all_equal)
    if how == "input":
        val = np.asarray(inputs.values[ref]).reshape(tt.shape).astype(tt.dtype.np, copy=False)
    elif how == "literal":
        val = np.asarray(ref).reshape(tt.shape).astype(tt.dtype.np)
    else:
        j = int(np.searchsorted(prog.arena_bufs, ref))
        off = int(prog.arena_off[j])
        val = _to_dtype(arena[off:off + _static(tt.shape)[0]].copy().reshape(tt.shape), tt)
    if t.placement is CLIENTS:
        return ClientValues([val] * n, all_equal=True)
    return val


#: below this much client work (floats touched, roughly) the clients run on the calling
#: thread: a parallel region costs more than it saves, and far more on a loaded machine
PARALLEL_MIN_WORK = 4_000_000


#: a block's client temporaries should fit in about this many floats (half of a 256 KiB L2)
BLOCK_FLOATS = 16384
#: clients holding at least this many floats of arguments run one at a time (client-major):
#: their data stays in cache from one instruction to the next, and each instruction already
#: has enough work to amortize its dispatch (measured: benchmarks/bench_numba.py --blocks)
CLIENT_MAJOR_FLOATS = 8192


class _Plan:
    """How the clients are cut: chunks (threads' units, one accumulator row each) made of
    blocks (units of instruction-major execution); ``bnd`` block boundaries, ``cblk`` each
    chunk's first block, ``pref[k]`` prefix sums of rows**k, ``need[k, chunk]`` the largest
    sum of rows**k over a block of the chunk (its workspace size), ``sk`` the work slots'
    (static size, ragged dims)."""

    __slots__ = ("bnd", "cblk", "pref", "need", "sk", "block", "ws_size", "woff")


def block_size(prog: Program, rows: np.ndarray, n: int) -> int:
    """Clients per block: 1 (client-major) for large clients, else as many as keep the
    block's temporaries in cache."""
    if n <= 1 or not len(prog.slots):
        return 1
    rmean = float(rows[:n].mean())
    args = sum(_static(t.shape)[0] * rmean ** t.tensor.ragged
               for t in prog.g_inputs if t.placement is CLIENTS)
    if args >= CLIENT_MAJOR_FLOATS:
        return 1
    st, sl, kk = prog.slots[:, 0], prog.slots[:, 1], prog.slots[:, 2]
    per = max(float(np.sum(sl[st == s] * rmean ** kk[st == s])) for s in np.unique(st))
    return int(max(1, min(n, BLOCK_FLOATS // max(per, 1.0))))


def _plan(prog: Program, rows: np.ndarray, n: int, nchunks: int) -> _Plan:
    plan = _Plan()
    B = plan.block = block_size(prog, rows, n)
    kmax = int(prog.slots[:, 2].max()) if len(prog.slots) else 0
    r = rows[:n].astype(np.int64)
    plan.pref = np.zeros((kmax + 1, n + 1), dtype=np.int64)
    for k in range(kmax + 1):
        np.cumsum(r ** k, out=plan.pref[k, 1:])
    edges = (np.arange(nchunks + 1) * n) // nchunks
    starts = [np.arange(edges[c], edges[c + 1], B) for c in range(nchunks)]
    plan.cblk = np.zeros(nchunks + 1, dtype=np.int64)
    np.cumsum([len(x) for x in starts], out=plan.cblk[1:])
    plan.bnd = np.concatenate(starts + [np.asarray([n])]).astype(np.int64)
    sums = plan.pref[:, plan.bnd[1:]] - plan.pref[:, plan.bnd[:-1]]       # [k, block]
    plan.need = np.zeros((kmax + 1, nchunks), dtype=np.int64)
    for c in range(nchunks):
        if plan.cblk[c + 1] > plan.cblk[c]:
            plan.need[:, c] = sums[:, plan.cblk[c]:plan.cblk[c + 1]].max(axis=1)
    plan.sk = np.ascontiguousarray(prog.slots[:, 1:3]) if len(prog.slots) else np.zeros(
        (1, 2), dtype=np.int64)
    return plan


def _cached_plan(prog: Program, rows: np.ndarray, n: int, nchunks: int, serial: bool):
    """The plan and workspace layout, reused while the clients' row counts stay the same
    (per-call work proportional to what changed: a training loop calls with the same data)."""
    key = (n, nchunks, serial, rows[:n].tobytes())
    cache = prog.plans
    plan = cache.get(key)
    if plan is None:
        plan = _plan(prog, rows, n, nchunks)
        need = plan.need.max(axis=1, keepdims=True) if serial else plan.need
        ws, wtab = _workspace(prog, need, nchunks)
        plan.ws_size = max(ws.size, 1)
        plan.woff = np.ascontiguousarray(wtab - ws.ctypes.data)
        if len(cache) >= 8:
            cache.clear()
        cache[key] = plan
    return plan


def _workspace(prog: Program, need: np.ndarray, nchunks: int):
    """Scratch memory for client temporaries: one region per distinct workspace, each sized
    for the largest block that uses it (``need[k, region]``: the block's sum of rows**k; one
    region per chunk, or one shared by all chunks), so one huge client costs one huge region,
    not one per chunk.

    Returns (the memory, ``wtab``: the address of every work slot in every chunk's region).
    """
    st, sl, kk = prog.slots[:, 0], prog.slots[:, 1], prog.slots[:, 2]
    nslots = len(sl)
    # sizes[slot, region] in floats, rounded up to 64-byte lines
    sizes = sl[:, None] * need[kk, :]
    sizes = -(-np.maximum(sizes, 1) // _ALIGN) * _ALIGN
    offs = np.zeros_like(sizes)
    extent = np.zeros(need.shape[1], dtype=np.int64)
    for s in np.unique(st):             # stages reuse the same region, one after the other
        m = st == s
        c = np.cumsum(sizes[m], axis=0)
        offs[m] = c - sizes[m]
        extent = np.maximum(extent, c[-1])
    bases = np.zeros(need.shape[1] + 1, dtype=np.int64)
    np.cumsum(np.maximum(extent, 1), out=bases[1:])
    ws = np.empty(int(bases[-1]), dtype=np.float64)
    wtab = ws.ctypes.data + 8 * (offs + bases[None, :-1])
    if need.shape[1] != nchunks:
        wtab = np.repeat(wtab[:, :1], nchunks, axis=1)
    if nslots == 0:                     # numba wants a non-empty table
        wtab = np.zeros((1, nchunks), dtype=np.int64)
    return ws, np.ascontiguousarray(wtab)


_RAN: set = set()


def _run_parallel(prog, loc, ctab, rows, n, plan, wtab, acc, err) -> bool:
    """All stages, clients in a prange over chunks (one workspace column per chunk)."""
    return K.run_program(prog.tape, prog.stages, prog.ip, prog.kind, loc, ctab, rows,
                         plan.bnd, plan.cblk, n, wtab, plan.sk, plan.pref, acc, err,
                         _kernels())


def _run_serial(prog, loc, ctab, rows, n, plan, wtab, acc, err) -> bool:
    """All stages on the calling thread: the same interpreter, the chunks in turn."""
    fns = _kernels()
    nchunks = wtab.shape[1]
    cb = plan.cblk.tolist()
    for s0, s1, c0, c1 in prog.stages.tolist():
        if K.run_part(prog.tape, s0, s1, prog.ip, prog.kind, loc, ctab, rows, -1, 0, plan.bnd,
                      n, nchunks, wtab, plan.sk, plan.pref, acc, 0, err[-1], fns) != K.E_OK:
            return False
        if c1 > c0:
            for c in range(nchunks):
                if K.run_part(prog.tape, c0, c1, prog.ip, prog.kind, loc, ctab, rows, cb[c],
                              cb[c + 1], plan.bnd, n, nchunks, wtab, plan.sk, plan.pref, acc,
                              c, err[c], fns) != K.E_OK:
                    return False
    return True


_KERNELS: list = []


def _kernels() -> np.ndarray:
    if not _KERNELS:
        _KERNELS.append(K.kernel_table())
    return _KERNELS[0]


def _num_threads() -> int:
    import numba
    return numba.get_num_threads()


def _raise(prog: Program, err: np.ndarray, g: Graph):
    rows_ = [r for r in err if r[0] != K.E_OK]
    rows_.sort(key=lambda r: (r[2] < 0, r[2]))
    code, t, client, value, bound = (int(x) for x in rows_[0])
    where = prog.sources[t] if 0 <= t < len(prog.sources) else "?"
    who = f"client {client}" if client >= 0 else "the server"
    if code == K.E_INDEX:
        shown = "NaN" if value == -(2 ** 62) else str(value)
        raise ShapeError(f"{g.name}: {where}: index {shown} out of range for an axis of size "
                         f"{bound} on {who} (indices must lie in [-{bound}, {bound}))")
    if code == K.E_INT:
        raise DTypeError(f"{g.name}: {where}: integer result beyond +-2**53 on {who} (an "
                         "overflow?); integers are exact only up to 2**53 in magnitude")
    if code == K.E_BOUNDS:
        raise LoweringError(f"{g.name}: {where}: the instruction's sizes do not fit its buffers "
                            f"on {who} (a bug in the numba backend's lowering; nothing was "
                            "read or written out of bounds)")
    if code == K.E_EMPTY:
        raise ShapeError(f"{g.name}: {where}: max/argmax over zero elements on {who} (a client "
                         "with zero rows?)")
    raise ShapeError(f"{g.name}: {where}: failed with status {code} on {who}")
