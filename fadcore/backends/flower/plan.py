"""The round plan the Flower backend executes (adapter over the shared round executor)."""

from __future__ import annotations

from ..dask_backend import _reduce as reduce_partials, _run_server as run_server, plan

__all__ = ["plan", "reduce_partials", "run_server"]
