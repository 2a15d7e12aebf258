"""The Flower backend: each round of a graph runs on Flower nodes (``backend="flower"``).

``fad.run(graph, *args, backend="flower")`` runs on a Flower simulation kept alive in the
process (:mod:`.simulation`): the ServerApp runs the server work and sends each node its round's
client sub-graph (by hash after the first time) and the broadcast values; each ClientApp
(:mod:`.client`) runs the sub-graph with fadcore on its own data, keeps stateful-reverse
residuals in its own ``context.state`` and replies with its contribution to the aggregations,
which the server combines (:mod:`.server`: a runtime of the round executor,
:mod:`fadcore.backends.executor`). ``fad export flower`` (:mod:`.export`) writes the
same ServerApp/ClientApp as a Flower app for ``flwr run``. See docs/flower.md.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as _err:   # available() skips the backend
    raise ImportError("the flower backend needs flwr[simulation]: "
                      "pip install 'fadcore[flower]'") from _err

from ...errors import FadError
from ...ir.types import SERVER
from ..executor import EVALUATORS
from ..inputs import Inputs
from .server import FlowerRoundError, RoundTraffic, run_graph
from .simulation import Simulation, default_simulation, set_default_simulation, shutdown

__all__ = ["execute", "FlowerRoundError", "RoundTraffic", "Simulation", "default_simulation",
           "set_default_simulation", "shutdown", "last_traffic"]

_LAST: dict = {}


def last_traffic() -> list:
    """Per round of the last ``backend="flower"`` run: a :class:`RoundTraffic` (bytes read off
    the messages actually sent and received)."""
    return list(_LAST.get("traffic", []))


def execute(graph, inputs: Inputs, simulation: Simulation | None = None, timeout=None,
            evaluator: str = "auto", on_dropout: str = "fail", on_round=None,
            secure=None) -> list:
    """Run ``graph`` on Flower; same results and contract as ``reference.execute``.

    ``simulation``: a :class:`Simulation` (default: the process's, started on first use);
    ``timeout``: seconds a round waits for the nodes' replies (None: no limit); ``evaluator``:
    what nodes run sub-graphs with (``"auto"``: numba, else the reference evaluator);
    ``on_dropout``: ``"fail"`` or ``"resample"`` (replace a node that does not reply by a
    spare node where the graph keeps no client state across that round); ``on_round``:
    called with each round's :class:`RoundTraffic`.
    """
    if evaluator not in EVALUATORS:
        raise FadError(f"flower backend: evaluator must be one of {EVALUATORS}, got "
                       f"{evaluator!r}")
    n = inputs.num_clients or 0
    sim = simulation if simulation is not None else default_simulation(n)
    client_k = [k for k, v in enumerate(graph.inputs) if v.type.placement is not SERVER]
    data = ""
    if client_k and n:
        data = sim.stage_data([[inputs.values[k][i] for k in client_k] for i in range(n)])
    server_values = [x if v.type.placement is SERVER else None
                     for v, x in zip(graph.inputs, inputs.values)]
    cohort = sim.nodes(n) if n else []
    spares = sim.spares(n) if n else []

    def job(grid):
        return run_graph(grid, graph, server_values, cohort, session=sim.session,
                         spares=spares, data=data, client_values=inputs.values,
                         timeout=timeout, evaluator=evaluator, on_dropout=on_dropout,
                         on_round=on_round, secure=secure)

    outs, traffic = sim.submit(job)
    _LAST["traffic"] = traffic
    return outs
