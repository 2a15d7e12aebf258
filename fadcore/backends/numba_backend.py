"""Compatibility name of the numba backend, now the package :mod:`fadcore.backends.numba`."""

from __future__ import annotations

from .numba import (ALIASES, OPCODES, OPS, PIPELINE, Program, disassemble, execute,  # noqa: F401
                    lower)
from .numba import runtime as _runtime

__all__ = ["execute", "lower", "disassemble", "OPCODES", "ALIASES", "OPS", "Program"]


def __getattr__(name):          # PARALLEL_MIN_WORK, _num_threads, ...: the runtime's
    return getattr(_runtime, name)
