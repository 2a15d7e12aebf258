"""The reference evaluator: plain NumPy, one equation at a time, one client at a time.

It is the oracle every other backend is tested against, so it is written for clarity, not
speed. Client values are Python lists of per-client arrays.

Two rules it shares with the numba backend, so that results never depend on the backend:

* **float32** values are computed in float64 and each primitive's result is rounded to
  float32 (NumPy would accumulate a float32 sum in float32: ``[1e8, 1, -1e8, 1]`` sums to
  1.0 there, 2.0 here, the exact value);
* **integers** are exact up to 2**53 in magnitude; a result beyond that (an overflow, a huge
  float converted to an integer) is a :class:`DTypeError` instead of a wrapped-around value.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .. import ops
from ..core import impl_rules
from ..errors import DTypeError, LoweringError, ShapeError, VerificationError
from ..ir.graph import Graph, Literal
from ..ir.types import CLIENTS
from ..values import ClientValues
from .inputs import Inputs

fed_impls = {}


def _broadcast(n, rows, x):
    return [x] * n


def _sum(n, rows, x):
    return np.sum(np.stack(x), axis=0)


#: the aggregations: float32 operands are summed in float64, like local ops
_AGGREGATIONS = (ops.sum_p, ops.secure_sum_p, ops.mean_p, ops.weighted_mean_p)
MAX_EXACT_INT = 2 ** 53
#: integer arithmetic runs in float64 too, so that an overflow shows instead of wrapping
_INT_ARITH = frozenset({"add", "sub", "mul", "neg", "reduce_sum", "matmul", "matvec", "vecmat",
                        "vdot", "outer", "sum", "secure_sum"})


def _widen(x, ints=False):
    """float32 data (and integers, with ``ints``) as float64; ``_cast`` rounds back."""
    if isinstance(x, list):
        return [_widen(m, ints) for m in x]
    dt = getattr(x, "dtype", None)
    if dt == np.float32 or (ints and dt is not None and dt.kind in "iu"):
        return np.asarray(x, dtype=np.float64)
    return x


def _mean(n, rows, x):
    return np.mean(np.stack(x), axis=0)


def _weighted_mean(n, rows, x, w):
    w = np.asarray(w, dtype=np.result_type(x[0]))
    return np.tensordot(w, np.stack(x), axes=1) / np.sum(w)


fed_impls[ops.broadcast_p] = _broadcast
fed_impls[ops.sum_p] = _sum
fed_impls[ops.secure_sum_p] = _sum
fed_impls[ops.mean_p] = _mean
fed_impls[ops.weighted_mean_p] = _weighted_mean
fed_impls[ops.num_clients_p] = lambda n, rows: np.asarray(float(n))
fed_impls[ops.after_p] = lambda n, rows, x, token: x


def _resolve(prim, params, rows_i):
    if not prim.shape_params:
        return params
    out = dict(params)
    for k in prim.shape_params:
        out[k] = ops._resolve(out[k], None if rows_i is None else int(rows_i))
    return out


#: primitives evaluated with their equation (loops, which run a body graph):
#: ``rule(eqn, args, n, rows, memo) -> value``; ``memo`` lives for one evaluation.
eqn_impls = {}


def execute(graph: Graph, inputs: Inputs) -> list:
    n, rows = inputs.num_clients, inputs.rows
    values = evaluate(graph, inputs.values, n, rows)
    outs = []
    for v, t in zip(values, graph.out_types):
        if t.placement is CLIENTS:
            outs.append(ClientValues([np.asarray(m) for m in v], all_equal=t.all_equal))
        else:
            outs.append(np.asarray(v, dtype=t.dtype.np))
    return outs


def evaluate(graph: Graph, values: list, n, rows) -> list:
    """The graph's outputs (server arrays, lists of per-client arrays) from its inputs'."""
    env = dict(zip(graph.inputs, values, strict=True))
    memo: dict = {}

    def read(a):
        return a.value if isinstance(a, Literal) else env[a]

    # values are dropped after their last use, so memory follows the live set
    # (fadcore.ir.resources.peak_bytes is what this evaluator holds at its fullest)
    last = {a: k for k, e in enumerate(graph.eqns) for a in e.inputs
            if not isinstance(a, Literal)}
    for a in graph.outputs:
        last.pop(a, None)
    needed = _needed(graph)
    for k, e in enumerate(graph.eqns):
        if e.out not in needed:
            continue
        args = [read(a) if j == 0 or e.prim.name != "after" else None
                for j, a in enumerate(e.inputs)]
        if e.prim in eqn_impls:
            env[e.out] = eqn_impls[e.prim](e, args, n, rows, memo)
        elif e.prim.kind == "federated":
            if e.prim in _AGGREGATIONS:
                ints = e.prim.name in _INT_ARITH
                env[e.out] = _cast(fed_impls[e.prim](n, rows, *[_widen(a, ints) for a in args]),
                                   e.out.type, None, e)
            else:
                env[e.out] = fed_impls[e.prim](n, rows, *args)
        elif (impl := impl_rules.get(e.prim)) is None:
            raise LoweringError(f"reference backend: no implementation of {e.prim.name}")
        elif e.out.type.placement is CLIENTS:
            args = [_widen(a, e.prim.name in _INT_ARITH and e.out.type.dtype.is_int)
                    for a in args]
            client = [not isinstance(a, Literal) and a.type.placement is CLIENTS
                      for a in e.inputs]
            outs = []
            for i in range(n):
                r = None if rows is None else int(rows[i])
                with _data_errors(e, i):
                    outs.append(_cast(impl(*[v[i] if c else v for v, c in zip(args, client)],
                                           **_resolve(e.prim, e.params, r)), e.out.type, r, e))
            env[e.out] = outs
        else:
            args = [_widen(a, e.prim.name in _INT_ARITH and e.out.type.dtype.is_int)
                    for a in args]
            with _data_errors(e, None):
                env[e.out] = _cast(impl(*args, **e.params), e.out.type, None, e)
        del args
        for a in e.inputs:
            if last.get(a) == k:
                env.pop(a, None)
    return [read(a) for a in graph.outputs]


def _needed(graph: Graph) -> set:
    """The variables the outputs' values depend on. Work that only feeds the token of an
    ``after`` (a scheduling edge) is not run, as on the numba backend: its errors (an index out
    of range) would otherwise be raised here and not there."""
    need = {a for a in graph.outputs if not isinstance(a, Literal)}
    for e in reversed(graph.eqns):
        if e.out in need:
            ins = e.inputs[:1] if e.prim.name == "after" else e.inputs
            need.update(a for a in ins if not isinstance(a, Literal))
    return need


@contextlib.contextmanager
def _data_errors(e, client):
    """Errors the data causes (an index out of range, a reduction over a client with no rows)
    become a ShapeError naming the equation, its source line and the client."""
    try:
        yield
    except (IndexError, ValueError) as err:
        where = f" at client {client}" if client is not None else " at the server"
        src = f" (from {e.source})" if e.source else ""
        raise ShapeError(f"{e.prim.name}{src}{where}: {err}") from None


def _cast(x, t, rows=None, eqn=None):
    """The value as the dtype of its type; its shape must be the type's (a check of the rules)."""
    x = np.asarray(x)
    want = t.tensor.concrete_shape(rows) if rows is not None else t.shape
    name = eqn.prim.name if eqn else "?"
    if x.shape != tuple(want) and None not in want:
        raise VerificationError(
            f"reference: {name} produced shape {x.shape}, its type says {t} (a shape rule and "
            "its implementation disagree)")
    if t.dtype.is_int and x.size and not np.all((x > -MAX_EXACT_INT) & (x < MAX_EXACT_INT)):
        src = f" (from {eqn.source})" if eqn is not None and eqn.source else ""
        raise DTypeError(f"{name}{src}: integer result beyond +-2**53 (an overflow?); integers "
                         "are exact only up to 2**53 in magnitude")
    return x if x.dtype == t.dtype.np else x.astype(t.dtype.np)
