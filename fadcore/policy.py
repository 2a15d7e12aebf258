"""Aggregation policies and the closure audit."""

from __future__ import annotations

from dataclasses import dataclass

from .ir.graph import Graph
from .ir.primitives import AGGREGATIONS, SECURE_AGGREGATIONS

__all__ = ["Policy", "audit"]

_AGG = frozenset(p.name for p in AGGREGATIONS)
_SECURE = frozenset(p.name for p in SECURE_AGGREGATIONS)


@dataclass(frozen=True)
class Policy:
    """Which clients->server flows a computation and its derivatives may use.

    ``Policy(aggregation="secure_sum")``: every clients->server flow must be a ``secure_sum``
    (secure aggregation). ``Policy()`` allows every aggregation."""

    aggregation: str = "any"

    def __post_init__(self):
        if self.aggregation not in ("any", "secure_sum"):
            import os
            import sys
            from .errors import OptionError
            caller = sys._getframe(2)      # past the dataclass's generated __init__
            raise OptionError("Policy(aggregation=...) is 'any' or 'secure_sum', got "
                              f"{self.aggregation!r} at {os.path.basename(caller.f_code.co_filename)}"
                              f":{caller.f_lineno} ({caller.f_code.co_name})")

    @property
    def secure(self) -> bool:
        return self.aggregation == "secure_sum"

    def allows(self, prim_name: str) -> bool:
        return not self.secure or prim_name not in _AGG or prim_name in _SECURE

    def __str__(self) -> str:
        return f"Policy(aggregation={self.aggregation!r})"


def audit(graph: Graph, policy: Policy) -> list[str]:
    """Every equation of ``graph`` the policy forbids, as readable lines (empty: compliant)."""
    from .ir.printer import Namer
    name = Namer()
    for v in graph.inputs:
        name(v)
    out = []
    for k, e in enumerate(graph.eqns):
        name(e.out)
        if not policy.allows(e.prim.name):
            src = f" (from {e.source})" if e.source else ""
            out.append(f"equation {k}: {name(e.out)} = {e.prim.name} ... is a clients->server "
                       f"flow that {policy} forbids{src}")
    for e, where in graph.walk():        # inside loop bodies
        if where and not policy.allows(e.prim.name):
            src = f" (from {e.source})" if e.source else ""
            out.append(f"{where}: {e.prim.name} ... is a clients->server flow that {policy} "
                       f"forbids{src}")
    return out
