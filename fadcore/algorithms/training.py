"""The training loop: sampled cohorts, a fixed or FAD-learned server learning rate, uniform or
FAD-learned client weights, evaluation on held-out data.

    alg = fedavg(softmax_regression(60, 10), local_steps=10, client_lr=0.05)
    res = train(alg, data, rounds=100, clients_per_round=10, eta=HypergradientLR(0.1))
    res.history["test_acc"], res.history["eta"]

Each round: sample a cohort (without replacement); if the learning rate is learned, compute
the hypergradient of this round's cohort loss (FAD, :attr:`FedOpt.hypergradient`) and update
``eta`` first; if client weights are learned, compute the validation-loss gradient w.r.t. the
cohort's weights (FAD, :attr:`FedOpt.weight_gradient`) and update them; then run the round with
the updated ``eta`` and weights (the derivatives act as one step of a line search on this
round's update). A fixed rate and uniform weights run the round only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import fadcore as fad
from fadcore.datasets import FederatedDataset

from ._trees import np_copy
from .client_weights import ClientWeights
from .fedopt import FedOpt
from .hypergradient import HypergradientLR

__all__ = ["train", "RunResult", "sample_cohort", "split_server_data"]


@dataclass
class RunResult:
    """A run's curves (``history``: lists indexed like ``history["round"]`` for the evaluated
    quantities, one entry per round for ``eta``/``hypergradient``), final model and weights."""

    label: str
    history: dict
    params: dict
    client_weights: np.ndarray | None = None
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def final(self, key: str) -> float:
        return float(self.history[key][-1])

    def rounds_to(self, accuracy: float) -> int | None:
        """The first evaluated round whose test accuracy reaches ``accuracy`` (None: never)."""
        for r, a in zip(self.history["round"], self.history["test_acc"], strict=True):
            if a >= accuracy:
                return int(r)
        return None

    def to_json(self) -> dict:
        out = {"label": self.label, "seconds": round(self.seconds, 3), "info": self.info,
               "history": {k: [_num(v) for v in vs] for k, vs in self.history.items()}}
        if self.client_weights is not None:
            out["client_weights"] = [_num(v) for v in self.client_weights]
        return out


def _num(v):
    v = float(v)
    return v if np.isfinite(v) else None         # JSON has no nan/inf


# --------------------------------------------------------------------------- data helpers

def sample_cohort(rng: np.random.Generator, sizes, m: int, tries: int = 32) -> np.ndarray:
    """``m`` distinct client ids, sorted. If the population's clients differ in size, a cohort
    whose clients all have the same size is redrawn (up to ``tries`` times): its data would have
    a fixed, not a ragged, row dimension and force a new trace."""
    sizes = np.asarray(sizes)
    k = len(sizes)
    if not 1 <= m <= k:
        raise ValueError(f"clients_per_round must be in [1, {k}], got {m}")
    ids = np.sort(rng.choice(k, size=m, replace=False))
    for _ in range(tries):
        if m == 1 or len(np.unique(sizes)) == 1 or len(np.unique(sizes[ids])) > 1:
            break
        ids = np.sort(rng.choice(k, size=m, replace=False))
    return ids


def split_server_data(data: FederatedDataset, fraction: float, seed: int = 0):
    """Pool the clients' held-out rows and split them: a ``fraction`` for a clean validation set
    held by the server, the rest as the test set. Returns ``((Xv, yv), (Xt, yt))``."""
    X, y = data.centralized("test")
    perm = np.random.default_rng(seed).permutation(len(y))
    nv = int(round(fraction * len(y)))
    v, t = perm[:nv], perm[nv:]
    return (X[v], y[v]), (X[t], y[t])


# --------------------------------------------------------------------------- the loop

def train(alg: FedOpt, data: FederatedDataset, *, rounds: int, clients_per_round: int,
          eta: float | HypergradientLR = 1.0, weights: ClientWeights | None = None,
          test=None, validation=None, params=None, seed: int = 0, eval_every: int = 1,
          label: str = "", progress: Callable[[int], None] | None = None) -> RunResult:
    """Run ``rounds`` rounds of ``alg`` on ``data``.

    ``eta``: a fixed server learning rate, or a :class:`HypergradientLR` (learned online).
    ``weights``: ``None`` for uniform client weights, or :class:`ClientWeights` (learned
    online; needs ``validation=(Xv, yv)`` held at the server). ``test``: ``(X, y)`` to report
    (default: the pooled held-out split). ``params``: initial model (default
    ``alg.model.init(seed)``). Cohorts are drawn from ``seed``; the result is reproducible.
    ``progress(r)`` is called after round ``r``.
    """
    if weights is not None and validation is None:
        raise ValueError("learning client weights needs validation=(X, y) held at the server")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    Xt, yt = test if test is not None else data.centralized("test")
    params = np_copy(params if params is not None else alg.model.init(seed))
    state = alg.init_state(params)
    lr = eta if isinstance(eta, HypergradientLR) else None
    eta_now = lr.eta if lr is not None else float(eta)
    hist = {k: [] for k in ("round", "test_loss", "test_acc", "eta", "hypergradient",
                            "cohort_loss", "validation_loss")}

    def evaluate(r):
        loss, acc = alg.model.evaluate(params, Xt, yt)
        hist["round"].append(r)
        hist["test_loss"].append(loss)
        hist["test_acc"].append(acc)

    evaluate(0)
    for r in range(1, rounds + 1):
        ids = sample_cohort(rng, data.sizes, clients_per_round)
        X = fad.clients([data.X[i] for i in ids])
        y = fad.clients([data.y[i] for i in ids])
        alpha = weights.alpha(ids) if weights is not None else np.ones(len(ids))
        if lr is not None:
            loss, h = alg.hypergradient(np.float64(eta_now), fad.clients(alpha), params, state,
                                        X, y)
            eta_now = lr.update(float(h))
            hist["cohort_loss"].append(float(loss))
            hist["hypergradient"].append(float(h))
        if weights is not None:
            vloss, g = alg.weight_gradient(np.float64(eta_now), fad.clients(alpha), params,
                                           state, X, y, *validation)
            weights.update(ids, g)
            alpha = weights.alpha(ids)
            hist["validation_loss"].append(float(vloss))
        params, state = alg.step(np.float64(eta_now), fad.clients(alpha), params, state, X, y)
        hist["eta"].append(eta_now)
        if r % eval_every == 0 or r == rounds:
            evaluate(r)
        if progress is not None:
            progress(r)
    hist = {k: v for k, v in hist.items() if v}
    return RunResult(label, hist, params,
                     weights.normalized() if weights is not None else None,
                     time.perf_counter() - t0)
