"""Secure aggregation of ``secure_sum`` (fadcore/backends/secagg.py) in the round executor.

Oracles: NumPy sums of the clients' values, the exact (unmasked) run of the same graph, and the
documented error bound ``n * 2**-(frac_bits+1)`` per element of a secure sum.
"""

from __future__ import annotations

import numpy as np
import pytest

import fadcore as fad
from fadcore import numpy as fnp
from fadcore import pytree
from fadcore.backends import executor, inprocess
from fadcore.backends.inputs import prepare_inputs
from fadcore.examples import example_args_fed_mse, secure_mse

pytest.importorskip("cryptography")

SECURE = fad.Policy(aggregation="secure_sum")


def inputs_of(g, args):
    return prepare_inputs(g, pytree.flatten(tuple(args))[0])


@fad.trace
def secure_vector_sum(x):
    return fad.secure_sum(x)


# --------------------------------------------------------------------------- what the server sees

def test_the_server_sees_only_uniform_words_and_learns_the_sum():
    """Record every message the server receives for a secure_sum of 6 clients' 4096-vectors
    (some all-zero, some constant, one a ramp): every client's row is uniform modulo 2^64
    (chi-square over the top byte) and uncorrelated with its input, yet the sum is right."""
    n, d = 6, 4096
    rng = np.random.default_rng(1)
    xs = [np.zeros(d), np.full(d, 3.0), np.linspace(-5, 5, d), rng.normal(size=d),
          np.full(d, -1e5), rng.integers(0, 2, size=d).astype(np.float64)]
    g = secure_vector_sum.graph(fad.clients(xs))
    seen = []
    got = inprocess.execute(g, inputs_of(g, (fad.clients(xs),)), chunk_size=2,
                            evaluator="reference", secure=fad.SecureAggregation(),
                            on_message=lambda kind, r, payload: seen.append((kind, r, payload)))
    np.testing.assert_allclose(got[0], np.sum(xs, axis=0), rtol=0,
                               atol=fad.SecureAggregation().error_bound(n) + 1e-9)
    kinds = [k for k, _, _ in seen]
    assert kinds == ["public_keys"] + ["partials"] * 3
    keys = seen[0][2]
    assert len(keys) == n and len(set(keys)) == n and all(len(k) == 32 for k in keys)
    rows = {}
    for kind, _, payload in seen[1:]:
        (sp,) = payload
        assert isinstance(sp, executor.SecurePartial)   # nothing else travels
        assert sp.rows.dtype == np.uint64
        rows.update(zip(sp.clients, sp.rows, strict=True))
    assert sorted(rows) == list(range(n))
    # chi-square of the top byte against uniform: df = 255, mean 255, sd 22.6; 6 sd margin
    for i, row in rows.items():
        top = (row >> np.uint64(56)).astype(np.int64)
        counts = np.bincount(top, minlength=256)
        expect = d / 256
        chi2 = float(((counts - expect) ** 2 / expect).sum())
        assert chi2 < 255 + 6 * 22.6, (i, chi2)
        u = row.astype(np.float64) / 2.0 ** 64
        if np.std(xs[i]) > 0:
            corr = abs(np.corrcoef(u, xs[i])[0, 1])
            assert corr < 5 / np.sqrt(d), (i, corr)
        # the fixed point encoding itself is not in the message
        plain = np.rint(xs[i] * 2.0 ** 24).astype(np.int64).view(np.uint64)
        assert np.mean(row == plain) < 0.01


def test_masks_cancel_exactly_sums_are_within_the_bound():
    rng = np.random.default_rng(2)
    for n, f in [(3, 24), (7, 10), (5, 40)]:
        params = fad.SecureAggregation(frac_bits=f, bound=2.0 ** 16)
        xs = [rng.normal(size=(2, 3)) * 100 for _ in range(n)]
        g = secure_vector_sum.graph(fad.clients(xs))
        got = fad.run(g, fad.clients(xs), backend="numba", secure_aggregation=params)
        want = np.sum(xs, axis=0)
        err = np.abs(got - want).max()
        assert err <= params.error_bound(n) + 4 * np.spacing(np.abs(want).max()), (n, f, err)
        # decoding is exact: the result is the sum of the clients' rounded values
        q = np.sum([np.rint(x * 2.0 ** f).astype(np.int64) for x in xs], axis=0)
        np.testing.assert_array_equal(got, q / 2.0 ** f)


def test_float32_and_small_modulus():
    xs = [np.array([1.5, -2.25], np.float32), np.array([0.5, 0.25], np.float32),
          np.array([-1.0, 4.0], np.float32)]
    g = secure_vector_sum.graph(fad.clients(xs))
    for k in (20, 64):
        got = fad.run(g, fad.clients(xs), secure_aggregation=fad.SecureAggregation(
            frac_bits=8, bound=16.0, modulus_bits=k))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.array([1.0, 2.0], np.float32))


# --------------------------------------------------------------------------- refusals

def test_out_of_range_values_are_an_error_naming_the_client():
    xs = [np.array([1.0]), np.array([2.0e6]), np.array([3.0])]
    g = secure_vector_sum.graph(fad.clients(xs))
    with pytest.raises(fad.SecureAggregationError, match=r"round 1 .*client 1.*outside ±bound"):
        fad.run(g, fad.clients(xs), secure_aggregation=True)
    xs[1] = np.array([np.nan])
    with pytest.raises(fad.SecureAggregationError, match="client 1"):
        fad.run(g, fad.clients(xs), secure_aggregation=True)
    # never a silent wrap-around: the parameters must hold the cohort's sum
    many = fad.clients([np.ones(1)] * 9)
    with pytest.raises(fad.SecureAggregationError, match="does not fit"):
        fad.run(secure_vector_sum.graph(many), many, secure_aggregation=fad.SecureAggregation(
            frac_bits=8, bound=2.0 ** 52))


def test_minimum_cohort():
    xs = fad.clients([np.ones(2), np.ones(2)])
    g = secure_vector_sum.graph(xs)
    with pytest.raises(fad.SecureAggregationError, match=r"over 2 clients.*min_clients=3"):
        fad.run(g, xs, secure_aggregation=True)
    np.testing.assert_allclose(
        fad.run(g, xs, secure_aggregation=fad.SecureAggregation(min_clients=2)), [2.0, 2.0])


@pytest.mark.parametrize("kw", [dict(frac_bits=-1), dict(frac_bits=2.5), dict(bound=0),
                                dict(bound=float("inf")), dict(modulus_bits=65),
                                dict(min_clients=1), dict(frac_bits=60, bound=1e6)])
def test_bad_parameters(kw):
    with pytest.raises(fad.SecureAggregationError, match="SecureAggregation"):
        fad.SecureAggregation(**kw)


# --------------------------------------------------------------------------- defaults and cost

def test_on_by_default_under_a_secure_policy_only():
    args = example_args_fed_mse()
    exact = fad.grad(secure_mse)
    secure = fad.grad(secure_mse, policy=SECURE)
    g_exact, g_secure = exact.graph(*args), secure.graph(*args)
    want = fad.run(g_exact, *args)
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        real = inprocess.execute

        def spy(*a, **kw):
            seen.append(kw.get("secure"))
            return real(*a, **kw)
        mp.setattr(inprocess, "execute", spy)
        fad.run(g_exact, *args)
        got = secure.run(*args)                      # .run: on by default under the policy
        off = fad.run(g_secure, *args, secure_aggregation=False)
    assert len(seen) == 1 and isinstance(seen[0], fad.SecureAggregation)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_array_equal(off, secure(*args))   # the plain call is not a runtime


def test_cost_reports_the_key_agreement():
    args = example_args_fed_mse(d=4)
    g = fad.grad(secure_mse, policy=SECURE).graph(*args)
    plain = fad.cost(g, clients=10, rows=5, secure_aggregation=False)
    sec = fad.cost(g, clients=10, rows=5)            # on: the graph's policy
    assert sec.rounds == plain.rounds + 1
    assert sec.secure == dict(rounds=1, bytes_down=32 * 10, bytes_up=32)
    assert sec.bytes_down == plain.bytes_down + 320
    # float64 words: masked contributions are as large as the plain ones
    assert sec.bytes_up == plain.bytes_up + 32
    g32 = fad.trace(lambda x: fad.secure_sum(x)).graph(fad.clients([np.ones(5, np.float32)] * 3))
    assert fad.cost(g32, clients=3, secure_aggregation=True).bytes_up == 32 + 8 * 5
    assert fad.cost(g32, clients=3).bytes_up == 4 * 5


# --------------------------------------------------------------------------- dropouts

def test_a_client_dropped_after_masking_is_an_error_naming_it():
    """Client 2 vanishes after masking its round-2 contribution of a 2-round reverse
    gradient: the server cannot remove its masks and says who dropped, in which round."""
    args = example_args_fed_mse()
    g = fad.grad(secure_mse, argnums=(0, 1), policy=SECURE).graph(*args)
    p = executor.plan(g, secure=True)
    assert len(p.rounds) == 2 and p.secure_rounds == [1, 2]
    with pytest.raises(fad.SecureAggregationError,
                       match=r"round 2 of 'grad_secure_mse': clients \[2\] dropped out after "
                             r"masking \(3 of 4 delivered\)"):
        inprocess.execute(g, inputs_of(g, args), chunk_size=1, secure=fad.SecureAggregation(),
                          drop={2: [2]})


# --------------------------------------------------------------------------- derivatives

K_LOCAL, CLIENT_LR = 3, 0.3


def logistic(w, X, y):
    z = X @ w
    return fnp.mean(fnp.logaddexp(0.0, z) - y * z)


@fad.trace
def secure_fedavg(eta, w, X, y):
    """One FedAvg round (K local steps) aggregated with secure_sum only; the loss after it."""
    wc = local = fad.broadcast(w)
    for _ in range(K_LOCAL):
        local = local - CLIENT_LR * fad.grad(logistic)(local, X, y)
    n = fad.num_clients()
    w_new = w - eta * fad.secure_sum(wc - local) / n
    return fad.secure_sum(logistic(fad.broadcast(w_new), X, y)) / n


@fad.trace
def clipped_second_order(w, X, y):
    """DP-FedSGD's shape: clipped client gradients, securely summed; its gradient is second
    order (through the clients' gradients and the clipping)."""
    g = fad.grad(logistic)(fad.broadcast(w), X, y)
    n = fad.num_clients()
    w2 = w - 0.5 * fad.secure_sum(fad.nn.clip_by_norm(g, 0.5)) / n
    return fad.secure_sum(logistic(fad.broadcast(w2), X, y)) / n


def fl_data(n=8, d=5, seed=0):
    rng = np.random.default_rng(seed)
    rows = [5 + (7 * i) % 11 for i in range(n)]
    X = fad.clients([rng.normal(size=(r, d)) for r in rows])
    y = fad.clients([(rng.random(r) < 0.5).astype(np.float64) for r in rows])
    return rng.normal(size=d) * 0.3, X, y


def _programs():
    w, X, y = fl_data()
    return {"fedavg_hypergradient": (secure_fedavg, (np.float64(0.5), w, X, y), (0, 1)),
            "clipped_second_order": (clipped_second_order, (w, X, y), 0)}


def _max_err(got, want):
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(pytree.flatten(got)[0], pytree.flatten(want)[0], strict=True))


#: docs/secure-aggregation.md: a derivative's error is at most C * n * 2**-(frac_bits+1), C the
#: sum of the output's sensitivities to the secure sums' elements; C <= 2 for these programs.
C_BOUND = 2.0


@pytest.mark.parametrize("program", ["fedavg_hypergradient", "clipped_second_order"])
@pytest.mark.parametrize("mode", ["reverse", "forward", "mixed", "auto"])
def test_secure_gradients_match_exact_within_the_bound(program, mode):
    f, args, argnums = _programs()[program]
    n = len(args[-1])
    want = fad.grad(f, argnums=argnums)(*args)                      # exact, numba
    assert _max_err(want, fad.run(fad.grad(f, argnums=argnums).graph(*args), *args,
                                  backend="reference")) < 1e-12
    gf = fad.grad(f, argnums=argnums, mode=mode, policy=SECURE)
    errs = {}
    for fb in (16, 32):
        params = fad.SecureAggregation(frac_bits=fb, bound=2.0 ** 16)
        got = gf.run(*args, secure_aggregation=params)
        errs[fb] = _max_err(got, want)
        assert errs[fb] <= C_BOUND * params.error_bound(n), (fb, errs[fb])
    # the error is the fixed point rounding's: 16 more fraction bits, far smaller error
    assert errs[32] < errs[16] * 2.0 ** -8, errs
    # the default parameters, and the default itself (the policy turns it on)
    got = gf.run(*args)
    assert _max_err(got, want) <= C_BOUND * fad.SecureAggregation().error_bound(n)


def test_multi_round_derivative_drop_after_masking_in_the_last_round():
    """The FedAvg hypergradient in reverse mode has 4 rounds, each with secure sums; a client
    lost after masking in any of them makes that round an error naming it."""
    f, args, argnums = _programs()["fedavg_hypergradient"]
    g = fad.grad(f, argnums=argnums, policy=SECURE).graph(*args)
    p = executor.plan(g, secure=True)
    assert len(p.secure_rounds) >= 3
    last = p.secure_rounds[-1]
    for r in (p.secure_rounds[0], last):
        with pytest.raises(fad.SecureAggregationError,
                           match=rf"round {r} of .*clients \[5, 6\] dropped out after masking"):
            inprocess.execute(g, inputs_of(g, args), chunk_size=3,
                              secure=fad.SecureAggregation(), drop={r: [5, 6]})


def test_round_masking_round_trips_as_plain_values():
    """What a runtime without pickles (Flower) sends its nodes: a dict of plain values."""
    from fadcore.backends import secagg
    xs = [np.arange(3.0) + i for i in range(4)]
    g = secure_vector_sum.graph(fad.clients(xs))
    seen = {}

    class Spy(inprocess.InProcessRuntime):
        def client_step(self, rp, server_values, masking=None):
            d = masking.to_dict()
            assert all(isinstance(v, (bytes, int, float, str, list)) for v in d.values())
            back = secagg.RoundMasking.from_dict(d)
            seen["same"] = back.to_dict() == d
            return super().client_step(rp, server_values, back)

    got = executor.execute(g, inputs_of(g, (fad.clients(xs),)), Spy(chunk_size=1),
                           secure=fad.SecureAggregation())
    assert seen["same"]
    np.testing.assert_allclose(got[0], np.sum(xs, axis=0), atol=1e-6)
