"""Small federated programs used by the docs, ``fad inspect`` and the tests.

Each ``NAME`` has an ``example_args_NAME(seed=0)`` giving arguments to trace and run it with.
"""

from __future__ import annotations

import numpy as np

import fadcore as fad
from fadcore import numpy as fnp

__all__ = ["fed_mse", "fedavg_round", "make_fedavg_round", "log_sum", "secure_mse", "two_round"]


def _ragged(seed, clients=4, d=3, rows=(3, 9)):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(rows[0], rows[1], size=clients)
    X = [rng.normal(size=(n, d)) for n in sizes]
    y = [rng.normal(size=n) for n in sizes]
    return rng, fad.clients(X), fad.clients(y)


# --------------------------------------------------------------------------- FedSGD loss

@fad.trace
def fed_mse(w, X, y):
    """The FedSGD loss: mean over clients of each client's mean squared error."""
    r = X @ fad.broadcast(w) - y
    return fad.mean(fnp.mean(r * r))


def example_args_fed_mse(seed=0, d=3):
    rng, X, y = _ragged(seed, d=d)
    return (rng.normal(size=d), X, y)


@fad.trace
def secure_mse(w, X, y):
    """Like fed_mse, aggregated with secure_sum only (sum of losses / number of clients)."""
    r = X @ fad.broadcast(w) - y
    return fad.secure_sum(fnp.mean(r * r)) / fad.num_clients()


def client_data_fed_mse(node_config: dict) -> tuple:
    """One node's client data for ``fed_mse``: client ``partition-id`` of
    ``example_args_fed_mse()`` (``fad export flower fadcore.examples:fed_mse`` names it as the
    nodes' ``client-data`` function)."""
    _, X, y = example_args_fed_mse()
    i = int(node_config["partition-id"])
    return X[i], y[i]


example_args_secure_mse = example_args_fed_mse


# --------------------------------------------------------------------------- one FedAvg round

K_LOCAL = 2
CLIENT_LR = 0.1


def logistic_loss(w, X, y):
    z = X @ w
    return fnp.mean(fnp.logaddexp(0.0, z) - y * z)


def make_fedavg_round(K: int = K_LOCAL, client_lr: float = CLIENT_LR):
    """One FedAvg round with ``K`` local SGD steps and client weights alpha, then the loss of
    the new model: its gradient w.r.t. eta is the server-LR hypergradient, w.r.t. alpha the
    client-weight gradient (DESIGN.md's example)."""

    @fad.trace(name="fedavg_round")
    def fedavg_round(eta, alpha, w, X, y):
        wc = local = fad.broadcast(w)
        for _ in range(K):
            local = local - client_lr * fad.grad(logistic_loss)(local, X, y)
        w_new = w - eta * fad.weighted_mean(wc - local, alpha)
        return fad.mean(logistic_loss(fad.broadcast(w_new), X, y))
    return fedavg_round


fedavg_round = make_fedavg_round()


def example_args_fedavg_round(seed=0, d=3):
    rng, X, _ = _ragged(seed, d=d)
    y = fad.clients([(rng.random(len(x)) < 0.5).astype(float) for x in X])
    alpha = fad.clients(rng.random(len(X)) + 0.5)
    return (np.float64(0.5), alpha, rng.normal(size=d), X, y)


# --------------------------------------------------------------------------- server post-processing

@fad.trace
def log_sum(w, X):
    """A vector aggregate post-processed non-linearly at the server: log(1 + |sum_i x_i|^2),
    x_i = mean_rows(tanh(X_i W)). Reverse needs a second round (the cotangent depends on the
    aggregate); push-forward sends the 4 x d Jacobian up instead: auto picks by the weights."""
    h = fnp.mean(fnp.tanh(X @ fad.broadcast(w)), axis=0)
    s = fad.sum(h)
    return fnp.log1p(fnp.sum(s * s))


def example_args_log_sum(seed=0, d=3, k=4):
    rng, X, _ = _ragged(seed, d=d)
    return (rng.normal(size=(d, k)) * 0.5, X)


# --------------------------------------------------------------------------- two rounds

@fad.trace
def two_round(w, X, y):
    """A FedSGD step (round 1) then the evaluation of the new model (round 2)."""
    r = X @ fad.broadcast(w) - y
    g = fad.mean(fnp.mean(r[:, None] * X, axis=0))
    w_new = w - 0.1 * g
    r2 = X @ fad.broadcast(w_new) - y
    return fad.mean(fnp.mean(r2 * r2))


example_args_two_round = example_args_fed_mse
