"""What a graph is made of: the primitive registry, each primitive's typed metadata, the
federated primitives with their type rules, and every group of primitives derived from that
metadata.

A :class:`Primitive` is a named operation with a type (or shape) rule and a few typed facts:

- ``comm``, its :class:`Comm` kind: does it run where its operands live (``LOCAL``), move a
  value server -> clients (``BROADCAST``), clients -> server (``AGGREGATE``,
  ``SECURE_AGGREGATE``), only order the schedule (``SCHEDULE``: ``after``) or read the number
  of clients (``CARDINALITY``: ``num_clients``);
- ``alias``: at run time the result is its (first) operand's buffer, no work is done;
- ``cost``: its :class:`CostClass` for the FLOP count of :mod:`fadcore.ir.cost`;
- ``differentiable``: whether a tangent flows through it (a non-differentiable primitive's JVP
  is a symbolic zero).

Groups (the aggregations, the communication primitives, ...) are *derived* here from that
metadata, never listed by hand elsewhere: :data:`AGGREGATIONS`, :data:`COMMUNICATION`,
:func:`by_comm`, :func:`runtime_aliases`. The rules that make a primitive compute (reference
implementation, JVP, transpose) live above the IR, in :mod:`fadcore.ops`, because they call
``bind``.

This module imports nothing from fadcore outside ``fadcore/ir``, ``errors`` and ``pytree``.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import sys
from typing import Callable

import numpy as np

from ..errors import DTypeError, FadError, PlacementError, ShapeError
from .types import CLIENTS, SERVER, DType, FederatedType, TensorType, bool_, f64

__all__ = [
    "Comm", "CostClass", "Primitive", "primitives", "by_comm", "runtime_aliases",
    "infer_type", "check_placements", "need_float", "need_numeric",
    "AGGREGATE_KINDS", "COMMUNICATION_KINDS", "AGGREGATIONS", "PLAIN_AGGREGATIONS",
    "SECURE_AGGREGATIONS", "COMMUNICATION", "FEDERATED",
    "broadcast_p", "sum_p", "mean_p", "weighted_mean_p", "secure_sum_p", "num_clients_p",
    "after_p",
]


# --------------------------------------------------------------------------- metadata

class Comm(enum.Enum):
    """How a primitive relates to placements and communication."""

    LOCAL = "local"                        # runs where its operands live (per client at CLIENTS)
    BROADCAST = "broadcast"                # SERVER -> CLIENTS
    AGGREGATE = "aggregate"                # CLIENTS -> SERVER, plain
    SECURE_AGGREGATE = "secure_aggregate"  # CLIENTS -> SERVER, by secure aggregation
    SCHEDULE = "schedule"                  # orders the schedule only (after)
    CARDINALITY = "cardinality"            # reads the number of clients (num_clients)
    CONTROL = "control"                    # runs a body graph (loop): communicates as it does


AGGREGATE_KINDS = frozenset({Comm.AGGREGATE, Comm.SECURE_AGGREGATE})
COMMUNICATION_KINDS = AGGREGATE_KINDS | {Comm.BROADCAST}


class CostClass(enum.Enum):
    """How :mod:`fadcore.ir.cost` counts a primitive's FLOPs."""

    FREE = "free"                      # no arithmetic (views, schedule edges, metadata)
    ELEMENTWISE = "elementwise"        # one per result element
    TRANSCENDENTAL = "transcendental"  # four per result element
    REDUCTION = "reduction"            # one per operand element
    CONTRACTION = "contraction"        # 2 k per result element (k: the contracted length)
    COMMUNICATION = "communication"    # counted by the round decomposition, not as FLOPs


# --------------------------------------------------------------------------- the registry

primitives: dict[str, "Primitive"] = {}


class Primitive:
    """A named operation with its typed metadata (see the module docstring).

    Local primitives give a ``shape_rule(*tensor_types, **params) -> TensorType``; the others a
    ``type_rule(*federated_types, **params) -> FederatedType``. ``shape_params`` names params
    holding a shape (or one dimension) that may contain ``None``, resolved to the client's row
    count when run.
    """

    __slots__ = ("name", "comm", "shape_rule", "type_rule", "shape_params", "differentiable",
                 "alias", "cost", "module", "__weakref__")

    def __init__(self, name: str, comm: Comm = Comm.LOCAL, *, shape_rule=None, type_rule=None,
                 shape_params: tuple = (), differentiable: bool = True, alias: bool = False,
                 cost: CostClass | None = None):
        if name in primitives:
            raise ValueError(f"primitive {name!r} defined twice")
        if not isinstance(comm, Comm):
            raise TypeError(f"primitive {name!r}: comm must be a Comm, got {comm!r}")
        self.name = name
        self.comm = comm
        self.shape_rule = shape_rule
        self.type_rule = type_rule
        self.shape_params = shape_params
        self.differentiable = differentiable
        self.alias = alias
        if cost is None:
            cost = (CostClass.ELEMENTWISE if comm is Comm.LOCAL else
                    CostClass.COMMUNICATION if comm in COMMUNICATION_KINDS else CostClass.FREE)
        self.cost = cost
        # the module that defines (and registers the rules of) the primitive, for unpickling
        self.module = sys._getframe(1).f_globals.get("__name__", __name__)
        primitives[name] = self

    @property
    def kind(self) -> str:
        """``"local"`` or ``"federated"`` (placement-aware: everything not local)."""
        return "local" if self.comm is Comm.LOCAL else "federated"

    @property
    def is_aggregation(self) -> bool:
        return self.comm in AGGREGATE_KINDS

    @property
    def communicates(self) -> bool:
        return self.comm in COMMUNICATION_KINDS

    def __repr__(self) -> str:
        return self.name

    def bind(self, *args, **params):
        """Apply the primitive through the tracing layer's ``bind`` (see :func:`set_bind`)."""
        if _bind is None:
            raise FadError(f"{self.name}: no tracing layer is loaded (import fadcore)")
        return _bind(self, *args, **params)

    def __reduce__(self):
        # pickled by name: the rule tables are keyed by the registered object
        return (_primitive_named, (self.name, self.module))


_bind: Callable | None = None


def set_bind(fn: Callable) -> None:
    """Install the tracing layer's ``bind`` (the IR imports nothing above it)."""
    global _bind
    _bind = fn


def _primitive_named(name: str, module: str) -> Primitive:
    if name not in primitives:
        importlib.import_module(module)      # registers the primitive and its rules
    return primitives[name]


def by_comm(*kinds: Comm) -> tuple[Primitive, ...]:
    """The registered primitives of the given communication kinds, in registration order."""
    return tuple(p for p in primitives.values() if p.comm in kinds)


def runtime_aliases() -> frozenset[str]:
    """Names of the primitives whose result is their operand's buffer at run time."""
    return frozenset(p.name for p in primitives.values() if p.alias)


# --------------------------------------------------------------------------- typing

def need_float(name: str, *ts: TensorType) -> None:
    for t in ts:
        if not t.dtype.is_float:
            raise DTypeError(f"{name}: needs a floating-point operand, got {t}")


def need_numeric(name: str, *ts: TensorType) -> None:
    for t in ts:
        if t.dtype is bool_:
            raise DTypeError(f"{name}: needs a numeric operand, got {t}")


def _at(source: str | None) -> str:
    return f" at {source}" if source else ""


def check_placements(name: str, in_types: list, source: str | None = None) -> None:
    """Raise :class:`PlacementError` if the operands of local op ``name`` mix placements."""
    placed = [(i, t) for i, t in enumerate(in_types) if isinstance(t, FederatedType)]
    if len({t.placement for _, t in placed}) > 1:
        (i, a), (j, b) = next((p, q) for p in placed for q in placed
                              if p[1].placement is SERVER and q[1].placement is CLIENTS)
        raise PlacementError(
            f"{name}: operand {i + 1} is {a} but operand {j + 1} is {b}{_at(source)}. "
            "Local operations need all operands at one placement: move the server value to the "
            "clients with fad.broadcast(...), or aggregate the client value to the server with "
            "fad.sum/fad.mean/fad.weighted_mean/fad.secure_sum.")


# --------------------------------------------------------------------------- params and sizes
#
# Type rules check every param they read (fadcore.ir.local_primitives: ints are ints, axes in
# [0, ndim), tuples one entry per axis, sizes bounded); infer_type checks what is common to all:
# the param names a rule takes, and the size of every result. So a graph that verifies cannot
# make a kernel index outside its buffers, and no product of dimensions nears int64 overflow.

MAX_NDIM = 8                   # dimensions of one value (what every backend runs)
MAX_DIM = 2**31 - 1            # one dimension
MAX_ELEMENTS = 2**40           # static elements of one value
_param_names: dict = {}


def is_int(v) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_shape(name: str, shape, what: str = "result") -> None:
    """Refuse a shape with too many dimensions, a dimension out of [0, MAX_DIM] or more than
    MAX_ELEMENTS static elements (``?`` dimensions are the clients' row counts)."""
    if len(shape) > MAX_NDIM:
        raise ShapeError(f"{name}: the {what} would have {len(shape)} dimensions "
                         f"(at most {MAX_NDIM})")
    n = 1
    for d in shape:
        if d is None:
            continue
        if not is_int(d) or not 0 <= d <= MAX_DIM:
            raise ShapeError(f"{name}: the {what} would have dimension {d!r} (dimensions are "
                             f"ints between 0 and {MAX_DIM})")
        n *= int(d)
    if n > MAX_ELEMENTS:
        raise ShapeError(f"{name}: the {what} would hold {n} static elements "
                         f"(at most {MAX_ELEMENTS})")


def _check_param_names(prim: Primitive, params) -> None:
    names = _param_names.get(prim)
    if names is None:
        rule = prim.type_rule if prim.comm is not Comm.LOCAL else prim.shape_rule
        try:
            sig = inspect.signature(rule)
        except (TypeError, ValueError):
            names = _param_names[prim] = ()
        else:
            ps = sig.parameters.values()
            if any(p.kind is p.VAR_KEYWORD for p in ps):
                names = ()
            else:
                names = (frozenset(p.name for p in ps if p.kind is p.KEYWORD_ONLY),
                         frozenset(p.name for p in ps if p.kind is p.KEYWORD_ONLY
                                   and p.default is p.empty))
            _param_names[prim] = names
    if not names:
        return
    if not isinstance(params, dict):
        raise ShapeError(f"{prim.name}: params must be a dict, got {type(params).__name__}")
    allowed, required = names
    for k in params:
        if k not in allowed:
            raise ShapeError(f"{prim.name}: unexpected parameter {k!r}"
                             + (f" (it takes {', '.join(sorted(allowed))})" if allowed else
                                " (it takes none)"))
    for k in required:
        if k not in params:
            raise ShapeError(f"{prim.name}: missing parameter {k!r}")


def infer_type(prim: Primitive, in_types: list, params: dict, source: str | None = None):
    """Type of ``prim`` applied to atoms of ``in_types`` (FederatedType or TensorType)."""
    try:
        _check_param_names(prim, params)
    except FadError as e:
        if source:
            e.args = (f"{e.args[0]}{_at(source)}",) + e.args[1:]
        raise
    if prim.comm is not Comm.LOCAL:
        fed = [t if isinstance(t, FederatedType) else FederatedType(t, SERVER, True)
               for t in in_types]
        return prim.type_rule(*fed, **params)
    placed = [(i, t) for i, t in enumerate(in_types) if isinstance(t, FederatedType)]
    placements = {t.placement for _, t in placed}
    check_placements(prim.name, in_types, source)
    tensors = [t.tensor if isinstance(t, FederatedType) else t for t in in_types]
    try:
        check_params(prim.name, tensors, params)
        out = prim.shape_rule(*tensors, **params)
        check_shape(prim.name, out.shape)
    except FadError as e:
        if source and " at " not in str(e):
            e.args = (f"{e.args[0]}{_at(source)}",) + e.args[1:]
        raise
    placement = placements.pop() if placements else SERVER
    # members are equal only if the operands' are, and no client's row count (?) shapes them
    all_equal = all(t.all_equal for _, t in placed) and not out.ragged
    if not placed and out.ragged:
        # constants shaped by a client's row count (e.g. broadcast to [?,3]): one per client
        placement, all_equal = CLIENTS, False
    return FederatedType(out, placement, all_equal)


# --------------------------------------------------------------------------- federated primitives

def _placed(name, x: FederatedType, want) -> None:
    if x.placement is not want:
        hint = ("aggregate it first (fad.sum, fad.mean, ...)" if want is SERVER else
                "broadcast it first (fad.broadcast)")
        raise PlacementError(f"fad.{name}: expects a value at {want}, got {x}; {hint}")


def _not_ragged(name, x: FederatedType) -> None:
    if x.tensor.ragged:
        raise ShapeError(
            f"fad.{name}: cannot aggregate the ragged value {x} (clients hold different numbers "
            "of rows); reduce the rows first, e.g. fnp.mean(x, axis=0)")


def _broadcast_type(x: FederatedType) -> FederatedType:
    _placed("broadcast", x, SERVER)
    return FederatedType(x.tensor, CLIENTS, True)


def _aggregate_type(name, float_only=False) -> Callable:
    def rule(x: FederatedType) -> FederatedType:
        _placed(name, x, CLIENTS)
        _not_ragged(name, x)
        (need_float if float_only else need_numeric)(f"fad.{name}", x.tensor)
        return FederatedType(x.tensor, SERVER, True)
    return rule


def _weighted_mean_type(x: FederatedType, w: FederatedType) -> FederatedType:
    _placed("weighted_mean", x, CLIENTS)
    _placed("weighted_mean", w, CLIENTS)
    _not_ragged("weighted_mean", x)
    need_float("fad.weighted_mean", x.tensor, w.tensor)
    if w.shape != ():
        raise ShapeError(f"fad.weighted_mean: the weight must be one scalar per client, got {w}")
    if w.dtype is not x.dtype:
        raise DTypeError(f"fad.weighted_mean: value {x} and weight {w} have different dtypes")
    return FederatedType(x.tensor, SERVER, True)


def _num_clients_type() -> FederatedType:
    return FederatedType(TensorType(f64, ()), SERVER, True)


def _after_type(x: FederatedType, token: FederatedType) -> FederatedType:
    return x


# a broadcast is an alias at run time: clients read the server's buffer
broadcast_p = Primitive("broadcast", Comm.BROADCAST, type_rule=_broadcast_type, alias=True)
sum_p = Primitive("sum", Comm.AGGREGATE, type_rule=_aggregate_type("sum"))
mean_p = Primitive("mean", Comm.AGGREGATE, type_rule=_aggregate_type("mean", float_only=True))
weighted_mean_p = Primitive("weighted_mean", Comm.AGGREGATE, type_rule=_weighted_mean_type)
secure_sum_p = Primitive("secure_sum", Comm.SECURE_AGGREGATE,
                         type_rule=_aggregate_type("secure_sum"))
num_clients_p = Primitive("num_clients", Comm.CARDINALITY, type_rule=_num_clients_type,
                          differentiable=False)
after_p = Primitive("after", Comm.SCHEDULE, type_rule=_after_type, alias=True)


# --------------------------------------------------------------------------- derived groups

#: clients -> server flows, in registration order (sum, mean, weighted_mean, secure_sum)
AGGREGATIONS = by_comm(*AGGREGATE_KINDS)
PLAIN_AGGREGATIONS = by_comm(Comm.AGGREGATE)
SECURE_AGGREGATIONS = by_comm(Comm.SECURE_AGGREGATE)
#: every primitive that moves a value between placements
COMMUNICATION = by_comm(*COMMUNICATION_KINDS)
#: every primitive that is not local
FEDERATED = tuple(p for p in primitives.values() if p.comm is not Comm.LOCAL)


from .params import check_params  # noqa: E402  (it uses the helpers above)
