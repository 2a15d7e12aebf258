"""Server optimizers of FedOpt (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The server treats the aggregated client change ``delta = weighted_mean(w - w_i)`` as a
pseudo-gradient and takes one optimizer step with learning rate ``lr``. Every update is plain
arithmetic on pytrees, so it runs inside a trace (the learning rate and the state are then
traced SERVER values and derivatives flow through the step, e.g. the hypergradient w.r.t.
``lr``) and eagerly on NumPy arrays (the reimplementations in the tests).

    state = opt.init(params)
    params, state = opt.update(delta, state, params, lr)
"""

from __future__ import annotations

from dataclasses import dataclass

from fadcore import numpy as fnp

from ._trees import tree_map, zeros_like

__all__ = ["ServerOptimizer", "SGD", "Momentum", "Adam", "sgd", "momentum", "adam",
           "server_optimizer"]


class ServerOptimizer:
    """``init(params) -> state`` (a dict pytree) and ``update(delta, state, params, lr)``."""

    name = "base"

    def init(self, params) -> dict:
        return {}

    def update(self, delta, state, params, lr):
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


@dataclass(repr=False)
class SGD(ServerOptimizer):
    """``w <- w - lr * delta``; with ``lr = 1`` this is FedAvg."""

    name = "sgd"

    def update(self, delta, state, params, lr):
        return tree_map(lambda p, d: p - lr * d, params, delta), state


@dataclass(repr=False)
class Momentum(ServerOptimizer):
    """Heavy ball: ``m <- beta m + delta``, ``w <- w - lr m`` (FedAvgM, Hsu et al. 2019)."""

    beta: float = 0.9
    name = "momentum"

    def init(self, params) -> dict:
        return {"m": zeros_like(params)}

    def update(self, delta, state, params, lr):
        m = tree_map(lambda m, d: self.beta * m + d, state["m"], delta)
        return tree_map(lambda p, m: p - lr * m, params, m), {"m": m}


@dataclass(repr=False)
class Adam(ServerOptimizer):
    """FedAdam (Reddi et al. 2021, Algorithm 2): ``m <- b1 m + (1-b1) delta``,
    ``v <- b2 v + (1-b2) delta^2``, ``w <- w - lr m / (sqrt(v) + tau)``; no bias correction,
    ``tau`` (their adaptivity constant) keeps small coordinates from exploding. The square
    root is taken of ``v + 1e-12`` so that its derivative stays finite at coordinates that
    never move (``v = 0``, e.g. weights of an always-zero pixel): derivatives through the step
    (hypergradients, client-weight gradients) would otherwise be ``0 * inf = nan``."""

    b1: float = 0.9
    b2: float = 0.99
    tau: float = 1e-3
    name = "adam"

    def init(self, params) -> dict:
        return {"m": zeros_like(params), "v": zeros_like(params)}

    def update(self, delta, state, params, lr):
        m = tree_map(lambda m, d: self.b1 * m + (1.0 - self.b1) * d, state["m"], delta)
        v = tree_map(lambda v, d: self.b2 * v + (1.0 - self.b2) * d * d, state["v"], delta)
        new = tree_map(lambda p, m, v: p - lr * m / (fnp.sqrt(v + 1e-12) + self.tau), params, m, v)
        return new, {"m": m, "v": v}


def sgd() -> SGD:
    return SGD()


def momentum(beta: float = 0.9) -> Momentum:
    return Momentum(beta)


def adam(b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3) -> Adam:
    return Adam(b1, b2, tau)


def server_optimizer(name: str, **kw) -> ServerOptimizer:
    """By name: ``"sgd"`` (FedAvg), ``"momentum"`` (FedAvgM) or ``"adam"`` (FedAdam)."""
    table = {"sgd": SGD, "momentum": Momentum, "adam": Adam}
    if name not in table:
        raise ValueError(f"server optimizer must be one of {sorted(table)}, got {name!r}")
    return table[name](**kw)
