"""Models for the federated algorithms: parameters are dicts of arrays (pytrees).

A :class:`Model` is written once with :mod:`fadcore.numpy`, so the same ``apply`` and ``loss``
run inside a trace (at SERVER or at every client) and eagerly on NumPy arrays (evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fadcore import nn
from fadcore import numpy as fnp

__all__ = ["Model", "softmax_regression", "logistic_regression", "mlp"]


@dataclass(frozen=True)
class Model:
    """A classifier: ``init(seed) -> params``, ``apply(params, X) -> logits``.

    ``num_classes == 2`` with ``binary=True`` is logistic regression style: one logit per row,
    labels 0/1, the sigmoid cross-entropy loss. Otherwise logits are ``[rows, num_classes]`` and
    the loss is the softmax cross-entropy with integer labels.
    """

    name: str
    num_classes: int
    init_fn: Callable[[np.random.Generator], dict]
    apply: Callable
    binary: bool = False
    #: ``(factory, args)`` that makes this model again; models pickle through it (their
    #: ``init``/``apply`` are closures). A Model built by hand pickles if its functions do.
    recipe: tuple | None = field(default=None, compare=False, repr=False)

    def __reduce__(self):
        if self.recipe is not None:
            factory, args = self.recipe
            return (factory, tuple(args))
        return (Model, (self.name, self.num_classes, self.init_fn, self.apply, self.binary))

    def init(self, seed: int | np.random.Generator = 0) -> dict:
        """Initial parameters (a dict of float64 arrays), reproducible from ``seed``."""
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        return {k: np.asarray(v, dtype=np.float64) for k, v in self.init_fn(rng).items()}

    def row_losses(self, params, X, y):
        """One loss per row (traced or NumPy)."""
        z = self.apply(params, X)
        return nn.sigmoid_cross_entropy(z, y) if self.binary else nn.softmax_cross_entropy(z, y)

    def loss(self, params, X, y):
        """The mean loss over the rows of ``X`` (traced or NumPy)."""
        return fnp.mean(self.row_losses(params, X, y))

    def predict(self, params, X) -> np.ndarray:
        """Predicted labels (NumPy only)."""
        z = np.asarray(self.apply(params, np.asarray(X)))
        return (z > 0).astype(np.int64) if self.binary else np.argmax(z, axis=-1)

    def evaluate(self, params, X, y) -> tuple[float, float]:
        """``(mean loss, accuracy)`` on NumPy data."""
        X, y = np.asarray(X), np.asarray(y)
        loss = float(np.asarray(self.loss(params, X, y)))
        return loss, float(np.mean(self.predict(params, X) == y))

    def num_params(self) -> int:
        return int(sum(np.size(v) for v in self.init(0).values()))


# --------------------------------------------------------------------------- linear models

def softmax_regression(dim: int, num_classes: int) -> Model:
    """Multinomial logistic regression ``X W + b``, zero-initialised."""
    def init(rng):
        return {"W": np.zeros((dim, num_classes)), "b": np.zeros(num_classes)}

    def apply(p, X):
        return X @ p["W"] + p["b"]

    return Model(f"softmax_regression({dim}->{num_classes})", num_classes, init, apply,
                 recipe=(softmax_regression, (dim, num_classes)))


def logistic_regression(dim: int) -> Model:
    """Binary logistic regression ``X w + b`` (labels 0/1), zero-initialised."""
    def init(rng):
        return {"w": np.zeros(dim), "b": np.zeros(())}

    def apply(p, X):
        return X @ p["w"] + p["b"]

    return Model(f"logistic_regression({dim})", 2, init, apply, binary=True,
                 recipe=(logistic_regression, (dim,)))


# --------------------------------------------------------------------------- MLP

_ACTIVATIONS = {"tanh": fnp.tanh, "relu": fnp.relu}


def mlp(dim: int, hidden: int, num_classes: int, activation: str = "tanh") -> Model:
    """One hidden layer: ``act(X W1 + b1) W2 + b2``; weights ~ N(0, 1/fan_in), biases 0."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    act = _ACTIVATIONS[activation]

    def init(rng):
        return {"W1": rng.normal(0.0, dim ** -0.5, size=(dim, hidden)), "b1": np.zeros(hidden),
                "W2": rng.normal(0.0, hidden ** -0.5, size=(hidden, num_classes)),
                "b2": np.zeros(num_classes)}

    def apply(p, X):
        return act(X @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]

    return Model(f"mlp({dim}-{hidden}-{num_classes},{activation})", num_classes, init, apply,
                 recipe=(mlp, (dim, hidden, num_classes, activation)))
