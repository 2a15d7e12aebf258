"""Checking and normalising run-time arguments, shared by every backend.

Bad input is reported here, before any backend runs: wrong dtypes or shapes, client values
where server values belong (and vice versa), clients that disagree on their number or on their
row count. NaN and inf are not errors: they propagate as in IEEE arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CardinalityError, DTypeError, PlacementError, ShapeError
from ..ir.graph import Graph, Literal
from ..ir.primitives import Comm
from ..ir.types import CLIENTS, SERVER
from ..values import ClientValues


@dataclass
class Inputs:
    values: list            # per graph input: ndarray (SERVER) or list of ndarrays (CLIENTS)
    num_clients: int | None
    rows: np.ndarray | None  # per-client row count where the graph has ragged values


def _uses_clients(graph: Graph) -> bool:
    """Whether running the graph needs the number of clients (num_clients counts them too)."""
    return any(v.type.placement is CLIENTS for v in graph.inputs) or any(
        e.out.type.placement is CLIENTS or (
            _uses_clients(e.params["body"]) if e.prim.name == "loop"
            else e.prim.comm is not Comm.LOCAL and e.prim.comm is not Comm.SCHEDULE)
        for e in graph.eqns)


def prepare_inputs(graph: Graph, leaves, num_clients: int | None = None) -> Inputs:
    n_user = graph.num_user_inputs
    if len(leaves) != n_user:
        raise ShapeError(f"{graph.name}: expected {n_user} arguments, got {len(leaves)}")
    if num_clients is not None and (isinstance(num_clients, bool) or not isinstance(
            num_clients, (int, np.integer)) or num_clients < 1):
        from ..core import at_source, user_source
        raise CardinalityError(f"num_clients must be a positive int, got {num_clients!r}"
                               f"{at_source(user_source())}")
    values: list = []
    n = None if num_clients is None else int(num_clients)
    n_from = "num_clients=" if n is not None else None
    rows = None
    rows_from = None
    for k, (v, x) in enumerate(zip(graph.inputs, leaves)):
        t = v.type
        what = f"argument {k} of {graph.name} ({t})"
        if t.placement is SERVER:
            if isinstance(x, ClientValues):
                raise PlacementError(f"{what}: got client values; a server value is a NumPy array")
            arr = np.asarray(x)
            if arr.dtype != t.dtype.np:
                if isinstance(x, (bool, np.bool_)) or arr.dtype.kind == "b":
                    raise DTypeError(f"{what}: got the bool {x!r}; pass a number (a bool is "
                                     "not silently made 0 or 1)")
                if isinstance(x, (int, float)) or (arr.dtype.kind in "iu" and t.dtype.is_float
                                                   and arr.ndim == 0):
                    arr = arr.astype(t.dtype.np)
                else:
                    raise DTypeError(f"{what}: got dtype {arr.dtype}")
            if arr.shape != t.shape:
                raise ShapeError(f"{what}: got shape {arr.shape}")
            values.append(arr if arr.flags.c_contiguous else arr.copy())
            continue
        if not isinstance(x, ClientValues):
            raise PlacementError(f"{what}: expects client values; wrap per-client arrays with "
                                 "fad.clients([...])")
        if n is None:
            n, n_from = len(x), f"argument {k}"
        elif len(x) != n:
            raise CardinalityError(f"{what}: has {len(x)} clients but {n_from} has {n}")
        if x.dtype != t.dtype.np:
            raise DTypeError(f"{what}: got client values of dtype {x.dtype}")
        shapes = x.shapes                      # [clients, ndim], checked without a Python loop
        if shapes.shape[1] != len(t.shape):
            raise ShapeError(f"{what}: client 0 has shape {tuple(x.members[0].shape)}")
        ragged_axes = [d for d, want in enumerate(t.shape) if want is None]
        for d, want in enumerate(t.shape):
            if want is not None and (shapes[:, d] != want).any():
                i = int(np.argmax(shapes[:, d] != want))
                raise ShapeError(f"{what}: client {i} has shape {tuple(x.members[i].shape)}")
        if ragged_axes:
            got = shapes[:, ragged_axes[0]]
            for d in ragged_axes[1:]:
                if (shapes[:, d] != got).any():
                    i = int(np.argmax(shapes[:, d] != got))
                    raise ShapeError(
                        f"{what}: client {i} has shape {tuple(x.members[i].shape)}; a client's "
                        "ragged dimensions (?) are all its row count")
            if rows is None:
                rows, rows_from = got.copy(), f"argument {k}"
            elif (rows != got).any():
                i = int(np.argmax(rows != got))
                raise ShapeError(
                    f"{what}: client {i} has {int(got[i])} rows but {rows_from} gives it "
                    f"{int(rows[i])}; a client's ragged dimensions (?) are all its row count")
        members = x.members
        values.append(members)
    if n is None and _uses_clients(graph):
        raise CardinalityError(
            f"{graph.name} runs at CLIENTS but no argument is client-placed: pass num_clients= "
            "(to fad.run, or to the traced function's call)")
    if n is not None and n < 1:
        raise CardinalityError("a federated computation needs at least one client")
    _check_index_arguments(graph, values)
    return Inputs(values, n, rows)


# --------------------------------------------------------------------------- index arguments

#: primitive -> position of its index operand
_INDEX_OPERAND = {"take": 1, "take_along_axis": 1, "untake": 1, "untake_along_axis": 1,
                  "one_hot": 0}
#: primitives that pass integer values through unchanged (a label reshaped is still a label)
_PASS_THROUGH = {"reshape", "transpose", "slice", "broadcast_in_dim", "stop_gradient",
                 "broadcast", "after", "convert", "concatenate"}


def index_arguments(graph: Graph) -> dict[int, tuple[str, str | None]]:
    """Integer arguments used as indices (labels): argument position -> (the primitive that
    indexes with it, its source line). Cached on the graph."""
    hit = graph._lowered.get("index_arguments")
    if hit is not None:
        return hit
    origin: dict = {}                     # var -> argument position it carries unchanged
    for k, v in enumerate(graph.inputs):
        if v.type.dtype.is_int:
            origin[v] = k
    found: dict[int, tuple[str, str | None]] = {}
    for e in graph.eqns:
        name = e.prim.name
        pos = _INDEX_OPERAND.get(name)
        if pos is not None and pos < len(e.inputs) and e.inputs[pos] in origin:
            found.setdefault(origin[e.inputs[pos]], (name, e.source))
        if name in _PASS_THROUGH and e.out.type.dtype.is_int:
            srcs = {origin.get(a) for a in e.inputs if not isinstance(a, Literal)}
            if len(srcs) == 1 and None not in srcs:
                origin[e.out] = srcs.pop()
    graph._lowered["index_arguments"] = found
    return found


def _check_index_arguments(graph: Graph, values: list) -> None:
    """Labels and other index arguments must be >= 0: NumPy would read ``-1`` as the last
    class and train it silently. Checked before any backend runs, so all of them agree."""
    for k, (prim, source) in index_arguments(graph).items():
        v = values[k]
        members = v if isinstance(v, list) else [v]
        for i, m in enumerate(members):
            if m.size and m.min() < 0:
                row = np.unravel_index(int(np.argmin(m)), m.shape)
                who = f"client {i}" if isinstance(v, list) else "the server"
                src = f" at {source}" if source else ""
                raise ShapeError(
                    f"argument {k} of {graph.name} ({graph.inputs[k].type}) indexes {prim}"
                    f"{src}: {who} holds {int(m[row])} at {tuple(int(r) for r in row)}; "
                    "indices and labels must be >= 0 (a negative label is not the last class)")
