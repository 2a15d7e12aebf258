"""One round of FedAvg / FedOpt as traced federated programs, and their FAD derivatives.

A round (McMahan et al. 2017; Reddi et al. 2021): the server broadcasts the model ``w``; every
client of the cohort runs ``local_steps`` steps of gradient descent on its own loss (written
with ``fad.grad`` inside the trace, as in :func:`fadcore.examples.fedavg_round`); the server
aggregates the changes ``delta = weighted_mean(w - w_i, alpha)`` with one positive weight per
client and takes a server-optimizer step ``w' = opt(w, delta, eta)``.

Because the whole round is one traced graph, FAD differentiates through its communication:

* ``hypergradient``: d/d eta of the cohort's loss after the round, ``mean_i L_i(w')``
  (the server learning-rate hypergradient; mixed mode by default: the cotangent of the final
  mean is constant, so it is fused into the forward rounds and no backward round is needed).
* ``weight_gradient``: d/d alpha of a loss after the round on validation data held at the
  SERVER (clean, trusted data); the result is one value per client (``fad.ClientValues``),
  computed in reverse mode (the cotangent crosses the weighted mean back to the clients).

Every traced function caches its graph per abstract signature; cohorts of ragged clients
(``?`` rows) of any size reuse one graph (``FedOpt.num_traces`` counts the traces).
"""

from __future__ import annotations

import fadcore as fad

from ._trees import broadcast, tree_map, weighted_mean
from .models import Model
from .optimizers import SGD, ServerOptimizer

__all__ = ["FedOpt", "fedavg"]


class FedOpt:
    """FedAvg/FedOpt rounds of ``model`` with ``server_optimizer`` (default SGD = FedAvg).

    Traced functions (call them on values; ``.graph(...)`` gives their IR):

    ``step(eta, alpha, params, state, X, y) -> (params, state)``
        one round; ``eta`` f64[]@SERVER, ``alpha`` {f64[]}@CLIENTS (positive weights),
        ``params``/``state`` dicts at SERVER, ``X`` {f64[?,d]}@CLIENTS, ``y`` {i64[?]}@CLIENTS.
    ``round_loss(eta, alpha, params, state, X, y) -> f64[]@SERVER``
        the mean over the cohort of each client's loss at the new model.
    ``validation_loss(eta, alpha, params, state, X, y, Xv, yv) -> f64[]@SERVER``
        the loss of the new model on server-held data ``Xv`` f64[n,d]@SERVER, ``yv``.
    ``hypergradient(...)`` = ``fad.value_and_grad(round_loss, argnums=0)``
        ``(loss, d loss / d eta)``.
    ``weight_gradient(...)`` = ``fad.value_and_grad(validation_loss, argnums=1)``
        ``(loss, d loss / d alpha)``, the latter a ``fad.ClientValues``.
    """

    def __init__(self, model: Model, server_optimizer: ServerOptimizer | None = None, *,
                 local_steps: int = 5, client_lr: float = 0.1,
                 hypergradient_mode: str = "auto", weight_mode: str = "auto"):
        if local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {local_steps}")
        self.model = model
        self.optimizer = server_optimizer if server_optimizer is not None else SGD()
        self.local_steps = int(local_steps)
        self.client_lr = float(client_lr)
        self.num_traces = 0
        self._modes = (hypergradient_mode, weight_mode)
        self.step = fad.trace(self._step, name="fedopt_step")
        self.round_loss = fad.trace(self._round_loss, name="fedopt_round_loss")
        self.validation_loss = fad.trace(self._validation_loss, name="fedopt_validation_loss")
        self.hypergradient = fad.value_and_grad(self.round_loss, argnums=0,
                                                mode=hypergradient_mode)
        self.weight_gradient = fad.value_and_grad(self.validation_loss, argnums=1,
                                                  mode=weight_mode)

    def __getstate__(self) -> dict:
        """Pickled as its configuration; the traced functions are made (and traced) again."""
        return {k: getattr(self, k) for k in ("model", "optimizer", "local_steps", "client_lr",
                                               "num_traces", "_modes")}

    def __setstate__(self, state: dict) -> None:
        hyper, weight = state["_modes"]
        self.__init__(state["model"], state["optimizer"], local_steps=state["local_steps"],
                      client_lr=state["client_lr"], hypergradient_mode=hyper, weight_mode=weight)
        self.num_traces = state["num_traces"]

    def __repr__(self) -> str:
        return (f"FedOpt({self.model.name}, {self.optimizer!r}, local_steps={self.local_steps}, "
                f"client_lr={self.client_lr})")

    # ----------------------------------------------------------------------- building blocks
    def init_state(self, params) -> dict:
        """The server optimizer's initial state for ``params``."""
        return self.optimizer.init(params)

    def client_update(self, start, X, y):
        """``local_steps`` steps of gradient descent from the broadcast model ``start`` on each
        client's data; returns the clients' final models (at CLIENTS)."""
        local = start
        for _ in range(self.local_steps):
            g = fad.grad(self.model.loss)(local, X, y)
            local = tree_map(lambda w, gw: w - self.client_lr * gw, local, g)
        return local

    def server_update(self, eta, alpha, params, state, X, y):
        """The round inside a trace: broadcast, local training, weighted mean of the clients'
        changes, server step. Returns ``(params, state)`` at SERVER."""
        self.num_traces += 1          # this Python body runs only while tracing
        start = broadcast(params)
        local = self.client_update(start, X, y)
        delta = weighted_mean(tree_map(lambda a, b: a - b, start, local), alpha)
        return self.optimizer.update(delta, state, params, eta)

    # ----------------------------------------------------------------------- traced programs
    def _step(self, eta, alpha, params, state, X, y):
        return self.server_update(eta, alpha, params, state, X, y)

    def _round_loss(self, eta, alpha, params, state, X, y):
        new, _ = self.server_update(eta, alpha, params, state, X, y)
        return fad.mean(self.model.loss(broadcast(new), X, y))

    def _validation_loss(self, eta, alpha, params, state, X, y, Xv, yv):
        new, _ = self.server_update(eta, alpha, params, state, X, y)
        return self.model.loss(new, Xv, yv)

def fedavg(model: Model, *, local_steps: int = 5, client_lr: float = 0.1, **kw) -> FedOpt:
    """FedAvg: :class:`FedOpt` with the SGD server optimizer (``eta = 1`` is plain averaging)."""
    return FedOpt(model, SGD(), local_steps=local_steps, client_lr=client_lr, **kw)
