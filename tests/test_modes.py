"""Derivative passes: every primitive's rules, closure, nesting, FedAvg hypergradients, errors.

Oracles: central differences (``fad.check_grads``), NumPy reimplementations, closed forms.
"""

from __future__ import annotations

import numpy as np
import pytest

import fadcore as fad
from fadcore import core, ops
from fadcore import numpy as fnp

ALL_MODES = ("forward", "reverse", "mixed", "auto")


def ragged(rng, sizes=(3, 5, 2), d=3):
    X = fad.clients([rng.normal(size=(n, d)) for n in sizes])
    lab = fad.clients([rng.integers(0, d, size=n) for n in sizes])
    return X, lab


# --------------------------------------------------------------------------- the rule table
# One entry per primitive: a client-side use of it inside f(w, X, lab) -> scalar at SERVER,
# on ragged clients. `smooth` entries are also checked at order 2. The test below enumerates
# the primitive registry, so a new primitive cannot skip this table.

def _h(w, X):
    """A smooth client value with rows: shape [?, 3], values in (-1, 1)."""
    return fnp.tanh(X @ fad.broadcast(w))


def _pos(w, X):
    return fnp.exp(0.5 * _h(w, X)) + 0.5          # in (1.1, 2.2): safe for log, sqrt, pow


def _out(z):
    return fad.mean(fnp.sum(z))


RULES = {
    "neg": lambda w, X, lab: _out(-_h(w, X)),
    "exp": lambda w, X, lab: _out(fnp.exp(_h(w, X))),
    "log": lambda w, X, lab: _out(fnp.log(_pos(w, X))),
    "log1p": lambda w, X, lab: _out(fnp.log1p(_pos(w, X))),
    "expm1": lambda w, X, lab: _out(fnp.expm1(_h(w, X))),
    "sqrt": lambda w, X, lab: _out(fnp.sqrt(_pos(w, X))),
    "tanh": lambda w, X, lab: _out(fnp.tanh(_h(w, X) * 2.0)),
    "logistic": lambda w, X, lab: _out(fnp.sigmoid(_h(w, X) * 3.0)),
    "sin": lambda w, X, lab: _out(fnp.sin(_h(w, X) * 2.0)),
    "cos": lambda w, X, lab: _out(fnp.cos(_h(w, X) * 2.0)),
    "sign": lambda w, X, lab: _out(fnp.sign(_h(w, X)) * _h(w, X)),
    "abs": lambda w, X, lab: _out(fnp.abs(_h(w, X) + 0.05)),
    "add": lambda w, X, lab: _out(_h(w, X) + _h(w, X) * _h(w, X)),
    "sub": lambda w, X, lab: _out(_h(w, X) - fnp.exp(_h(w, X))),
    "mul": lambda w, X, lab: _out(_h(w, X) * fnp.exp(_h(w, X))),
    "div": lambda w, X, lab: _out(_h(w, X) / _pos(w, X)),
    "pow": lambda w, X, lab: _out(_pos(w, X) ** _pos(w, X) + _pos(w, X) ** 3),
    "max": lambda w, X, lab: _out(fnp.maximum(_h(w, X), fnp.sin(_h(w, X) * 3) * 0.9)),
    "min": lambda w, X, lab: _out(fnp.minimum(_h(w, X), fnp.sin(_h(w, X) * 3) * 0.9)),
    "logaddexp": lambda w, X, lab: _out(fnp.logaddexp(_h(w, X), 2.0 * _h(w, X))),
    "lt": lambda w, X, lab: _out(fnp.where(_h(w, X) < 0.1, _h(w, X), 2 * _h(w, X))),
    "le": lambda w, X, lab: _out(fnp.where(_h(w, X) <= 0.1, _h(w, X), 2 * _h(w, X))),
    "gt": lambda w, X, lab: _out(fnp.where(_h(w, X) > 0.1, _h(w, X), 2 * _h(w, X))),
    "ge": lambda w, X, lab: _out(fnp.where(_h(w, X) >= 0.1, _h(w, X), 2 * _h(w, X))),
    "eq": lambda w, X, lab: _out(fnp.where(lab == 1, _h(w, X)[:, 0], 3 * _h(w, X)[:, 1])),
    "ne": lambda w, X, lab: _out(fnp.where(lab != 1, _h(w, X)[:, 0], 3 * _h(w, X)[:, 1])),
    "select": lambda w, X, lab: _out(fnp.where(_h(w, X) > 0, _h(w, X) ** 2, fnp.exp(_h(w, X)))),
    "convert": lambda w, X, lab: _out(fnp.astype(fnp.astype(_h(w, X), fnp.float32),
                                                 fnp.float64) * 0 + _h(w, X)),
    # logsumexp subtracts stop_gradient(max): the value, hence finite differences, see no stop
    "stop_gradient": lambda w, X, lab: _out(fnp.logsumexp(2 * _h(w, X), axis=1)),
    "zeros_like": lambda w, X, lab: _out(fnp.ones_like(_h(w, X)) * _h(w, X)),
    "reduce_sum": lambda w, X, lab: fad.mean(fnp.sum(fnp.sum(_h(w, X), axis=0) ** 2)),
    "reduce_max": lambda w, X, lab: fad.mean(fnp.sum(fnp.max(_h(w, X), axis=1))),
    "argmax": lambda w, X, lab: _out(fnp.take_along_axis(
        _h(w, X), fnp.expand_dims(fnp.argmax(_h(w, X), axis=1), 1), 1)),
    "broadcast_in_dim": lambda w, X, lab: _out(_h(w, X) * fnp.mean(_h(w, X), axis=0)),
    "reshape": lambda w, X, lab: _out(fnp.reshape(_h(w, X), (-1, 3, 1)) ** 2),
    "transpose": lambda w, X, lab: fad.mean(fnp.sum((fnp.transpose(_h(w, X)) @ X) ** 2)),
    "matmul": lambda w, X, lab: fad.mean(fnp.sum((X @ fnp.reshape(fad.broadcast(w), (3, 3))) ** 2)),
    "matvec": lambda w, X, lab: _out(fnp.tanh(X @ fad.broadcast(w)[0])),
    "vecmat": lambda w, X, lab: fad.mean(fnp.sum(fnp.tanh(fad.broadcast(w)[0] @ fad.broadcast(w)))),
    "vdot": lambda w, X, lab: fad.mean(fnp.dot(fad.broadcast(w)[0], fad.broadcast(w)[1]) * fnp.sum(X)),
    "outer": lambda w, X, lab: fad.mean(fnp.sum(fnp.tanh(fnp.outer(fad.broadcast(w)[0], fnp.mean(_h(w, X), axis=0))))),
    "slice": lambda w, X, lab: _out(_h(w, X)[:, 1:3] * _h(w, X)[:, ::2]),
    "pad": lambda w, X, lab: _out(ops.pad(_h(w, X), (None, 5), (0, 1), (None, 4), (1, 1)) ** 2),
    "concatenate": lambda w, X, lab: _out(fnp.concatenate([_h(w, X), _h(w, X) ** 2], axis=1)),
    "take": lambda w, X, lab: _out(fnp.take(_h(w, X), np.array([2, 0, 2]), axis=1) ** 2),
    "untake": lambda w, X, lab: _out(ops.untake(_h(w, X), np.array([4, 0, 4]), 1, 5) ** 2),
    "take_along_axis": lambda w, X, lab: _out(fad.nn.softmax_cross_entropy(_h(w, X) * 2, lab)),
    "untake_along_axis": lambda w, X, lab: _out(ops.untake_along_axis(
        _h(w, X)[:, :1], fnp.expand_dims(lab, 1), 1, 4) ** 2),
    "one_hot": lambda w, X, lab: _out(fnp.one_hot(lab, 3) * fnp.log_softmax(_h(w, X))),
    "rows": lambda w, X, lab: fad.mean(fnp.mean(_h(w, X) ** 2)),
    "broadcast": lambda w, X, lab: _out(_h(w, X)),
    "sum": lambda w, X, lab: fnp.sum(fnp.tanh(fad.sum(fnp.mean(_h(w, X), axis=0)))),
    "mean": lambda w, X, lab: fnp.log1p(fnp.sum(fad.mean(fnp.mean(_h(w, X), axis=0)) ** 2)),
    "secure_sum": lambda w, X, lab: fnp.sum(fad.secure_sum(fnp.sum(_h(w, X), axis=0)) ** 2),
    "weighted_mean": lambda w, X, lab: fnp.sum(fad.weighted_mean(
        fnp.mean(_h(w, X), axis=0), fnp.sum(_pos(w, X)) / 10) ** 2),
    "num_clients": lambda w, X, lab: fad.sum(fnp.sum(_h(w, X))) / fad.num_clients(),
    "after": lambda w, X, lab: _out(ops.after(_h(w, X), fad.broadcast(w)[0])),
    # two local steps in a loop carrying (model, per-row state); the index scales the step
    "loop": lambda w, X, lab: _out(fad.fori_loop(0, 2, lambda i, c: (
        c[0] * 0.9 + 0.1 * fnp.transpose(fnp.tanh(X @ c[0])) @ X * fnp.astype(i + 1, fnp.float64),
        c[1] + fnp.sum(fnp.tanh(X @ c[0]))), (fad.broadcast(w), fnp.sum(X) * 0.0))[0]),
}

NOT_SMOOTH = {"abs", "max", "min", "sign", "lt", "le", "gt", "ge", "eq", "ne", "select",
              "reduce_max", "argmax", "sqrt", "pow", "convert"}


def test_rule_table_covers_every_primitive():
    missing = sorted(set(core.primitives) - set(RULES))
    assert not missing, f"primitives without an entry in the rule table: {missing}"


@pytest.mark.parametrize("name", sorted(RULES))
def test_primitive_rules(name, rng):
    X, lab = ragged(rng)
    w = rng.normal(size=(3, 3)) * 0.7
    body = RULES[name]

    @fad.trace(name=f"uses_{name}")
    def f(w, X, lab):
        return body(w, X, lab)

    g = f.graph(w, X, lab)
    assert core.primitives[name] and (name in g.primitives() or _in_derivatives(f, w, X, lab, name)), \
        f"the program for {name} does not use it"
    fad.check_grads(f, (w, X, lab), order=1, modes=ALL_MODES, fixed={1})
    if name not in NOT_SMOOTH:
        fad.check_grads(f, (w, X, lab), order=2, modes=("forward", "reverse"), fixed={1})
    # mixed and auto agree with reverse to 1e-10
    ref = fad.grad(f)(w, X, lab)
    for mode in ("mixed", "auto"):
        np.testing.assert_allclose(fad.grad(f, mode=mode)(w, X, lab), ref, rtol=1e-10, atol=1e-12)


def _in_derivatives(f, w, X, lab, name):
    return name in fad.grad(f).graph(w, X, lab).primitives()


# --------------------------------------------------------------------------- closure

@pytest.mark.parametrize("mode,state", [(m, s) for m in ALL_MODES for s in ("stateful", "remat")
                                         if not (m == "forward" and s == "remat")])
def test_secure_sum_only_program_has_secure_sum_only_derivatives(mode, state, rng):
    from fadcore.examples import example_args_secure_mse, secure_mse
    args = example_args_secure_mse()
    g = fad.grad(secure_mse, mode=mode, state=state).graph(*args)
    g.verify()
    fed = {p for p in g.primitives() if core.primitives[p].kind == "federated"}
    assert fed <= {"broadcast", "secure_sum", "num_clients", "after"}, fed
    assert "secure_sum" in fed
    assert fad.audit(g, fad.Policy(aggregation="secure_sum")) == []
    w, X, y = args
    ref = np.mean([2 * x.T @ (x @ w - t) / len(t) for x, t in zip(X, y)], axis=0)
    np.testing.assert_allclose(fad.grad(secure_mse, mode=mode, state=state)(*args), ref,
                               rtol=1e-12)


def test_jvp_of_secure_program_is_secure(rng):
    from fadcore.examples import example_args_secure_mse, secure_mse
    w, X, y = example_args_secure_mse()
    g = fad.jvp(secure_mse).graph((w, X, y), (w, None, None))
    assert set(g.primitives()) & {"sum", "mean", "weighted_mean"} == set()


def test_policy_rejects_plain_aggregation():
    from fadcore.examples import example_args_fed_mse, fed_mse
    with pytest.raises(fad.ClosureError, match="already aggregates with mean"):
        fad.grad(fed_mse, policy=fad.Policy(aggregation="secure_sum")).graph(
            *example_args_fed_mse())
    g = fad.grad(fed_mse).graph(*example_args_fed_mse())
    bad = fad.audit(g, fad.Policy(aggregation="secure_sum"))
    assert len(bad) == 2 and all("forbids" in b for b in bad)      # the mean and the sum


# --------------------------------------------------------------------------- FedAvg with K local steps

def _np_fedavg_loss(eta, alpha, w, Xs, ys, K, lr):
    def grad_i(v, X, y):
        return X.T @ (1 / (1 + np.exp(-(X @ v))) - y) / len(y)

    def loss_i(v, X, y):
        z = X @ v
        return np.mean(np.logaddexp(0, z) - y * z)

    deltas = []
    for X, y in zip(Xs, ys):
        v = w.copy()
        for _ in range(K):
            v = v - lr * grad_i(v, X, y)
        deltas.append(w - v)
    w_new = w - eta * np.average(deltas, axis=0, weights=alpha)
    return np.mean([loss_i(w_new, X, y) for X, y in zip(Xs, ys)])


def _fedavg(K, lr):
    from fadcore.examples import make_fedavg_round
    return make_fedavg_round(K, lr)


def _fedavg_data(rng, sizes=(4, 7, 3, 5), d=3):
    Xs = [rng.normal(size=(n, d)) for n in sizes]
    ys = [(rng.random(n) < 0.5).astype(float) for n in sizes]
    alpha = rng.random(len(sizes)) + 0.5
    return np.float64(0.8), alpha, rng.normal(size=d), Xs, ys


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("mode", ["forward", "reverse", "mixed", "auto"])
def test_fedavg_hypergradients_match_finite_differences(K, mode, rng):
    lr = 0.2
    eta, alpha, w, Xs, ys = _fedavg_data(rng)
    f = _fedavg(K, lr)
    args = (eta, fad.clients(alpha), w, fad.clients(Xs), fad.clients(ys))
    h = 1e-6
    fd_eta = (_np_fedavg_loss(eta + h, alpha, w, Xs, ys, K, lr)
              - _np_fedavg_loss(eta - h, alpha, w, Xs, ys, K, lr)) / (2 * h)
    fd_alpha = np.array([
        (_np_fedavg_loss(eta, alpha + h * e, w, Xs, ys, K, lr)
         - _np_fedavg_loss(eta, alpha - h * e, w, Xs, ys, K, lr)) / (2 * h)
        for e in np.eye(len(alpha))])
    if mode == "forward":
        d_eta = fad.grad(f, argnums=0, mode="forward")(*args)
        np.testing.assert_allclose(d_eta, fd_eta, rtol=1e-6, atol=1e-9)
        with pytest.raises(fad.DifferentiationError, match="per-client gradients"):
            fad.grad(f, argnums=1, mode="forward")(*args)
        return
    d_eta, d_alpha = fad.grad(f, argnums=(0, 1), mode=mode)(*args)
    assert isinstance(d_alpha, fad.ClientValues) and len(d_alpha) == len(alpha)
    np.testing.assert_allclose(d_eta, fd_eta, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.array(d_alpha.tolist()), fd_alpha, rtol=1e-5, atol=1e-9)


def test_fedavg_k1_closed_form(rng):
    """K = 1: Δ_i = lr ∇L_i(w), w' = w - η Σα_iΔ_i/Σα;
    dL/dη = -∇L(w')·Δ̄,  dL/dα_j = -η ∇L(w')·(Δ_j - Δ̄)/Σα."""
    lr = 0.3
    eta, alpha, w, Xs, ys = _fedavg_data(rng)

    def g(v, X, y):
        return X.T @ (1 / (1 + np.exp(-(X @ v))) - y) / len(y)

    deltas = np.array([lr * g(w, X, y) for X, y in zip(Xs, ys)])
    dbar = alpha @ deltas / alpha.sum()
    w_new = w - eta * dbar
    gL = np.mean([g(w_new, X, y) for X, y in zip(Xs, ys)], axis=0)
    want_eta = -gL @ dbar
    want_alpha = -eta * (deltas - dbar) @ gL / alpha.sum()
    f = _fedavg(1, lr)
    for mode in ("reverse", "mixed"):
        d_eta, d_alpha = fad.grad(f, argnums=(0, 1), mode=mode)(
            eta, fad.clients(alpha), w, fad.clients(Xs), fad.clients(ys))
        np.testing.assert_allclose(d_eta, want_eta, rtol=1e-12)
        np.testing.assert_allclose(np.array(d_alpha.tolist()), want_alpha, rtol=1e-10)


def test_grad_of_grad_through_local_sgd(rng):
    eta, alpha, w, Xs, ys = _fedavg_data(rng)
    f = _fedavg(2, 0.2)
    args = (eta, fad.clients(alpha), w, fad.clients(Xs), fad.clients(ys))
    fad.check_grads(f, args, order=2, modes=("forward", "reverse"), fixed={1, 3, 4})


# --------------------------------------------------------------------------- vjp, jvp, hvp

def test_vjp_and_jvp_with_client_outputs(rng):
    X, _ = ragged(rng)

    @fad.trace
    def f(w, X):
        return X @ fad.broadcast(w), fad.sum(fnp.sum(X, axis=0)) * w

    w = rng.normal(size=3)
    out, pullback = fad.vjp(f, w, X)
    u = (fad.clients([rng.normal(size=len(x)) for x in X]), rng.normal(size=3))
    ct_w, ct_X = pullback(u)
    S = np.sum([x.sum(0) for x in X], axis=0)
    want_w = sum(x.T @ ui for x, ui in zip(X, u[0])) + S * u[1]
    np.testing.assert_allclose(ct_w, want_w, rtol=1e-12)
    for x, ui, c in zip(X, u[0], ct_X):
        np.testing.assert_allclose(c, np.outer(ui, w) + np.outer(np.ones(len(x)), w * u[1]),
                                   rtol=1e-12)
    _, (t0, t1) = fad.jvp(f, (w, X), (np.ones(3), None))
    for x, t in zip(X, t0):
        np.testing.assert_allclose(t, x.sum(1), rtol=1e-12)
    np.testing.assert_allclose(t1, S, rtol=1e-12)


def test_hvp_closed_form(rng):
    """f(w) = mean_i mean_rows (X_i w - y_i)^2 has Hessian mean_i 2 X_iᵀX_i / n_i."""
    from fadcore.examples import example_args_fed_mse, fed_mse
    w, X, y = example_args_fed_mse()
    v = rng.normal(size=3)
    H = np.mean([2 * x.T @ x / len(x) for x in X], axis=0)
    hv, hx, hy = fad.hvp(fed_mse, (w, X, y), (v, None, None))
    assert hx is None and hy is None
    np.testing.assert_allclose(hv, H @ v, rtol=1e-12)


def test_value_and_grad_pytree_arguments(rng):
    X, lab = ragged(rng)

    @fad.trace
    def f(params, X, lab):
        logits = X @ fad.broadcast(params["W"]) + fad.broadcast(params["b"])
        return fad.mean(fnp.mean(fad.nn.softmax_cross_entropy(logits, lab)))

    params = {"W": rng.normal(size=(3, 3)), "b": rng.normal(size=3)}
    val, g = fad.value_and_grad(f)(params, X, lab)
    assert set(g) == {"W", "b"} and g["W"].shape == (3, 3)

    def np_loss(W, b):
        out = []
        for x, l in zip(X, lab):
            z = x @ W + b
            lse = np.log(np.exp(z).sum(1))
            out.append(np.mean(lse - z[np.arange(len(l)), l]))
        return np.mean(out)

    np.testing.assert_allclose(val, np_loss(params["W"], params["b"]), rtol=1e-12)
    h = 1e-6
    fd_b = [(np_loss(params["W"], params["b"] + h * e) - np_loss(params["W"], params["b"] - h * e))
            / (2 * h) for e in np.eye(3)]
    np.testing.assert_allclose(g["b"], fd_b, rtol=1e-6)


# --------------------------------------------------------------------------- errors

def test_grad_wrt_integer_input_is_an_error(rng):
    X, lab = ragged(rng)

    @fad.trace
    def f(w, X, lab):
        return fad.mean(fnp.mean(fad.nn.softmax_cross_entropy(X @ fad.broadcast(w), lab)))

    with pytest.raises(fad.DifferentiationError, match="integer and bool inputs"):
        fad.grad(f, argnums=2)(rng.normal(size=(3, 3)), X, lab)


def test_grad_of_non_scalar_output_is_an_error(rng):
    X, _ = ragged(rng)

    @fad.trace
    def f(w, X):
        return fad.sum(fnp.sum(X @ fad.broadcast(w), axis=0, keepdims=True))

    with pytest.raises(fad.DifferentiationError, match="float scalar at SERVER"):
        fad.grad(f)(np.ones(3), X)

    @fad.trace
    def g(w, X):
        return fnp.sum(X @ fad.broadcast(w))

    with pytest.raises(fad.DifferentiationError, match="communicates"):
        fad.grad(g)(np.ones(3), X)


def test_missing_rule_names_primitive_and_mode(rng):
    from fadcore.core import Primitive, impl_rules
    name = "test_only_cube"
    p = core.primitives.get(name) or Primitive(name, shape_rule=lambda x: x)
    impl_rules[p] = lambda x: x ** 3

    @fad.trace
    def f(w):
        return fnp.sum(p.bind(w))

    with pytest.raises(fad.DifferentiationError,
                       match=r"JVP rule for primitive 'test_only_cube' not implemented.*forward"):
        fad.grad(f, mode="forward")(np.ones(2))
    with pytest.raises(fad.DifferentiationError, match="test_only_cube"):
        fad.grad(f)(np.ones(2))
    del core.primitives[name]


def test_derivative_graphs_verify_and_round_trip(rng):
    from fadcore.examples import example_args_fedavg_round, fedavg_round
    args = example_args_fedavg_round()
    for mode in ("reverse", "mixed", "auto"):
        for state in ("stateful", "remat"):
            g = fad.grad(fedavg_round, argnums=(0, 1), mode=mode, state=state).graph(*args)
            g.verify()
            if hasattr(g, "to_json"):
                try:
                    g2 = fad.Graph.from_json(g.to_json())
                except ImportError:
                    continue
                assert str(g2) == str(g)
                np.testing.assert_allclose(fad.run(g2, *args, backend="reference")[0],
                                           fad.run(g, *args, backend="reference")[0], rtol=0)


# --------------------------------------------------------------------------- float32, grad of grad

@pytest.mark.parametrize("mode", ALL_MODES)
def test_float32_gradients_in_every_mode(mode, rng):
    """Rules use Python constants (2.0, 1/n...): they must take float32 operands' dtype."""
    sizes = (3, 5)
    X64 = [rng.normal(size=(n, 3)) for n in sizes]
    y64 = [rng.normal(size=n) for n in sizes]
    lab = fad.clients([rng.integers(0, 3, size=n) for n in sizes])

    @fad.trace
    def f(w, X, y, lab):
        r = X @ fad.broadcast(w) - y
        z = X * fad.broadcast(w)
        return (fad.mean(fnp.mean(fnp.tanh(r) * r))
                + fad.mean(fnp.mean(fad.nn.softmax_cross_entropy(z, lab)))
                + fad.weighted_mean(fnp.max(z), fnp.sum(fnp.exp(z))))

    w = np.array([0.5, -1.0, 0.25])
    ref = fad.grad(f)(w, fad.clients(X64), fad.clients(y64), lab)
    g = fad.grad(f, mode=mode)(w.astype(np.float32), fad.clients([x.astype(np.float32) for x in X64]),
                               fad.clients([x.astype(np.float32) for x in y64]), lab)
    assert g.dtype == np.float32
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)


def test_grad_of_grad_scalar_closed_form(rng):
    """s(x) = mean_i sum tanh(x X_i); s''(x) = mean_i sum -2 tanh(x a)(1 - tanh²(x a)) a²."""
    X = [rng.normal(size=(n, 2)) for n in (3, 5)]

    @fad.trace
    def s(x, X):
        return fad.mean(fnp.sum(fnp.tanh(X * fad.broadcast(x))))

    x = np.float64(0.3)
    want = np.mean([np.sum(-2 * np.tanh(a * x) * (1 - np.tanh(a * x) ** 2) * a * a) for a in X])
    for mode in ("reverse", "mixed", "forward"):
        got = fad.grad(fad.grad(s, mode=mode), mode=mode)(x, fad.clients(X))
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_federated_primitives_map_over_pytrees(rng):
    X, _ = ragged(rng)
    params = {"W": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}
    alpha = fad.clients(rng.random(len(X)) + 0.5)

    @fad.trace
    def f(p, X, alpha):
        pc = fad.broadcast(p)
        h = {"z": fnp.mean(X @ pc["W"] + pc["b"], axis=0), "s": fnp.sum(X)}
        m, ws, s = fad.mean(h), fad.weighted_mean(h, alpha), fad.secure_sum(h)
        return fnp.sum(m["z"]) + fnp.sum(ws["z"] * ws["s"]) + s["s"] + fnp.sum(fad.sum(h)["z"])

    a = np.array(alpha.tolist())
    z = [x.mean(0) @ params["W"] + params["b"] for x in X]
    sx = [x.sum() for x in X]
    want = (np.sum(np.mean(z, 0)) + np.sum((a @ np.array(z) / a.sum()) * (a @ sx / a.sum()))
            + np.sum(sx) + np.sum(np.sum(z, 0)))
    np.testing.assert_allclose(f(params, X, alpha), want, rtol=1e-12)
    g = fad.grad(f)(params, X, alpha)
    # d/db: 1 (mean) + the weighted mean of sum(X) (the product term) + n (the sum)
    np.testing.assert_allclose(g["b"], np.full(2, 1 + a @ sx / a.sum() + len(X)), rtol=1e-12)
