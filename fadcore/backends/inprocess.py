"""The in-process runtime of the round executor: clients simulated in this process.

Each round's client step runs separately on groups of clients (``chunk_size`` clients each;
default: all clients in one group; under secure aggregation every client of a group still masks
its own contribution with its own keys). Kept client values stay in this runtime's memory
between rounds. It is what ``fad.run(..., secure_aggregation=...)``
uses with the numba and reference backends, the simplest :class:`~.executor.Runtime` to read
when writing one, and a test bed: ``drop={round: [clients]}`` makes those clients vanish after
they masked their contribution in that round (their messages never reach the server).
"""

from __future__ import annotations

from ..errors import FadError
from .executor import EVALUATORS, Execution, Runtime, SecurePartial, run_client_step
from .inputs import Inputs

__all__ = ["InProcessRuntime", "execute"]


def _without(partial, dropped: set):
    """A group's partial as the server gets it when the ``dropped`` clients vanish after
    masking (plain partials are group sums: they cannot lose single clients and stay)."""
    if not isinstance(partial, SecurePartial):
        return partial
    keep = [k for k, i in enumerate(partial.clients) if i not in dropped]
    return SecurePartial([partial.clients[k] for k in keep], partial.rows[keep])


class InProcessRuntime(Runtime):
    """Run client steps here, ``chunk_size`` clients per group, with ``evaluator``.

    ``on_message(kind, round, payload)``: called with everything the server receives
    (``"public_keys"``: the key-agreement uploads; ``"partials"``: a group's partials), for
    monitoring and for tests that inspect the server's view.
    """

    def __init__(self, chunk_size: int | None = None, evaluator: str = "auto", drop=None,
                 on_message=None):
        if evaluator not in EVALUATORS:
            raise FadError(f"in-process runtime: evaluator must be one of {EVALUATORS}, "
                           f"got {evaluator!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool)
                                       or not isinstance(chunk_size, int) or chunk_size < 1):
            raise FadError(f"in-process runtime: chunk_size must be a positive integer, got "
                           f"{chunk_size!r}")
        self.chunk_size, self.evaluator = chunk_size, evaluator
        self.drop = {int(r): set(cs) for r, cs in (drop or {}).items()}
        self.on_message = on_message
        self.kept: dict = {}        # round -> per group: StepResult.kept
        self.keys: list = []        # per group: its clients' private keys (secure runs)

    def start(self, execution: Execution) -> None:
        self.inputs: Inputs = execution.inputs
        n = self.inputs.num_clients
        size = self.chunk_size or n
        self.groups = [(lo, min(n, lo + size)) for lo in range(0, n, size)]

    def _tell(self, kind, rnd, payload):
        if self.on_message is not None:
            self.on_message(kind, rnd, payload)

    def public_keys(self, session) -> list:
        from .secagg import ClientKeys
        self.keys = [ClientKeys(session, range(lo, hi)) for lo, hi in self.groups]
        out = [pk for k in self.keys for pk in k.public]
        self._tell("public_keys", 0, out)
        return out

    def client_step(self, rp, server_values, masking=None) -> list:
        inputs, parts, kept = self.inputs, [], []
        for g, (lo, hi) in enumerate(self.groups):
            srcs = [[m for m in inputs.values[s[1]][lo:hi]] if s[0] == "data"
                    else self.kept[s[1]][g][s[2]] for s in rp.client_in]
            rows = None if inputs.rows is None else inputs.rows[lo:hi]
            ctx = None if masking is None else masking.for_group(lo, hi, self.keys[g])
            res = run_client_step(rp.subgraph, rp.num_partials, server_values, srcs, hi - lo,
                                  rows, self.evaluator, rp.key, ctx)
            if rp.index in self.drop:
                res.partials = [_without(p, self.drop[rp.index]) for p in res.partials]
            self._tell("partials", rp.index, res.partials)
            parts.append(res.partials)
            kept.append(res.kept)
        if rp.kept:
            self.kept[rp.index] = kept
        return parts

    def client_output(self, rp, j) -> list:
        return [m for group in self.kept[rp.index] for m in group[j]]

    def release(self, round_index: int) -> None:
        self.kept.pop(round_index, None)

    def finish(self) -> None:
        self.kept.clear()
        self.keys = []


def execute(graph, inputs: Inputs, chunk_size: int | None = None, evaluator: str = "auto",
            secure=None, drop=None, on_message=None) -> list:
    """Run ``graph`` round by round in this process (see :class:`InProcessRuntime`)."""
    runtime = InProcessRuntime(chunk_size, evaluator, drop, on_message)
    return Execution(graph, inputs, runtime, secure).run()
