"""Products: matmul, matvec, vecmat, vdot, outer. Each is bilinear: its JVP is the sum of the
product with each operand's tangent, its transpose in one operand another product."""

from __future__ import annotations

import numpy as np

from ..core import bind, impl_rules, transpose_rules
from ..ir.local_primitives import matmul_p, matvec_p, outer_p, vdot_p, vecmat_p
from .elementwise import mul
from .rules import defjvp, is_undefined, nonlinear
from .shapes import transpose

for _p in (matmul_p, matvec_p, vecmat_p, vdot_p):
    impl_rules[_p] = lambda a, b: np.asarray(np.dot(a, b))
impl_rules[outer_p] = np.outer


def matmul(a, b): return bind(matmul_p, a, b)
def matvec(a, x): return bind(matvec_p, a, x)
def vecmat(x, a): return bind(vecmat_p, x, a)
def vdot(a, b): return bind(vdot_p, a, b)
def outer(a, b): return bind(outer_p, a, b)


def defbilinear(p, transpose_a, transpose_b) -> None:
    """Register a bilinear product: ``transpose_a(ct, b)`` is the cotangent of ``a`` (with
    ``b`` known), ``transpose_b(ct, a)`` that of ``b``."""
    defjvp(p, lambda ta, out, a, b: bind(p, ta, b), lambda tb, out, a, b: bind(p, a, tb))

    def transpose_rule(ct, a, b):
        if is_undefined(a) and is_undefined(b):
            raise nonlinear(p.name)
        if is_undefined(a):
            return [transpose_a(ct, b), None]
        return [None, transpose_b(ct, a)]

    transpose_rules[p] = transpose_rule


defbilinear(matmul_p, lambda ct, b: matmul(ct, transpose(b, (1, 0))),
            lambda ct, a: matmul(transpose(a, (1, 0)), ct))
defbilinear(matvec_p, lambda ct, x: outer(ct, x), lambda ct, a: vecmat(ct, a))
defbilinear(vecmat_p, lambda ct, a: matvec(a, ct), lambda ct, x: outer(x, ct))
defbilinear(vdot_p, lambda ct, b: mul(b, ct), lambda ct, a: mul(a, ct))
defbilinear(outer_p, lambda ct, b: matvec(ct, b), lambda ct, a: vecmat(a, ct))
