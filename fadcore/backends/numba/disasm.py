"""``disassemble()``: a lowered tape as text, one row per instruction with its source line.

    stage 1 clients
      3  matvec        w2  <- c0, f1        n=?*1  ip=[-1, 3]        # matvec (from fit.py:12)

Buffers print by kind: ``f`` fixed (server values, literals, server arguments), ``w`` a work
slot of the running chunk of clients, ``c`` a per-client row of ``ctab`` (client arguments and
client values kept across stages); sizes print as ``static*?^k`` (``?``: the client's rows).
"""

from __future__ import annotations

from ...ir.graph import Graph
from . import kernels as K
from .lowering import Program, lower

__all__ = ["disassemble"]

_KIND = {K.K_FIXED: "f", K.K_WORK: "w", K.K_CLIENT: "c"}
_FLAGS = {K.FL_F32: "f32", K.FL_INT: "int"}


def _buf(prog: Program, b: int) -> str:
    if b < 0:
        return ""
    k = int(prog.kind[b])
    loc = f"{int(prog.loc[b])}" if k != K.K_FIXED else f"{b}"
    return _KIND[k] + loc


def _size(st: int, k: int) -> str:
    return str(st) + "".join("*?" for _ in range(k))


def disassemble(program: Program | Graph) -> str:
    """The tape of a program (or of a graph, lowered first) with each row's source."""
    prog = lower(program) if isinstance(program, Graph) else program
    nrows = len(prog.sources)
    ip_ends = [int(prog.tape[t + 1, K.F_IP]) if t + 1 < nrows else len(prog.ip) - 1
               for t in range(nrows)]
    lines = []
    for s, (s0, s1, c0, c1) in enumerate(prog.stages.tolist()):
        for part, lo, hi in (("server", s0, s1), ("clients", c0, c1)):
            if hi <= lo:
                continue
            lines.append(f"stage {s} {part}")
            for t in range(lo, hi):
                row = prog.tape[t]
                name = K.OPCODE_NAMES[int(row[K.F_OP])]
                ins = ", ".join(x for x in (_buf(prog, int(row[f])) for f in
                                            (K.F_A, K.F_B, K.F_C)) if x)
                out = _buf(prog, int(row[K.F_OUT])) or "acc"
                ip = prog.ip[int(row[K.F_IP]):ip_ends[t]].tolist()
                flags = "".join(f" {v}" for bit, v in _FLAGS.items() if row[K.F_FLAGS] & bit)
                lines.append(f"  {t:3d}  {name:17s} {out:>5s} <- {ins:14s} "
                             f"n={_size(int(row[K.F_NO]), int(row[K.F_KO])):8s} "
                             f"ip={ip}{flags}  # {prog.sources[t]}")
    return "\n".join(lines)
