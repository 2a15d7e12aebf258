"""``@fad.trace``: Python functions to federated graphs, cached per abstract signature."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import types as pytypes
import warnings
from typing import Callable

import numpy as np

from . import pytree
from .core import Tracer, current_builder, inline, trace_to_graph, user_source
from .errors import DTypeError, FadError, TracingError
from .ir.graph import Graph
from .ir.types import CLIENTS, SERVER, FederatedType, TensorType, dtype_of
from .values import ClientValues

__all__ = ["trace", "TracedFunction", "abstractify", "signature", "RetraceWarning",
           "cached_transform"]

#: a traced function warns (once) when it has been traced for more signatures than this
RETRACE_WARN_AFTER = 5


class RetraceWarning(UserWarning):
    """A traced function keeps being re-traced for new abstract signatures."""

log = logging.getLogger("fadcore.tracing")


def abstractify(x) -> FederatedType:
    """The federated type of an argument: a value, a Tracer, or a type."""
    if isinstance(x, Tracer):
        return x.type
    if isinstance(x, FederatedType):
        return x
    if isinstance(x, TensorType):
        return FederatedType(x, SERVER, True)
    if isinstance(x, ClientValues):
        return x.type
    if isinstance(x, (bool, int, float, np.ndarray, np.generic)):
        arr = np.asarray(x)
        return FederatedType(TensorType(dtype_of(arr.dtype), tuple(arr.shape)), SERVER, True)
    if isinstance(x, (list, tuple)):
        raise TracingError("internal: pytree node reached abstractify")
    raise DTypeError(
        f"cannot pass a {type(x).__name__} to a traced function: use NumPy arrays (server "
        "values), fad.clients(...) (client values), or fad types such as fad.f64[3] @ fad.SERVER")


def signature(args: tuple) -> tuple[tuple, tuple[FederatedType, ...], list]:
    leaves, tree = pytree.flatten(tuple(args))
    return tree, tuple(abstractify(x) for x in leaves), leaves


class TracedFunction:
    """A function traced to a graph once per abstract signature.

    Call it on values to run it (numba backend by default), on traced values inside another
    trace to inline it, or ask ``.graph(*values_or_types)`` for its IR.
    """

    def __init__(self, make_graph: Callable, name: str, doc: str | None = None,
                 fun: Callable | None = None):
        self._make_graph = make_graph         # (in_tree, in_types) -> (Graph, captured)
        self.__name__ = name
        self.__doc__ = doc
        self.fun = fun
        self._cache: dict = {}
        self._signatures: list = []        # every signature traced (for the retrace warning)
        self._warned = False
        #: ``(factory, args, kwargs)`` that makes this function again: how it pickles
        self.recipe: tuple | None = None

    def _graph_for(self, tree, types) -> tuple[Graph, list]:
        types = tuple(types)
        key = (tree, types)
        hit = self._cache.get(key)
        if hit is not None:
            return hit, []
        try:
            graph, captured = self._make_graph(tree, list(types))
        except FadError as e:
            add_user_line(e)
            raise
        log.debug("traced %s at (%s): %d equations", self.__name__,
                  ", ".join(map(str, types)), len(graph.eqns))
        if not captured:
            self._cache[key] = graph
            if self.fun is not None:
                self._note_retrace(key)
        return graph, captured

    def _note_retrace(self, key) -> None:
        sigs = self._signatures
        sigs.append(key)
        if self._warned or len(sigs) <= RETRACE_WARN_AFTER:
            return
        self._warned = True
        warnings.warn(RetraceWarning(
            f"{self.__name__} has been traced for {len(sigs)} different argument signatures "
            f"(each trace re-derives and re-compiles); "
            f"{_signature_change(_closest(sigs[:-1], key), key)}"),
            stacklevel=_user_stacklevel())

    def graph(self, *args) -> Graph:
        """The graph of this function at the given values or types."""
        tree, types, _ = signature(args)
        graph, captured = self._graph_for(tree, types)
        if captured:
            raise TracingError(
                f"{self.__name__} closes over traced values of an enclosing trace; its graph "
                "exists only inside that trace")
        return graph

    def __call__(self, *args, num_clients: int | None = None):
        """Run on values (``num_clients=`` for a function with no client-placed argument), or
        inline into the enclosing trace when called on traced values."""
        tree, types, leaves = signature(args)
        graph, captured = self._graph_for(tree, types)
        if current_builder() is not None or any(isinstance(x, Tracer) for x in leaves):
            outs = inline(graph, list(leaves) + list(captured))
            return pytree.unflatten(graph.out_tree, outs)
        from .backends import run_flat
        try:
            outs = run_flat(graph, leaves, num_clients=num_clients)
        except FadError as e:          # arguments that do not fit: name the caller's line
            add_user_line(e)
            raise
        return pytree.unflatten(graph.out_tree, outs)

    def run(self, *args, backend: str | None = None, **kw):
        """Run with an explicit backend (``"numba"``, ``"reference"``, ``"dask"``)."""
        from .backends import run
        return run(self.graph(*args), *args, backend=backend, **kw)

    def __repr__(self) -> str:
        return f"<fad traced function {self.__name__}>"

    def __reduce__(self):
        """Pickled as what made it, never as graphs: a module-level ``@fad.trace`` function by
        reference; ``fad.trace(f)``, ``fad.grad(f, ...)``, ``fad.jvp(f)``... as that call on
        ``f`` (which must pickle itself: a module-level function or a bound method). The
        unpickled function traces again on first use."""
        mod = sys.modules.get(self.__dict__.get("__module__") or "")
        qualname = self.__dict__.get("__qualname__")
        if mod is not None and qualname and "<locals>" not in qualname:
            obj = mod
            for part in qualname.split("."):
                obj = getattr(obj, part, None)
            if obj is self:
                return qualname
        if self.recipe is None:
            import pickle
            raise pickle.PicklingError(f"{self!r} was not made by fad.trace/grad/jvp/vjp and "
                                       "cannot be pickled")
        factory, args, kw = self.recipe
        return (_remake, (factory, args, kw))


def _remake(factory, args, kw):
    return factory(*args, **kw)


_PKG_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_STDLIB_DIR = os.path.dirname(os.path.abspath(os.__file__)) + os.sep   # contextlib, functools...
_HAS_LINE = re.compile(r" at \S+:\d+ \(")


def _user_frame(tb) -> str | None:
    """``file:line (function)`` of the innermost traceback frame outside fadcore and NumPy."""
    found = None
    while tb is not None:
        code = tb.tb_frame.f_code
        fn = code.co_filename
        stdlib = fn.startswith(_STDLIB_DIR) and "-packages" + os.sep not in fn
        if not (stdlib or fn.startswith((_PKG_DIR, "<frozen")) or "numpy" + os.sep in fn):
            found = f"{os.path.basename(fn)}:{tb.tb_lineno} ({code.co_name})"
        tb = tb.tb_next
    return found


def add_user_line(e: FadError) -> None:
    """Append the user's source line to a FadError raised while tracing or transforming, if it
    has none: the innermost frame of the user's own code in the traceback, whatever raised it,
    else (an error of a derivative pass) the user's frame that called fadcore."""
    if not e.args or not isinstance(e.args[0], str) or _HAS_LINE.search(e.args[0]):
        return
    src = _user_frame(e.__traceback__) or user_source()
    if src:
        e.args = (f"{e.args[0]} at {src}",) + e.args[1:]


def trace(fun: Callable | None = None, *, name: str | None = None):
    """Decorator: trace ``fun`` into a placement-typed federated graph."""
    if fun is None:
        return functools.partial(trace, name=name)
    if isinstance(fun, TracedFunction):
        return fun
    fname = name or getattr(fun, "__name__", "f")

    def make_graph(tree, types):
        return trace_to_graph(fun, types, tree, fname)

    tf = TracedFunction(make_graph, fname, getattr(fun, "__doc__", None), fun)
    tf.recipe = (trace, (fun,), {"name": name})
    functools.update_wrapper(tf, fun, updated=())
    return tf


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the innermost caller outside fadcore."""
    import os
    import sys
    pkg = os.path.dirname(os.path.abspath(__file__))
    f, level = sys._getframe(1), 1
    while f is not None and f.f_code.co_filename.startswith(pkg):
        f, level = f.f_back, level + 1
    return level


def _closest(sigs: list, new):
    """The earlier signature most like ``new`` (a dtype change counts less than a shape's)."""
    def distance(old):
        if old[0] != new[0]:
            return 10 ** 9
        return sum(0 if a == b else 1 if a.shape == b.shape else 2 if a.dtype == b.dtype else 3
                   for a, b in zip(old[1], new[1]))
    return min(sigs, key=distance)


def _signature_change(old, new) -> str:
    """Why two signatures differ, with the usual cause and its fix."""
    (t0, ty0), (t1, ty1) = old, new
    if t0 != t1:
        return (f"the argument structure changed from {pytree.tree_str(t0)} to "
                f"{pytree.tree_str(t1)}")
    for k, (a, b) in enumerate(zip(ty0, ty1)):
        if a == b:
            continue
        hint = ""
        if a.dtype != b.dtype and a.dtype.is_float != b.dtype.is_float:
            hint = (" (a Python int then a float? pass floats, or np.float64 values, "
                    "consistently)")
        elif a.dtype != b.dtype:
            hint = " (a new dtype: convert the arguments to one dtype before the call)"
        elif a.placement is b.placement is CLIENTS and a.shape != b.shape:
            hint = (" (stacked client data of a new row count: build the values with "
                    "fad.clients(..., ragged=True) to trace once for every row count)")
        elif a.shape != b.shape:
            hint = " (a new array shape)"
        return f"argument leaf {k} changed from {a} to {b}{hint}"
    return "the signatures differ"


def _cache_of(f) -> dict | None:
    """A per-function dict for memoized transforms, stored on the function itself (so it dies
    with the function); None for callables that cannot hold attributes."""
    if isinstance(f, pytypes.MethodType):
        return None             # a bound method shares its function's __dict__ across objects
    holder = getattr(f, "__dict__", None)
    if not isinstance(holder, dict):
        return None
    return holder.setdefault("__fad_transforms__", {})


def cached_transform(f, key, build: Callable):
    """``build()``, memoized per function identity and ``key`` (hashable options): making
    ``fad.grad(f)`` again returns the same traced function and its per-signature graphs."""
    cache = _cache_of(f)
    try:
        hash(key)
    except TypeError:
        cache = None
    if cache is None:
        return build()
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = build()
    return hit


def as_traced(f) -> TracedFunction:
    """``f`` itself if it is traced, else its (memoized) ``fad.trace(f)``."""
    if isinstance(f, TracedFunction):
        return f
    return cached_transform(f, ("trace",), lambda: trace(f))
