"""What derivative rules are written with.

Conventions: a JVP rule is ``jvp(primals, tangents, **params) -> (out, tangent_out)`` with
:class:`Zero` for symbolic zero tangents; a transpose rule is
``transpose(ct, *args, **params) -> [ct_arg or None]``, where linear arguments arrive as
:class:`UndefinedPrimal` and known ones as values. A non-differentiable primitive
(``Primitive(..., differentiable=False)``) needs no JVP rule: the forward pass gives it a zero
tangent.

Most rules are one line of math, declared with a helper that does the rest once (JAX
``ad.defjvp`` / ``deflinear2``, autograd ``defvjp``):

- :func:`defjvp`: one function per operand giving that operand's contribution
  ``fn(t, out, *primals, **params)``; zero tangents are skipped, contributions added, and the
  sum broadcast up to the result shape (an operand may be a scalar beside a full operand).
- :func:`deflinear`: linear in its first operand (the others are indices or static): the
  tangent goes through the same primitive; optionally its transpose.
- :func:`deflinear2`: linear in both operands jointly (``add``, ``sub``): the primitive applied
  to both tangents, or a unary linear map of the only nonzero one; the transpose applies those
  maps to the cotangent summed down to each operand's shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..core import bind, jvp_rules, transpose_rules
from ..errors import DifferentiationError
from ..ir.graph import Literal, atom_type  # noqa: F401  (re-exported)
from ..ir.local_primitives import add_p, broadcast_in_dim_p, reduce_sum_p, zeros_like_p
from ..ir.primitives import Primitive, sum_p
from ..ir.types import FederatedType, TensorType, dtype_of

# --------------------------------------------------------------------------- zeros and types


class _Typed:
    __slots__ = ("type",)

    def __init__(self, type):
        self.type = type

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.type})"


class Zero(_Typed):
    """A symbolic zero tangent or cotangent of the given type."""

    __slots__ = ()


class UndefinedPrimal(_Typed):
    """Marks a linear argument of an equation being transposed."""

    __slots__ = ()


def is_zero(x) -> bool:
    return isinstance(x, Zero)


def is_undefined(x) -> bool:
    return isinstance(x, UndefinedPrimal)


def tensor_type(x) -> TensorType:
    """Tensor type of a tracer, Zero, UndefinedPrimal, literal or array."""
    t = getattr(x, "type", None)
    if isinstance(t, FederatedType):
        return t.tensor
    if isinstance(t, TensorType):
        return t
    if isinstance(x, Literal):
        return x.type
    arr = np.asarray(x)
    return TensorType(dtype_of(arr.dtype), tuple(arr.shape))


def shape_of(x) -> tuple:
    return tensor_type(x).shape


def dtype(x):
    return tensor_type(x).dtype


def zeros_like(x):
    return bind(zeros_like_p, x)


def instantiate(t, primal):
    """A tangent as a value: symbolic zeros become zeros shaped like ``primal``."""
    return zeros_like(primal) if is_zero(t) else t


# --------------------------------------------------------------------------- fitting

def fit(t, out_tensor: TensorType):
    """Broadcast a scalar tangent/cotangent up to the result shape of an elementwise op."""
    if shape_of(t) == out_tensor.shape:
        return t
    return bind(broadcast_in_dim_p, t, shape=tuple(out_tensor.shape), dims=())


def unfit(ct, t: TensorType):
    """Transpose of :func:`fit`: sum a cotangent down to a scalar operand's shape."""
    if shape_of(ct) == t.shape:
        return ct
    return bind(reduce_sum_p, ct, axes=tuple(range(len(shape_of(ct)))))


def add_tangents(a, b):
    """``a + b`` where either may be a symbolic zero."""
    if is_zero(a):
        return b
    if is_zero(b):
        return a
    return bind(add_p, a, b)


def nonlinear(what) -> DifferentiationError:
    return DifferentiationError(
        f"transpose of {what}: the equation is not linear in its tangent operands (a JVP rule "
        "produced a non-linear tangent computation; this is a bug in that rule)")


# --------------------------------------------------------------------------- rule helpers

def defjvp(prim: Primitive, *fns: Callable | None) -> None:
    """Register ``prim``'s JVP from one contribution per operand.

    ``fns[i](t_i, out, *primals, **params)`` is operand i's contribution to the output
    tangent (None: the operand carries no tangent, e.g. indices)."""
    def jvp(primals, tangents, **params):
        out = bind(prim, *primals, **params)
        t = Zero(tensor_type(out))
        for fn, ti in zip(fns, tangents, strict=True):
            if fn is not None and not is_zero(ti):
                t = add_tangents(t, fn(ti, out, *primals, **params))
        return out, t if is_zero(t) else fit(t, tensor_type(out))
    jvp_rules[prim] = jvp


def deflinear(prim: Primitive, transpose: Callable | None = None) -> None:
    """``prim`` is linear in its first operand (the others are indices or static): its JVP is
    the same primitive applied to the tangent. ``transpose(ct, *args, **params)`` is its
    transpose rule, if given."""
    def jvp(primals, tangents, **params):
        out = bind(prim, *primals, **params)
        if is_zero(tangents[0]):
            return out, Zero(tensor_type(out))
        return out, bind(prim, tangents[0], *primals[1:], **params)
    jvp_rules[prim] = jvp
    if transpose is not None:
        transpose_rules[prim] = transpose


def deflinear2(prim: Primitive, fx: Callable, fy: Callable) -> None:
    """``prim(x, y)`` is linear in both operands, equal to ``fx(x) + fy(y)`` for linear,
    self-adjoint, shape-preserving maps ``fx`` and ``fy`` (identity or negation), up to
    broadcasting a scalar operand."""
    def jvp(primals, tangents):
        tx, ty = tangents
        out = bind(prim, *primals)
        ot = tensor_type(out)
        if is_zero(tx) and is_zero(ty):
            return out, Zero(ot)
        if is_zero(ty):
            return out, fit(fx(tx), ot)
        if is_zero(tx):
            return out, fit(fy(ty), ot)
        return out, bind(prim, tx, ty)

    def transpose(ct, x, y):
        return [fx(unfit(ct, tensor_type(x))) if is_undefined(x) else None,
                fy(unfit(ct, tensor_type(y))) if is_undefined(y) else None]

    jvp_rules[prim] = jvp
    transpose_rules[prim] = transpose


def identity(x):
    return x


# --------------------------------------------------------------------------- transpose context

@dataclass(frozen=True)
class TransposeContext:
    """What a transpose rule may need to know about the pass transposing it. A rule that
    needs it is marked with :func:`uses_context` and receives it as the keyword ``ctx``."""

    #: what a transposed broadcast becomes: sum, or secure_sum when the primal aggregates only
    #: with secure_sum or under a secure policy (the closure rule)
    aggregation: Primitive = sum_p


def uses_context(rule: Callable) -> Callable:
    """Mark a transpose rule as taking the :class:`TransposeContext` (keyword ``ctx``)."""
    rule.uses_context = True
    return rule


def call_transpose(rule: Callable, ctx: TransposeContext, ct, args, params: dict):
    """Apply a transpose rule, passing ``ctx`` to the rules that take it."""
    if getattr(rule, "uses_context", False):
        return rule(ct, *args, ctx=ctx, **params)
    return rule(ct, *args, **params)


#: the old name of :func:`deflinear` without a transpose
linear_jvp = deflinear
