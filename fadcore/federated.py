"""Federated primitives: moving values between SERVER and CLIENTS."""

from __future__ import annotations

from . import ops
from .core import Tracer
from .errors import PlacementError
from .ir.types import CLIENTS

__all__ = ["broadcast", "sum", "mean", "weighted_mean", "secure_sum", "num_clients", "map"]


def broadcast(x):
    """SERVER -> CLIENTS: every client receives the same value (``T@SERVER -> T@CLIENTS``)."""
    return ops.broadcast(x)


def sum(x):  # noqa: A001
    """CLIENTS -> SERVER: the sum of the clients' values."""
    return ops.fsum(x)


def mean(x):
    """CLIENTS -> SERVER: the unweighted mean of the clients' values."""
    return ops.fmean(x)


def weighted_mean(x, weight):
    """CLIENTS -> SERVER: ``sum_i w_i x_i / sum_i w_i`` with one scalar weight per client."""
    return ops.weighted_mean(x, weight)


def secure_sum(x):
    """CLIENTS -> SERVER: a sum the server learns only in aggregate (secure aggregation).

    Simulated here as an exact sum; what matters to fadcore is that it is the only
    clients -> server flow privacy policies allow, and that derivatives keep to it."""
    return ops.secure_sum(x)


def num_clients():
    """The number of participating clients, a ``f64[]@SERVER`` value bound at run time."""
    return ops.num_clients()


def map(fn, *client_values):  # noqa: A001
    """Run ``fn`` on client-placed values (readability sugar: local ops already run per client)."""
    for i, v in enumerate(client_values):
        if isinstance(v, Tracer) and v.placement is not CLIENTS:
            raise PlacementError(f"fad.map: argument {i} is {v.type}, not a CLIENTS value; "
                                 "broadcast it first")
    return fn(*client_values)
