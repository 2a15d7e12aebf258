"""Lowering: a verified graph -> a :class:`Program` (a flat tape over buffers), as a pipeline
of small passes over one :class:`State` (see :data:`PIPELINE`).

1. ``check_supported``: every primitive has a row in the opcode table or is an alias.
2. ``resolve_aliases``: ``reshape``, ``stop_gradient``, ``broadcast``, ``after`` and
   value-preserving ``convert`` share their operand's buffer (no instruction).
3. ``drop_dead``: equations no output needs go (``after``'s token is a scheduling edge for
   federated runtimes, not a data dependency).
4. ``assign_stages``: 0 for arguments, the operands' stage for local work, one more across an
   aggregation; client values computed from broadcast values only (equal on every client,
   not ragged) are *uniform* and run once, with the server work.
5. ``split_parts``: per stage, the server instructions (run once) and the client ones.
6. ``find_last_uses``: server values by program position, client values by stage.
7. ``bind_inputs``: server arguments are fixed buffers, client arguments per-client rows.
8. ``allocate_and_encode``: buffers reused by liveness (server arena; per-stage work slots
   for client temporaries; per-client buffers for client values kept across stages or
   returned), and one tape row per instruction (:mod:`.opcodes` encodes the parameters).
9. ``assemble``: the tape in stage order, addresses of constants, outputs, statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import LoweringError
from ...ir.graph import Graph, Literal, Var
from ...ir.primitives import Comm
from ...ir.types import CLIENTS, SERVER, f32
from . import kernels as K
from .opcodes import AGG_MODE, ALIASES, ELEMENTWISE, EXACT, OPS, convert_mode, static_size

__all__ = ["Program", "lower", "PIPELINE"]

INF = 1 << 60


@dataclass
class Program:
    """A lowered graph: the tape, its buffers and what ``execute`` needs to bind them."""

    tape: np.ndarray
    ip: np.ndarray
    stages: np.ndarray
    kind: np.ndarray
    loc: np.ndarray                     # template; per-call entries filled by execute
    consts: np.ndarray
    arena_bufs: np.ndarray              # buffer ids in the server arena ...
    arena_off: np.ndarray               # ... and their offsets (elements)
    arena_size: int
    server_inputs: list                 # (buffer, input index)
    client_inputs: list                 # (buffer, ctab row, input index)
    persistent: list                    # (buffer, ctab row, static, k)
    work: list                          # per stage: list of (buffers, static, k) per slot
    slots: np.ndarray                   # per global work slot: (stage, static size, k)
    acc_size: int
    outputs: list                       # per output: (how, ...)
    sources: list                       # per tape row: "prim (file:line)"
    n_ctab: int
    ragged: bool
    uses_clients: bool
    uses_n: bool
    g_inputs: list = field(default_factory=list)   # input types
    stats: dict = field(default_factory=dict)
    plans: dict = field(default_factory=dict)     # run-time plans by row counts (runtime.py)


@dataclass
class State:
    """What the passes share: the graph, then the facts each pass adds."""

    g: Graph
    root: dict = field(default_factory=dict)        # Var -> Var | Literal it aliases
    eqns: list = field(default_factory=list)        # live equations, graph order
    stage: dict = field(default_factory=dict)
    uniform: set = field(default_factory=set)
    srv: list = field(default_factory=list)         # per stage: [("op"|"fin", eqn)]
    cli: list = field(default_factory=list)         # per stage: [("op"|"agg", eqn)]
    outputs: set = field(default_factory=set)
    last_fixed: dict = field(default_factory=dict)  # fixed value -> last program position
    use_stage: dict = field(default_factory=dict)   # client value -> last stage reading it
    dies_at: dict = field(default_factory=dict)     # program position -> fixed values
    positions: list = field(default_factory=list)   # per stage: (server positions, block)
    # buffers
    buf: dict = field(default_factory=dict)         # root key -> buffer id
    kind: list = field(default_factory=list)
    loc: list = field(default_factory=list)
    consts: list = field(default_factory=list)
    const_off: dict = field(default_factory=dict)
    const_size: int = 0
    server_inputs: list = field(default_factory=list)
    client_inputs: list = field(default_factory=list)
    n_ctab: int = 0
    arena_of: dict = field(default_factory=dict)
    arena_free: dict = field(default_factory=dict)
    arena_size: int = 0
    persistent: list = field(default_factory=list)
    work: list = field(default_factory=list)
    acc_size: int = 0
    acc_of: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)        # (stage, part, fields, ip, source)

    @property
    def nstages(self) -> int:
        return 1 + max(self.stage.values(), default=0)

    def find(self, a):
        while isinstance(a, Var) and a in self.root:
            a = self.root[a]
        return a

    def fixed(self, v: Var) -> bool:
        """Whether a root value has one copy for everyone (server or uniform client)."""
        return v.type.placement is SERVER or v in self.uniform

    def new_buf(self, kind, loc=0) -> int:
        self.kind.append(kind)
        self.loc.append(loc)
        return len(self.kind) - 1

    def buf_of(self, a) -> int:
        r = self.find(a)
        if not isinstance(r, Literal):
            return self.buf[r]
        key = ("lit",) + r.key()
        if key not in self.buf:
            arr = np.ascontiguousarray(r.value, dtype=np.float64).ravel()
            self.consts.append(arr)
            b = self.new_buf(K.K_FIXED)
            self.const_off[b] = self.const_size
            self.const_size += arr.size
            self.buf[key] = b
        return self.buf[key]

    def roots(self, e):
        """The root values (not literals) an equation reads."""
        return [r for r in map(self.find, e.inputs) if isinstance(r, Var)]


# --------------------------------------------------------------------------- passes 1-6

def check_supported(st: State) -> None:
    for e in st.g.eqns:
        name = e.prim.name
        if name not in OPS and name not in ALIASES:
            raise LoweringError(f"numba backend: no lowering rule for primitive {name!r}"
                                + (f" (from {e.source})" if e.source else ""))
        for a in [e.out, *e.inputs]:
            t = a.type.tensor if isinstance(a, Var) else a.type
            if t.ndim > K.MAX_NDIM:
                raise LoweringError(f"numba backend: {name}: {t} has more than "
                                    f"{K.MAX_NDIM} dimensions")


def _convert_alias(e) -> bool:
    src, dst = e.inputs[0].type.dtype, e.params["dtype"]
    return convert_mode(src, dst) == K.CV_COPY and not (dst is f32 and src is not f32)


def resolve_aliases(st: State) -> None:
    for e in st.g.eqns:
        if e.prim.name in ALIASES or (e.prim.name == "convert" and _convert_alias(e)):
            st.root[e.out] = e.inputs[0]


def drop_dead(st: State) -> None:
    live = {st.find(a) for a in st.g.outputs if isinstance(a, Var)}
    needed = []
    for e in reversed(st.g.eqns):
        if e.out in st.root or e.out not in live:
            continue
        needed.append(e)
        live.update(st.roots(e))
    st.eqns = needed[::-1]


def assign_stages(st: State) -> None:
    for v in st.g.inputs:
        st.stage[v] = 0
    for e in st.eqns:
        vs = st.roots(e)
        s = max((st.stage[a] for a in vs), default=0)
        if e.prim.name in AGG_MODE:
            s += 1
        elif e.prim.name == "num_clients":
            s = 0
        st.stage[e.out] = s
        t = e.out.type
        if (t.placement is CLIENTS and e.prim.comm is Comm.LOCAL and not t.tensor.ragged
                and all(st.fixed(a) for a in vs)):
            st.uniform.add(e.out)


def split_parts(st: State) -> None:
    st.srv = [[] for _ in range(st.nstages)]
    st.cli = [[] for _ in range(st.nstages)]
    for e in st.eqns:
        s = st.stage[e.out]
        if e.prim.name in AGG_MODE:
            st.cli[s - 1].append(("agg", e))
            st.srv[s].append(("fin", e))
        elif st.fixed(e.out):
            st.srv[s].append(("op", e))
        else:
            st.cli[s].append(("op", e))


def find_last_uses(st: State) -> None:
    # an output may alias a literal (after 1.0 h, reverse mode's seed): nothing to keep
    st.outputs = {r for r in map(st.find, st.g.outputs) if isinstance(r, Var)}
    pos = 0
    for s in range(st.nstages):
        sp = []
        for kind_, e in st.srv[s]:
            if kind_ == "op":
                for r in st.roots(e):
                    st.last_fixed[r] = pos
            sp.append(pos)
            pos += 1
        block = pos             # the stage's client part, as one position
        pos += 1
        for _, e in st.cli[s]:
            for r in st.roots(e):
                if st.fixed(r):
                    st.last_fixed[r] = block
                else:
                    st.use_stage[r] = max(st.use_stage.get(r, 0), s)
        st.positions.append((sp, block))
    for r in st.outputs:
        if st.fixed(r):
            st.last_fixed[r] = INF
        else:
            st.use_stage[r] = INF
    for r, at in st.last_fixed.items():
        st.dies_at.setdefault(at, []).append(r)


def bind_inputs(st: State) -> None:
    for k, v in enumerate(st.g.inputs):
        if v.type.placement is SERVER:
            b = st.new_buf(K.K_FIXED)
            st.server_inputs.append((b, k))
        else:
            b = st.new_buf(K.K_CLIENT, st.n_ctab)
            st.client_inputs.append((b, st.n_ctab, k))
            st.n_ctab += 1
        st.buf[v] = b


# --------------------------------------------------------------------------- pass 7: buffers + rows

def _arena_alloc(st: State, size: int) -> int:
    lst = st.arena_free.get(size)
    if lst:
        return lst.pop()
    off = st.arena_size
    st.arena_size += size
    return off


def _arena_release(st: State, r) -> None:
    b = st.buf.get(r)
    if b is not None and b in st.arena_of:
        st.arena_free.setdefault(static_size(r.type.shape)[0], []).append(st.arena_of[b])


def _server_part(st: State, s: int) -> None:
    """Server instructions of stage ``s``: arena buffers, exact-size free lists."""
    sp, _ = st.positions[s]
    for (kind_, e), at in zip(st.srv[s], sp):
        dead = []
        if kind_ == "op":
            dead = [r for r in dict.fromkeys(st.roots(e)) if r not in st.outputs
                    and st.fixed(r) and st.last_fixed.get(r) == at and r in st.buf
                    and st.buf[r] in st.arena_of]
        inplace = kind_ == "op" and OPS[e.prim.name].opcode in ELEMENTWISE
        if inplace:                 # the result may overwrite an operand read for the last time
            for r in dead:
                _arena_release(st, r)
        b = st.new_buf(K.K_FIXED)
        st.arena_of[b] = _arena_alloc(st, static_size(e.out.type.shape)[0])
        st.buf[e.out] = b
        if not inplace:
            for r in dead:
                _arena_release(st, r)
        st.rows.append((s, 0, *(encode_finish(st, e) if kind_ == "fin" else encode(st, e))))


def _dying_work(st: State, e, j: int, s: int, last_use: dict) -> list:
    """Client temporaries an instruction (number j of stage s) reads for the last time."""
    return [r for r in dict.fromkeys(st.roots(e))
            if not st.fixed(r) and last_use.get(r) == j and st.use_stage.get(r, 0) <= s
            and r in st.buf and st.kind[st.buf[r]] == K.K_WORK]


def _release_work(st: State, dead, free) -> None:
    for r in dead:
        free.setdefault(static_size(r.type.shape), []).append(st.loc[st.buf[r]])


def _client_part(st: State, s: int) -> None:
    """Client instructions of stage ``s``: work slots (per stage, keyed by (static, k)) for
    temporaries, per-client buffers for values a later stage or an output reads."""
    free: dict[tuple, list[int]] = {}
    slots: list[list] = []       # [buffers, static, k]
    last_use: dict = {}
    for j, (_, e) in enumerate(st.cli[s]):
        for r in st.roots(e):
            if not st.fixed(r):
                last_use[r] = j
    for j, (kind_, e) in enumerate(st.cli[s]):
        dead = _dying_work(st, e, j, s, last_use)
        if kind_ == "agg":
            m = static_size(e.inputs[0].type.shape)[0]
            st.acc_of[e] = st.acc_size
            st.acc_size += m + (1 if e.prim.name == "weighted_mean" else 0)
            st.rows.append((s, 1, *encode_aggregate(st, e, st.acc_of[e])))
            _release_work(st, dead, free)
            continue
        inplace = OPS[e.prim.name].opcode in ELEMENTWISE
        if inplace:
            _release_work(st, dead, free)
        v = e.out
        size = static_size(v.type.shape)
        if st.use_stage.get(v, 0) > s:
            b = st.new_buf(K.K_CLIENT, st.n_ctab)
            st.persistent.append((b, st.n_ctab, *size))
            st.n_ctab += 1
        else:
            lst = free.get(size)
            slot = lst.pop() if lst else len(slots)
            if slot == len(slots):
                slots.append([[], *size])
            b = st.new_buf(K.K_WORK, slot)
            slots[slot][0].append(b)
        st.buf[v] = b
        if not inplace:
            _release_work(st, dead, free)
        st.rows.append((s, 1, *encode(st, e)))
    st.work.append([tuple(slot) for slot in slots])


def allocate_and_encode(st: State) -> None:
    for s in range(st.nstages):
        _server_part(st, s)
        _client_part(st, s)
        # server values read by this stage's clients die after it
        block = st.positions[s][1]
        for r in st.dies_at.get(block, ()):
            if st.last_fixed.get(r) == block and r not in st.outputs:
                _arena_release(st, r)


# --------------------------------------------------------------------------- encoding

def _flags(dtype, name) -> int:
    """Float32 results are rounded, integer results checked for overflow, unless the op
    cannot leave its operands' set of values."""
    if name in EXACT:
        return 0
    return K.FL_F32 if dtype is f32 else K.FL_INT if dtype.is_int else 0


def _row(op, e, out_buf, ins, flags=0) -> list[int]:
    f = [0] * K.NFIELDS
    f[K.F_OP] = op
    f[K.F_OUT] = out_buf
    for j, fld in enumerate((K.F_A, K.F_B, K.F_C)):
        f[fld] = ins[j][0] if j < len(ins) else -1
    f[K.F_FLAGS] = flags
    if e is not None:
        f[K.F_NO], f[K.F_KO] = static_size(e.out.type.shape)
    for j, (nf, kf) in enumerate(((K.F_NA, K.F_KA), (K.F_NB, K.F_KB), (K.F_NC, K.F_KC))):
        if j < len(ins):
            f[nf], f[kf] = static_size(ins[j][1])
    return f


def _where(e) -> str:
    return e.prim.name + (f" (from {e.source})" if e.source else "")


def encode(st: State, e):
    """(row fields, ip words, source) of a local instruction, from its opcode-table row."""
    op = OPS[e.prim.name]
    ins = [(st.buf_of(a), a.type.shape) for a in e.inputs]
    shapes = [s for _, s in ins]
    ip = op.encode(e, shapes, e.out.type.shape, [b for b, _ in ins])
    if op.opcode == K.OP_CONCATENATE:       # the operands travel in ip
        ins = ins[:1]
    row = _row(op.opcode, e, st.buf[e.out], ins, _flags(e.out.type.dtype, e.prim.name))
    return row, ip, _where(e)


def encode_aggregate(st: State, e, off: int):
    ins = [(st.buf_of(a), a.type.shape) for a in e.inputs]
    mode = AGG_MODE[e.prim.name]
    f = _row(K.OP_AGGREGATE, None, -1, ins)
    f[K.F_NO], f[K.F_KO] = static_size(e.inputs[0].type.shape)
    m = f[K.F_NO]
    return f, [mode, off] + ([off + m] if mode == K.AG_WMEAN else []), _where(e)


def encode_finish(st: State, e):
    off = st.acc_of[e]
    mode = AGG_MODE[e.prim.name]
    f = _row(K.OP_FINISH, e, st.buf[e.out], [], _flags(e.out.type.dtype, e.prim.name))
    m = f[K.F_NO]
    return f, [mode, off] + ([off + m] if mode == K.AG_WMEAN else []), _where(e)


# --------------------------------------------------------------------------- pass 8: assemble

def _order_tape(st: State):
    """Rows per stage, server part then client part; ip words concatenated."""
    by_part: dict = {}
    for s, part, fields, ip, src in st.rows:
        by_part.setdefault((s, part), []).append((fields, ip, src))
    rows, ip_all, sources, stages = [], [], [], []
    for s in range(st.nstages):
        bounds = []
        for part in (0, 1):
            bounds.append(len(rows))
            for fields, ip, src in by_part.get((s, part), ()):
                fields = list(fields)
                fields[K.F_IP] = len(ip_all)
                ip_all.extend(ip)
                rows.append(fields)
                sources.append(src)
            bounds.append(len(rows))
        stages.append(bounds)
    tape = np.zeros((max(len(rows), 1), K.NFIELDS), dtype=np.int64)
    if rows:
        tape[:len(rows)] = rows
    return tape, np.asarray(ip_all + [0], dtype=np.int64), sources, stages


def _locations(st: State, consts: np.ndarray):
    """The loc template: constants' addresses, work buffers' global slot ids."""
    loc = np.asarray(st.loc, dtype=np.int64)
    for b, off in st.const_off.items():
        loc[b] = consts.ctypes.data + 8 * off
    slot_rows = []
    for s, slots in enumerate(st.work):
        for bufs, size, k in slots:
            for b in bufs:
                loc[b] = len(slot_rows)
            slot_rows.append((s, size, k))
    return loc, np.asarray(slot_rows, dtype=np.int64).reshape(-1, 3)


def _outputs(st: State) -> list:
    outs = []
    in_index = {v: k for k, v in enumerate(st.g.inputs)}
    for a, t in zip(st.g.outputs, st.g.out_types):
        r = st.find(a)
        if isinstance(r, Literal):
            outs.append(("literal", r.value, t))
        elif r in in_index:
            outs.append(("input", in_index[r], t))
        elif st.fixed(r):
            outs.append(("fixed", st.buf[r], t))
        else:
            outs.append(("client", st.buf[r], t))
    return outs


def assemble(st: State) -> Program:
    g = st.g
    consts = np.ascontiguousarray(np.concatenate(st.consts) if st.consts else np.zeros(1),
                                  dtype=np.float64)
    tape, ip, sources, stages = _order_tape(st)
    loc, slots = _locations(st, consts)
    arena_bufs = np.asarray(sorted(st.arena_of), dtype=np.int64)
    uses_clients = any(v.type.placement is CLIENTS for v in g.inputs) or any(
        e.out.type.placement is CLIENTS for e in st.eqns)
    prog = Program(
        tape=tape, ip=ip, stages=np.asarray(stages, dtype=np.int64).reshape(-1, 4),
        kind=np.asarray(st.kind, dtype=np.int64), loc=loc, consts=consts,
        arena_bufs=arena_bufs,
        arena_off=np.asarray([st.arena_of[b] for b in arena_bufs.tolist()], dtype=np.int64),
        arena_size=max(st.arena_size, 1), server_inputs=st.server_inputs,
        client_inputs=st.client_inputs, persistent=st.persistent, work=st.work, slots=slots,
        acc_size=max(st.acc_size, 1), outputs=_outputs(st), sources=sources,
        n_ctab=st.n_ctab,
        ragged=any(v.type.tensor.ragged for v in g.inputs) or any(
            e.out.type.tensor.ragged for e in st.eqns),
        uses_clients=uses_clients,
        uses_n=uses_clients or any(e.prim.name == "num_clients" for e in st.eqns),
        g_inputs=[v.type for v in g.inputs])
    prog.stats = dict(
        equations=len(g.eqns), instructions=len(sources), stages=st.nstages,
        arena_floats=st.arena_size, work_slots=[len(w) for w in st.work],
        client_state_buffers=len(st.persistent),
        dropped=len(g.eqns) - len(st.eqns) - sum(1 for e in g.eqns if e.out in st.root))
    return prog


#: the passes, in order; each reads and extends the shared State
PIPELINE = (check_supported, resolve_aliases, drop_dead, assign_stages, split_parts,
            find_last_uses, bind_inputs, allocate_and_encode)


def lower_graph(graph: Graph) -> Program:
    """Lower a verified graph (uncached)."""
    st = State(graph)
    for p in PIPELINE:
        p(st)
    return assemble(st)


def lower(graph: Graph) -> Program:
    """The program of a graph, lowered once and cached on the graph."""
    prog = graph._lowered.get("numba")
    if prog is None:
        graph.verify()
        prog = lower_graph(graph)
        graph._lowered["numba"] = prog
    return prog
