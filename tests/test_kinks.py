"""Derivative rules at exact zeros and kinks: no silent NaN, up to third order.

The pow JVP used to re-emit ``y * x ** (y - 1)``, so the third derivative of ``x ** 2`` at 0 was
``0 * 0 ** -1 = nan`` (and every HVP through a FedProx round written with ``** 2``). Oracles:
closed forms and central differences (``fad.check_grads``).
"""

from __future__ import annotations

import numpy as np
import pytest

import fadcore as fad
from fadcore import numpy as fnp

ZEROS = np.array([0.0, 0.0, 0.7, -0.4])        # exact zeros beside ordinary points

# Functions three times differentiable at 0, built on the rules with a kink or a pole there.
AT_ZERO = {
    "pow2": lambda x: fnp.sum(x ** 2),
    "pow3": lambda x: fnp.sum(x ** 3),
    "pow2_of_pow2": lambda x: fnp.sum((x ** 2) ** 2),
    "abs": lambda x: fnp.sum(fnp.abs(x) * x * x * x),        # |x| x^3: C3 at 0
    "relu": lambda x: fnp.sum(fnp.relu(x) * x * x * x),      # x^4 on one side: C3
    "maximum": lambda x: fnp.sum(fnp.maximum(x, -x) * x ** 3),
    "maximum_tie": lambda x: fnp.sum(fnp.maximum(x, 0.0) ** 4),
}


@pytest.mark.parametrize("name", sorted(AT_ZERO))
def test_check_grads_order_3_at_exact_zeros(name):
    fad.check_grads(AT_ZERO[name], (ZEROS,), order=3, modes=("forward", "reverse"))


@pytest.mark.parametrize("name", sorted(AT_ZERO))
def test_derivatives_at_zero_are_finite_in_every_mode(name):
    f = AT_ZERO[name]
    for mode in ("forward", "reverse", "mixed", "auto"):
        g = fad.grad(f, mode=mode)
        h = fad.jacfwd(fad.grad(f, mode=mode))(ZEROS)
        assert np.all(np.isfinite(g(ZEROS))) and np.all(np.isfinite(h)), mode
        (t,) = fad.jvp(lambda x: fad.jacfwd(g)(x), (ZEROS,), (np.ones(4),))[1:]
        assert np.all(np.isfinite(t)), mode


def test_third_derivatives_of_powers_at_zero_are_the_closed_forms():
    x0 = np.array(0.0)

    def d(f, k):
        for _ in range(k):
            f = fad.grad(f)
        return f

    assert d(lambda x: x ** 2, 3)(x0) == 0.0
    assert d(lambda x: x ** 3, 3)(x0) == 6.0
    assert d(lambda x: x ** 3, 2)(x0) == 0.0
    assert d(lambda x: x ** 4, 3)(np.array(0.5)) == pytest.approx(12.0)
    assert d(lambda x: x ** 1, 3)(x0) == 0.0
    assert d(lambda x: x ** 0, 2)(x0) == 0.0


def test_hvp_of_a_gradient_at_zero():
    """The issue's example: sum(grad(v -> sum(v**2))(w) * w) = 2|w|^2, so H = 4 I."""
    def f(w):
        return fnp.sum(fad.grad(lambda v: fnp.sum(v ** 2))(w) * w)

    (hv,) = fad.hvp(f, (np.zeros(2),), (np.ones(2),))
    np.testing.assert_allclose(hv, [4.0, 4.0])


def test_fedprox_meta_gradient_at_the_first_local_step_is_finite():
    """FedProx's proximal term (mu/2)|local - w|^2 is exactly 0 at the first local step; the
    HVP of the round's loss differentiates it three times."""
    rng = np.random.default_rng(0)
    Xs = [rng.normal(size=(n, 3)) for n in (4, 3)]
    ys = [rng.normal(size=n) for n in (4, 3)]

    def local_loss(v, w, mu, X, y):
        r = X @ v - y
        return fnp.mean(r ** 2) + 0.5 * mu * fnp.sum((v - w) ** 2)

    @fad.trace
    def round_loss(w, mu, X, y):
        wc = local = fad.broadcast(w)
        for _ in range(2):
            local = local - 0.1 * fad.grad(local_loss)(local, wc, fad.broadcast(mu), X, y)
        new = w - fad.mean(wc - local)
        return fad.mean(fnp.mean((X @ fad.broadcast(new) - y) ** 2))

    args = (rng.normal(size=3), np.array(0.3), fad.clients(Xs), fad.clients(ys))
    hv = fad.hvp(round_loss, args, (np.ones(3), np.array(1.0), None, None))
    assert all(np.all(np.isfinite(h)) for h in hv[:2])
    fad.check_grads(round_loss, args, order=2, modes=("forward", "reverse"))
