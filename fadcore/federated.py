"""Federated primitives: moving values between SERVER and CLIENTS."""

from __future__ import annotations

from . import ops, pytree
from .core import Tracer
from .errors import PlacementError
from .ir.types import CLIENTS

__all__ = ["broadcast", "sum", "mean", "weighted_mean", "secure_sum", "num_clients", "map"]


def _tree_map(f, tree):
    leaves, treedef = pytree.flatten(tree)
    return pytree.unflatten(treedef, [f(x) for x in leaves])


def broadcast(x):
    """SERVER -> CLIENTS: every client receives the same value (``T@SERVER -> T@CLIENTS``).

    Like every federated primitive, it maps over a pytree (e.g. a dict of model parameters)."""
    return _tree_map(ops.broadcast, x)


def sum(x):  # noqa: A001
    """CLIENTS -> SERVER: the sum of the clients' values."""
    return _tree_map(ops.fsum, x)


def mean(x):
    """CLIENTS -> SERVER: the unweighted mean of the clients' values."""
    return _tree_map(ops.fmean, x)


def weighted_mean(x, weight):
    """CLIENTS -> SERVER: ``sum_i w_i x_i / sum_i w_i`` with one scalar weight per client
    (the same weight for every leaf of a pytree ``x``)."""
    return _tree_map(lambda leaf: ops.weighted_mean(leaf, weight), x)


def secure_sum(x):
    """CLIENTS -> SERVER: a sum the server learns only in aggregate (secure aggregation).

    Simulated here as an exact sum; what matters to fadcore is that it is the only
    clients -> server flow privacy policies allow, and that derivatives keep to it."""
    return _tree_map(ops.secure_sum, x)


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
