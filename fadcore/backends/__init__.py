"""Backends execute graphs: ``reference`` (NumPy oracle), ``numba`` (default), ``dask``."""

from __future__ import annotations

from .. import pytree
from ..errors import FadError
from ..ir.resources import check_memory
from .inputs import prepare_inputs

__all__ = ["run", "run_flat", "BACKENDS", "default_backend", "set_default_backend"]

_default = ["numba"]


def default_backend() -> str:
    return _default[0]


def set_default_backend(name: str) -> None:
    if name not in available():
        raise FadError(f"unknown backend {name!r}; choose one of {sorted(available())}")
    _default[0] = name


def available() -> dict:
    from . import reference
    table = {"reference": reference.execute}
    try:
        from . import numba_backend
        table["numba"] = numba_backend.execute
    except ImportError:
        pass
    try:
        from . import dask_backend
        table["dask"] = dask_backend.execute
    except ImportError:
        pass
    return table


def run_flat(graph, leaves, backend: str | None = None, num_clients: int | None = None, **kw):
    """Run ``graph`` on flat argument leaves; returns the flat outputs."""
    name = backend or default_backend()
    table = available()
    if name not in table:
        hint = " (pip install 'fadcore[dask]')" if name == "dask" else ""
        raise FadError(f"backend {name!r} is not available{hint}; have {sorted(table)}")
    inputs = prepare_inputs(graph, leaves, num_clients)
    check_memory(graph, inputs.rows, inputs.num_clients)      # before anything is allocated
    return table[name](graph, inputs, **kw)


def run(graph, *args, backend: str | None = None, num_clients: int | None = None, **kw):
    """``fad.run(graph, *args)``: run a graph on arguments shaped like its traced function's."""
    from ..errors import TracingError
    if graph.meta.get("num_captured"):
        raise TracingError("this graph closes over values of an enclosing trace; it cannot run alone")
    leaves, tree = pytree.flatten(tuple(args))
    if tree != graph.in_tree:
        raise FadError(
            f"fad.run: arguments have structure {pytree.tree_str(tree)} but the graph takes "
            f"{pytree.tree_str(graph.in_tree)}")
    outs = run_flat(graph, leaves, backend, num_clients, **kw)
    return pytree.unflatten(graph.out_tree, outs)
