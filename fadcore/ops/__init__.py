"""The primitives' rules, by family, and the op functions that bind them.

Every primitive is declared once, with its metadata and type (or shape) rule, in
:mod:`fadcore.ir` (:mod:`~fadcore.ir.local_primitives`, :mod:`~fadcore.ir.primitives`). Its
rules live in the family module here, one record per rule table, right below its op function:
the NumPy reference implementation (``impl_rules``), the JVP rule (``jvp_rules``) and, for
linear primitives, the transpose rule (``transpose_rules``). Rules are written with the op
functions and the helpers of :mod:`.rules` (``defjvp``, ``deflinear``, ``deflinear2``), so a
rule applied to traced values records equations: that is how the derivative passes rewrite
graphs into graphs of the same primitives.

Families: :mod:`.elementwise`, :mod:`.shapes`, :mod:`.reductions`, :mod:`.products`,
:mod:`.gathers`, :mod:`.federated`. Everything is re-exported here (``fadcore.ops.mul``,
``fadcore.ops.mul_p``, ...).
"""

from __future__ import annotations

from ..core import bind, impl_rules, jvp_rules, transpose_rules  # noqa: F401
from ..ir.local_primitives import *  # noqa: F401,F403
from ..ir.local_primitives import norm_axes as _norm_axes  # noqa: F401
from ..ir.primitives import (AGGREGATIONS, Comm, CostClass, Primitive, after_p,  # noqa: F401
                             broadcast_p, mean_p, num_clients_p, secure_sum_p, sum_p,
                             weighted_mean_p)
from .elementwise import (_weak, abs, add, convert, cos, div, eq, exp, expm1, ge,  # noqa: F401
                          gt, le, log, log1p, logaddexp, logistic, lt, maximum, minimum, mul,
                          ne, neg, pow, select, sign, sin, sqrt, stop_gradient, sub, tanh)
from .federated import (after, broadcast, fmean, fsum, num_clients, secure_sum,  # noqa: F401
                        weighted_mean)
from .gathers import take, take_along_axis, untake, untake_along_axis  # noqa: F401
from .products import defbilinear, matmul, matvec, outer, vdot, vecmat  # noqa: F401
from .reductions import argmax, reduce_max, reduce_sum  # noqa: F401
from .rules import (TransposeContext, UndefinedPrimal, Zero, add_tangents,  # noqa: F401
                    atom_type, call_transpose, defjvp, deflinear, deflinear2, dtype, fit,
                    instantiate, is_undefined, is_zero, linear_jvp, nonlinear, shape_of,
                    tensor_type, unfit, uses_context, zeros_like)
from .shapes import (_resolve, broadcast_in_dim, concatenate, pad, reshape, rows,  # noqa: F401
                     slice_, transpose)
