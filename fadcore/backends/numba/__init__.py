"""The numba backend: graphs lowered to a flat instruction tape, run by a jitted interpreter.

* :mod:`.opcodes`: the opcode table, one row per primitive (opcode, kernel, parameter
  encoder, flags); every other per-op table is derived from it and checked at import
  against the jitted module's constants;
* :mod:`.lowering`: graph -> :class:`Program`, a pipeline of small passes;
* :mod:`.kernels`: the jitted kernels and interpreter (``@cfunc``/``@njit(cache=True)``);
* :mod:`.runtime`: ``execute`` (argument binding, workspace, serial/parallel, outputs, errors);
* :mod:`.disasm`: ``disassemble(program_or_graph)``, the tape with source lines.

Every value is held in float64 slots: float32 results are rounded to float32 after every
instruction, integers are exact up to 2**53 (checked). See ``docs/performance.md``.
"""

from __future__ import annotations

from ._notice import compiling

with compiling():                   # the kernels are @cfunc: compiled (or loaded) on import
    from . import kernels  # noqa: F401

from .disasm import disassemble  # noqa: E402
from .lowering import PIPELINE, Program, lower  # noqa: E402
from .opcodes import AGG_MODE, ALIASES, ELEMENTWISE, EXACT, OPCODES, OPS, Op  # noqa: E402
from .runtime import execute  # noqa: E402

__all__ = ["execute", "lower", "disassemble", "Program", "PIPELINE", "OPS", "Op", "OPCODES",
           "ALIASES", "AGG_MODE", "ELEMENTWISE", "EXACT"]
