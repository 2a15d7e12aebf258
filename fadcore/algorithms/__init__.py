"""The paper's applications (Rush, Charles & Garrett, "Federated Automatic Differentiation",
JMLR 2024): FedAvg / FedOpt with server optimizers, a server learning rate learned online by
hypergradient descent through the round, and learned client weights for the weighted mean.

See docs/algorithms.md for the API and a worked example, docs/experiments.md for results.
"""

from __future__ import annotations

from .client_weights import ClientWeights
from .fedopt import FedOpt, fedavg
from .hypergradient import HypergradientLR
from .models import Model, logistic_regression, mlp, softmax_regression
from .optimizers import (SGD, Adam, Momentum, ServerOptimizer, adam, momentum,
                         server_optimizer, sgd)
from .training import RunResult, sample_cohort, split_server_data, train

__all__ = [
    "FedOpt", "fedavg", "HypergradientLR", "ClientWeights",
    "Model", "softmax_regression", "logistic_regression", "mlp",
    "ServerOptimizer", "SGD", "Momentum", "Adam", "sgd", "momentum", "adam", "server_optimizer",
    "train", "RunResult", "sample_cohort", "split_server_data",
]
