"""Backends execute graphs: ``reference`` (NumPy oracle), ``numba`` (default), ``dask``,
``flower``.

A backend's module is imported the first time it is used (``set_default_backend``, a run) and
only that one: ``set_default_backend("reference")`` imports neither numba nor dask.
"""

from __future__ import annotations

import logging
import warnings

from .. import pytree
from ..errors import FadError
from ..ir.primitives import Comm
from ..ir.resources import check_memory
from .inputs import prepare_inputs

__all__ = ["run", "run_flat", "BACKENDS", "default_backend", "set_default_backend"]

_default = ["numba"]
log = logging.getLogger("fadcore.backends")


def default_backend() -> str:
    return _default[0]


def set_default_backend(name: str) -> None:
    """Make ``name`` the backend of traced calls and ``fad.run``; imports that backend only."""
    if name not in _IMPORTS:
        raise FadError(f"unknown backend {name!r}; choose one of {sorted(_IMPORTS)}")
    if _load(name) is None:
        raise FadError(f"backend {name!r} is not available: {_MISSING[name]}")
    _default[0] = name


_TABLE: dict = {}                   # backend -> execute function, once imported
_MISSING: dict = {}                 # backend -> why it cannot be used, with what to install


def _import_numba():
    try:
        import scipy  # noqa: F401  (numba needs it for ``@`` / np.dot)
    except ImportError:
        raise ImportError("scipy is not installed, and numba needs it for matrix products "
                          "(pip install scipy)") from None
    from .numba import execute
    return execute


def _import_dask():
    from . import dask_backend
    return dask_backend.execute


def _import_flower():
    from . import flower
    return flower.execute


def _import_reference():
    from . import reference
    return reference.execute


_IMPORTS = {"reference": _import_reference, "numba": _import_numba, "dask": _import_dask,
            "flower": _import_flower}
_HINTS = {"numba": "pip install numba scipy", "dask": "pip install 'fadcore[dask]'",
          "flower": "pip install 'fadcore[flower]'"}


def _load(name: str):
    """The execute function of backend ``name``, or None; each backend is imported at most
    once per process (a failing optional import is not retried on every call)."""
    if name in _TABLE:
        return _TABLE[name]
    if name in _MISSING or name not in _IMPORTS:
        return None
    try:
        _TABLE[name] = _IMPORTS[name]()
        if name == "numba":
            log.info("numba backend loaded; its first run in a fresh environment compiles the "
                     "interpreter (tens of seconds, cached on disk afterwards)")
    except ImportError as err:
        hint = _HINTS.get(name, "")
        _MISSING[name] = f"{err}" + (f" ({hint})" if hint and hint not in str(err) else "")
        if name == "numba":
            warnings.warn(f"fadcore: the numba backend (the default) is unavailable: "
                          f"{_MISSING[name]}; the reference backend runs instead",
                          RuntimeWarning, stacklevel=3)
            if _default[0] == "numba":
                _default[0] = "reference"
        return None
    return _TABLE[name]


def available() -> dict:
    """Backend name -> execute function, for the backends that import."""
    for name in _IMPORTS:
        _load(name)
    return {name: _TABLE[name] for name in _IMPORTS if name in _TABLE}


def run_flat(graph, leaves, backend: str | None = None, num_clients: int | None = None,
             secure_aggregation=False, **kw):
    """Run ``graph`` on flat argument leaves; returns the flat outputs.

    ``secure_aggregation`` (see :func:`run`; False here: a traced function's call evaluates
    the whole cohort in this process, where there is no server to hide anything from)."""
    name = backend or default_backend()
    fn = _load(name)
    if fn is None and backend is None:      # the default just fell back (numba missing)
        name = default_backend()
        fn = _load(name)
    if fn is None:
        why = f": {_MISSING[name]}" if name in _MISSING else ""
        raise FadError(f"backend {name!r} is not available{why}; have {sorted(available())}")
    from .secagg import resolve
    secure = resolve(secure_aggregation, graph)
    inputs = prepare_inputs(graph, leaves, num_clients)
    check_memory(graph, inputs.rows, inputs.num_clients)      # before anything is allocated
    log.debug("running %s (%d equations) on the %s backend, %s clients", graph.name,
              len(graph.eqns), name, inputs.num_clients)
    if _loop_backend(graph, name) != name:
        if secure is not None:
            from ..errors import LoweringError
            raise LoweringError("secure aggregation of a graph with loops is not supported "
                                "yet (fad.fori_loop/fad.scan); run it with "
                                "secure_aggregation=False")
        from .reference import execute
        return execute(graph, inputs)        # backend options (dask's client=...) do not apply
    if secure is not None and any(e.prim.comm is Comm.SECURE_AGGREGATE for e in graph.eqns):
        if name in ("dask", "flower"):
            return fn(graph, inputs, secure=secure, **kw)
        from . import inprocess
        return inprocess.execute(graph, inputs, evaluator=name, secure=secure, **kw)
    return fn(graph, inputs, **kw)


_loop_note: list = []

#: primitives the numba backend hands (with the whole graph) to the reference evaluator
ON_REFERENCE = frozenset({"loop"})


def _loop_backend(graph, name: str) -> str:
    """Loops (fad.fori_loop/fad.scan) run on the reference evaluator for now, whatever the
    backend: the numba tape has no loop instructions and the round executor no looped rounds
    yet. Noted once per backend in the "fadcore" logger."""
    from ..loops import has_loops
    if name == "reference" or not has_loops(graph):
        return name
    if name not in _loop_note:
        _loop_note.append(name)
        import logging
        logging.getLogger("fadcore").warning(
            "fadcore: graphs with loops run on the reference evaluator (the %s backend has no "
            "loop support yet)", name)
    return "reference"


def run(graph, *args, backend: str | None = None, num_clients: int | None = None,
        secure_aggregation=None, **kw):
    """``fad.run(graph, *args)``: run a graph on arguments shaped like its traced function's.

    ``secure_aggregation``: every ``secure_sum`` becomes a masked aggregation
    (:mod:`fadcore.backends.secagg`): ``True`` (default parameters), a
    ``fad.SecureAggregation(...)``, ``False``, or None (the default: on when the graph was
    made under ``fad.Policy(aggregation="secure_sum")``). With ``backend="numba"`` or
    ``"reference"`` the clients are simulated in this process by the round executor's
    in-process runtime (keyword ``chunk_size=``), each masking its own contribution."""
    from ..errors import TracingError
    if graph.num_captured:
        raise TracingError("this graph closes over values of an enclosing trace; it cannot run alone")
    leaves, tree = pytree.flatten(tuple(args))
    if tree != graph.in_tree:
        raise FadError(
            f"fad.run: arguments have structure {pytree.tree_str(tree)} but the graph takes "
            f"{pytree.tree_str(graph.in_tree)}")
    outs = run_flat(graph, leaves, backend, num_clients, secure_aggregation, **kw)
    return pytree.unflatten(graph.out_tree, outs)
