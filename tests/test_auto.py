"""``mode="auto"``: on a set of federated programs and three cost models, auto's weighted cost
is the minimum over every explicit mode (forward; reverse and mixed, stateful and remat; mixed
with every explicit per-boundary choice ``boundaries=``), each built independently with
``fad.grad(mode=...)`` and costed with ``fad.cost``, its gradient is the reverse-mode gradient, and ``fad.explain``
prints the candidates without contradictions.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

import fadcore as fad
from fadcore import numpy as fnp

rng = np.random.default_rng(0)
D, SIZES = 4, (3, 5, 2)
W = rng.normal(size=D)
XS = fad.clients([rng.normal(size=(n, D)) for n in SIZES])
YS = fad.clients([(rng.random(n) > 0.5).astype(float) for n in SIZES])
ALPHA = fad.clients(np.array([0.5, 1.0, 2.0]))


def client_loss(w, X, y):
    z = X @ w
    return fnp.mean(fnp.logaddexp(0.0, z) - y * z)


def local_sgd(w, X, y, lr, steps=2, mu=None):
    local = start = fad.broadcast(w)
    for _ in range(steps):
        g = fad.grad(client_loss)(local, X, y)
        if mu is not None:
            g = g + fad.broadcast(mu) * (local - start)
        local = local - lr * g
    return start - local


def fedavg_round(eta, lr, w, X, y):
    """After one FedAvg round, the mean client loss (server lr eta, client lr lr)."""
    w_new = w - eta * fad.mean(local_sgd(w, X, y, fad.broadcast(lr)))
    return fad.mean(client_loss(fad.broadcast(w_new), X, y))


def weighted_round(alpha, w, X, y):
    w_new = w - fad.weighted_mean(local_sgd(w, X, y, 0.1), alpha)
    return fad.mean(client_loss(fad.broadcast(w_new), X, y))


def fedsgd(w, X, y):
    return fad.mean(client_loss(fad.broadcast(w), X, y))


def fedprox_round(mu, w, X, y):
    w_new = w - fad.mean(local_sgd(w, X, y, 0.1, mu=mu))
    return fad.mean(client_loss(fad.broadcast(w_new), X, y))


def dp_round(clip, w, X, y):
    delta = fad.nn.clip_by_norm(local_sgd(w, X, y, 0.1), fad.broadcast(clip))
    w_new = w - fad.mean(delta)
    return fad.mean(client_loss(fad.broadcast(w_new), X, y))


def two_rounds(eta, w, X, y):
    w1 = w - eta * fad.mean(local_sgd(w, X, y, 0.1))
    w2 = w1 - eta * fad.mean(local_sgd(w1, X, y, 0.1))
    return fad.mean(client_loss(fad.broadcast(w2), X, y))


E, LR = np.array(1.0), np.array(0.1)
PROGRAMS = {
    "server lr": (fedavg_round, (E, LR, W, XS, YS), 0),
    "client lr": (fedavg_round, (E, LR, W, XS, YS), 1),
    "client weights": (weighted_round, (ALPHA, W, XS, YS), 0),
    "model gradient": (fedsgd, (W, XS, YS), 0),
    "model after a round": (fedavg_round, (E, LR, W, XS, YS), 2),
    "FedProx mu": (fedprox_round, (np.array(0.5), W, XS, YS), 0),
    "DP clip norm": (dp_round, (np.array(0.3), W, XS, YS), 0),
    "two rounds": (two_rounds, (E, W, XS, YS), 0),
    "server lr and model": (fedavg_round, (E, LR, W, XS, YS), (0, 2)),
}
EXPLICIT = [("forward", "stateful"), ("reverse", "stateful"), ("reverse", "remat"),
            ("mixed", "stateful"), ("mixed", "remat")]
WEIGHTS = {
    "rounds first": fad.CostWeights(),
    "bytes only": fad.CostWeights(rounds=0.0, bytes=1.0, client_flops=0.0),
    "FLOPs and state": fad.CostWeights(rounds=0.0, bytes=0.0, client_flops=1.0, state=1.0),
}


def _weighted(graph, w):
    return w.total(fad.cost(graph, w.clients, w.rows))


@pytest.mark.parametrize("wname", sorted(WEIGHTS))
@pytest.mark.parametrize("pname", sorted(PROGRAMS))
def test_auto_is_the_cheapest_explicit_mode(pname, wname):
    f, args, argnums = PROGRAMS[pname]
    w = WEIGHTS[wname]
    f = fad.trace(f)
    explicit = {}
    for mode, state in EXPLICIT:
        try:
            g = fad.grad(f, argnums=argnums, mode=mode, state=state).graph(*args)
        except fad.DifferentiationError:
            assert mode == "forward" and pname == "client weights"
            continue
        explicit[f"{mode}/{state}"] = _weighted(g, w)
        if mode == "mixed":         # and every explicit per-boundary choice
            pushable = [b["boundary"] for b in g.meta["boundaries"] if b["choice"] == "pushforward"]
            for r in range(1, len(pushable)):
                for sub in itertools.combinations(pushable, r):
                    bd = {i: "pushforward" if i in sub else "reverse" for i in pushable}
                    gb = fad.grad(f, argnums=argnums, mode="mixed", state=state,
                                  boundaries=bd).graph(*args)
                    explicit[f"mixed/{state} {sub}"] = _weighted(gb, w)
    auto = fad.grad(f, argnums=argnums, mode="auto", weights=w)
    got = _weighted(auto.graph(*args), w)
    best = min(explicit.values())
    assert got <= best * (1 + 1e-12), (got, explicit)
    if not isinstance(argnums, tuple):        # one argument: nothing to combine
        assert got == pytest.approx(best, rel=1e-12), (got, explicit)
    # the same gradient as reverse mode
    want = fad.grad(f, argnums=argnums)(*args)
    have = auto(*args)
    for a, b in zip(_leaves(have), _leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


def _leaves(x):
    leaves, _ = fad.pytree.flatten(x)
    return [np.concatenate([np.ravel(m) for m in v.tolist()]) if isinstance(v, fad.ClientValues)
            else np.ravel(v) for v in leaves]


def test_auto_takes_forward_for_a_scalar_hyperparameter_when_rounds_then_flops_count():
    f = fad.trace(fedavg_round)
    args = (E, LR, W, XS, YS)
    rounds_then_flops = fad.CostWeights(rounds=1e4, bytes=0.0, client_flops=1.0, state=1.0)
    g = fad.grad(f, argnums=1, mode="auto", weights=rounds_then_flops).graph(*args)
    assert g.meta["auto"]["chosen"] == "forward", fad.explain(g)
    assert fad.cost(g, clients=10, rows=10).client_state_bytes == 0
    # with two arguments, forward for one and a reverse-side mode for the other are costed too
    g2 = fad.grad(f, argnums=(1, 2), mode="auto").graph(*args)
    names = [r["candidate"] for r in g2.meta["auto"]["candidates"]]
    assert "forward(arg 1) + reverse/stateful" in names and "forward(arg 2) + mixed/stateful" in names


def test_explain_prints_the_candidates_without_contradictions():
    f = fad.trace(fedavg_round)
    g = fad.grad(f, argnums=(0, 2), mode="auto").graph(E, LR, W, XS, YS)
    text = fad.explain(g)
    assert "candidate" in text and "weighted cost" in text and "chose " in text
    rep = g.meta["auto"]
    costs = {r["candidate"]: r["cost"] for r in rep["candidates"] if "cost" in r}
    assert costs[rep["chosen"]] == min(costs.values())
    # every "a < b" the text states holds; no "x < x"
    for a, b in re.findall(r"([0-9.e+-]+) < ([0-9.e+-]+)", text):
        assert float(a) < float(b), text
    # the table's weighted costs are fad.cost's, recomputed
    w = fad.CostWeights(**rep["weights"])
    assert costs[rep["chosen"]] == pytest.approx(_weighted(g, w), rel=1e-12)


def test_auto_with_a_ragged_client_argument():
    """Forward mode cannot take a ragged client argument: auto says so and picks another."""
    f = fad.trace(lambda w, X: fnp.sum(w) + fad.sum(fnp.sum(fnp.tanh(X))))
    args = (W, XS)
    g = fad.grad(f, argnums=(0, 1), mode="auto").graph(*args)
    fwd = next(r for r in g.meta["auto"]["candidates"] if r["candidate"] == "forward")
    assert "client argument" in fwd["skipped"]
    for a, b in zip(_leaves(fad.run(g, *args)), _leaves(fad.grad(f, argnums=(0, 1))(*args))):
        np.testing.assert_allclose(a, b, rtol=1e-12)
