"""Federated primitives (declared, with their type rules and communication kinds, in
:mod:`fadcore.ir.primitives`): their op functions, JVP and transpose rules. Their reference
implementations need the number of clients and live in :mod:`fadcore.backends.reference`.

The JVP of a broadcast is a broadcast, of an aggregation the same aggregation. Transposes move
cotangents the other way: sumᵀ = secure_sumᵀ = broadcast, meanᵀ = broadcast then ÷ count,
broadcastᵀ = the aggregation the reverse pass chose (closure rule).
"""

from __future__ import annotations

from ..core import bind, transpose_rules
from ..ir.primitives import (after_p, broadcast_p, mean_p, num_clients_p, secure_sum_p, sum_p,
                             weighted_mean_p)
from .elementwise import convert, div, mul, sub
from .rules import defjvp, deflinear, dtype, is_undefined, nonlinear, uses_context


def broadcast(x): return bind(broadcast_p, x)
def fsum(x): return bind(sum_p, x)
def fmean(x): return bind(mean_p, x)
def secure_sum(x): return bind(secure_sum_p, x)
def weighted_mean(x, w): return bind(weighted_mean_p, x, w)
def num_clients(): return bind(num_clients_p)


def after(x, token):
    """``x``, available only once ``token`` is: a scheduling edge that fixes rounds."""
    return bind(after_p, x, token)


# a transposed broadcast aggregates with what the reverse pass chose (closure rule)
deflinear(broadcast_p, uses_context(lambda ct, x, *, ctx: [bind(ctx.aggregation, ct)]))
deflinear(sum_p, lambda ct, x: [broadcast(ct)])
deflinear(secure_sum_p, lambda ct, x: [broadcast(ct)])
deflinear(mean_p, lambda ct, x: [broadcast(div(ct, convert(num_clients(), dtype(ct))))])


def _weighted_mean_transpose(ct, x, w):
    if is_undefined(w):
        raise nonlinear("weighted_mean (in its weights)")
    return [mul(broadcast(div(ct, fsum(w))), w), None]


# d s = (sum(dw x) - s sum(dw)) / sum(w): same round, aggregations only
defjvp(weighted_mean_p, lambda tx, out, x, w: weighted_mean(tx, w),
       lambda tw, out, x, w: div(sub(fsum(mul(x, tw)), mul(out, fsum(tw))), fsum(w)))
transpose_rules[weighted_mean_p] = _weighted_mean_transpose

deflinear(after_p, lambda ct, x, token: [ct, None])        # the tangent waits for the same token
