"""Federated benchmark datasets: Synthetic(alpha, beta) and non-IID digits.

Every dataset is returned as a :class:`FederatedDataset`: a list of per-client
feature matrices and label vectors (ragged: clients hold different numbers of
rows), plus a per-client held-out split that can serve as test or validation
data.  Everything is generated in NumPy and is fully determined by ``seed``
(through :func:`numpy.random.default_rng`).

Synthetic(alpha, beta)
----------------------
The generator of Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith, "Federated
Optimization in Heterogeneous Networks" (FedProx), MLSys 2020
(arXiv:1812.06127), Section 5.1, following their public ``generate_synthetic``
scripts.  For client ``k`` out of ``K``, with ``d`` features and ``C`` classes:

* model heterogeneity (controlled by ``alpha``):
  ``u_k ~ N(0, alpha)``, ``W_k ~ N(u_k, 1)`` of shape ``(d, C)``,
  ``b_k ~ N(u_k, 1)`` of shape ``(C,)``;
* data heterogeneity (controlled by ``beta``):
  ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)`` of shape ``(d,)``;
* features ``x ~ N(v_k, Sigma)`` with diagonal ``Sigma_jj = j ** -1.2``
  (``j = 1..d``);
* labels ``y = argmax(softmax(W_k^T x + b_k))``, i.e. the argmax of the logits.

As in the reference script, ``alpha`` and ``beta`` are used as the *standard
deviation* of ``u_k`` and ``B_k`` (the paper writes ``N(0, alpha)``).  Client
sizes follow the script's heavy-tailed rule ``floor(lognormal(4, 2)) + 50``;
the lognormal parameters and the offset are configurable, and the sizes are
clipped to ``[min_samples, max_samples]`` so that the default 30-client set
stays small (a few thousand rows).  ``iid=True`` gives the paper's IID variant:
one shared ``W ~ N(0, 1)``, ``b ~ N(0, 1)`` and ``v = 0`` for all clients.
Larger ``alpha``/``beta`` means more heterogeneous clients; Synthetic(0, 0) still
has a different model per client, while ``iid=True`` has none.

Non-IID digits
--------------
The 8x8 handwritten digits of scikit-learn (:func:`sklearn.datasets.load_digits`,
1797 images, 10 classes, shipped with scikit-learn, no download), features
scaled to ``[0, 1]`` by dividing by 16.  Rows are spread over clients with the
standard Dirichlet label-skew partition of Hsu, Qi and Brown, "Measuring the
Effects of Non-Identical Data Distribution for Federated Visual
Classification" (arXiv:1909.06335, 2019), also used by Yurochkin et al.,
"Bayesian Nonparametric Federated Learning of Neural Networks" (ICML 2019):
for each class, the proportions of its rows that go to each client are drawn
from ``Dirichlet(alpha * 1_K)``.  Small ``alpha`` gives clients dominated by a
few classes; large ``alpha`` approaches an IID split.  Clients left with too few
rows receive rows from the largest client, so every client has at least
``min_samples`` rows.

Train/test split
----------------
Each client's rows are shuffled and split into train and test parts: the test
part has ``round(test_fraction * n)`` rows, at least one, and the train part
keeps at least one row.  The split uses its own random stream, so changing
``test_fraction`` does not change the generated rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "FederatedDataset",
    "synthetic",
    "digits",
    "dirichlet_partition",
    "train_test_split_clients",
]

_DIGITS_IMPORT_MESSAGE = "fadcore.datasets.digits needs scikit-learn: pip install scikit-learn"


# --------------------------------------------------------------------------- #
# Container
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False, repr=False)
class FederatedDataset:
    """A client-partitioned classification dataset.

    Attributes
    ----------
    name:
        Human-readable name, e.g. ``"synthetic(1,1)"``.
    X, y:
        Per-client training features (``float64``, shape ``(n_i, d)``) and
        integer labels (``int64``, shape ``(n_i,)``).  ``n_i`` varies.
    num_classes:
        Number of classes ``C``; every label lies in ``[0, C)``.
    X_test, y_test:
        Per-client held-out split for the same clients (usable as validation).
    meta:
        Free-form information: generator parameters, seed, noisy clients...

    Arrays are converted to ``float64``/``int64`` on construction (without a
    copy when they already have that dtype).  :meth:`subset` shares the arrays
    of the original dataset; do not modify them in place.
    """

    name: str
    X: list[np.ndarray]
    y: list[np.ndarray]
    num_classes: int
    X_test: list[np.ndarray]
    y_test: list[np.ndarray]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        X = [np.asarray(a, dtype=np.float64) for a in self.X]
        y = [np.asarray(a, dtype=np.int64) for a in self.y]
        X_test = [np.asarray(a, dtype=np.float64) for a in self.X_test]
        y_test = [np.asarray(a, dtype=np.int64) for a in self.y_test]
        k = len(X)
        if k == 0:
            raise ValueError("a FederatedDataset needs at least one client")
        if not (len(y) == len(X_test) == len(y_test) == k):
            raise ValueError(
                f"X, y, X_test, y_test must list the same clients; got lengths "
                f"{len(X)}, {len(y)}, {len(X_test)}, {len(y_test)}"
            )
        num_classes = int(self.num_classes)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        dim = None
        for split, feats, labels in (("train", X, y), ("test", X_test, y_test)):
            for i, (xi, yi) in enumerate(zip(feats, labels)):
                if xi.ndim != 2:
                    raise ValueError(f"client {i} {split} features must be 2-D, got shape {xi.shape}")
                if yi.ndim != 1 or yi.shape[0] != xi.shape[0]:
                    raise ValueError(
                        f"client {i} {split} labels must have shape ({xi.shape[0]},), got {yi.shape}"
                    )
                if dim is None:
                    dim = xi.shape[1]
                elif xi.shape[1] != dim:
                    raise ValueError(
                        f"client {i} {split} features have {xi.shape[1]} columns, expected {dim}"
                    )
                if yi.size and (yi.min() < 0 or yi.max() >= num_classes):
                    raise ValueError(
                        f"client {i} {split} labels must lie in [0, {num_classes}), "
                        f"got range [{yi.min()}, {yi.max()}]"
                    )
        object.__setattr__(self, "X", X)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "X_test", X_test)
        object.__setattr__(self, "y_test", y_test)
        object.__setattr__(self, "num_classes", num_classes)
        object.__setattr__(self, "meta", dict(self.meta))

    # -- basic properties --------------------------------------------------- #
    @property
    def num_clients(self) -> int:
        """Number of clients ``K``."""
        return len(self.X)

    @property
    def dim(self) -> int:
        """Number of features ``d``."""
        return int(self.X[0].shape[1])

    @property
    def sizes(self) -> np.ndarray:
        """Training rows per client, ``int64`` array of shape ``(K,)``."""
        return np.array([xi.shape[0] for xi in self.X], dtype=np.int64)

    @property
    def test_sizes(self) -> np.ndarray:
        """Held-out rows per client, ``int64`` array of shape ``(K,)``."""
        return np.array([xi.shape[0] for xi in self.X_test], dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"FederatedDataset(name={self.name!r}, num_clients={self.num_clients}, "
            f"dim={self.dim}, num_classes={self.num_classes}, "
            f"train_rows={int(self.sizes.sum())}, test_rows={int(self.test_sizes.sum())})"
        )

    # -- transformations ---------------------------------------------------- #
    def subset(self, client_ids: Iterable[int]) -> "FederatedDataset":
        """The dataset restricted to ``client_ids``, in the order given.

        Client ``j`` of the result is client ``client_ids[j]`` of ``self``.
        ``meta["client_ids"]`` records the ids in the *original* numbering
        (composed across repeated subsets) and ``meta["noisy_clients"]``, if
        present, is renumbered to the new positions.
        """
        ids = [int(i) for i in np.asarray(list(client_ids), dtype=np.int64).ravel()]
        if not ids:
            raise ValueError("subset needs at least one client id")
        if len(set(ids)) != len(ids):
            raise ValueError(f"client ids must be distinct, got {ids}")
        bad = [i for i in ids if not 0 <= i < self.num_clients]
        if bad:
            raise IndexError(f"client ids {bad} out of range for {self.num_clients} clients")
        meta = dict(self.meta)
        parent = meta.get("client_ids", list(range(self.num_clients)))
        meta["client_ids"] = [int(parent[i]) for i in ids]
        if "noisy_clients" in meta:
            noisy = set(int(i) for i in meta["noisy_clients"])
            meta["noisy_clients"] = sorted(j for j, i in enumerate(ids) if i in noisy)
        return FederatedDataset(
            name=self.name,
            X=[self.X[i] for i in ids],
            y=[self.y[i] for i in ids],
            num_classes=self.num_classes,
            X_test=[self.X_test[i] for i in ids],
            y_test=[self.y_test[i] for i in ids],
            meta=meta,
        )

    def corrupt_labels(self, fraction: float, seed: int) -> "FederatedDataset":
        """Replace all training labels of a random fraction of clients by noise.

        ``round(fraction * num_clients)`` clients are drawn without
        replacement; each of their training labels is replaced by an
        independent uniform draw from ``[0, num_classes)``.  Other clients and
        every test split are left untouched (the original dataset is not
        modified).  ``meta["noisy_clients"]`` becomes the sorted list of noisy
        client ids (united with any recorded earlier).
        """
        fraction = float(fraction)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
        rng = np.random.default_rng(seed)
        count = int(np.floor(fraction * self.num_clients + 0.5))
        chosen = np.sort(rng.choice(self.num_clients, size=count, replace=False))
        y = list(self.y)
        for i in chosen:
            y[i] = rng.integers(0, self.num_classes, size=self.y[i].shape[0], dtype=np.int64)
        meta = dict(self.meta)
        previous = {int(i) for i in meta.get("noisy_clients", [])}
        meta["noisy_clients"] = sorted(previous | {int(i) for i in chosen})
        meta["label_noise"] = {"fraction": fraction, "seed": seed}
        return FederatedDataset(
            name=self.name,
            X=list(self.X),
            y=y,
            num_classes=self.num_classes,
            X_test=list(self.X_test),
            y_test=list(self.y_test),
            meta=meta,
        )

    def centralized(self, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """All clients' rows concatenated (client order): ``(X, y)``.

        ``split="train"`` (default) pools the training data, ``split="test"``
        the held-out data.
        """
        if split == "train":
            X, y = self.X, self.y
        elif split == "test":
            X, y = self.X_test, self.y_test
        else:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return np.concatenate(X, axis=0), np.concatenate(y, axis=0)


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def _check_test_fraction(test_fraction: float) -> float:
    test_fraction = float(test_fraction)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    return test_fraction


def train_test_split_clients(
    X: Sequence[np.ndarray],
    y: Sequence[np.ndarray],
    test_fraction: float,
    rng: np.random.Generator,
) -> tuple[list, list, list, list]:
    """Shuffle each client's rows and split them into train and test parts.

    The test part of a client with ``n >= 2`` rows has
    ``clip(round(test_fraction * n), 1, n - 1)`` rows.
    """
    test_fraction = _check_test_fraction(test_fraction)
    X_tr, y_tr, X_te, y_te = [], [], [], []
    for i, (xi, yi) in enumerate(zip(X, y)):
        n = xi.shape[0]
        if n < 2:
            raise ValueError(f"client {i} has {n} rows; a train/test split needs at least 2")
        n_test = int(np.clip(np.floor(test_fraction * n + 0.5), 1, n - 1))
        perm = rng.permutation(n)
        test_idx, train_idx = perm[:n_test], perm[n_test:]
        X_tr.append(xi[train_idx])
        y_tr.append(yi[train_idx])
        X_te.append(xi[test_idx])
        y_te.append(yi[test_idx])
    return X_tr, y_tr, X_te, y_te


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_samples: int = 1,
) -> list[np.ndarray]:
    """Label-skew partition of row indices over ``num_clients`` clients.

    For every class, the class's rows are shuffled and cut into ``num_clients``
    consecutive pieces with sizes proportional to a ``Dirichlet(alpha)`` draw.
    Afterwards, while some client has fewer than ``min_samples`` rows, rows of
    the most frequent class of the currently largest client are moved to it.
    Returns one sorted index array per client; together they cover every row
    exactly once.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    num_clients = int(num_clients)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_samples * num_clients > n:
        raise ValueError(
            f"cannot give {num_clients} clients {min_samples} rows each out of {n} rows"
        )
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = np.floor(np.cumsum(props)[:-1] * idx.size + 0.5).astype(np.int64)
        for k, piece in enumerate(np.split(idx, cuts)):
            parts[k].extend(piece.tolist())

    # Top up clients that ended up too small, from the largest client.
    while True:
        sizes = np.array([len(p) for p in parts])
        small = np.flatnonzero(sizes < min_samples)
        if small.size == 0:
            break
        receiver = int(small[0])
        donor = int(np.argmax(sizes))
        donor_rows = np.asarray(parts[donor], dtype=np.int64)
        donor_labels = labels[donor_rows]
        values, counts = np.unique(donor_labels, return_counts=True)
        top = values[np.argmax(counts)]
        candidates = donor_rows[donor_labels == top]
        need = min_samples - sizes[receiver]
        spare = sizes[donor] - min_samples
        take = int(min(need, spare, candidates.size))
        moved = rng.choice(candidates, size=take, replace=False)
        moved_set = set(moved.tolist())
        parts[donor] = [r for r in parts[donor] if r not in moved_set]
        parts[receiver].extend(moved.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _client_sizes(
    rng: np.random.Generator,
    num_clients: int,
    mean: float,
    sigma: float,
    offset: int,
    min_samples: int,
    max_samples: int,
) -> np.ndarray:
    raw = rng.lognormal(mean, sigma, size=num_clients)
    # Guard the cast: a huge lognormal draw is clipped anyway.
    raw = np.minimum(raw, float(max_samples) + abs(offset) + 1.0)
    sizes = raw.astype(np.int64) + int(offset)
    return np.clip(sizes, min_samples, max_samples)


# --------------------------------------------------------------------------- #
# Generators
# --------------------------------------------------------------------------- #
def _synthetic_models(rng, iid, alpha, beta, num_clients, dim, num_classes):
    """The generating quantities ``u, B, W, b, v`` of Synthetic(alpha, beta) (shared model
    and zero feature means when ``iid``), drawn from ``rng`` in a fixed order."""
    if iid:
        u = np.zeros(num_clients)
        B = np.zeros(num_clients)
        W_shared = rng.normal(0.0, 1.0, size=(dim, num_classes))
        b_shared = rng.normal(0.0, 1.0, size=num_classes)
        W = np.broadcast_to(W_shared, (num_clients, dim, num_classes)).copy()
        b = np.broadcast_to(b_shared, (num_clients, num_classes)).copy()
        v = np.zeros((num_clients, dim))
        return u, B, W, b, v
    u = rng.normal(0.0, alpha, size=num_clients)
    B = rng.normal(0.0, beta, size=num_clients)
    v = rng.normal(B[:, None], 1.0, size=(num_clients, dim))
    W = np.empty((num_clients, dim, num_classes))
    b = np.empty((num_clients, num_classes))
    for k in range(num_clients):
        W[k] = rng.normal(u[k], 1.0, size=(dim, num_classes))
        b[k] = rng.normal(u[k], 1.0, size=num_classes)
    return u, B, W, b, v


def synthetic(
    alpha: float = 1.0,
    beta: float = 1.0,
    num_clients: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    iid: bool = False,
    seed: int = 0,
    test_fraction: float = 0.2,
    min_samples: int = 50,
    max_samples: int = 300,
    size_mean: float = 4.0,
    size_sigma: float = 2.0,
    size_offset: int = 50,
) -> FederatedDataset:
    """The Synthetic(alpha, beta) dataset of FedProx (Li et al., MLSys 2020).

    Client ``k`` holds ``n_k = clip(floor(lognormal(size_mean, size_sigma)) +
    size_offset, min_samples, max_samples)`` rows in total (train + test),
    drawn as described in the module docstring.  With the defaults, 30 clients
    hold roughly 3-6 thousand rows.  ``iid=True`` ignores ``alpha`` and
    ``beta`` and uses one shared model and feature mean ``v = 0``.

    ``meta`` records the parameters, the seed and, under ``"true_params"``,
    the generating quantities: ``u`` and ``B`` (shape ``(K,)``), ``W``
    (``(K, d, C)``), ``b`` (``(K, C)``) and ``v`` (``(K, d)``).  Labels satisfy
    ``y == argmax(X @ W[k] + b[k], axis=1)`` for client ``k``.
    """
    num_clients, dim, num_classes = int(num_clients), int(dim), int(num_classes)
    if num_clients < 1 or dim < 1 or num_classes < 2:
        raise ValueError("need num_clients >= 1, dim >= 1 and num_classes >= 2")
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
    if not 2 <= int(min_samples) <= int(max_samples):
        raise ValueError(
            f"need 2 <= min_samples <= max_samples, got {min_samples}, {max_samples}"
        )
    test_fraction = _check_test_fraction(test_fraction)
    gen_seq, split_seq = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(gen_seq)

    sizes = _client_sizes(
        rng, num_clients, size_mean, size_sigma, size_offset, int(min_samples), int(max_samples)
    )
    std_x = np.arange(1, dim + 1, dtype=np.float64) ** (-1.2 / 2.0)  # sqrt(Sigma_jj)

    u, B, W, b, v = _synthetic_models(rng, iid, alpha, beta, num_clients, dim, num_classes)
    X_all, y_all = [], []
    for k in range(num_clients):
        xk = v[k] + rng.standard_normal((int(sizes[k]), dim)) * std_x
        # softmax is monotone, so argmax(softmax(z)) == argmax(z).
        yk = np.argmax(xk @ W[k] + b[k], axis=1).astype(np.int64)
        X_all.append(xk)
        y_all.append(yk)

    X_tr, y_tr, X_te, y_te = train_test_split_clients(
        X_all, y_all, test_fraction, np.random.default_rng(split_seq)
    )
    name = "synthetic_iid" if iid else f"synthetic({alpha:g},{beta:g})"
    meta = {
        "generator": "synthetic",
        "alpha": float(alpha),
        "beta": float(beta),
        "iid": bool(iid),
        "seed": seed,
        "test_fraction": test_fraction,
        "min_samples": int(min_samples),
        "max_samples": int(max_samples),
        "size_mean": float(size_mean),
        "size_sigma": float(size_sigma),
        "size_offset": int(size_offset),
        "true_params": {"u": u, "B": B, "W": W, "b": b, "v": v},
    }
    return FederatedDataset(name, X_tr, y_tr, num_classes, X_te, y_te, meta)


def digits(
    num_clients: int = 20,
    alpha: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.2,
    min_samples: int = 10,
) -> FederatedDataset:
    """scikit-learn's 8x8 digits split over clients with Dirichlet label skew.

    Features are the 64 pixel intensities divided by 16 (``float64`` in
    ``[0, 1]``); labels are the digits 0-9.  Each client receives at least
    ``min_samples`` rows in total (train + test, ``min_samples >= 2``).
    Raises :class:`ImportError` if scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - exercised via monkeypatch
        raise ImportError(_DIGITS_IMPORT_MESSAGE) from exc
    if int(min_samples) < 2:
        raise ValueError(f"min_samples must be >= 2, got {min_samples}")
    test_fraction = _check_test_fraction(test_fraction)
    data = load_digits()
    X = np.asarray(data.data, dtype=np.float64) / 16.0
    y = np.asarray(data.target, dtype=np.int64)

    part_seq, split_seq = np.random.SeedSequence(seed).spawn(2)
    parts = dirichlet_partition(
        y, num_clients, alpha, np.random.default_rng(part_seq), min_samples=int(min_samples)
    )
    X_tr, y_tr, X_te, y_te = train_test_split_clients(
        [X[p] for p in parts], [y[p] for p in parts], test_fraction,
        np.random.default_rng(split_seq),
    )
    meta = {
        "generator": "digits",
        "alpha": float(alpha),
        "seed": seed,
        "test_fraction": test_fraction,
        "min_samples": int(min_samples),
        "partition": parts,
    }
    return FederatedDataset(f"digits(alpha={alpha:g})", X_tr, y_tr, 10, X_te, y_te, meta)
