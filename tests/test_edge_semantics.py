"""Edge semantics every mode and backend must agree on: infinite partial derivatives, bools
where numbers belong. The expected values are worked out by hand (docs/modes.md states the
rule), not taken from any mode."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fadcore as fad
from fadcore import numpy as fnp

MODES = ("forward", "reverse", "mixed", "auto")
BACKENDS = ("reference", "numba")
INF = math.inf

# f, x, d/dx of sum(f(x)) by hand (1/x, 1/(2 sqrt x), 0.5 x**-0.5, -1/x**2, exp(x))
INFINITE_PARTIALS = [
    ("log", lambda x: fnp.sum(fnp.log(x)), [0.0, 1.0], [INF, 1.0]),
    ("sqrt", lambda x: fnp.sum(fnp.sqrt(x)), [0.0, 1.0], [INF, 0.5]),
    ("pow_half", lambda x: fnp.sum(x ** 0.5), [0.0, 4.0], [INF, 0.25]),
    ("reciprocal", lambda x: fnp.sum(1.0 / x), [0.0, 2.0], [-INF, -0.25]),
    ("exp_overflow", lambda x: fnp.sum(fnp.exp(x)), [710.0, 0.0], [INF, 1.0]),
    ("log_of_sqrt", lambda x: fnp.sum(fnp.log(fnp.sqrt(x))), [0.0, 0.5], [INF, 1.0]),
    ("matvec_log", lambda x: fnp.sum(np.array([[1.0, 2.0], [3.0, 4.0]]) @ fnp.log(x)),
     [0.0, 1.0], [INF, 6.0]),
    ("log1p", lambda x: fnp.sum(fnp.log1p(x)), [-1.0, 1.0], [INF, 0.5]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, f, x, want", INFINITE_PARTIALS,
                         ids=[c[0] for c in INFINITE_PARTIALS])
def test_infinite_partials_agree_across_modes(name, f, x, want, mode, backend):
    x = np.array(x)
    with np.errstate(all="ignore"):
        g = fad.grad(fad.trace(f), mode=mode).graph(x)
        got = fad.run(g, x, backend=backend)
    np.testing.assert_allclose(got, np.array(want), rtol=1e-14)   # infs must match exactly


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_infinite_partial_across_a_communication_boundary(mode, backend):
    # d/dw_j of mean_i sum(log(X_i * w)) = mean_i (rows_i * 3 ... ) / w_j: 1/w_j per row
    @fad.trace
    def f(w, X):
        return fad.mean(fnp.sum(fnp.log(X * fad.broadcast(w)), axis=(0, 1)))

    w = np.array([0.0, 1.0, 2.0])
    X = fad.clients([np.ones((2, 3)), np.full((1, 3), 2.0)])
    with np.errstate(all="ignore"):
        got = fad.run(fad.grad(f, mode=mode).graph(w, X), w, X, backend=backend)
    # client 0: 2 rows, client 1: 1 row; mean over clients of rows / w_j
    np.testing.assert_array_equal(got, [INF, 1.5 / 1.0, 1.5 / 2.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_documented_indeterminate_case(backend):
    """log(x * x) at 0: 0 * inf on the path. Reverse gives nan, forward (strong zeros) 0, as
    docs/modes.md says; the finite component agrees (2 / x)."""
    f = fad.trace(lambda x: fnp.sum(fnp.log(x * x)))
    x = np.array([0.0, 4.0])
    with np.errstate(all="ignore"):
        rev = fad.run(fad.grad(f, mode="reverse").graph(x), x, backend=backend)
        fwd = fad.run(fad.grad(f, mode="forward").graph(x), x, backend=backend)
    assert np.isnan(rev[0]) and fwd[0] == 0.0
    assert rev[1] == fwd[1] == 0.5


def test_jvp_keeps_ieee_products():
    """fad.jvp computes J v for the v given: 0 * inf = nan there, as documented."""
    f = fad.trace(lambda x: fnp.sum(fnp.log(x)))
    x = np.array([0.0, 1.0])
    with np.errstate(all="ignore"):
        _, t = fad.jvp(f, (x,), (np.array([0.0, 1.0]),))
    assert np.isnan(t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [True, False, np.True_, np.array(True),
                                   np.array([True, False])])
def test_bools_are_not_numbers(value, backend):
    g = fad.trace(lambda x: x * 2.0).graph(np.float64(1.0))
    with pytest.raises(fad.DTypeError, match=r"argument 0 of .*f64\[\]@SERVER.*got the bool"):
        fad.run(g, value, backend=backend)
    g = fad.trace(lambda x: x + 1).graph(np.int64(1))
    with pytest.raises(fad.DTypeError, match="got the bool"):
        fad.run(g, value, backend=backend)
    assert fad.run(g, 3, backend=backend) == 4                    # ints still are ints


# --------------------------------------------------------------------------- negative labels

def _xent(w, X, y):
    logits = X @ fad.broadcast(w)
    return fad.mean(fnp.mean(fad.nn.softmax_cross_entropy(logits, y)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["loss", "grad"])
def test_negative_labels_are_refused_naming_client_and_line(what, backend):
    f = fad.trace(_xent)
    w = np.ones((3, 4))
    X = fad.clients([np.ones((2, 3)), np.ones((3, 3))])
    y = fad.clients([np.array([0, 1]), np.array([1, -1, 3])])
    g = (f if what == "loss" else fad.grad(f)).graph(w, X, y)
    with pytest.raises(fad.ShapeError, match=r"argument 2 of \w+ \(\{i64\[\?\]\}@CLIENTS\) "
                                             r"indexes take_along_axis at test_edge_semantics"
                                             r"\.py:\d+ \(_xent\): client 1 holds -1 at \(1,\)"):
        fad.run(g, w, X, y, backend=backend)
    # the same labels without the -1 train class 3, not 3 and the last class
    y_ok = fad.clients([np.array([0, 1]), np.array([1, 2, 3])])
    assert np.isfinite(fad.run(g, w, X, y_ok, backend=backend)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_labels_through_reshapes_and_one_hot(backend):
    @fad.trace
    def counts(labels):
        return fad.sum(fnp.sum(fnp.one_hot(fnp.reshape(labels, (-1,)), 3), axis=0))

    ok = fad.clients([np.array([[0], [2]]), np.array([[1]])])
    np.testing.assert_array_equal(fad.run(counts.graph(ok), ok, backend=backend), [1, 1, 1])
    bad = fad.clients([np.array([[0], [2]]), np.array([[-3]])])
    with pytest.raises(fad.ShapeError, match=r"indexes one_hot .* client 1 holds -3 at \(0, 0\)"):
        fad.run(counts.graph(bad), bad, backend=backend)


# --------------------------------------------------------------------------- dead work

@pytest.mark.parametrize("backend", BACKENDS)
def test_work_that_only_feeds_a_token_is_not_run_anywhere(backend):
    """``after x token`` needs the token's round, not its value: the numba backend never runs
    work whose value no output needs, so the reference does not either (found by the fuzzer: an
    out-of-range index there was an error on one backend only)."""
    from fadcore.ir.graph import Eqn, Graph, Literal, Var
    from fadcore.ir.primitives import primitives
    from fadcore.ir.serialize import parse_type
    x, idx = Var(parse_type("f64[3]@SERVER")), Var(parse_type("i64[]@SERVER"))
    t = Var(parse_type("f64[]@SERVER"))
    out = Var(parse_type("f64[3]@SERVER"))
    g = Graph([x, idx], [Eqn(primitives["take"], [x, idx], t, {"axis": 0}),
                         Eqn(primitives["after"], [x, t], out, {})], [out])
    g.verify()
    got = fad.run(g, np.arange(3.0), np.int64(7), backend=backend)     # 7: out of range
    np.testing.assert_array_equal(got, [0.0, 1.0, 2.0])
    g2 = Graph([x, idx], g.eqns, [t])                                 # now the value is needed
    with pytest.raises(fad.ShapeError, match="take"):
        fad.run(g2, np.arange(3.0), np.int64(7), backend=backend)
