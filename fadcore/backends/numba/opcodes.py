"""The opcode table: one row per primitive, everything the numba backend knows about it.

A row (:class:`Op`) carries the opcode the interpreter dispatches on, the kernel that runs it,
the encoder of its integer parameters (the ``ip`` words the interpreter reads) and its flags.
Every other table of the backend is *derived* from :data:`OPS` below (:data:`OPCODES`,
:data:`AGG_MODE`, :data:`ELEMENTWISE`, :data:`EXACT`, the kernel of every opcode), and
:func:`check_table` verifies at import that the rows agree with the jitted module's integer
constants (opcode ranges the interpreter dispatches on, opcode names, kernel indices).

Adding an elementwise primitive: one ``OP_*`` constant and a line in ``_uop``/``_bop`` of
:mod:`.kernels`, then one row here (``unary("name")``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...ir.primitives import AGGREGATIONS, runtime_aliases
from ...ir.types import bool_
from . import kernels as K

__all__ = ["Op", "OPS", "OPCODES", "ALIASES", "AGG_MODE", "ELEMENTWISE", "EXACT", "op_of",
           "static_size", "check_table"]


# --------------------------------------------------------------------------- shape helpers

def static_size(shape) -> tuple[int, int]:
    """(static size, number of ragged dims): the size for a client with r rows is s * r**k."""
    s, k = 1, 0
    for d in shape:
        if d is None:
            k += 1
        else:
            s *= d
    return s, k


def _dims(shape) -> list[int]:
    return [-1 if d is None else int(d) for d in shape]


def _group(shape) -> list[int]:
    return list(static_size(shape))


def _collapse(shape, axis) -> list[int]:
    """[outer, D, inner] around ``axis``, each as (static, ragged count): 6 ints."""
    return [*_group(shape[:axis]), *_group(shape[axis:axis + 1]), *_group(shape[axis + 1:])]


# --------------------------------------------------------------------------- encoders
# An encoder gets the equation (``e.params``), its operands' shapes, the result's shape and
# the operands' buffer ids; it returns the instruction's integer parameters.

def _no_params(e, shp, out, bufs):
    return []


def _convert(e, shp, out, bufs):
    return [convert_mode(e.inputs[0].type.dtype, e.params["dtype"])]


def _reduce(e, shp, out, bufs):
    xs = shp[0]
    return [len(xs), *_dims(xs), *[1 if i in e.params["axes"] else 0 for i in range(len(xs))]]


def _argmax(e, shp, out, bufs):
    return _collapse(shp[0], e.params["axis"])


def _broadcast_in_dim(e, shp, out, bufs):
    xs = shp[0]
    return [len(out), *_dims(out), len(xs), *_dims(xs), *e.params["dims"]]


def _transpose(e, shp, out, bufs):
    return [len(shp[0]), *_dims(shp[0]), *e.params["perm"]]


def _slice_params(big, p) -> list[int]:
    """starts, limits (-1: a whole ragged dimension), strides of a slice or pad. An axis with
    at most one element taken gets stride 1 (any stride means the same there), so every
    number fits the kernels' int64 arithmetic."""
    limits, strides = [], []
    for s0, lim, k in zip(p["starts"], p["limits"], p["strides"]):
        if lim is None:
            limits.append(-1)
            strides.append(k)
            continue
        n = len(range(s0, lim, k))
        limits.append(s0 + n if n <= 1 else lim)
        strides.append(1 if n <= 1 else k)
    return [*p["starts"], *limits, *strides]


def _slice(e, shp, out, bufs):
    return [len(shp[0]), *_dims(shp[0]), *_slice_params(shp[0], e.params)]


def _pad(e, shp, out, bufs):
    return [len(out), *_dims(out), *_slice_params(out, e.params)]


def _concatenate(e, shp, out, bufs):
    ip = [len(out), e.params["axis"], *_dims(out), len(bufs)]
    for b, s in zip(bufs, shp):
        ip += [b, *_dims(s)]
    return ip


def _matmul(e, shp, out, bufs):
    return _dims((shp[0][0], shp[0][1], shp[1][1]))


def _first_dims(e, shp, out, bufs):       # matvec [m,k]@[k], vdot [k].[k]
    return _dims(shp[0])


def _second_dims(e, shp, out, bufs):      # vecmat [k]@[k,n]
    return _dims(shp[1])


def _outer(e, shp, out, bufs):
    return _dims((shp[0][0], shp[1][0]))


def _take(e, shp, out, bufs):
    xs, ids = shp
    return [*_collapse(xs, e.params["axis"]), *_group(ids)]


def _untake(e, shp, out, bufs):
    cs, ids = shp
    ax, k = e.params["axis"], len(ids)
    return [*_group(cs[:ax]), *_group((e.params["dim"],)), *_group(cs[ax + k:]), *_group(ids)]


def _take_along_axis(e, shp, out, bufs):
    xs, ids = shp
    ax = e.params["axis"]
    return [*_collapse(xs, ax), *_group(ids[ax:ax + 1])]


def _untake_along_axis(e, shp, out, bufs):
    cs, ids = shp
    ax = e.params["axis"]
    return [*_group(cs[:ax]), *_group((e.params["dim"],)), *_group(cs[ax + 1:]),
            *_group(cs[ax:ax + 1])]


def _one_hot(e, shp, out, bufs):
    return [e.params["depth"]]


def convert_mode(src, dst) -> int:
    if dst is bool_:
        return K.CV_COPY if src is bool_ else K.CV_NONZERO
    if dst.is_int and src.is_float:
        return K.CV_TRUNC
    return K.CV_COPY


# --------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Op:
    """Everything the numba backend knows about one primitive.

    ``kernel``: the KI_* index of the kernel that runs it (None: done inline by the
    interpreter); ``encode``: its integer parameters; ``elementwise``: the result may be
    written over an operand the instruction is the last reader of; ``exact``: the result is
    exact in float32 (no rounding pass) and cannot leave the integers' exact range when its
    operands are in it (no overflow check); ``agg_mode``: AG_* for an aggregation (lowered to
    an OP_AGGREGATE row on the clients and an OP_FINISH row on the server); ``family``:
    which opcode range the interpreter expects it in (checked by :func:`check_table`).
    """

    name: str
    opcode: int
    kernel: int | None = None
    encode: Callable = _no_params
    elementwise: bool = False
    exact: bool = False
    agg_mode: int | None = None
    family: str = "other"


def unary(name, exact=False):
    return Op(name, getattr(K, "OP_" + name.upper()), K.KI_UNARY, elementwise=True,
              exact=exact, family="unary")


def binary(name, exact=False):
    return Op(name, getattr(K, "OP_" + name.upper()), K.KI_BINARY, elementwise=True,
              exact=exact, family="binary")


def _rows(*ops):
    return {op.name: op for op in ops}


OPS: dict[str, Op] = _rows(
    # elementwise, one opcode range each (the interpreter dispatches on the ranges)
    unary("neg", exact=True), unary("exp"), unary("log"), unary("log1p"), unary("expm1"),
    unary("sqrt"), unary("tanh"), unary("logistic"), unary("sin"), unary("cos"),
    unary("sign", exact=True), unary("abs", exact=True),
    binary("add"), binary("sub"), binary("mul"), binary("div"), binary("pow"),
    binary("max", exact=True), binary("min", exact=True), binary("logaddexp"),
    *(binary(c, exact=True) for c in ("lt", "le", "gt", "ge", "eq", "ne")),
    Op("select", K.OP_SELECT, K.KI_SELECT, elementwise=True, exact=True),
    Op("convert", K.OP_CONVERT, K.KI_CONVERT, _convert, elementwise=True),
    Op("zeros_like", K.OP_ZEROS, None, elementwise=True, exact=True),
    # reductions
    Op("reduce_sum", K.OP_REDUCE_SUM, K.KI_REDUCE, _reduce),
    Op("reduce_max", K.OP_REDUCE_MAX, K.KI_REDUCE, _reduce, exact=True),
    Op("argmax", K.OP_ARGMAX, K.KI_ARGMAX, _argmax, exact=True),
    # data movement
    Op("broadcast_in_dim", K.OP_BROADCAST_IN_DIM, K.KI_MOVE, _broadcast_in_dim, exact=True),
    Op("transpose", K.OP_TRANSPOSE, K.KI_MOVE, _transpose, exact=True),
    Op("slice", K.OP_SLICE, K.KI_MOVE, _slice, exact=True),
    Op("pad", K.OP_PAD, K.KI_MOVE, _pad, exact=True),
    Op("concatenate", K.OP_CONCATENATE, K.KI_MOVE, _concatenate, exact=True),
    # products
    Op("matmul", K.OP_MATMUL, K.KI_DOT, _matmul, family="dot"),
    Op("matvec", K.OP_MATVEC, K.KI_DOT, _first_dims, family="dot"),
    Op("vecmat", K.OP_VECMAT, K.KI_DOT, _second_dims, family="dot"),
    Op("vdot", K.OP_VDOT, K.KI_DOT, _first_dims, family="dot"),
    Op("outer", K.OP_OUTER, K.KI_DOT, _outer, family="dot"),
    # gathers and their transposes
    Op("take", K.OP_TAKE, K.KI_TAKE, _take, exact=True),
    Op("untake", K.OP_UNTAKE, K.KI_TAKE, _untake),
    Op("take_along_axis", K.OP_TAKE_ALONG_AXIS, K.KI_TAKE, _take_along_axis, exact=True),
    Op("untake_along_axis", K.OP_UNTAKE_ALONG_AXIS, K.KI_TAKE, _untake_along_axis),
    Op("one_hot", K.OP_ONE_HOT, K.KI_ONE_HOT, _one_hot, exact=True),
    # federated facts and aggregations
    Op("rows", K.OP_ROWS, exact=True),
    Op("num_clients", K.OP_NUM_CLIENTS),
    Op("sum", K.OP_AGGREGATE, agg_mode=K.AG_SUM),
    Op("secure_sum", K.OP_AGGREGATE, agg_mode=K.AG_SUM),
    Op("mean", K.OP_AGGREGATE, agg_mode=K.AG_MEAN),
    Op("weighted_mean", K.OP_AGGREGATE, agg_mode=K.AG_WMEAN),
)

# --------------------------------------------------------------------------- derived tables

#: primitive name -> opcode. With ALIASES, covers every primitive (tests enumerate both).
OPCODES: dict[str, int] = {name: op.opcode for name, op in OPS.items()}
#: primitives that never become an instruction: the result shares its operand's buffer
ALIASES = runtime_aliases()
#: aggregation primitive -> AG_* mode
AGG_MODE: dict[str, int] = {n: op.agg_mode for n, op in OPS.items() if op.agg_mode is not None}
#: opcodes whose result may overwrite an operand they are the last reader of
ELEMENTWISE = frozenset({op.opcode for op in OPS.values() if op.elementwise} | {K.OP_COPY})
#: primitives whose result needs no float32 rounding nor integer range check
EXACT = frozenset(n for n, op in OPS.items() if op.exact)


def op_of(name: str) -> Op | None:
    return OPS.get(name)


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise RuntimeError(f"numba backend: the opcode table disagrees with the kernels: {msg}")


def check_table() -> None:
    """The table agrees with the jitted module: fail at import, not with a wrong result."""
    codes = [op.opcode for op in OPS.values() if op.agg_mode is None]
    _need(len(set(codes)) == len(codes), "two primitives share an opcode")
    ranges = {"unary": (K.OP_NEG, K.OP_ABS), "binary": (K.OP_ADD, K.OP_NE),
              "dot": (K.OP_MATMUL, K.OP_OUTER)}
    kernel_names = {getattr(K, n): "k_" + n[3:].lower() for n in dir(K) if n.startswith("KI_")}
    for op in OPS.values():
        name = K.OPCODE_NAMES[op.opcode]
        want = "aggregate" if op.agg_mode is not None else op.name
        _need(name == want, f"opcode {op.opcode}: table says {op.name}, kernels say {name}")
        lo, hi = ranges.get(op.family, (None, None))
        if lo is not None:
            _need(lo <= op.opcode <= hi, f"{op.name}: opcode outside the {op.family} range")
        else:
            _need(not any(a <= op.opcode <= b for a, b in ranges.values()),
                  f"{op.name}: opcode inside a range the interpreter dispatches as a family")
        if op.kernel is not None:
            _need(getattr(K, kernel_names.get(op.kernel, ""), None) is K.KERNELS[op.kernel],
                  f"{op.name}: kernel index {op.kernel} is not {kernel_names.get(op.kernel)}")
    for family, (lo, hi) in ranges.items():
        covered = {op.opcode for op in OPS.values() if op.family == family}
        _need(covered == set(range(lo, hi + 1)), f"the {family} range has unlisted opcodes")
    _need(set(AGG_MODE) == {p.name for p in AGGREGATIONS}, "aggregations out of sync")
    listed = {op.opcode for op in OPS.values()} | {K.OP_AGGREGATE, K.OP_FINISH, K.OP_COPY}
    _need(listed == set(range(len(K.OPCODE_NAMES))), "kernels define opcodes the table lacks")
    _need(not (set(OPS) & ALIASES), "a primitive is both an alias and an instruction")


check_table()
