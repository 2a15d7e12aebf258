"""The numba backend: graphs lowered to a flat instruction tape, run by a jitted interpreter.

``execute(graph, inputs)`` has the contract of :func:`fadcore.backends.reference.execute`.
The first call on a graph *lowers* it (cached in ``graph._lowered``):

1. **Simplify.** ``reshape``, ``stop_gradient``, ``broadcast``, ``after`` and value-preserving
   ``convert`` become aliases (no instruction); equations no output needs are dropped
   (``after``'s token is a scheduling edge for federated runtimes, not a data dependency, so
   the work that only fed a token is dead here).
2. **Schedule.** Every value gets a *stage*: 0 for arguments, the stage of its operands for
   local work, one more than its operand for an aggregation. Stage ``s`` runs its server
   instructions once, then its client instructions for every client. Client values computed
   from broadcast values only (equal on every client, not ragged) run once, with the server
   work. A gradient whose cotangent does not depend on an aggregate thus runs forward and
   backward in one pass over each client's data, while it is in cache.
3. **Buffers.** Server values share one arena, client temporaries one scratch row per chunk of
   clients; both are reused by liveness (a buffer is free after its last reader; elementwise
   ops may write over an operand they are the last reader of), so memory follows the live
   set. Client values kept across stages or returned get one flat buffer with per-client
   offsets; client arguments are read in place (float64) through per-client addresses.
4. **Emit** one tape row per instruction (see :mod:`._numba_kernels` for the fields).

Every value is held in float64 slots: float32 results are rounded to float32 after every
instruction, int64/int32 labels and bools are exact integers (|x| < 2**53, checked on integer
arguments). See ``docs/performance.md``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from .. import ops
from ..core import primitives
from ..errors import CardinalityError, DTypeError, LoweringError, ShapeError
from ..ir.graph import Graph, Literal, Var
from ..ir.primitives import AGGREGATIONS, runtime_aliases
from ..ir.types import CLIENTS, SERVER, TensorType, bool_, f32, f64
from ..values import ClientValues
from . import _numba_kernels as K
from .inputs import Inputs

__all__ = ["execute", "lower", "OPCODES", "ALIASES", "Program"]

# --------------------------------------------------------------------------- the opcode table

#: primitive name -> opcode. With ALIASES, covers every primitive (tests enumerate both).
OPCODES: dict[str, int] = {
    name: getattr(K, "OP_" + name.upper()) for name in (
        "neg", "exp", "log", "log1p", "expm1", "sqrt", "tanh", "logistic", "sin", "cos",
        "sign", "abs", "add", "sub", "mul", "div", "pow", "max", "min", "logaddexp", "lt",
        "le", "gt", "ge", "eq", "ne", "select", "convert", "reduce_sum", "reduce_max",
        "argmax", "broadcast_in_dim", "transpose", "matmul", "matvec", "vecmat", "vdot",
        "outer", "slice", "pad", "concatenate", "take", "untake", "take_along_axis",
        "untake_along_axis", "one_hot", "rows", "num_clients")
}
OPCODES["zeros_like"] = K.OP_ZEROS
for _agg in (p.name for p in AGGREGATIONS):
    OPCODES[_agg] = K.OP_AGGREGATE          # + OP_FINISH on the server side

#: primitives that never become an instruction: the result shares its operand's buffer
ALIASES = runtime_aliases()

_AGG_MODE = {"sum": K.AG_SUM, "secure_sum": K.AG_SUM, "mean": K.AG_MEAN,
             "weighted_mean": K.AG_WMEAN}
_ELEMENTWISE = frozenset(range(K.OP_NEG, K.OP_NE + 1)) | {
    K.OP_SELECT, K.OP_CONVERT, K.OP_ZEROS, K.OP_COPY}

_CHUNKS_PER_THREAD = 4
_ALIGN = 8                       # work slots start on 64-byte boundaries


def _static(shape) -> tuple[int, int]:
    """(static size, number of ragged dims): the size for a client with r rows is s * r**k."""
    s, k = 1, 0
    for d in shape:
        if d is None:
            k += 1
        else:
            s *= d
    return s, k


def _dims(shape) -> list[int]:
    return [-1 if d is None else int(d) for d in shape]


def _group(shape) -> list[int]:
    """(static size, ragged count) of a group of dimensions."""
    return list(_static(shape))


def _collapse(shape, axis) -> list[int]:
    """[outer, D, inner] around ``axis``, each as (static, ragged count): 6 ints."""
    return [*_group(shape[:axis]), *_group(shape[axis:axis + 1]), *_group(shape[axis + 1:])]


# --------------------------------------------------------------------------- the program

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


class _Lowering:
    """Builds a :class:`Program` from a verified graph."""

    def __init__(self, graph: Graph):
        self.g = graph
        self.root: dict = {}            # Var -> Var | Literal it aliases
        self.buf: dict = {}             # root key -> buffer id
        self.kind: list[int] = []
        self.loc: list[int] = []
        self.consts: list[np.ndarray] = []
        self.const_off: dict = {}

    # -- aliases, dead code, stages ------------------------------------------------------
    def find(self, a):
        while isinstance(a, Var) and a in self.root:
            a = self.root[a]
        return a

    def analyse(self):
        g = self.g
        for e in g.eqns:
            name = e.prim.name
            if name not in OPCODES and name not in ALIASES:
                raise LoweringError(
                    f"numba backend: no lowering rule for primitive {name!r}"
                    + (f" (from {e.source})" if e.source else ""))
            for a in [e.out, *e.inputs]:
                t = a.type.tensor if isinstance(a, Var) else a.type
                if t.ndim > K.MAX_NDIM:
                    raise LoweringError(f"numba backend: {name}: {t} has more than "
                                        f"{K.MAX_NDIM} dimensions")
        # aliases
        for e in g.eqns:
            if e.prim.name in ALIASES or (e.prim.name == "convert" and self._convert_alias(e)):
                self.root[e.out] = e.inputs[0]
        # dead code: from the outputs back; after's token is not a data dependency
        live = {self.find(a) for a in g.outputs if isinstance(a, Var)}
        needed = []
        for e in reversed(g.eqns):
            if e.out in self.root:
                continue
            if e.out not in live:
                continue
            needed.append(e)
            for a in e.inputs:
                r = self.find(a)
                if isinstance(r, Var):
                    live.add(r)
        self.eqns = needed[::-1]
        # stages and uniformity (client values equal on every client, computed once)
        self.stage: dict = {}
        self.uniform: set = set()
        for v in g.inputs:
            self.stage[v] = 0
        for e in self.eqns:
            ins = [self.find(a) for a in e.inputs]
            vs = [a for a in ins if isinstance(a, Var)]
            s = max((self.stage[a] for a in vs), default=0)
            if e.prim.name in _AGG_MODE:
                s += 1
            elif e.prim.name == "num_clients":
                s = 0
            self.stage[e.out] = s
            t = e.out.type
            if (t.placement is CLIENTS and e.prim.kind == "local" and not t.tensor.ragged
                    and all(self._fixed(a) for a in vs)):
                self.uniform.add(e.out)

    def _fixed(self, v: Var) -> bool:
        """Whether a root value has one copy for everyone (server or uniform client)."""
        return v.type.placement is SERVER or v in self.uniform

    @staticmethod
    def _convert_alias(e) -> bool:
        src, dst = e.inputs[0].type.dtype, e.params["dtype"]
        return _convert_mode(src, dst) == K.CV_COPY and not (dst is f32 and src is not f32)

    # -- buffers -------------------------------------------------------------------------
    def new_buf(self, kind, loc=0) -> int:
        self.kind.append(kind)
        self.loc.append(loc)
        return len(self.kind) - 1

    def const_buf(self, lit: Literal) -> int:
        key = ("lit",) + lit.key()
        if key not in self.buf:
            arr = np.ascontiguousarray(lit.value, dtype=np.float64).ravel()
            off = sum(c.size for c in self.consts)
            self.consts.append(arr)
            b = self.new_buf(K.K_FIXED)
            self.const_off[b] = off
            self.buf[key] = b
        return self.buf[key]

    def buf_of(self, a) -> int:
        r = self.find(a)
        if isinstance(r, Literal):
            return self.const_buf(r)
        return self.buf[r]

    # -- lowering ------------------------------------------------------------------------
    def run(self) -> Program:
        g = self.g
        self.analyse()
        nstages = 1 + max(self.stage.values(), default=0)
        # instruction lists per stage, in graph order
        srv = [[] for _ in range(nstages)]
        cli = [[] for _ in range(nstages)]
        for e in self.eqns:
            s = self.stage[e.out]
            name = e.prim.name
            if name in _AGG_MODE:
                cli[s - 1].append(("agg", e))
                srv[s].append(("fin", e))
            elif e.out.type.placement is SERVER or e.out in self.uniform:
                srv[s].append(("op", e))
            else:
                cli[s].append(("op", e))

        # last uses: server values by program position, client values by stage
        # an output may alias a literal (after 1.0 h, reverse mode's seed): nothing to keep
        outputs = {r for r in map(self.find, g.outputs) if isinstance(r, Var)}
        INF = 1 << 60
        pos = 0
        last_fixed: dict = {}
        use_stage: dict = {}
        positions = []
        for s in range(nstages):
            sp = []
            for item in srv[s]:
                for a in item[1].inputs if item[0] == "op" else []:
                    r = self.find(a)
                    if isinstance(r, Var):
                        last_fixed[r] = pos
                sp.append(pos)
                pos += 1
            block = pos
            pos += 1
            for item in cli[s]:
                kind_, e = item
                ins = e.inputs
                for a in ins:
                    r = self.find(a)
                    if not isinstance(r, Var):
                        continue
                    if self._fixed(r):
                        last_fixed[r] = block
                    else:
                        use_stage[r] = max(use_stage.get(r, 0), s)
            positions.append((sp, block))
        for r in outputs:
            if self._fixed(r):
                last_fixed[r] = INF
            else:
                use_stage[r] = INF
        dies_at: dict = {}          # position -> values last read there (linear, not quadratic)
        for r, at in last_fixed.items():
            dies_at.setdefault(at, []).append(r)

        # graph inputs
        server_inputs, client_inputs = [], []
        n_ctab = 0
        for k, v in enumerate(g.inputs):
            if v.type.placement is SERVER:
                b = self.new_buf(K.K_FIXED)
                server_inputs.append((b, k))
            else:
                b = self.new_buf(K.K_CLIENT, n_ctab)
                client_inputs.append((b, n_ctab, k))
                n_ctab += 1
            self.buf[v] = b

        # server arena: linear scan, exact-size free lists
        arena_free: dict[int, list[int]] = {}
        arena_size = 0
        arena_of: dict[int, int] = {}

        def arena_alloc(size):
            nonlocal arena_size
            lst = arena_free.get(size)
            if lst:
                return lst.pop()
            off = arena_size
            arena_size += size
            return off

        def arena_release(r):
            b = self.buf.get(r)
            if b is not None and b in arena_of:
                arena_free.setdefault(_static(r.type.shape)[0], []).append(arena_of[b])

        # work slots: per stage, linear scan keyed by (static, k)
        persistent = []
        work = []
        acc_size = 0
        acc_of: dict = {}
        tape_rows = []      # (stage, 'srv'|'cli', row fields, ip list, source)

        def dying(e, at, is_fixed_pos):
            out = []
            for a in e.inputs:
                r = self.find(a)
                if not isinstance(r, Var) or r in out or r in outputs:
                    continue
                if is_fixed_pos:
                    if self._fixed(r) and last_fixed.get(r) == at and r in self.buf \
                            and self.buf[r] in arena_of:
                        out.append(r)
            return out

        for s in range(nstages):
            sp, block = positions[s]
            # ---- server part
            for item, at in zip(srv[s], sp):
                kind_, e = item
                is_op = kind_ == "op"
                dead = dying(e, at, True) if is_op else []
                inplace = is_op and self._opcode(e) in _ELEMENTWISE
                if inplace:
                    for r in dead:
                        arena_release(r)
                size = _static(e.out.type.shape)[0]
                b = self.new_buf(K.K_FIXED)
                arena_of[b] = arena_alloc(size)
                self.buf[e.out] = b
                if not inplace:
                    for r in dead:
                        arena_release(r)
                if kind_ == "fin":
                    tape_rows.append((s, 0, *self._emit_finish(e, acc_of)))
                else:
                    tape_rows.append((s, 0, *self._emit(e)))
            # ---- client part
            free: dict[tuple, list[int]] = {}
            slots: list[list] = []       # [buffers, static, k]
            last_use: dict = {}
            for j, (kind_, e) in enumerate(cli[s]):
                for a in e.inputs:
                    r = self.find(a)
                    if isinstance(r, Var) and not self._fixed(r):
                        last_use[r] = j
            for j, (kind_, e) in enumerate(cli[s]):
                if kind_ == "agg":
                    x = e.inputs[0]
                    m = _static(x.type.shape)[0]
                    acc_of[e] = acc_size
                    acc_size += m + (1 if e.prim.name == "weighted_mean" else 0)
                    tape_rows.append((s, 1, *self._emit_aggregate(e, acc_of[e])))
                    dead = []
                else:
                    dead = []
                    for a in e.inputs:
                        r = self.find(a)
                        if (isinstance(r, Var) and not self._fixed(r) and r not in dead
                                and last_use.get(r) == j and use_stage.get(r, 0) <= s
                                and r in self.buf and self.kind[self.buf[r]] == K.K_WORK):
                            dead.append(r)
                    inplace = self._opcode(e) in _ELEMENTWISE
                    if inplace:
                        self._release_work(dead, free)
                    v = e.out
                    st, kk = _static(v.type.shape)
                    if use_stage.get(v, 0) > s:
                        b = self.new_buf(K.K_CLIENT, n_ctab)
                        persistent.append((b, n_ctab, st, kk, v))
                        n_ctab += 1
                    else:
                        lst = free.get((st, kk))
                        if lst:
                            slot = lst.pop()
                        else:
                            slot = len(slots)
                            slots.append([[], st, kk])
                        b = self.new_buf(K.K_WORK, slot)
                        slots[slot][0].append(b)
                    self.buf[v] = b
                    if not inplace:
                        self._release_work(dead, free)
                    tape_rows.append((s, 1, *self._emit(e)))
                if kind_ == "agg":
                    r = self.find(e.inputs[0])
                    if (isinstance(r, Var) and not self._fixed(r) and last_use.get(r) == j
                            and use_stage.get(r, 0) <= s and r in self.buf
                            and self.kind[self.buf[r]] == K.K_WORK):
                        self._release_work([r], free)
            work.append(slots)
            # server values read by this stage's clients die after it
            for r in dies_at.get(block, ()):
                if last_fixed.get(r) == block and r not in outputs:
                    arena_release(r)

        # literal and constant buffers
        consts = (np.concatenate(self.consts) if self.consts else np.zeros(1))
        consts = np.ascontiguousarray(consts, dtype=np.float64)
        # order the tape: per stage server rows then client rows
        rows, ips, sources, stages = [], [], [], []
        ip_all: list[int] = []
        by_part: dict = {}
        for (s2, p2, fields, ip, src) in tape_rows:
            by_part.setdefault((s2, p2), []).append((fields, ip, src))
        for s in range(nstages):
            st = [0, 0, 0, 0]
            for part in (0, 1):
                st[2 * part] = len(rows)
                for fields, ip, src in by_part.get((s, part), ()):
                    fields = list(fields)
                    fields[K.F_IP] = len(ip_all)
                    ip_all.extend(ip)
                    rows.append(fields)
                    sources.append(src)
                st[2 * part + 1] = len(rows)
            stages.append(st)
        tape = np.zeros((max(len(rows), 1), K.NFIELDS), dtype=np.int64)
        for t, f in enumerate(rows):
            tape[t] = f
        kind = np.asarray(self.kind, dtype=np.int64)
        loc = np.asarray(self.loc, dtype=np.int64)
        cbase = consts.ctypes.data
        for b, off in self.const_off.items():
            loc[b] = cbase + 8 * off
        # work slots: one global id each (a row of the per-call address table)
        slot_stage, slot_static, slot_k = [], [], []
        for s, slots in enumerate(work):
            for bufs, st, kk in slots:
                for b in bufs:
                    loc[b] = len(slot_stage)
                slot_stage.append(s)
                slot_static.append(st)
                slot_k.append(kk)
        arena_bufs = np.asarray(sorted(arena_of), dtype=np.int64)
        arena_off = np.asarray([arena_of[b] for b in sorted(arena_of)], dtype=np.int64)

        # outputs
        outs = []
        in_index = {v: k for k, v in enumerate(g.inputs)}
        for a, t in zip(g.outputs, g.out_types):
            r = self.find(a)
            if isinstance(r, Literal):
                outs.append(("literal", r.value, t))
            elif r in in_index:
                outs.append(("input", in_index[r], t))
            elif self._fixed(r):
                outs.append(("fixed", self.buf[r], t))
            else:
                outs.append(("client", self.buf[r], t))
        ragged = any(v.type.tensor.ragged for v in g.inputs) or any(
            e.out.type.tensor.ragged for e in self.eqns)
        uses_clients = any(v.type.placement is CLIENTS for v in g.inputs) or any(
            e.out.type.placement is CLIENTS for e in self.eqns)
        uses_n = uses_clients or any(e.prim.name == "num_clients" for e in self.eqns)
        prog = Program(
            tape=tape, ip=np.asarray(ip_all + [0], dtype=np.int64),
            stages=np.asarray(stages, dtype=np.int64).reshape(-1, 4), kind=kind, loc=loc,
            consts=consts, arena_bufs=arena_bufs, arena_off=arena_off,
            arena_size=max(arena_size, 1), server_inputs=server_inputs,
            client_inputs=client_inputs,
            persistent=[(b, row, st, kk) for b, row, st, kk, _ in persistent],
            work=[[(slot[0], slot[1], slot[2]) for slot in slots] for slots in work],
            slots=np.asarray([slot_stage, slot_static, slot_k], dtype=np.int64).reshape(3, -1).T,
            acc_size=max(acc_size, 1), outputs=outs, sources=sources, n_ctab=n_ctab,
            ragged=ragged, uses_clients=uses_clients, uses_n=uses_n,
            g_inputs=[v.type for v in g.inputs])
        prog.stats = dict(
            equations=len(g.eqns), instructions=len(rows), stages=nstages,
            arena_floats=arena_size,
            work_slots=[len(w) for w in prog.work],
            client_state_buffers=len(persistent),
            dropped=len(g.eqns) - len(self.eqns) - sum(1 for e in g.eqns if e.out in self.root))
        return prog

    def _release_work(self, dead, free):
        for r in dead:
            b = self.buf[r]
            slot = self.loc[b]
            free.setdefault(_static(r.type.shape), []).append(slot)

    # -- emission ------------------------------------------------------------------------
    def _opcode(self, e) -> int:
        if e.prim.name == "convert":
            return K.OP_CONVERT
        return OPCODES[e.prim.name]

    def _row(self, op, e, out_buf, ins, flags=0):
        f = [0] * K.NFIELDS
        f[K.F_OP] = op
        f[K.F_OUT] = out_buf
        for j, fld in enumerate((K.F_A, K.F_B, K.F_C)):
            f[fld] = ins[j][0] if j < len(ins) else -1
        f[K.F_FLAGS] = flags
        if e is not None:
            f[K.F_NO], f[K.F_KO] = _static(e.out.type.shape)
        for j, (nf, kf) in enumerate(((K.F_NA, K.F_KA), (K.F_NB, K.F_KB), (K.F_NC, K.F_KC))):
            if j < len(ins):
                f[nf], f[kf] = _static(ins[j][1])
        return f

    def _emit(self, e):
        name = e.prim.name
        p = e.params
        op = self._opcode(e)
        out_t = e.out.type.tensor
        ins = [(self.buf_of(a), a.type.shape if isinstance(a, Var) else a.type.shape)
               for a in e.inputs]
        flags = _flags(out_t.dtype, name)
        ip: list[int] = []
        shp = [a.type.shape for a in e.inputs]
        if name == "convert":
            ip = [_convert_mode(e.inputs[0].type.dtype, p["dtype"])]
        elif name in ("reduce_sum", "reduce_max"):
            xs = shp[0]
            ip = [len(xs), *_dims(xs), *[1 if i in p["axes"] else 0 for i in range(len(xs))]]
        elif name == "argmax":
            ip = _collapse(shp[0], p["axis"])
        elif name == "broadcast_in_dim":
            xs = shp[0]
            ip = [len(out_t.shape), *_dims(out_t.shape), len(xs), *_dims(xs), *p["dims"]]
        elif name == "transpose":
            ip = [len(shp[0]), *_dims(shp[0]), *p["perm"]]
        elif name in ("slice", "pad"):
            big = shp[0] if name == "slice" else out_t.shape
            ip = [len(big), *_dims(big), *_slice_params(big, p)]
        elif name == "concatenate":
            nd = len(out_t.shape)
            ip = [nd, p["axis"], *_dims(out_t.shape), len(ins)]
            for (b, s) in ins:
                ip += [b, *_dims(s)]
            ins = ins[:1]
        elif name == "matmul":
            ip = _dims((shp[0][0], shp[0][1], shp[1][1]))
        elif name == "matvec":
            ip = _dims(shp[0])
        elif name == "vecmat":
            ip = _dims(shp[1])
        elif name == "vdot":
            ip = _dims(shp[0])
        elif name == "outer":
            ip = _dims((shp[0][0], shp[1][0]))
        elif name == "take":
            xs, ids = shp
            outer, D, inner = _pairs(_collapse(xs, p["axis"]))
            ip = [*outer, *D, *inner, *_group(ids)]
        elif name == "untake":
            cs, ids = shp
            ax, k = p["axis"], len(ids)
            ip = [*_group(cs[:ax]), *_group((p["dim"],)), *_group(cs[ax + k:]), *_group(ids)]
        elif name == "take_along_axis":
            xs, ids = shp
            outer, D, inner = _pairs(_collapse(xs, p["axis"]))
            ip = [*outer, *D, *inner, *_group(ids[p["axis"]:p["axis"] + 1])]
        elif name == "untake_along_axis":
            cs, ids = shp
            ax = p["axis"]
            ip = [*_group(cs[:ax]), *_group((p["dim"],)), *_group(cs[ax + 1:]),
                  *_group(cs[ax:ax + 1])]
        elif name == "one_hot":
            ip = [p["depth"]]
        row = self._row(op, e, self.buf[e.out], ins, flags)
        return row, ip, _where(e)

    def _emit_aggregate(self, e, off):
        ins = [(self.buf_of(a), a.type.shape) for a in e.inputs]
        mode = _AGG_MODE[e.prim.name]
        f = self._row(K.OP_AGGREGATE, None, -1, ins)
        f[K.F_NO], f[K.F_KO] = _static(e.inputs[0].type.shape)
        m = f[K.F_NO]
        ip = [mode, off] + ([off + m] if mode == K.AG_WMEAN else [])
        return f, ip, _where(e)

    def _emit_finish(self, e, acc_of):
        off = acc_of[e]
        mode = _AGG_MODE[e.prim.name]
        flags = _flags(e.out.type.dtype, e.prim.name)
        f = self._row(K.OP_FINISH, e, self.buf[e.out], [], flags)
        m = f[K.F_NO]
        ip = [mode, off] + ([off + m] if mode == K.AG_WMEAN else [])
        return f, ip, _where(e)


def _flags(dtype, name) -> int:
    """Float32 results are rounded, integer results checked for overflow, unless the op
    cannot leave its operands' set of values."""
    if name in _EXACT_F32:
        return 0
    return K.FL_F32 if dtype is f32 else K.FL_INT if dtype.is_int else 0


# results exact in float32 (and integers in range) when the operands are: no rounding pass
# or range check needed
_EXACT_F32 = frozenset({
    "neg", "abs", "sign", "max", "min", "select", "zeros_like", "broadcast_in_dim",
    "transpose", "slice", "pad", "concatenate", "take", "take_along_axis", "one_hot",
    "reduce_max", "lt", "le", "gt", "ge", "eq", "ne", "argmax", "rows"})


def _slice_params(big, p) -> list[int]:
    """starts, limits (-1: a whole ragged dimension), strides of a slice or pad. An axis with
    at most one element taken gets stride 1 (any stride means the same there), so every
    number fits the kernels' int64 arithmetic."""
    starts, limits, strides = list(p["starts"]), [], []
    for d, s0, lim, k in zip(big, p["starts"], p["limits"], p["strides"]):
        if lim is None:
            limits.append(-1)
            strides.append(k)
            continue
        n = len(range(s0, lim, k))
        limits.append(s0 + n if n <= 1 else lim)
        strides.append(1 if n <= 1 else k)
    return [*starts, *limits, *strides]


def _pairs(xs):
    return [xs[0:2], xs[2:4], xs[4:6]]


def _convert_mode(src, dst) -> int:
    if dst is bool_:
        return K.CV_COPY if src is bool_ else K.CV_NONZERO
    if dst.is_int and src.is_float:
        return K.CV_TRUNC
    return K.CV_COPY


def _where(e) -> str:
    return e.prim.name + (f" (from {e.source})" if e.source else "")


def lower(graph: Graph) -> Program:
    """The program of a graph, lowered once and cached on the graph."""
    prog = graph._lowered.get("numba")
    if prog is None:
        graph.verify()
        prog = _Lowering(graph).run()
        graph._lowered["numba"] = prog
    return prog


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
    if n <= 1 or work < PARALLEL_MIN_WORK or nchunks == 1:
        # chunks run one after the other: they share one workspace
        rmax = np.asarray([rows[:n].max() if n else 0])
        ws, wtab = _workspace(prog, rmax, nchunks)
        ok = _run_serial(prog, loc, ctab, rows, n, wtab, acc, err)
    else:
        starts = (np.arange(nchunks) * n) // nchunks
        ws, wtab = _workspace(prog, np.maximum.reduceat(rows[:n], starts), nchunks)
        ok = K.run_program(prog.tape, prog.stages, prog.ip, prog.kind, loc, ctab, rows, n,
                           nchunks, wtab, acc, err, _kernels())
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


def _workspace(prog: Program, rmax: np.ndarray, nchunks: int):
    """Scratch memory for client temporaries: one region per distinct workspace, each sized
    for the largest client that uses it (``rmax``: one entry per region, or one shared by all
    chunks), so one huge client costs one huge region, not one per chunk.

    Returns (the memory, ``wtab``: the address of every work slot in every chunk's region).
    """
    st, sl, kk = prog.slots[:, 0], prog.slots[:, 1], prog.slots[:, 2]
    nslots = len(sl)
    # sizes[slot, region] in floats, rounded up to 64-byte lines
    sizes = sl[:, None] * rmax[None, :].astype(np.int64) ** kk[:, None]
    sizes = -(-np.maximum(sizes, 1) // _ALIGN) * _ALIGN
    offs = np.zeros_like(sizes)
    extent = np.zeros(len(rmax), dtype=np.int64)
    for s in np.unique(st):             # stages reuse the same region, one after the other
        m = st == s
        c = np.cumsum(sizes[m], axis=0)
        offs[m] = c - sizes[m]
        extent = np.maximum(extent, c[-1])
    bases = np.zeros(len(rmax) + 1, dtype=np.int64)
    np.cumsum(np.maximum(extent, 1), out=bases[1:])
    ws = np.empty(int(bases[-1]), dtype=np.float64)
    wtab = ws.ctypes.data + 8 * (offs + bases[None, :-1])
    if len(rmax) != nchunks:
        wtab = np.repeat(wtab[:, :1], nchunks, axis=1)
    if nslots == 0:                     # numba wants a non-empty table
        wtab = np.zeros((1, nchunks), dtype=np.int64)
    return ws, np.ascontiguousarray(wtab)


def _run_serial(prog, loc, ctab, rows, n, wtab, acc, err) -> bool:
    """All stages on the calling thread: the same interpreter, one chunk of clients."""
    fns = _kernels()
    nchunks = wtab.shape[1]
    for s0, s1, c0, c1 in prog.stages.tolist():
        if K.run_part(prog.tape, s0, s1, prog.ip, prog.kind, loc, ctab, rows, -1, 0, n,
                      nchunks, wtab, acc, 0, err[-1], fns) != K.E_OK:
            return False
        if c1 > c0:
            for c in range(nchunks):
                if K.run_part(prog.tape, c0, c1, prog.ip, prog.kind, loc, ctab, rows,
                              (c * n) // nchunks, ((c + 1) * n) // nchunks, n, nchunks,
                              wtab, acc, c, err[c], fns) != K.E_OK:
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
