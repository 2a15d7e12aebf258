"""A newcomer's first hour (issue 18, items 9 and 10): the common mistakes answered with a typed
error naming what to do and the user's own line; NumPy functions on traced values; the NumPy
functions fadcore.numpy adds (checked against NumPy and against finite differences); row counts
inside a trace; client-value selection; pytree utilities."""

from __future__ import annotations

import os

import numpy as np
import pytest

import fadcore as fad
from fadcore import numpy as fnp

HERE = os.path.basename(__file__)


@pytest.fixture
def data(ragged):
    rows = [4, 2, 5]
    X = fad.clients(ragged(rows, 3))
    y = fad.clients(ragged(rows))
    labels = fad.clients(ragged(rows, dtype=np.int64, high=3))
    return np.ones(3) * 0.5, X, y, labels


# --------------------------------------------------------------------------- common mistakes

def _line_of(f) -> int:
    return f.__code__.co_firstlineno


def _mistakes(w, X, y, labels):
    """(what, callable made on ONE line, expected error type). The error must name that line."""
    fmean_bad = lambda: fad.trace(lambda w: fad.mean(w))(w)  # noqa: E731
    return [
        ("plain list for client data",
         lambda: fad.trace(lambda w, X: fad.mean(fnp.mean(X @ fad.broadcast(w))))(w, X.tolist()),
         fad.DTypeError, "fad.clients"),
        ("equal-size plain list",
         lambda: fad.trace(lambda w, X: fad.mean(fnp.sum(X @ fad.broadcast(w))))(w, [np.ones((2, 3))] * 2),
         fad.DTypeError, "fad.clients"),
        ("fad.mean of a server value", fmean_bad, fad.PlacementError, "fad.broadcast"),
        ("fad.sum of ragged rows", lambda: fad.trace(lambda X: fad.sum(X))(X), fad.ShapeError,
         "fnp.mean(x, axis=0)"),
        ("fad.broadcast of a client value", lambda: fad.trace(lambda X: fad.broadcast(X))(X),
         fad.PlacementError, "aggregate"),
        ("X[0] on ragged rows", lambda: fad.trace(lambda X: fad.mean(fnp.sum(X[0])))(X),
         fad.ShapeError, "ragged"),
        ("reshape", lambda: fad.trace(lambda w: fnp.reshape(w, (2, 2)))(w), fad.ShapeError,
         "reshape"),
        ("axis out of range", lambda: fad.trace(lambda w: fnp.sum(w, axis=3))(w),
         fad.ShapeError, "sum: axis 3"),
        ("float axis", lambda: fad.trace(lambda w: fnp.mean(w, axis=0.0))(w), fad.ShapeError,
         "axis must be an int"),
        ("float labels",
         lambda: fad.trace(lambda X, y: fad.mean(fnp.mean(fad.nn.softmax_cross_entropy(X, y))))(X, y),
         fad.DTypeError, "integer"),
        ("float take indices", lambda: fad.trace(lambda X, y: fnp.take(X, y, axis=1))(X, y),
         fad.DTypeError, "astype"),
        ("boolean mask", lambda: fad.trace(lambda w: fnp.sum(w[w > 0]))(w), fad.DTypeError,
         "fnp.where(mask, x, 0)"),
        ("boolean mask on clients", lambda: fad.trace(lambda y: fad.sum(fnp.sum(y[y > 0])))(y),
         fad.DTypeError, "fnp.where"),
        ("num_clients=2.5", lambda: fad.trace(lambda w: fad.sum(fad.broadcast(w)))(w, num_clients=2.5),
         fad.CardinalityError, "positive int"),
        ("num_clients=0", lambda: fad.trace(lambda w: fad.sum(fad.broadcast(w)))(w, num_clients=0),
         fad.CardinalityError, "positive int"),
        ("bad mode", lambda: fad.grad(lambda w: fnp.sum(w * w), mode="revers")(w),
         fad.OptionError, "'reverse'"),
        ("bad state", lambda: fad.grad(lambda w: fnp.sum(w * w), state="rematt")(w),
         fad.OptionError, "'remat'"),
        ("bad policy value", lambda: fad.Policy(aggregation="secure"), fad.OptionError,
         "'secure_sum'"),
        ("policy as a string", lambda: fad.grad(lambda w: fnp.sum(w), policy="secure_sum")(w),
         fad.OptionError, "fad.Policy"),
        ("bad vjp mode", lambda: fad.vjp(lambda w: w * 2, w, mode="backward"), fad.OptionError,
         "mode"),
        ("np.arctan on a tracer", lambda: fad.trace(lambda w: np.arctan(w))(w),
         fad.TracingError, "no equivalent"),
        ("np.add.reduce on a tracer", lambda: fad.trace(lambda w: np.add.reduce(w))(w),
         fad.TracingError, "fadcore.numpy.sum"),
        ("np.mean with out=", lambda: fad.trace(lambda w: np.mean(w, out=np.zeros(())))(w),
         fad.TracingError, "out"),
        ("np.argmax without axis on 2-d",
         lambda: fad.trace(lambda X: np.argmax(X))(X), fad.TracingError, "axis="),
        ("np.linalg.inv", lambda: fad.trace(lambda w: np.linalg.inv(w))(w), fad.TracingError,
         "np.linalg.inv"),
        ("np.where with one argument", lambda: fad.trace(lambda w: np.where(w > 0))(w),
         fad.TracingError, "takes (cond, x, y)"),
        ("len of ragged rows", lambda: fad.trace(lambda X: fad.sum(len(X) * fnp.sum(X)))(X),
         fad.TracingError, "fnp.rows(x)"),
        ("Python if on a traced value",
         lambda: fad.trace(lambda w: w if fnp.sum(w) > 0 else -w)(w), fad.TracingError,
         "where"),
        ("rows of server data", lambda: fad.trace(lambda w: fnp.rows(w))(w), fad.ShapeError,
         "no ragged dimension"),
        ("cumsum over ragged rows", lambda: fad.trace(lambda X: fnp.cumsum(X, axis=0))(X),
         fad.ShapeError, "static length"),
        ("sort over ragged rows", lambda: fad.trace(lambda y: fnp.sort(y))(y), fad.ShapeError,
         "static length"),
        ("einsum diagonal", lambda: fad.trace(lambda w: fnp.einsum("ii->i", fnp.outer(w, w)))(w),
         fad.ShapeError, "distinct letter"),
        ("arange of a traced bound", lambda: fad.trace(lambda w: fnp.arange(w[0]))(w),
         fad.TracingError, "Python numbers"),
        ("weighted_mean with a server weight",
         lambda: fad.trace(lambda w, X: fad.weighted_mean(fnp.sum(X, axis=0), w[0]))(w, X),
         fad.PlacementError, "broadcast"),
        ("mixing placements", lambda: fad.trace(lambda w, X: fad.mean(fnp.sum(X * w)))(w, X),
         fad.PlacementError, "fad.broadcast"),
        ("grad of a vector", lambda: fad.grad(lambda w: w * 2)(w), fad.DifferentiationError,
         "fnp.sum"),
        ("grad w.r.t. an integer", lambda: fad.grad(lambda a, w: fnp.sum(w))(np.arange(3), w),
         fad.DifferentiationError, "argnums"),
        ("argnums out of range", lambda: fad.grad(lambda w: fnp.sum(w), argnums=3)(w),
         fad.DifferentiationError, "out of range"),
        ("forward mode per client",
         lambda: fad.grad(lambda w, y: fad.mean(fnp.mean(y * fad.broadcast(w)[0])), argnums=1, mode="forward")(w, y),
         fad.DifferentiationError, "mode='reverse'"),
        ("a policy the primal breaks",
         lambda: fad.grad(lambda w, y: fad.mean(fnp.mean(y * fad.broadcast(w)[0])), policy=fad.Policy("secure_sum"))(w, y),
         fad.ClosureError, "secure_sum"),
        ("client arguments of different cohorts",
         lambda: fad.trace(lambda X, y: fad.mean(fnp.sum(X)) + fad.mean(fnp.sum(y)))(X, y[[0, 1]]),
         fad.CardinalityError, "has 2 clients but argument 0 has 3"),
    ]


def test_common_mistakes_are_typed_and_name_the_line(data):
    w, X, y, labels = data
    cases = _mistakes(w, X, y, labels)
    assert len(cases) >= 30
    for what, f, etype, hint in cases:
        with pytest.raises(etype) as e:
            f()
        msg = str(e.value)
        assert f"{HERE}:{_line_of(f)}" in msg, f"{what}: no user line in {msg!r}"
        assert hint in msg, f"{what}: {hint!r} not in {msg!r}"


def test_the_same_mistake_inside_a_nested_grad_names_the_inner_line(data):
    w, X, y, _ = data

    def client_loss(v, X):
        return fnp.mean(X @ v)       # fine

    def bad_local(v, X):
        return client_loss(v, X) + fnp.sum(X[0] * v)    # <- X[0]: rows are ragged

    @fad.trace
    def outer(w, X):
        g = fad.grad(bad_local)(fad.broadcast(w), X)
        return fad.mean(fnp.sum(g))

    with pytest.raises(fad.FadError) as e:
        outer(w, X)
    assert f"{HERE}:{_line_of(bad_local) + 1}" in str(e.value)


# --------------------------------------------------------------------------- NumPy on tracers

def test_numpy_functions_dispatch_to_fadcore_numpy(data, ragged):
    w, X, y, labels = data

    def with_np(w, X):
        h = np.tanh(X * fad.broadcast(w))
        z = np.exp(h) + np.maximum(h, 0.0) * np.sqrt(np.square(h) + 1.0) - np.log1p(np.abs(h))
        s = np.mean(z, axis=0) + np.sum(z) / 3.0 + np.max(z, axis=0) + np.var(z) + np.std(z)
        zz = np.ones(2) + np.reshape(np.concatenate([s, s], axis=0)[:4], (2, 2)).sum(axis=0)
        t = np.where(zz > 2.0, zz, 2.0 - zz) + np.linalg.norm(s) + np.dot(s, np.ones(3))
        return fad.mean(np.stack([t, np.clip(t, a_min=0.0, a_max=1.5)]).T)

    def with_fnp(w, X):
        h = fnp.tanh(X * fad.broadcast(w))
        z = fnp.exp(h) + fnp.maximum(h, 0.0) * fnp.sqrt(fnp.square(h) + 1.0) - fnp.log1p(fnp.abs(h))
        s = fnp.mean(z, axis=0) + fnp.sum(z) / 3.0 + fnp.max(z, axis=0) + fnp.var(z) + fnp.std(z)
        zz = np.ones(2) + fnp.reshape(fnp.concatenate([s, s], axis=0)[:4], (2, 2)).sum(axis=0)
        t = fnp.where(zz > 2.0, zz, 2.0 - zz) + fnp.linalg.norm(s) + fnp.dot(s, np.ones(3))
        return fad.mean(fnp.stack([t, fnp.clip(t, 0.0, 1.5)]).T)

    def with_numpy_only(w, Xs):    # the oracle: plain NumPy per client, then the mean
        outs = []
        for Xi in Xs:
            h = np.tanh(Xi * w)
            z = np.exp(h) + np.maximum(h, 0.0) * np.sqrt(np.square(h) + 1.0) - np.log1p(np.abs(h))
            s = np.mean(z, axis=0) + np.sum(z) / 3.0 + np.max(z, axis=0) + np.var(z) + np.std(z)
            zz = np.ones(2) + np.reshape(np.concatenate([s, s])[:4], (2, 2)).sum(axis=0)
            t = np.where(zz > 2.0, zz, 2.0 - zz) + np.linalg.norm(s) + np.dot(s, np.ones(3))
            outs.append(np.stack([t, np.clip(t, 0.0, 1.5)]).T)
        return np.mean(outs, axis=0)

    want = with_numpy_only(w, X.tolist())
    np.testing.assert_allclose(fad.trace(with_np)(w, X), want, rtol=1e-12)
    np.testing.assert_allclose(fad.trace(with_fnp)(w, X), want, rtol=1e-12)
    # the same graph either way
    assert str(fad.trace(with_np).graph(w, X)).count("=") == str(
        fad.trace(with_fnp).graph(w, X)).count("=")


def test_numpy_operators_with_arrays_on_the_left():
    w = np.array([1.0, -2.0, 3.0])
    f = fad.trace(lambda v: (np.ones(3) - v, np.float64(2.0) * v, np.arange(3.0) < v,
                             np.ones((2, 3)) @ v))
    got = f(w)
    want = (np.ones(3) - w, 2.0 * w, np.arange(3.0) < w, np.ones((2, 3)) @ w)
    for g, wa in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, wa)


# --------------------------------------------------------------------------- new functions

def _fd_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = eps
        g[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return g


NEW_SCALARS = {
    "var": (lambda m, x: m.sum(m.var(x, axis=0) * np.arange(1.0, 4.0)), np.var),
    "std-ddof": (lambda m, x: m.sum(m.std(x, axis=1, ddof=1)), None),
    "prod": (lambda m, x: m.sum(m.prod(x, axis=1)), None),
    "prod-all": (lambda m, x: m.prod(x), None),
    "cumsum": (lambda m, x: m.sum(m.cumsum(x, axis=1) * np.arange(1.0, 4.0) ** 2), None),
    "sort": (lambda m, x: m.sum(m.sort(x, axis=0) * np.arange(5.0)[:, None]), None),
    "einsum": (lambda m, x: m.einsum("ij,ij->", x, m.tanh(x)), None),
    "einsum-3": (lambda m, x: m.einsum("ij,jk,ik->", x, np.ones((3, 2)), x[:, :2]), None),
    "norm": (lambda m, x: m.linalg.norm(x) + m.sum(m.linalg.norm(x, ord=3, axis=1)), None),
}


@pytest.mark.parametrize("name", sorted(NEW_SCALARS))
def test_new_functions_match_numpy_and_finite_differences(name):
    f, _ = NEW_SCALARS[name]
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 3)) + np.arange(15.0).reshape(5, 3) * 0.1   # distinct values
    numpy_f = lambda v: float(f(_NP, v))  # noqa: E731
    traced = fad.trace(lambda v: f(fnp, v))
    np.testing.assert_allclose(traced(x), numpy_f(x), rtol=1e-12)
    np.testing.assert_allclose(traced.run(x, backend="reference"), numpy_f(x), rtol=1e-12)
    want = _fd_grad(numpy_f, x)
    for mode in ("reverse", "forward"):
        np.testing.assert_allclose(fad.grad(traced, mode=mode)(x), want, rtol=1e-6, atol=1e-7,
                                   err_msg=f"{name} {mode}")
    fad.check_grads(traced, (x,), order=2, modes=("forward", "reverse"))


class _NumPyWithLinalg:
    def __getattr__(self, name):
        return getattr(np, name)


_NP = _NumPyWithLinalg()


def test_new_functions_on_ragged_clients_numba_equals_numpy(ragged):
    rows = [4, 1, 6]
    Xs = ragged(rows, 5)

    @fad.trace
    def f(X):
        return (fnp.var(X, axis=1), fnp.std(X, axis=0), fnp.prod(X, axis=1),
                fnp.cumsum(X, axis=1), fnp.sort(X, axis=1), fnp.argmin(X, axis=1),
                fnp.einsum("ij,j->i", X, np.arange(5.0)), fnp.linalg.norm(X, axis=1),
                fnp.zeros(X.shape) + X, fnp.size(X), fnp.rows(X))

    got = f(fad.clients(Xs))
    for i, Xi in enumerate(Xs):
        want = (np.var(Xi, axis=1), np.std(Xi, axis=0), np.prod(Xi, axis=1),
                np.cumsum(Xi, axis=1), np.sort(Xi, axis=1), np.argmin(Xi, axis=1),
                np.einsum("ij,j->i", Xi, np.arange(5.0)), np.linalg.norm(Xi, axis=1), Xi,
                Xi.size, float(len(Xi)))
        for g, wa in zip(got, want, strict=True):
            np.testing.assert_allclose(g[i], wa, rtol=1e-12, atol=1e-14)
            assert np.asarray(g[i]).dtype == np.asarray(wa).dtype


def test_sorting_network_sorts_every_length():
    rng = np.random.default_rng(0)
    for n in range(0, 34):
        x = rng.integers(0, 5, size=(3, n))
        np.testing.assert_array_equal(fnp.sort(x, axis=1), np.sort(x, axis=1))
        np.testing.assert_array_equal(fnp.argmin(x, axis=1) if n else np.zeros(3, int),
                                      np.argmin(x, axis=1) if n else np.zeros(3, int))


def test_argmin_of_extreme_integers():
    a = np.array([0, -2 ** 52, 2 ** 52, -1], dtype=np.int64)    # exact range: |x| < 2**53
    assert int(fnp.argmin(a)) == 1
    for backend in ("reference", "numba"):
        assert int(fad.trace(lambda v: fnp.argmin(v)).run(a, backend=backend)) == 1


# --------------------------------------------------------------------------- row counts

def test_fedavg_weights_from_row_counts(ragged):
    rows = [3, 7, 2, 5]
    Xs, ys = ragged(rows, 3), ragged(rows)
    w = np.array([0.5, -1.0, 0.25])

    @fad.trace
    def weighted_loss(w, X, y):
        r = X @ fad.broadcast(w) - y
        return fad.weighted_mean(fnp.mean(r * r), fnp.rows(X))

    want = sum(np.sum((Xi @ w - yi) ** 2) for Xi, yi in zip(Xs, ys)) / sum(rows)
    X, y = fad.clients(Xs), fad.clients(ys)
    np.testing.assert_allclose(weighted_loss(w, X, y), want, rtol=1e-12)
    np.testing.assert_allclose(weighted_loss.run(w, X, y, backend="reference"), want, rtol=1e-12)
    gw = fad.grad(weighted_loss)(w, X, y)
    want_g = sum(2 * Xi.T @ (Xi @ w - yi) for Xi, yi in zip(Xs, ys)) / sum(rows)
    np.testing.assert_allclose(gw, want_g, rtol=1e-10)
    sizes = fad.trace(lambda X: (fnp.size(X), fnp.rows(X, dtype=fnp.float32)))(X)
    assert [int(s) for s in sizes[0]] == [3 * n for n in rows]
    assert sizes[1].dtype == np.float32 and list(sizes[1]) == rows


# --------------------------------------------------------------------------- client values, trees

def test_client_values_select_by_list_slice_and_mask():
    cv = fad.clients([np.full((n, 2), float(n)) for n in (1, 2, 3, 4)])
    assert [len(m) for m in cv[[0, 2]]] == [1, 3]
    assert [len(m) for m in cv[[3, 0, -1]]] == [4, 1, 4]
    assert [len(m) for m in cv[1:3]] == [2, 3]
    assert [len(m) for m in cv[np.array([True, False, False, True])]] == [1, 4]
    assert [len(m) for m in cv[np.array([1, 2])]] == [2, 3]
    assert cv[[0, 2]].type == cv.type
    with pytest.raises(IndexError, match="client 7 out of range"):
        cv[[0, 7]]
    with pytest.raises(IndexError, match="no client"):
        cv[[]]
    with pytest.raises(IndexError, match="boolean client mask needs 4"):
        cv[np.array([True, False])]
    with pytest.raises(IndexError, match="list of ints"):
        cv[1.5]


def test_tree_map_and_tree_utilities():
    params = {"w": np.ones((2, 3)), "b": [np.zeros(3), None]}
    grads = {"w": np.full((2, 3), 2.0), "b": [np.ones(3), None]}
    out = fad.tree_map(lambda p, g: p - 0.5 * g, params, grads)
    np.testing.assert_array_equal(out["w"], np.zeros((2, 3)))
    np.testing.assert_array_equal(out["b"][0], -0.5 * np.ones(3))
    assert out["b"][1] is None
    assert len(fad.tree_leaves(params)) == 2
    assert fad.tree_structure(params) == fad.tree_structure(grads)
    with pytest.raises(fad.FadError, match="tree 2 has structure"):
        fad.tree_map(lambda a, b: a, params, {"w": 1.0})

    @fad.trace
    def step(p, X):                  # inside a trace too
        pc = fad.broadcast(p)
        g = fad.tree_map(lambda v: fnp.mean(X) * v, pc)
        return fad.tree_map(lambda v: fad.mean(v), g)

    X = fad.clients([np.ones((2, 1)), 3 * np.ones((1, 1))])
    got = step({"a": np.ones(2), "b": np.ones(())}, X)
    np.testing.assert_allclose(got["a"], [2.0, 2.0])


# --------------------------------------------------------------------------- pickling

@fad.trace
def module_level_loss(w, X):
    return fad.mean(fnp.mean(fnp.tanh(X @ fad.broadcast(w))))


def plain_loss(w, X):
    return fad.mean(fnp.mean(fnp.tanh(X @ fad.broadcast(w)) ** 2))


def test_traced_functions_and_their_derivatives_pickle(ragged):
    import pickle
    w = np.array([0.3, -0.2, 0.5])
    X = fad.clients(ragged([3, 5], 3))
    fns = [module_level_loss, fad.trace(plain_loss), fad.grad(module_level_loss),
           fad.grad(plain_loss, mode="mixed"), fad.value_and_grad(plain_loss, state="remat"),
           fad.grad(plain_loss, policy=fad.Policy())]
    for f in fns:
        f(w, X)                                  # traced and cached before pickling
        g = pickle.loads(pickle.dumps(f))
        got, want = g(w, X), f(w, X)
        for a, b in zip(fad.tree_leaves(got), fad.tree_leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
    assert pickle.loads(pickle.dumps(module_level_loss)) is module_level_loss
    jf = pickle.loads(pickle.dumps(fad.jvp(plain_loss)))
    out, t = jf((w, X), (np.ones(3), None))
    want_t = fad.grad(plain_loss)(w, X) @ np.ones(3)
    np.testing.assert_allclose(t, want_t, rtol=1e-10)
    import pickle as _p
    with pytest.raises(Exception, match="lambda|local"):
        _p.dumps(fad.trace(lambda v: v * 2))


def test_fedopt_pickles_and_runs_the_same_round(ragged):
    import pickle
    from fadcore import algorithms as alg
    from fadcore.algorithms.models import softmax_regression
    fo = alg.FedOpt(softmax_regression(3, 2), local_steps=2, client_lr=0.5)
    params, X = fo.model.init(0), fad.clients(ragged([4, 6], 3))
    y = fad.clients(ragged([4, 6], dtype=np.int64, high=2))
    alpha = fad.clients([np.array(1.0), np.array(2.0)])
    state = fo.init_state(params)
    want = fo.step(np.array(1.0), alpha, params, state, X, y)
    fo2 = pickle.loads(pickle.dumps(fo))
    assert repr(fo2) == repr(fo) and fo2.num_traces == fo.num_traces
    got = fo2.step(np.array(1.0), alpha, params, state, X, y)
    for a, b in zip(fad.tree_leaves(got), fad.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- packaging, CLI

def _run(args, cwd, env_extra=None):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(fad.__file__)))
    env = dict(os.environ, PYTHONPATH=repo, **(env_extra or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_reference_backend_imports_neither_numba_nor_dask(tmp_path):
    out = _run(["-c", "import sys, fadcore as fad, numpy as np\n"
                "fad.set_default_backend('reference')\n"
                "print(fad.trace(lambda w: w * 2)(np.ones(2)))\n"
                "print(sorted(m for m in ('numba', 'dask', 'distributed', 'scipy') "
                "if m in sys.modules))"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[2. 2.]", "[]"]


def test_a_backend_that_cannot_import_is_a_typed_error(monkeypatch):
    from fadcore import backends

    def broken():
        raise ImportError("No module named 'distributed'")
    monkeypatch.setitem(backends._IMPORTS, "dask", broken)
    monkeypatch.setattr(backends, "_TABLE", {k: v for k, v in backends._TABLE.items()
                                              if k != "dask"})
    monkeypatch.setattr(backends, "_MISSING", {})
    with pytest.raises(fad.FadError, match="backend 'dask' is not available: No module named "
                       "'distributed'.*pip install 'fadcore\\[dask\\]'"):
        fad.set_default_backend("dask")
    assert fad.default_backend() != "dask"
    with pytest.raises(fad.FadError, match="unknown backend 'numbaa'"):
        fad.set_default_backend("numbaa")


def test_fadcore_logs_to_its_logger_and_prints_nothing(caplog, capsys):
    import logging
    with caplog.at_level(logging.DEBUG, logger="fadcore"):
        fad.trace(lambda w: w * 3.0)(np.ones(2))
    assert any(r.name == "fadcore.tracing" and "traced" in r.getMessage() for r in caplog.records)
    assert any(r.name == "fadcore.backends" and "running" in r.getMessage()
               for r in caplog.records)
    assert capsys.readouterr().out == ""


MYMOD = '''
import numpy as np
import fadcore as fad
from fadcore import numpy as fnp


def loss(w, X):
    return fad.mean(fnp.mean(fnp.tanh(X @ fad.broadcast(w))))


def example_args():
    return np.ones(3), fad.clients([np.ones((2, 3)), np.ones((4, 3))])
'''


def test_fad_inspect_finds_a_module_in_the_current_directory(tmp_path):
    (tmp_path / "mymod.py").write_text(MYMOD)
    out = _run(["-m", "fadcore", "inspect", "mymod:loss", "--quiet", "--dot", "g",
                "--json", "g"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "==" not in out.stdout                      # --quiet: the cost table only
    assert out.stdout.splitlines()[0].split() == ["primal", "reverse", "reverse/remat",
                                                  "forward", "mixed", "auto"]
    files = sorted(os.listdir(tmp_path / "g"))
    assert "loss.reverse.dot" in files and "loss.reverse-remat.json" in files and len(files) == 12
    text = (tmp_path / "g" / "loss.reverse.json").read_text()
    g = fad.Graph.from_json(text)
    assert (tmp_path / "g" / "loss.reverse.dot").read_text().startswith('digraph "grad_loss"')
    w, X = np.ones(3), fad.clients([np.ones((2, 3)), np.ones((4, 3))])
    mod = {}
    exec(MYMOD, mod)
    np.testing.assert_allclose(fad.run(g, w, X), fad.grad(mod["loss"])(w, X), rtol=1e-12)


def test_fad_inspect_missing_module_says_what_to_do(tmp_path):
    out = _run(["-m", "fadcore", "inspect", "nomod:loss"], tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"no module named 'nomod' in {tmp_path}" in out.stderr
    out = _run(["-m", "fadcore", "inspect", "mymod.py:loss"], tmp_path)
    assert "give the module name, not the file: mymod:loss" in out.stderr


def test_version_and_python_m(tmp_path):
    out = _run(["-m", "fadcore", "--version"], tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"fad (fadcore) {fad.__version__}"


def test_packaging_files():
    import tomllib
    root = os.path.dirname(os.path.dirname(os.path.abspath(fad.__file__)))
    assert os.path.exists(os.path.join(root, "fadcore", "py.typed"))
    lic = open(os.path.join(root, "LICENSE")).read()
    assert "Apache License" in lic and "Version 2.0, January 2004" in lic
    assert "END OF TERMS AND CONDITIONS" in lic
    meta = tomllib.load(open(os.path.join(root, "pyproject.toml"), "rb"))
    assert meta["project"]["license"] == "Apache-2.0"
    assert meta["project"]["license-files"] == ["LICENSE"]
    req = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")][0]
    assert int(req.split(">=")[1].split(".")[0]) >= 77     # SPDX license + license-files
    assert meta["tool"]["setuptools"]["package-data"]["fadcore"] == ["py.typed"]
