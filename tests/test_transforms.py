"""The transformation toolbox: jacfwd, jacrev, hessian, has_aux, vjp argnums, num_clients,
memoized transforms and the retrace warning.

Oracles: central differences written here in NumPy, closed-form Jacobians and Hessians, and
the identities J v = jvp(v), uᵀ J = vjp(u) checked against finite differences.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fadcore as fad
from fadcore import numpy as fnp

EPS = 1e-6


def fd_jacobian(fn, w: np.ndarray) -> np.ndarray:
    """Central-difference Jacobian of a NumPy function: shape out.shape + w.shape."""
    cols = []
    for k in range(w.size):
        e = np.zeros(w.size)
        e[k] = EPS
        e = e.reshape(w.shape)
        cols.append((np.asarray(fn(w + e)) - np.asarray(fn(w - e))) / (2 * EPS))
    out = np.stack(cols, axis=-1)
    return out.reshape(np.shape(fn(w)) + w.shape)


@pytest.fixture
def data(rng):
    Xs = [rng.normal(size=(n, 3)) for n in (4, 2, 5)]
    ys = [rng.normal(size=n) for n in (4, 2, 5)]
    return rng.normal(size=3), Xs, ys


# --------------------------------------------------------------------------- a vector-valued
# federated function with a pytree output: a server vector, a server matrix and a per-client
# vector (f64[2]@CLIENTS)

def fed_vec(w, A, X):
    z = X @ fad.broadcast(w)                                # {f64[?]}@CLIENTS
    s = fad.mean(fnp.mean(fnp.tanh(z)))                     # f64[]@SERVER
    u = fad.sum(fnp.sum(z * z)) * w[:2]                     # f64[2]@SERVER
    m = fnp.sin(A * w[0]) + s                               # f64[2,2]@SERVER
    c = fnp.stack([fnp.mean(z), fnp.max(z)]) * fad.broadcast(w[1])   # f64[2]@CLIENTS
    return {"s": s, "u": u, "m": m}, c


def fed_vec_np(w, A, Xs):
    zs = [X @ w for X in Xs]
    s = np.mean([np.mean(np.tanh(z)) for z in zs])
    u = sum(np.sum(z * z) for z in zs) * w[:2]
    m = np.sin(A * w[0]) + s
    c = [np.array([np.mean(z), np.max(z)]) * w[1] for z in zs]
    return {"s": s, "u": u, "m": m}, c


@pytest.mark.parametrize("jac", ["jacfwd", "jacrev"])
def test_jacobian_of_a_pytree_output_matches_finite_differences(jac, data, rng):
    w, Xs, _ = data
    A = rng.normal(size=(2, 2))
    X = fad.clients(Xs)
    if jac == "jacrev":       # reverse mode: server outputs only (a client output would mix)
        f = lambda w, A, X: fed_vec(w, A, X)[0]      # noqa: E731
    else:
        f = fed_vec
    J = getattr(fad, jac)(f)(w, A, X)
    servers = J if jac == "jacrev" else J[0]
    for key in ("s", "u", "m"):
        want = fd_jacobian(lambda v: fed_vec_np(v, A, Xs)[0][key], w)
        assert servers[key].shape == want.shape
        np.testing.assert_allclose(servers[key], want, rtol=1e-6, atol=1e-8)
    if jac == "jacfwd":       # per-client Jacobians of the client output
        assert isinstance(J[1], fad.ClientValues) and len(J[1]) == 3
        for i in range(3):
            want = fd_jacobian(lambda v: fed_vec_np(v, A, Xs)[1][i], w)
            np.testing.assert_allclose(J[1][i], want, rtol=1e-6, atol=1e-8)


def test_jacfwd_equals_jacrev_equals_stacked_jvps_and_vjps(data, rng):
    w, Xs, _ = data
    A = rng.normal(size=(2, 2))
    X = fad.clients(Xs)

    def f(w, A, X):
        return fed_vec(w, A, X)[0]["u"]                      # f64[2]@SERVER

    Jf = fad.jacfwd(f, argnums=(0, 1))(w, A, X)
    Jr = fad.jacrev(f, argnums=(0, 1))(w, A, X)
    for a, b in zip(Jf, Jr, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # every column is a JVP, every row a VJP, and both match finite differences
    fd_w = fd_jacobian(lambda v: fed_vec_np(v, A, Xs)[0]["u"], w)
    for k in range(3):
        e = np.eye(3)[k]
        _, col = fad.jvp(f, (w, A, X), (e, None, None))
        np.testing.assert_allclose(col, fd_w[:, k], rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(Jf[0][:, k], col, rtol=1e-10, atol=1e-12)
    _, pullback = fad.vjp(f, w, A, X, argnums=(0, 1))
    for j in range(2):
        rw, rA = pullback(np.eye(2)[j])
        np.testing.assert_allclose(rw, fd_w[j], rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(Jr[0][j], rw, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(Jr[1][j], rA, rtol=1e-10, atol=1e-12)
    assert Jf[1].shape == (2, 2, 2) and np.allclose(Jf[1], 0.0)      # u does not use A


def test_jacrev_wrt_a_client_argument_is_per_client(data):
    w, Xs, _ = data

    def f(w, X):                                             # f64[2]@SERVER
        z = X @ fad.broadcast(w)
        return fnp.stack([fad.mean(fnp.sum(fnp.tanh(z))), fad.sum(fnp.sum(z * z))])

    J = fad.jacrev(f, argnums=1)(w, fad.clients(Xs))
    assert isinstance(J, fad.ClientValues)
    n = len(Xs)
    for i in range(n):
        def fi(Xi, i=i):
            zs = [X @ w for X in Xs[:i] + [Xi] + Xs[i + 1:]]
            return np.array([np.mean([np.sum(np.tanh(z)) for z in zs]),
                             sum(np.sum(z * z) for z in zs)])
        np.testing.assert_allclose(J[i], fd_jacobian(fi, Xs[i]), rtol=1e-6, atol=1e-8)


def test_jacobians_of_a_local_function_at_the_clients(rng):
    """A function that does not communicate: per-client Jacobians w.r.t. client arguments."""
    B = rng.normal(size=(2, 3))
    xs = [rng.normal(size=3) for _ in range(4)]

    def f(x):
        return fnp.tanh(x @ B.T) * x[0]

    Jf = fad.jacfwd(f)(fad.clients(xs))
    Jr = fad.jacrev(f)(fad.clients(xs))
    for i, x in enumerate(xs):
        t = np.tanh(B @ x)
        want = (1 - t * t)[:, None] * B * x[0]
        want[:, 0] += t
        np.testing.assert_allclose(Jf[i], want, rtol=1e-10)
        np.testing.assert_allclose(Jr[i], want, rtol=1e-10)


def test_hessian_is_symmetric_and_the_closed_form(data):
    """Federated logistic regression: H = mean_i X_iᵀ diag(p(1-p)) X_i / n_i."""
    w, Xs, _ = data
    ys = [(np.arange(len(X)) % 2).astype(float) for X in Xs]

    def loss(w, X, y):
        z = X @ fad.broadcast(w)
        return fad.mean(fnp.mean(fnp.logaddexp(0.0, z) - y * z))

    H = fad.hessian(loss)(w, fad.clients(Xs), fad.clients(ys))
    want = np.zeros((3, 3))
    for X in Xs:
        p = 1 / (1 + np.exp(-X @ w))
        want += X.T @ (X * (p * (1 - p))[:, None]) / len(X)
    want /= len(Xs)
    assert H.shape == (3, 3)
    np.testing.assert_allclose(H, H.T, atol=1e-14)
    np.testing.assert_allclose(H, want, rtol=1e-10)


def test_hessian_of_pytree_arguments(rng):
    """argnums=(0, 1): blocks H[i][j] of shape I_i + I_j, against a closed form."""
    a, b = rng.normal(size=2), rng.normal(size=(2, 2))

    def f(a, b):
        return fnp.sum(a * a * a) + fnp.sum(b * b) * a[0]

    H = fad.hessian(f, argnums=(0, 1))(a, b)
    np.testing.assert_allclose(H[0][0], np.diag(6 * a), rtol=1e-12)
    np.testing.assert_allclose(H[0][1], np.stack([2 * b, np.zeros((2, 2))]), rtol=1e-12)
    np.testing.assert_allclose(H[1][0], np.moveaxis(H[0][1], 0, -1), rtol=1e-12)
    np.testing.assert_allclose(H[1][1], 2 * a[0] * np.eye(4).reshape(2, 2, 2, 2), rtol=1e-12)


def test_jacobian_errors_say_what_to_do(data):
    w, Xs, _ = data
    X = fad.clients(Xs)

    def f(w, X):
        return X @ fad.broadcast(w)

    with pytest.raises(fad.DifferentiationError, match="one forward pass per client"):
        fad.jacfwd(lambda w, X: fad.mean(fnp.sum(X @ fad.broadcast(w))), argnums=1)(w, X)
    with pytest.raises(fad.DifferentiationError, match="static shape"):
        fad.jacrev(f)(w, X)          # ragged client output
    with pytest.raises(fad.DifferentiationError, match="aggregate the output"):
        fad.jacrev(lambda w, X: fnp.sum(f(w, X)))(w, X)


# --------------------------------------------------------------------------- has_aux, argnums

def _loss_aux(w, X, y):
    r = X @ fad.broadcast(w) - y
    loss = fad.mean(fnp.mean(r * r))
    return loss, {"rows": fad.sum(fnp.sum(r * 0.0 + 1.0)), "w": w * 2.0}


def _np_loss_grad(w, Xs, ys):
    loss = np.mean([np.mean((X @ w - y) ** 2) for X, y in zip(Xs, ys)])
    g = np.mean([2 * X.T @ (X @ w - y) / len(y) for X, y in zip(Xs, ys)], axis=0)
    return loss, g


@pytest.mark.parametrize("mode", ["reverse", "forward", "mixed", "auto"])
def test_has_aux_on_grad_and_value_and_grad(data, mode):
    w, Xs, ys = data
    args = (w, fad.clients(Xs), fad.clients(ys))
    loss, g = _np_loss_grad(w, Xs, ys)
    got, aux = fad.grad(_loss_aux, has_aux=True, mode=mode)(*args)
    np.testing.assert_allclose(got, g, rtol=1e-10)
    assert aux["rows"] == sum(len(y) for y in ys)
    np.testing.assert_allclose(aux["w"], 2 * w)
    (value, aux2), got2 = fad.value_and_grad(_loss_aux, has_aux=True, mode=mode)(*args)
    np.testing.assert_allclose(value, loss, rtol=1e-12)
    np.testing.assert_allclose(got2, g, rtol=1e-10)
    np.testing.assert_allclose(aux2["w"], 2 * w)


def test_has_aux_on_vjp_and_vjp_argnums(data):
    w, Xs, ys = data
    X, y = fad.clients(Xs), fad.clients(ys)
    loss, g = _np_loss_grad(w, Xs, ys)
    out, pullback, aux = fad.vjp(_loss_aux, w, X, y, has_aux=True, argnums=0)
    np.testing.assert_allclose(out, loss, rtol=1e-12)
    np.testing.assert_allclose(aux["w"], 2 * w)
    np.testing.assert_allclose(pullback(np.array(3.0)), 3 * g, rtol=1e-10)
    _, pullback2 = fad.vjp(lambda w, X, y: _loss_aux(w, X, y)[0], w, X, y, argnums=(1, 0))
    gX, gw = pullback2(np.array(1.0))
    np.testing.assert_allclose(gw, g, rtol=1e-10)
    for i, (Xi, yi) in enumerate(zip(Xs, ys)):
        want = 2 * np.outer(Xi @ w - yi, w) / len(yi) / len(Xs)
        np.testing.assert_allclose(gX[i], want, rtol=1e-10)
    with pytest.raises(fad.DifferentiationError, match="pair"):
        fad.grad(lambda w: fnp.sum(w), has_aux=True)(w)


# --------------------------------------------------------------------------- num_clients

def test_every_eager_transform_takes_num_clients():
    """Functions whose only inputs live at the server: the cohort size comes from num_clients."""
    x = np.array(1.5)

    def spread(x):
        return fad.broadcast(x) * 2.0                        # f64[]@CLIENTS

    def total(x):
        return fad.sum(fad.broadcast(x) ** 3)                # 4 x^3 with 4 clients

    out, pullback = fad.vjp(spread, x, num_clients=4)
    assert len(out) == 4 and np.allclose(out.stack(), 3.0)
    (ct,) = pullback(fad.clients(np.arange(4.0)))
    assert ct == pytest.approx(2.0 * 6.0)
    assert fad.jvp(total, (x,), (np.array(1.0),), num_clients=4)[1] == pytest.approx(12 * x * x)
    assert fad.hvp(total, (x,), (np.array(1.0),), num_clients=4)[0] == pytest.approx(24 * x)
    assert fad.grad(total)(x, num_clients=4) == pytest.approx(12 * x * x)
    assert fad.value_and_grad(total)(x, num_clients=4)[0] == pytest.approx(4 * x ** 3)
    assert fad.jacfwd(total)(x, num_clients=4) == pytest.approx(12 * x * x)
    assert fad.jacrev(total)(x, num_clients=4) == pytest.approx(12 * x * x)
    assert fad.hessian(total)(x, num_clients=4) == pytest.approx(24 * x)
    with pytest.raises(fad.CardinalityError):
        fad.vjp(spread, x)


# --------------------------------------------------------------------------- memoization

def test_a_transform_made_in_a_loop_is_derived_once(data):
    w, Xs, ys = data
    traced = []

    def loss(w, X, y):
        traced.append(1)
        return _loss_aux(w, X, y)[0]

    args = (w, fad.clients(Xs), fad.clients(ys))
    first = fad.grad(loss)(*args)
    for _ in range(5):
        np.testing.assert_allclose(fad.grad(loss)(*args), first)
        fad.value_and_grad(loss)(*args)
        fad.jacrev(loss)(*args)
    assert len(traced) == 1
    assert fad.grad(loss) is fad.grad(loss)
    assert fad.grad(loss) is not fad.grad(loss, mode="forward")
    assert fad.grad(loss, argnums=(0,)) is not fad.grad(loss)


def test_bound_methods_are_not_shared_between_objects():
    class Model:
        def __init__(self, scale):
            self.scale = scale

        def loss(self, w):
            return fnp.sum(w * w) * self.scale

    w = np.array([1.0, 2.0])
    np.testing.assert_allclose(fad.grad(Model(1.0).loss)(w), 2 * w)
    np.testing.assert_allclose(fad.grad(Model(3.0).loss)(w), 6 * w)


def test_retracing_warns_once_with_the_cause():
    @fad.trace
    def f(X):
        return fad.mean(fnp.sum(X))

    with pytest.warns(fad.RetraceWarning, match="ragged=True") as record:
        for rows in range(1, 9):
            f(fad.clients(np.ones((2, rows))))
    assert len([r for r in record if issubclass(r.category, fad.RetraceWarning)]) == 1

    @fad.trace
    def g(x):
        return x * 2.0

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(10):
            g(np.ones(3))                    # one signature: no warning
    with pytest.warns(fad.RetraceWarning, match="int then a float"):
        for k in range(3):
            g(np.ones(k + 1))
            g(np.ones(k + 1, dtype=np.int64))


# --------------------------------------------------------------------------- forward mode and
# client arguments

def test_forward_grad_wrt_client_arguments_of_a_local_function(rng):
    a = np.array([0.5, -1.0, 2.0])
    xs = rng.normal(size=(3, 4))

    def f(a, x):                       # applied at the clients: one scalar per client
        return fnp.sum(fnp.tanh(x * a))

    args = (fad.clients(a), fad.clients(xs))
    got = fad.grad(f, mode="forward")(*args)
    want = [np.sum(x * (1 - np.tanh(x * ai) ** 2)) for ai, x in zip(a, xs)]
    np.testing.assert_allclose(got.stack(), want, rtol=1e-12)
    np.testing.assert_allclose(fad.grad(f)(*args).stack(), want, rtol=1e-12)
    J = fad.jacfwd(lambda a, x: fnp.tanh(x * a), argnums=0)(*args)     # {f64[4]}@CLIENTS
    for i in range(3):
        np.testing.assert_allclose(J[i], xs[i] * (1 - np.tanh(xs[i] * a[i]) ** 2), rtol=1e-12)


def test_forward_grad_wrt_a_client_argument_of_a_communicating_function_explains(rng):
    def f(a, x):
        return fad.mean(fnp.sum(fnp.tanh(x * a)))

    with pytest.raises(fad.DifferentiationError, match="one direction per client"):
        fad.grad(f, mode="forward")(fad.clients(np.ones(3)), fad.clients(np.ones((3, 2))))
