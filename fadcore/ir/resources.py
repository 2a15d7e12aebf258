"""How much memory running a graph allocates, known before anything is allocated.

A graph's types fix the size of every value up to the clients' row counts: a value of type
``{f64[?,3]}@CLIENTS`` takes ``8 * 3 * rows_i`` bytes at client ``i``. :func:`footprint`
walks the equations once and records, at every step, the bytes of the values still alive
(a value lives from its equation to its last use; outputs to the end), as a polynomial in
the row count per client plus a constant at the server. :func:`peak_bytes` evaluates it
for given row counts: it is what the reference evaluator holds at its fullest, and a lower
bound for any backend. Arguments are not counted: the caller already holds them.

It is used twice: :func:`fadcore.ir.serialize.from_json` refuses a graph whose peak for a
declared client size is over its limit (a 400-byte JSON file cannot ask for 16 GiB), and
every run checks the peak for the actual row counts against :func:`memory_budget` before a
backend starts (:class:`fadcore.ResourceError`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import ResourceError
from .graph import Graph, Var
from .types import CLIENTS

__all__ = ["Footprint", "footprint", "peak_bytes", "memory_budget", "check_memory",
           "value_bytes", "largest_live", "describe"]


def value_bytes(tensor, rows: int) -> int:
    """Bytes of one value (one client's member) with every ``?`` dimension ``rows`` long."""
    n = tensor.dtype.itemsize
    for d in tensor.shape:
        n *= rows if d is None else d
    return n


@dataclass
class Footprint:
    """Live bytes after each equation: ``server[t] + sum_k client[t, k] * sum_i rows_i**k``.

    A broadcast value counts once (every client shares the server's array); any other client
    value once per client, all-equal or not (each client computes its own copy)."""

    server: np.ndarray          # [steps]
    client: np.ndarray          # [steps, max ragged rank + 1]

    def live(self, rows_powers: np.ndarray) -> np.ndarray:
        return self.server + self.client @ rows_powers


#: primitives whose client result is the very same array at every client
_SHARED = ("broadcast", "after")


def footprint(graph: Graph) -> Footprint:
    """The live bytes of ``graph`` at each equation (cached per graph object)."""
    hit = graph._lowered.get("footprint")     # the graph's per-object cache
    key = (id(graph.eqns), len(graph.eqns), id(graph.outputs))
    if hit is not None and hit[0] == key:
        return hit[1]
    eqns = graph.eqns
    steps = max(len(eqns), 1)
    last: dict[Var, int] = {}
    for k, e in enumerate(eqns):
        for a in e.inputs:
            if isinstance(a, Var):
                last[a] = k
    for a in graph.outputs:
        if isinstance(a, Var):
            last[a] = steps - 1
    kmax = max((e.out.type.shape.count(None) for e in eqns), default=0)
    # difference arrays: +bytes at the defining step, -bytes after the last use
    server = np.zeros(steps + 1)
    client = np.zeros((steps + 1, kmax + 1))
    for k, e in enumerate(eqns):
        t = e.out.type
        end = last.get(e.out, k) + 1          # an unused value dies after its own step
        static = float(value_bytes(t.tensor, 1))
        extra = _nested_peak(e)
        if extra:                              # a loop body's own peak, during its step
            server[k] += extra
            server[k + 1] -= extra
        if t.placement is CLIENTS and e.prim.name not in _SHARED:
            r = t.shape.count(None)
            client[k, r] += static
            client[end, r] -= static
        else:
            server[k] += static
            server[end] -= static
    fp = Footprint(np.cumsum(server)[:steps], np.cumsum(client, axis=0)[:steps])
    graph._lowered["footprint"] = (key, fp)
    return fp


def _nested_peak(e) -> float:
    """Peak bytes of graphs held in an equation's params (loop bodies), at one 1-row client."""
    out = 0.0
    for v in e.params.values():
        if isinstance(v, Graph):
            fp = footprint(v)
            out += float(fp.live(np.ones(fp.client.shape[1])).max())
    return out


def peak_bytes(graph: Graph, rows, clients: int | None = None) -> tuple[float, int]:
    """``(peak live bytes, index of the equation where it is reached)``.

    ``rows`` is one row count per client (an array), or one count for ``clients`` clients
    alike (a declared client size)."""
    fp = footprint(graph)
    kmax = fp.client.shape[1]
    if np.ndim(rows) == 0:
        n = 1 if clients is None else clients
        powers = np.array([n * float(rows) ** k for k in range(kmax)])
    else:
        r = np.asarray(rows, dtype=np.float64)
        powers = np.array([np.sum(r ** k) for k in range(kmax)])
    live = fp.live(powers)
    if live.size == 0 or not graph.eqns:
        return 0.0, -1
    k = int(np.argmax(live))
    return float(live[k]), k


def largest_live(graph: Graph, step: int, rows, clients: int | None = None) -> int:
    """Index of the equation defining the biggest value alive at ``step`` (for messages)."""
    last: dict[Var, int] = {}
    for k, e in enumerate(graph.eqns):
        for a in e.inputs:
            if isinstance(a, Var):
                last[a] = k
    for a in graph.outputs:
        if isinstance(a, Var):
            last[a] = len(graph.eqns)
    r = np.asarray(rows if np.ndim(rows) else [rows] * (clients or 1), dtype=np.float64)
    best, at = -1.0, step
    for k, e in enumerate(graph.eqns[:step + 1]):
        if last.get(e.out, k) < step:
            continue
        t = e.out.type
        b = float(value_bytes(t.tensor, 1))
        if t.placement is CLIENTS and e.prim.name not in _SHARED:
            b *= float(np.sum(r ** t.shape.count(None)))
        if b > best:
            best, at = b, k
    return at


def describe(graph: Graph, step: int, rows, clients: int | None = None) -> str:
    """``equation k (prim -> type from source)`` of the biggest value alive at ``step``."""
    k = largest_live(graph, step, rows, clients)
    e = graph.eqns[k]
    src = f" from {e.source}" if e.source else ""
    return f"equation {k} ({e.prim.name} -> {e.out.type}{src})"


def memory_budget() -> int:
    """Bytes a run may allocate: ``$FADCORE_MEMORY_LIMIT`` if set, else the machine's RAM."""
    env = os.environ.get("FADCORE_MEMORY_LIMIT")
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise ResourceError(f"FADCORE_MEMORY_LIMIT={env!r} is not a number of bytes") \
                from None
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 2**63 - 1


def check_memory(graph: Graph, rows, clients: int | None) -> None:
    """Raise :class:`ResourceError` if running ``graph`` would hold more than the budget."""
    if not graph.eqns:
        return
    r = rows if rows is not None else 0
    peak, k = peak_bytes(graph, r, clients or 0)
    budget = memory_budget()
    if peak > budget:
        raise ResourceError(
            f"{graph.name}: running it would hold {_human(peak)} at once (the biggest value: "
            f"{describe(graph, k, r, clients or 0)}), over the memory budget of "
            f"{_human(budget)} (set FADCORE_MEMORY_LIMIT to change it); nothing was allocated")


def _human(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({int(n)} bytes)"
    return f"{int(n)} bytes"
