"""fadcore.algorithms: one round of every algorithm against a NumPy reimplementation, the FAD
hypergradient and client-weight gradients against central differences of that
reimplementation, the online rules, and the training loop (no retracing, reproducibility).

The NumPy oracles below are written from the formulas (hand-derived gradients of the softmax
cross-entropy and of the MLP), not from fadcore.algorithms.
"""

from __future__ import annotations

import numpy as np
import pytest

import fadcore as fad
from fadcore import algorithms as alg
from fadcore.datasets import synthetic

SIZES = (4, 7, 3, 5)
D, C = 3, 3
K_LOCAL, CLIENT_LR = 2, 0.3


# --------------------------------------------------------------------------- NumPy oracle

def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_loss(kind, p, X, y):
    z = np_logits(kind, p, X)
    if kind == "logistic":
        return float(np.mean(np.logaddexp(0.0, z) - y * z))
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def np_logits(kind, p, X):
    if kind == "mlp":
        return np.tanh(X @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]
    if kind == "logistic":
        return X @ p["w"] + p["b"]
    return X @ p["W"] + p["b"]


def np_grad(kind, p, X, y):
    """Hand-derived gradient of the mean loss."""
    n = len(y)
    if kind == "logistic":
        r = (1 / (1 + np.exp(-(X @ p["w"] + p["b"]))) - y) / n
        return {"w": X.T @ r, "b": np.sum(r)}
    onehot = np.eye(p["b" if kind == "softmax" else "b2"].shape[0])[y]
    if kind == "softmax":
        dz = (_softmax(X @ p["W"] + p["b"]) - onehot) / n
        return {"W": X.T @ dz, "b": dz.sum(0)}
    h = np.tanh(X @ p["W1"] + p["b1"])
    dz = (_softmax(h @ p["W2"] + p["b2"]) - onehot) / n
    dh = dz @ p["W2"].T * (1 - h * h)
    return {"W1": X.T @ dh, "b1": dh.sum(0), "W2": h.T @ dz, "b2": dz.sum(0)}


def np_delta(kind, p, Xs, ys, alpha, K=K_LOCAL, lr=CLIENT_LR):
    """Weighted mean over clients of (w - w_i) after K local gradient steps."""
    deltas = []
    for X, y in zip(Xs, ys):
        q = {k: v.copy() for k, v in p.items()}
        for _ in range(K):
            g = np_grad(kind, q, X, y)
            q = {k: q[k] - lr * g[k] for k in q}
        deltas.append({k: p[k] - q[k] for k in p})
    a = np.asarray(alpha) / np.sum(alpha)
    return {k: sum(ai * d[k] for ai, d in zip(a, deltas)) for k in p}


def np_server(opt, delta, state, p, eta):
    """SGD / heavy-ball momentum / FedAdam (Reddi et al. 2021, no bias correction; the root of
    v + 1e-12 as documented in fadcore.algorithms.Adam)."""
    if opt == "sgd":
        return {k: p[k] - eta * delta[k] for k in p}, state
    if opt == "momentum":
        m = {k: 0.9 * state["m"][k] + delta[k] for k in p}
        return {k: p[k] - eta * m[k] for k in p}, {"m": m}
    m = {k: 0.9 * state["m"][k] + 0.1 * delta[k] for k in p}
    v = {k: 0.99 * state["v"][k] + 0.01 * delta[k] ** 2 for k in p}
    return {k: p[k] - eta * m[k] / (np.sqrt(v[k] + 1e-12) + 1e-3) for k in p}, {"m": m, "v": v}


def np_round(kind, opt, eta, alpha, p, state, Xs, ys):
    return np_server(opt, np_delta(kind, p, Xs, ys, alpha), state, p, eta)


# --------------------------------------------------------------------------- fixtures

def make_model(kind):
    if kind == "softmax":
        return alg.softmax_regression(D, C)
    if kind == "logistic":
        return alg.logistic_regression(D)
    return alg.mlp(D, 4, C, activation="tanh")


def make_data(kind, rng, sizes=SIZES):
    Xs = [rng.normal(size=(n, D)) for n in sizes]
    ys = [rng.integers(0, 2 if kind == "logistic" else C, size=n) for n in sizes]
    return Xs, ys


def random_params(model, rng):
    return {k: rng.normal(scale=0.5, size=np.shape(v)) for k, v in model.init(0).items()}


def random_state(opt, p, rng):
    if opt == "sgd":
        return {}
    st = {"m": {k: rng.normal(scale=0.1, size=v.shape) for k, v in p.items()}}
    if opt == "adam":
        st["v"] = {k: rng.uniform(0.01, 0.1, size=v.shape) for k, v in p.items()}
    return st


def fedopt(kind, opt, **kw):
    return alg.FedOpt(make_model(kind), alg.server_optimizer(opt), local_steps=K_LOCAL,
                      client_lr=CLIENT_LR, **kw)


def assert_tree_close(got, want, **tol):
    assert set(got) == set(want)
    for k in want:
        if isinstance(want[k], dict):
            assert_tree_close(got[k], want[k], **tol)
        else:
            np.testing.assert_allclose(got[k], want[k], err_msg=k, **tol)


# --------------------------------------------------------------------------- one round

@pytest.mark.parametrize("kind,opt", [("softmax", "sgd"), ("softmax", "momentum"),
                                      ("softmax", "adam"), ("logistic", "sgd"),
                                      ("mlp", "adam")])
def test_round_matches_numpy(kind, opt, rng):
    """Two consecutive rounds (so the optimizer state is used), ragged clients, unequal
    client weights, against the NumPy reimplementation."""
    a = fedopt(kind, opt)
    Xs, ys = make_data(kind, rng)
    alpha = rng.uniform(0.5, 2.0, size=len(SIZES))
    p = random_params(a.model, rng)
    st = a.init_state(p)
    assert set(st) == {"sgd": set(), "momentum": {"m"}, "adam": {"m", "v"}}[opt]
    assert_tree_close(st, {k: {n: np.zeros_like(v) for n, v in p.items()} for k in st})
    want_p = p
    st = want_st = random_state(opt, p, rng)
    for eta in (0.7, 1.3):
        p, st = a.step(np.float64(eta), fad.clients(alpha), p, st, fad.clients(Xs),
                       fad.clients(ys))
        want_p, want_st = np_round(kind, opt, eta, alpha, want_p, want_st, Xs, ys)
        assert_tree_close(p, want_p, rtol=1e-10, atol=1e-12)
        assert_tree_close(st, want_st, rtol=1e-10, atol=1e-12)


def test_round_matches_numpy_on_reference_backend(rng):
    a = fedopt("softmax", "sgd")
    Xs, ys = make_data("softmax", rng)
    p = random_params(a.model, rng)
    args = (np.float64(1.0), fad.clients(np.ones(4)), p, {}, fad.clients(Xs), fad.clients(ys))
    got, _ = a.step.run(*args, backend="reference")
    assert_tree_close(got, np_round("softmax", "sgd", 1.0, np.ones(4), p, {}, Xs, ys)[0],
                      rtol=1e-10)


# --------------------------------------------------------------------------- derivatives

def _central(f, x, h=1e-6):
    return (f(x + h) - f(x - h)) / (2 * h)


@pytest.mark.parametrize("kind,opt", [("softmax", "sgd"), ("softmax", "adam"),
                                      ("mlp", "momentum")])
@pytest.mark.parametrize("mode", ["mixed", "reverse", "forward"])
def test_hypergradient_matches_finite_differences(kind, opt, mode, rng):
    """d/d eta of the cohort's mean loss after the round, through the whole round."""
    a = fedopt(kind, opt, hypergradient_mode=mode)
    Xs, ys = make_data(kind, rng)
    alpha = rng.uniform(0.5, 2.0, size=len(SIZES))
    p = random_params(a.model, rng)
    st = random_state(opt, p, rng)
    eta = 0.8

    def np_after(e):
        new, _ = np_round(kind, opt, e, alpha, p, st, Xs, ys)
        return np.mean([np_loss(kind, new, X, y) for X, y in zip(Xs, ys)])

    loss, h = a.hypergradient(np.float64(eta), fad.clients(alpha), p, st, fad.clients(Xs),
                              fad.clients(ys))
    np.testing.assert_allclose(loss, np_after(eta), rtol=1e-10)
    np.testing.assert_allclose(h, _central(np_after, eta), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind,opt", [("softmax", "sgd"), ("softmax", "adam"),
                                      ("mlp", "sgd")])
@pytest.mark.parametrize("mode", ["reverse", "mixed"])
def test_client_weight_gradient_matches_finite_differences(kind, opt, mode, rng):
    """d/d alpha_i of a server-held validation loss after the round: one value per client."""
    a = fedopt(kind, opt, weight_mode=mode)
    Xs, ys = make_data(kind, rng)
    Xv, yv = make_data(kind, rng, sizes=(9,))
    Xv, yv = Xv[0], yv[0]
    alpha = rng.uniform(0.5, 2.0, size=len(SIZES))
    p = random_params(a.model, rng)
    st = random_state(opt, p, rng)
    eta = 0.9

    def np_val(al):
        new, _ = np_round(kind, opt, eta, al, p, st, Xs, ys)
        return np_loss(kind, new, Xv, yv)

    loss, g = a.weight_gradient(np.float64(eta), fad.clients(alpha), p, st, fad.clients(Xs),
                                fad.clients(ys), Xv, yv)
    assert isinstance(g, fad.ClientValues) and len(g) == len(SIZES)
    g = np.array([float(v) for v in g])
    fd = np.array([_central(lambda t: np_val(alpha + t * e), 0.0) for e in np.eye(len(SIZES))])
    np.testing.assert_allclose(loss, np_val(alpha), rtol=1e-10)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-9)
    # the weighted mean ignores a common scale: sum_i alpha_i dL/dalpha_i = 0
    assert abs(alpha @ g) < 1e-10 * np.abs(alpha * g).sum() + 1e-14


def test_hypergradient_graph_communicates_like_the_round(rng):
    """The hypergradient graph is federated: it broadcasts, aggregates with a weighted mean and
    a mean, and (mixed mode, constant output cotangent) needs no more rounds than the primal."""
    a = fedopt("softmax", "sgd")
    Xs, ys = make_data("softmax", rng)
    args = (np.float64(1.0), fad.clients(np.ones(4)), a.model.init(0), {}, fad.clients(Xs),
            fad.clients(ys))
    g = a.hypergradient.graph(*args)
    prims = g.primitives()
    assert {"broadcast", "weighted_mean"} <= set(prims)
    assert fad.cost(g, clients=4, rows=5).rounds == fad.cost(
        a.round_loss.graph(*args), clients=4, rows=5).rounds


# --------------------------------------------------------------------------- online rules

def test_hypergradient_lr_rules():
    lr = alg.HypergradientLR(1.0, beta=0.5)                  # normalized: first step is ±beta
    assert np.isclose(lr.update(+3.0), np.exp(-0.5))
    lr = alg.HypergradientLR(1.0, beta=0.5)
    assert np.isclose(lr.update(-1e-9), np.exp(0.5))
    lr = alg.HypergradientLR(2.0, beta=0.1, rule="multiplicative")
    assert np.isclose(lr.update(0.5), 2.0 * np.exp(-0.1 * 2.0 * 0.5))
    lr = alg.HypergradientLR(2.0, beta=0.1, rule="additive", eta_min=1e-3)
    assert np.isclose(lr.update(5.0), 1.5)
    assert np.isclose(lr.update(1e6), 1e-3)                  # clipped, stays positive
    lr = alg.HypergradientLR(1.0, beta=0.3)
    assert np.isclose(lr.update(float("nan")), np.exp(-0.3))  # diverged: smaller
    with pytest.raises(ValueError):
        alg.HypergradientLR(0.0)
    with pytest.raises(ValueError):
        alg.HypergradientLR(1.0, rule="sideways")


def test_hypergradient_lr_finds_the_minimum_of_a_quadratic():
    """Loss after a step of size eta on f(w) = w^2/2 from w = 1: (1 - eta)^2 / 2, best eta 1."""
    for eta0 in (0.01, 1.9):
        lr = alg.HypergradientLR(eta0, beta=0.3)
        etas = []
        for _ in range(80):
            etas.append(lr.update(-(1 - lr.eta)))
        # normalised steps keep a size of about beta: eta hovers around the optimum
        assert abs(np.exp(np.mean(np.log(etas[-20:]))) - 1.0) < 0.05, eta0
        assert all(0.7 < e < 1.4 for e in etas[-20:]), eta0


def test_client_weights_update():
    cw = alg.ClientWeights(5, lr=0.5)
    np.testing.assert_allclose(cw.alpha([0, 3]), [1.0, 1.0])
    for _ in range(20):
        # client 3 always raises the validation loss; the others are neutral to helpful
        cw.update([1, 3, 4], fad.clients(np.array([-1.0, 2.0, -1.0])))
    w = cw.normalized()
    # d L / d s_3 = alpha_3 d L / d alpha_3 shrinks with alpha_3: the decay slows, still < 10%
    assert w[3] < 0.1 * w[1] and np.isclose(w.mean(), 1.0)
    assert (cw.s <= 0).all() and np.isclose(cw.s[[0, 2]], 0).all()   # untouched stay at 1
    cw.update([0, 1], [np.nan, 1.0])                                  # ignored
    assert np.isclose(cw.s[0], 0)
    with pytest.raises(ValueError):
        alg.ClientWeights(3, base=[1.0, 0.0, 1.0])


# --------------------------------------------------------------------------- training loop

@pytest.fixture(scope="module")
def tiny():
    return synthetic(1, 1, num_clients=8, dim=5, num_classes=3, min_samples=10, max_samples=40,
                     seed=3)


def test_train_reuses_graphs_and_is_reproducible(tiny):
    a = alg.fedavg(alg.softmax_regression(tiny.dim, tiny.num_classes), local_steps=2,
                   client_lr=0.1)
    val, test = alg.split_server_data(tiny, 0.5, seed=0)
    runs = [alg.train(a, tiny, rounds=6, clients_per_round=3, seed=5, test=test,
                      eta=alg.HypergradientLR(0.5), weights=alg.ClientWeights(8),
                      validation=val) for _ in range(2)]
    # round_loss/hypergradient, validation_loss/weight_gradient and step: one trace each,
    # shared by every cohort (ragged client sizes) and by the second run
    assert a.num_traces == 3
    h0, h1 = runs[0].history, runs[1].history
    assert h0 == h1
    assert len(h0["eta"]) == len(h0["hypergradient"]) == 6 and h0["round"] == list(range(7))
    assert np.isfinite(h0["test_loss"]).all() and h0["test_loss"][-1] < h0["test_loss"][0]
    assert runs[0].client_weights.shape == (8,) and np.isclose(runs[0].client_weights.mean(), 1)


def test_learned_weights_downweight_noisy_clients():
    data = synthetic(0, 0, num_clients=8, dim=5, num_classes=3, min_samples=20, max_samples=80,
                     iid=True, seed=1).corrupt_labels(0.25, seed=0)
    noisy = np.zeros(8, bool)
    noisy[data.meta["noisy_clients"]] = True
    val, test = alg.split_server_data(data, 0.5, seed=0)
    a = alg.fedavg(alg.softmax_regression(data.dim, data.num_classes), local_steps=3,
                   client_lr=0.2)
    res = alg.train(a, data, rounds=25, clients_per_round=4, weights=alg.ClientWeights(8),
                    validation=val, test=test, seed=0)
    w = res.client_weights
    assert w[noisy].mean() < 0.5 * w[~noisy].mean()


def test_sample_cohort_avoids_equal_sizes():
    rng = np.random.default_rng(0)
    sizes = np.array([5, 5, 5, 5, 9])
    for _ in range(20):
        ids = alg.sample_cohort(rng, sizes, 2)
        assert len(set(ids)) == 2 and len(set(sizes[ids])) == 2
    assert len(alg.sample_cohort(rng, np.full(4, 3), 2)) == 2     # all equal: nothing to do
    with pytest.raises(ValueError):
        alg.sample_cohort(rng, sizes, 6)


def test_learned_weights_need_validation_data(tiny):
    a = alg.fedavg(alg.softmax_regression(tiny.dim, tiny.num_classes))
    with pytest.raises(ValueError, match="validation"):
        alg.train(a, tiny, rounds=1, clients_per_round=2, weights=alg.ClientWeights(8))
