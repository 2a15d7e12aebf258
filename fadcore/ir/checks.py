"""``FAD_CHECKS=1``: every pass verifies the graph it produces (JAX's ``enable_checks``).

Passes call :func:`checked` on their output. With checks on, an ill-typed result raises
:class:`~fadcore.errors.VerificationError` naming the pass and printing the offending equation
with a few around it; with checks off (the default) :func:`checked` costs one dict lookup.
"""

from __future__ import annotations

import os

from .graph import Graph
from .verifier import verify


def checks_enabled() -> bool:
    """Whether ``FAD_CHECKS`` is set to something other than empty or ``0``."""
    return os.environ.get("FAD_CHECKS", "") not in ("", "0")


def checked(pass_name: str, g: Graph) -> Graph:
    """``g``, verified first when checks are on (a failure names ``pass_name``)."""
    if checks_enabled():
        verify(g, pass_name=pass_name)
    return g
