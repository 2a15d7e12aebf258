"""Tests for fadcore.datasets: Synthetic(alpha, beta) and non-IID digits."""

import dataclasses
import sys

import numpy as np
import pytest

from fadcore import datasets as fds
from fadcore.datasets import FederatedDataset, dirichlet_partition, synthetic


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def mean_tv_to_global(labels_per_client, num_classes):
    """Mean total-variation distance of client label histograms to the pooled one."""
    pooled = np.bincount(np.concatenate(labels_per_client), minlength=num_classes)
    pooled = pooled / pooled.sum()
    tvs = []
    for y in labels_per_client:
        h = np.bincount(y, minlength=num_classes) / len(y)
        tvs.append(0.5 * np.abs(h - pooled).sum())
    return float(np.mean(tvs))


def assert_same_dataset(a, b):
    assert a.num_clients == b.num_clients
    for field in ("X", "y", "X_test", "y_test"):
        for u, v in zip(getattr(a, field), getattr(b, field)):
            np.testing.assert_array_equal(u, v)


@pytest.fixture(scope="module")
def syn():
    return synthetic(alpha=1.0, beta=1.0, seed=0)


# --------------------------------------------------------------------------- #
# Synthetic(alpha, beta)
# --------------------------------------------------------------------------- #
def test_synthetic_shapes_dtypes_and_label_range(syn):
    assert syn.num_clients == 30
    assert syn.dim == 60
    assert syn.num_classes == 10
    for field in ("X", "y", "X_test", "y_test"):
        assert isinstance(getattr(syn, field), list)
        assert len(getattr(syn, field)) == 30
    for X, y, Xt, yt in zip(syn.X, syn.y, syn.X_test, syn.y_test):
        assert X.dtype == np.float64 and Xt.dtype == np.float64
        assert y.dtype == np.int64 and yt.dtype == np.int64
        assert X.ndim == 2 and X.shape[1] == 60 and Xt.shape[1] == 60
        assert y.shape == (X.shape[0],) and yt.shape == (Xt.shape[0],)
        assert X.shape[0] >= 1 and Xt.shape[0] >= 1
        for labels in (y, yt):
            assert labels.min() >= 0 and labels.max() < 10
        assert np.all(np.isfinite(X))
    np.testing.assert_array_equal(syn.sizes, [x.shape[0] for x in syn.X])
    assert syn.sizes.dtype == np.int64
    # "a few thousand rows" for the default 30 clients
    total = int(syn.sizes.sum() + syn.test_sizes.sum())
    assert 1500 <= total <= 9000
    # several classes actually occur
    assert len(np.unique(syn.centralized()[1])) >= 5


def test_synthetic_sizes_are_ragged_and_clipped(syn):
    assert len(np.unique(syn.sizes)) >= 8
    assert syn.sizes.max() > 2 * syn.sizes.min()
    totals = syn.sizes + syn.test_sizes
    assert totals.min() >= 50 and totals.max() <= 300

    small = synthetic(num_clients=40, dim=3, seed=3, min_samples=20, max_samples=60,
                      size_offset=0)
    totals = small.sizes + small.test_sizes
    assert totals.min() >= 20 and totals.max() <= 60
    assert (totals == 20).any() or (totals == 60).any()  # clipping is active


def test_synthetic_size_distribution_is_lognormal_plus_offset():
    # Without effective clipping, n_k = floor(lognormal(4, 2)) + 50: its median is
    # about exp(4) + 50 and log(n_k - 50) has spread ~2.
    ds = synthetic(num_clients=400, dim=2, num_classes=2, seed=1, min_samples=2,
                   max_samples=10**5)
    totals = ds.sizes + ds.test_sizes
    assert totals.min() >= 50
    logs = np.log(totals[totals > 51] - 50)
    assert abs(np.median(logs) - 4.0) < 0.5
    assert 1.5 < np.std(logs) < 2.5


def test_synthetic_is_deterministic_for_a_seed_and_varies_across_seeds():
    a = synthetic(seed=7, num_clients=10)
    b = synthetic(seed=7, num_clients=10)
    assert_same_dataset(a, b)
    c = synthetic(seed=8, num_clients=10)
    assert not np.array_equal(a.sizes, c.sizes) or not all(
        np.array_equal(u, v) for u, v in zip(a.X, c.X)
    )
    assert not np.allclose(a.X[0][:5], c.X[0][:5])


def test_synthetic_test_fraction_split():
    ds = synthetic(seed=2, num_clients=12, test_fraction=0.25)
    totals = ds.sizes + ds.test_sizes
    np.testing.assert_array_equal(ds.test_sizes, np.floor(0.25 * totals + 0.5).astype(int))
    # at least one test row even with test_fraction=0
    zero = synthetic(seed=2, num_clients=12, test_fraction=0.0)
    assert np.all(zero.test_sizes == 1)
    # the split does not change the generated rows, only how they are divided
    for k in range(12):
        rows_a = np.sort(np.concatenate([ds.X[k], ds.X_test[k]]), axis=0)
        rows_b = np.sort(np.concatenate([zero.X[k], zero.X_test[k]]), axis=0)
        np.testing.assert_array_equal(rows_a, rows_b)
    with pytest.raises(ValueError):
        synthetic(test_fraction=1.0)


def test_synthetic_labels_are_argmax_of_client_model(syn):
    p = syn.meta["true_params"]
    K, d, C = syn.num_clients, syn.dim, syn.num_classes
    assert p["W"].shape == (K, d, C) and p["b"].shape == (K, C) and p["v"].shape == (K, d)
    for k in range(K):
        for X, y in ((syn.X[k], syn.y[k]), (syn.X_test[k], syn.y_test[k])):
            logits = X @ p["W"][k] + p["b"][k]
            np.testing.assert_array_equal(y, np.argmax(logits, axis=1))
    # non-IID: every client has its own model
    assert not np.allclose(p["W"][0], p["W"][1])
    assert syn.meta["alpha"] == 1.0 and syn.meta["beta"] == 1.0 and syn.meta["seed"] == 0
    assert syn.meta["iid"] is False


def test_synthetic_alpha_beta_control_the_client_priors():
    ds = synthetic(alpha=5.0, beta=5.0, num_clients=40, dim=60, seed=4)
    p = ds.meta["true_params"]
    # u_k ~ N(0, alpha), B_k ~ N(0, beta): spread scales with alpha / beta
    assert 3.0 < np.std(p["u"]) < 7.5
    assert 3.0 < np.std(p["B"]) < 7.5
    # W_k ~ N(u_k, 1), b_k ~ N(u_k, 1), v_k ~ N(B_k, 1)
    np.testing.assert_allclose(p["W"].mean(axis=(1, 2)), p["u"], atol=0.2)
    np.testing.assert_allclose(p["b"].mean(axis=1), p["u"], atol=1.5)
    np.testing.assert_allclose(p["v"].mean(axis=1), p["B"], atol=0.6)
    assert 0.8 < np.std(p["W"] - p["u"][:, None, None]) < 1.2
    # feature means follow v_k
    big_k = int(np.argmax(ds.sizes))
    np.testing.assert_allclose(ds.X[big_k].mean(axis=0), p["v"][big_k], atol=0.5)

    zero = synthetic(alpha=0.0, beta=0.0, num_clients=5, seed=4)
    np.testing.assert_array_equal(zero.meta["true_params"]["u"], 0.0)
    np.testing.assert_array_equal(zero.meta["true_params"]["B"], 0.0)


def test_synthetic_covariance_decays_as_j_to_minus_1_2():
    # one large client: the within-client covariance is Sigma = diag(j^-1.2)
    ds = synthetic(num_clients=1, dim=60, seed=5, min_samples=20000, max_samples=20000,
                   test_fraction=0.1)
    X = ds.X[0]
    assert X.shape[0] >= 17000
    var = X.var(axis=0)
    ratio = var[0] / var[9]  # feature 1 vs feature 10
    assert abs(ratio / 10**1.2 - 1.0) < 0.1
    np.testing.assert_allclose(var[0], 1.0, rtol=0.05)
    slope = np.polyfit(np.log(np.arange(1, 61)), np.log(var), 1)[0]
    assert abs(slope + 1.2) < 0.05
    # diagonal: off-diagonal correlations vanish
    corr = np.corrcoef(X[:, :5], rowvar=False)
    assert np.max(np.abs(corr - np.eye(5))) < 0.05


def test_synthetic_iid_shares_model_and_features():
    iid = synthetic(iid=True, seed=6)
    p = iid.meta["true_params"]
    for k in range(1, iid.num_clients):
        np.testing.assert_array_equal(p["W"][k], p["W"][0])
        np.testing.assert_array_equal(p["b"][k], p["b"][0])
    np.testing.assert_array_equal(p["v"], 0.0)
    assert iid.meta["iid"] is True
    X, _ = iid.centralized()
    np.testing.assert_allclose(X.mean(axis=0), 0.0, atol=0.1)
    for k in range(iid.num_clients):
        np.testing.assert_array_equal(
            iid.y[k], np.argmax(iid.X[k] @ p["W"][0] + p["b"][0], axis=1)
        )


def test_synthetic_non_iid_label_skew_exceeds_iid():
    iid = synthetic(iid=True, seed=9)
    non = synthetic(alpha=1.0, beta=1.0, seed=9)
    tv_iid = mean_tv_to_global(iid.y, 10)
    tv_non = mean_tv_to_global(non.y, 10)
    assert tv_non > tv_iid + 0.2
    assert tv_iid < 0.3


def test_synthetic_argument_validation():
    with pytest.raises(ValueError):
        synthetic(min_samples=1)
    with pytest.raises(ValueError):
        synthetic(min_samples=100, max_samples=50)
    with pytest.raises(ValueError):
        synthetic(alpha=-1.0)


# --------------------------------------------------------------------------- #
# FederatedDataset
# --------------------------------------------------------------------------- #
def test_dataset_is_frozen_and_validates():
    ds = synthetic(num_clients=3, seed=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "other"
    X = [np.zeros((3, 2)), np.zeros((4, 2))]
    y = [np.zeros(3, dtype=int), np.zeros(4, dtype=int)]
    Xt = [np.zeros((1, 2)), np.zeros((1, 2))]
    yt = [np.zeros(1, dtype=int), np.ones(1, dtype=int)]
    ok = FederatedDataset("tiny", X, y, 2, Xt, yt, {})
    assert ok.num_clients == 2 and ok.dim == 2
    np.testing.assert_array_equal(ok.sizes, [3, 4])
    assert ok.y[0].dtype == np.int64 and ok.X[0].dtype == np.float64
    with pytest.raises(ValueError):  # label out of range
        FederatedDataset("bad", X, y, 1, Xt, yt, {})
    with pytest.raises(ValueError):  # client count mismatch
        FederatedDataset("bad", X, y[:1], 2, Xt, yt, {})
    with pytest.raises(ValueError):  # feature width mismatch
        FederatedDataset("bad", [X[0], np.zeros((4, 3))], y, 2, Xt, yt, {})
    with pytest.raises(ValueError):  # label length mismatch
        FederatedDataset("bad", X, [y[1], y[1]], 2, Xt, yt, {})
    assert "num_clients=2" in repr(ok)


def test_centralized_concatenates_clients(syn):
    X, y = syn.centralized()
    assert X.shape == (syn.sizes.sum(), syn.dim) and y.shape == (syn.sizes.sum(),)
    np.testing.assert_array_equal(X[: syn.sizes[0]], syn.X[0])
    np.testing.assert_array_equal(y[-syn.sizes[-1]:], syn.y[-1])
    Xt, yt = syn.centralized("test")
    assert Xt.shape[0] == syn.test_sizes.sum() == yt.shape[0]
    with pytest.raises(ValueError):
        syn.centralized("validation")


def test_subset_selects_clients_in_order(syn):
    sub = syn.subset([5, 2, 17])
    assert sub.num_clients == 3
    for j, k in enumerate([5, 2, 17]):
        np.testing.assert_array_equal(sub.X[j], syn.X[k])
        np.testing.assert_array_equal(sub.y[j], syn.y[k])
        np.testing.assert_array_equal(sub.X_test[j], syn.X_test[k])
        np.testing.assert_array_equal(sub.y_test[j], syn.y_test[k])
    np.testing.assert_array_equal(sub.sizes, syn.sizes[[5, 2, 17]])
    assert sub.meta["client_ids"] == [5, 2, 17]
    assert sub.subset([2, 0]).meta["client_ids"] == [17, 5]
    assert sub.num_classes == syn.num_classes and sub.dim == syn.dim
    assert syn.num_clients == 30  # original untouched
    with pytest.raises(ValueError):
        syn.subset([1, 1])
    with pytest.raises(IndexError):
        syn.subset([30])
    with pytest.raises(ValueError):
        syn.subset([])


def test_corrupt_labels_changes_only_chosen_clients(syn):
    y_before = [y.copy() for y in syn.y]
    noisy = syn.corrupt_labels(0.2, seed=11)
    chosen = noisy.meta["noisy_clients"]
    assert isinstance(chosen, list) and all(type(i) is int for i in chosen)
    assert chosen == sorted(chosen) and len(set(chosen)) == len(chosen) == 6
    assert all(0 <= i < 30 for i in chosen)

    agree, total = 0, 0
    for k in range(syn.num_clients):
        np.testing.assert_array_equal(noisy.X[k], syn.X[k])
        np.testing.assert_array_equal(noisy.X_test[k], syn.X_test[k])
        np.testing.assert_array_equal(noisy.y_test[k], syn.y_test[k])  # test split clean
        assert noisy.y[k].dtype == np.int64 and noisy.y[k].shape == syn.y[k].shape
        if k in chosen:
            assert noisy.y[k].min() >= 0 and noisy.y[k].max() < 10
            assert not np.array_equal(noisy.y[k], syn.y[k])
            agree += int(np.sum(noisy.y[k] == syn.y[k]))
            total += syn.y[k].size
        else:
            np.testing.assert_array_equal(noisy.y[k], syn.y[k])
    # uniform random labels agree with the true ones about 1/C of the time
    assert 0.03 < agree / total < 0.2
    # the noisy labels are spread over the classes
    pooled = np.concatenate([noisy.y[k] for k in chosen])
    counts = np.bincount(pooled, minlength=10)
    assert counts.min() > 0.5 * pooled.size / 10

    # original dataset unchanged, same seed -> same corruption, other seed differs
    for a, b in zip(syn.y, y_before):
        np.testing.assert_array_equal(a, b)
    assert "noisy_clients" not in syn.meta
    again = syn.corrupt_labels(0.2, seed=11)
    assert again.meta["noisy_clients"] == chosen
    assert_same_dataset(again, noisy)
    other = syn.corrupt_labels(0.2, seed=12)
    assert other.meta["noisy_clients"] != chosen or not all(
        np.array_equal(a, b) for a, b in zip(other.y, noisy.y)
    )


def test_corrupt_labels_edge_fractions_and_subset(syn):
    none = syn.corrupt_labels(0.0, seed=0)
    assert none.meta["noisy_clients"] == []
    assert_same_dataset(none, syn)
    every = syn.corrupt_labels(1.0, seed=0)
    assert every.meta["noisy_clients"] == list(range(30))
    with pytest.raises(ValueError):
        syn.corrupt_labels(1.5, seed=0)
    # subset renumbers the noisy clients
    noisy = syn.corrupt_labels(0.5, seed=3)
    chosen = noisy.meta["noisy_clients"]
    clean = [k for k in range(30) if k not in chosen]
    sub = noisy.subset([clean[0], chosen[0], chosen[1]])
    assert sub.meta["noisy_clients"] == [1, 2]


# --------------------------------------------------------------------------- #
# Dirichlet partition (pure NumPy) and digits
# --------------------------------------------------------------------------- #
def test_dirichlet_partition_covers_rows_and_skews_labels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=3000)
    tv = {}
    for alpha in (0.1, 100.0):
        parts = dirichlet_partition(labels, 20, alpha, np.random.default_rng(1), min_samples=10)
        assert len(parts) == 20
        allidx = np.concatenate(parts)
        np.testing.assert_array_equal(np.sort(allidx), np.arange(3000))  # exact cover
        assert min(len(p) for p in parts) >= 10
        tv[alpha] = mean_tv_to_global([labels[p] for p in parts], 10)
    assert tv[0.1] > tv[100.0] + 0.3
    assert tv[100.0] < 0.15
    with pytest.raises(ValueError):
        dirichlet_partition(labels, 400, 1.0, np.random.default_rng(0), min_samples=10)


def test_dirichlet_partition_tops_up_small_clients():
    labels = np.random.default_rng(0).integers(0, 10, size=600)
    raw = dirichlet_partition(labels, 40, 0.05, np.random.default_rng(2), min_samples=0)
    assert min(len(p) for p in raw) < 5  # without top-up some clients are tiny
    parts = dirichlet_partition(labels, 40, 0.05, np.random.default_rng(2), min_samples=5)
    assert min(len(p) for p in parts) >= 5
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(600))
    # topping up keeps the partition strongly label-skewed
    assert mean_tv_to_global([labels[p] for p in parts], 10) > 0.5


@pytest.fixture(scope="module")
def digits_sets():
    pytest.importorskip("sklearn")
    return {a: fds.digits(num_clients=20, alpha=a, seed=0) for a in (0.1, 100.0)}


def test_digits_shapes_scaling_and_coverage(digits_sets):
    ds = digits_sets[0.1]
    assert ds.num_clients == 20 and ds.dim == 64 and ds.num_classes == 10
    X, y = ds.centralized()
    Xt, yt = ds.centralized("test")
    assert X.shape[0] + Xt.shape[0] == 1797
    for arr in (X, Xt):
        assert arr.dtype == np.float64 and arr.min() >= 0.0 and arr.max() <= 1.0
    assert X.max() == 1.0  # scaled by 16, not min-max per feature
    assert y.dtype == np.int64 and set(np.unique(np.concatenate([y, yt]))) == set(range(10))
    totals = ds.sizes + ds.test_sizes
    assert totals.min() >= 10 and np.all(ds.test_sizes >= 1) and np.all(ds.sizes >= 1)
    assert len(np.unique(ds.sizes)) > 5
    # rows are the sklearn rows: pixel values are multiples of 1/16
    np.testing.assert_allclose(X * 16, np.round(X * 16))


def test_digits_non_iid_skew_grows_as_alpha_shrinks(digits_sets):
    tv_small = mean_tv_to_global(digits_sets[0.1].y, 10)
    tv_large = mean_tv_to_global(digits_sets[100.0].y, 10)
    assert tv_small > tv_large + 0.3
    assert tv_large < 0.25


def test_digits_is_deterministic(digits_sets):
    again = fds.digits(num_clients=20, alpha=0.1, seed=0)
    assert_same_dataset(again, digits_sets[0.1])
    other = fds.digits(num_clients=20, alpha=0.1, seed=1)
    assert not np.array_equal(other.sizes, again.sizes)


def test_digits_without_sklearn_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        fds.digits()
