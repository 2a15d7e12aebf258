"""Online server learning rate by hypergradient descent (Baydin et al. 2018).

Baydin, Cornish, Martínez Rubio, Schmidt and Wood, "Online Learning Rate Adaptation with
Hypergradient Descent", ICLR 2018, adapt a learning rate with the derivative ``h`` of the loss
after an update w.r.t. the learning rate used in that update. Here the update is a whole
federated round and ``h = d/d eta mean_i L_i(w'(eta))`` is computed by FAD through the round's
communication (:attr:`FedOpt.hypergradient`).

The rate is learned in log space, so it stays positive. With ``g = eta * h`` the derivative of
the loss w.r.t. ``log eta`` (the chain rule), the rules are:

``"normalized"`` (default)
    ``log eta -= beta * g / sqrt(v)``, ``v`` an exponential moving average of ``g^2``
    (bias-corrected, decay ``decay``): a scale-free step; each round changes ``eta`` by a factor
    of at most about ``exp(beta)`` whatever the loss's scale, and steps shrink when the sign of
    ``g`` starts to alternate (``eta`` near the best one-round value). Baydin et al.'s own
    normalised ("multiplicative") rule divides by gradient norms for the same purpose; dividing
    by the running RMS of the hypergradient does it without needing those norms.
``"multiplicative"``
    ``log eta -= beta * g``: plain gradient descent on ``log eta``, ``eta <- eta exp(-beta eta h)``.
``"additive"``
    Baydin et al.'s HD rule ``eta -= beta * h`` (clipped to ``[eta_min, eta_max]``).

A non-finite ``h`` (the round diverged) counts as "too large": ``eta`` is divided by
``exp(beta)``.
"""

from __future__ import annotations

import math

__all__ = ["HypergradientLR", "RULES"]

RULES = ("normalized", "multiplicative", "additive")


class HypergradientLR:
    """The learned server learning rate: read :attr:`eta`, feed :meth:`update` the FAD
    hypergradient ``h = d loss / d eta`` of each round."""

    def __init__(self, eta0: float, beta: float = 0.3, rule: str = "normalized",
                 decay: float = 0.9, eta_min: float = 1e-6, eta_max: float = 1e6):
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if not eta0 > 0:
            raise ValueError(f"eta0 must be positive, got {eta0}")
        self.rule = rule
        self.beta = float(beta)
        self.decay = float(decay)
        self.eta_min, self.eta_max = float(eta_min), float(eta_max)
        self.log_eta = math.log(float(eta0))
        self._v = 0.0
        self._t = 0

    @property
    def eta(self) -> float:
        return math.exp(self.log_eta)

    def update(self, h: float) -> float:
        """One hypergradient step from ``h = d loss / d eta`` at the current ``eta``; returns
        the new ``eta``."""
        h = float(h)
        lo, hi = math.log(self.eta_min), math.log(self.eta_max)
        if not math.isfinite(h):
            self.log_eta = min(max(self.log_eta - self.beta, lo), hi)
            return self.eta
        g = self.eta * h                              # d loss / d log(eta)
        if self.rule == "normalized":
            self._t += 1
            self._v = self.decay * self._v + (1.0 - self.decay) * g * g
            rms = math.sqrt(self._v / (1.0 - self.decay ** self._t))
            self.log_eta -= self.beta * g / rms if rms > 0 else 0.0
        elif self.rule == "multiplicative":
            self.log_eta -= self.beta * g
        else:
            eta = min(max(self.eta - self.beta * h, self.eta_min), self.eta_max)
            self.log_eta = math.log(eta)
        self.log_eta = min(max(self.log_eta, lo), hi)
        return self.eta

    def __repr__(self) -> str:
        return f"HypergradientLR(eta={self.eta:.4g}, beta={self.beta}, rule={self.rule!r})"
