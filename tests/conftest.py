"""Shared test set-up: hypothesis profiles, a seeded generator and ragged client data."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import settings

import fadcore as fad

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          print_blob=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

#: Row counts per client for the client counts the tests use: ragged as soon as there are two
#: clients, and always with a one-row client among several.
CLIENT_ROWS = {1: [3], 2: [2, 5], 7: [4, 1, 6, 3, 2, 5, 3]}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


class Ragged:
    """Makes client data with per-client row counts.

    ``ragged(rows, 3)`` is a list with one ``(rows[i], 3)`` float64 array per client;
    ``ragged(rows, dtype=np.int64, high=5)`` integer labels in ``[0, 5)``;
    ``ragged(rows, 3, positive=True)`` values in ``[0.5, 2)`` (for log, sqrt, ...);
    ``ragged.clients(rows, 3)`` the same wrapped in :func:`fad.clients`.
    """

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    @staticmethod
    def rows(num_clients: int) -> list[int]:
        return list(CLIENT_ROWS[num_clients]) if num_clients in CLIENT_ROWS else [
            1 + (3 * i) % 5 for i in range(num_clients)]

    def array(self, shape, dtype=np.float64, high=None, positive=False) -> np.ndarray:
        if high is not None:
            return self.rng.integers(0, high, size=shape).astype(dtype)
        if positive:
            return self.rng.uniform(0.5, 2.0, size=shape).astype(dtype)
        return self.rng.normal(size=shape).astype(dtype)

    def __call__(self, rows, *trailing, dtype=np.float64, high=None, positive=False):
        return [self.array((n, *trailing), dtype, high, positive) for n in rows]

    def clients(self, rows, *trailing, **kw) -> fad.ClientValues:
        return fad.clients(self(rows, *trailing, **kw))


@pytest.fixture
def ragged(rng) -> Ragged:
    return Ragged(rng)
