"""Learned client weights for the weighted mean of a FedAvg/FedOpt round.

Every client ``i`` of the population has a weight ``alpha_i = base_i * exp(s_i)`` (positive by
construction; ``base_i`` is 1, or e.g. the client's number of rows). In a round the cohort's
changes are aggregated with ``fad.weighted_mean(delta_i, alpha_i)``, which normalises the
weights. FAD gives ``d L_val / d alpha_i`` for every client of the cohort (one value per client,
a ``fad.ClientValues``) where ``L_val`` is the loss of the new model on clean validation data
held by the server (:attr:`FedOpt.weight_gradient`). By the chain rule
``d L_val / d s_i = alpha_i * d L_val / d alpha_i``, and the log-weights of the cohort take a
gradient step normalised by the cohort's RMS gradient:

    s_i -= lr * (g_i / rms(g_cohort) + shrink * s_i)

so the step size does not depend on the loss's scale; ``shrink`` (default 0) pulls the
log-weights back towards uniform (an L2 penalty on ``s``).

A client whose change raises the validation loss (e.g. one with corrupted labels) gets a
positive ``g_i`` round after round and its weight decays. The weighted mean is invariant to
scaling all weights, so ``sum_i alpha_i dL/dalpha_i = 0`` over a cohort: the steps have mean
zero and there is no common drift. ``s`` starts at 0 (uniform weights) and is clipped to
``[s_min, s_max]`` with ``s_max = 0`` by default: a client's weight can fall below the others'
but not rise above the starting level. The one-round validation signal is noisy, and unbounded
weights tend to collapse onto a handful of clients, which costs accuracy on heterogeneous data.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ClientWeights"]


class ClientWeights:
    """Positive per-client weights over a population of ``num_clients`` clients."""

    def __init__(self, num_clients: int, lr: float = 0.3, shrink: float = 0.0, base=None,
                 s_min: float = -12.0, s_max: float = 0.0):
        self.s = np.zeros(int(num_clients))
        self.base = (np.ones(int(num_clients)) if base is None
                     else np.asarray(base, dtype=np.float64).copy())
        if self.base.shape != self.s.shape or not (self.base > 0).all():
            raise ValueError("base weights must be positive, one per client")
        self.lr = float(lr)
        self.shrink = float(shrink)
        self.s_min, self.s_max = float(s_min), float(s_max)

    def alpha(self, ids) -> np.ndarray:
        """The weights of the clients ``ids`` (for ``fad.weighted_mean``)."""
        ids = np.asarray(ids, dtype=np.int64)
        return self.base[ids] * np.exp(self.s[ids])

    def update(self, ids, grad_alpha) -> None:
        """One step from ``d L_val / d alpha`` of the cohort ``ids`` (a ``fad.ClientValues`` or
        an array in the order of ``ids``)."""
        ids = np.asarray(ids, dtype=np.int64)
        g = self.alpha(ids) * np.asarray([float(v) for v in grad_alpha])   # d L / d s
        if not np.isfinite(g).all():
            return
        rms = float(np.sqrt(np.mean(g * g)))
        if rms > 0:
            self.s[ids] -= self.lr * (g / rms + self.shrink * self.s[ids])
        np.clip(self.s, self.s_min, self.s_max, out=self.s)

    def normalized(self) -> np.ndarray:
        """All clients' weights scaled to mean 1 (uniform weights are all 1)."""
        w = self.base * np.exp(self.s)
        return w / w.mean()
