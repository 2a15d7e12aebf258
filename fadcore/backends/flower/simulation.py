"""One Flower simulation kept alive across graph runs.

Flower's Simulation Runtime (``flwr.simulation.run_simulation``: virtual SuperNodes running
ClientApps in Ray actors, the engine ``flwr run`` uses for a simulation federation) starts Ray
once, which costs 30-45 s on two cores. So fadcore starts one simulation per process on first
use and keeps it: its ServerApp ``main`` runs in the simulation's server thread and serves
*jobs* (graph runs) from a queue until the process exits or :func:`shutdown` is called. Each
``fad.run(..., backend="flower")`` is one job; the nodes keep their context (parsed sub-graphs,
client state of the current call) between jobs.

Client data is staged before a job: client i's arrays are written to a private temporary
directory as the partition file of the node with ``partition-id`` i, and the node loads its own
file (the simulation's stand-in for data that lives on the device). Messages carry sub-graphs,
broadcast values and contributions only. Telemetry is off (``FLWR_TELEMETRY_ENABLED=0``,
``RAY_USAGE_STATS_ENABLED=0``) and Ray listens on 127.0.0.1 only.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import queue
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future

from ...errors import FadError
from . import protocol as P

__all__ = ["Simulation", "default_simulation", "shutdown", "DEFAULT_NODES"]

#: Virtual SuperNodes of the default simulation (more are started if a run needs them).
DEFAULT_NODES = 10
#: Seconds allowed for the simulation (Ray) to start.
START_TIMEOUT = 600.0


def _quiet_env() -> None:
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray would otherwise replace builtins.print in this process (for its tqdm bars) as soon
    # as a worker logs a line
    os.environ["RAY_TQDM_PATCH_PRINT"] = "0"


def _at_exit(fn) -> None:
    """Call ``fn`` when the interpreter exits, *before* Python joins non-daemon threads.

    Flower's Simulation Runtime runs in threads Python joins at exit (its worker pool is a
    ``concurrent.futures`` executor, joined by ``threading``'s own exit hooks, which run before
    ``atexit``): the simulation must be told to stop first or the process never exits.
    ``threading._register_atexit`` is the hook ``concurrent.futures`` itself uses; hooks run in
    reverse order, so this one runs before the executor's join."""
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(fn)
    else:   # pragma: no cover -- other Pythons: at least stop at atexit
        atexit.register(fn)


class Simulation:
    """A running Flower simulation with ``num_nodes`` virtual SuperNodes serving graph runs.

    ``client_mods``: Flower client mods wrapped around fadcore's ClientApp (e.g. to inject
    faults in tests); ``cpus``: CPUs Ray may use (one ClientApp actor per CPU).
    """

    def __init__(self, num_nodes: int = DEFAULT_NODES, client_mods=(), cpus: int | None = None,
                 start_timeout: float = START_TIMEOUT):
        _quiet_env()
        from flwr.clientapp import ClientApp
        from flwr.serverapp import ServerApp

        from . import client as C
        from .server import Session

        self.num_nodes = int(num_nodes)
        self.cpus = int(cpus or min(2, os.cpu_count() or 1))
        self.session = Session()
        self.jobs: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.stage = tempfile.mkdtemp(prefix="fad-flower-")
        self._staged: list = []
        self.grid = None
        self.started = time.perf_counter()
        self.start_seconds = None

        server = ServerApp()

        @server.main()
        def main(grid, context):
            self._serve(grid)

        client = ClientApp(mods=list(client_mods))
        client.query(P.ACTION)(C.handle)
        client.query(P.HELLO_ACTION)(C.hello)
        self._server, self._client = server, client
        self.thread = threading.Thread(target=self._main, name="fad-flower-simulation",
                                       daemon=True)
        self.thread.start()
        _at_exit(self.close)
        if not self.ready.wait(start_timeout) or self.error is not None:
            raise FadError(f"flower backend: the Flower simulation did not start "
                           f"({self.error!r})") from self.error

    # ----------------------------------------------------------------------- threads

    def _main(self) -> None:
        from flwr.simulation import run_simulation
        backend_config = {
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": self.cpus, "num_gpus": 0, "include_dashboard": False,
                          "_node_ip_address": "127.0.0.1", "logging_level": "ERROR",
                          "log_to_driver": True},
        }
        try:
            run_simulation(server_app=self._server, client_app=self._client,
                           num_supernodes=self.num_nodes, backend_config=backend_config)
        except BaseException as err:  # noqa: BLE001 -- reported to whoever waits
            self.error = err
        finally:
            self.ready.set()
            self._fail_pending()

    def _serve(self, grid) -> None:
        from .server import hello
        if hasattr(grid, "pull_interval"):
            grid.pull_interval = 0.01       # InMemoryGrid polls for replies; 0.1 s by default
        deadline = time.perf_counter() + START_TIMEOUT
        while len(list(grid.get_node_ids())) < self.num_nodes:   # nodes register after
            if time.perf_counter() > deadline:                     # the ServerApp starts
                raise FadError("flower backend: the simulation's nodes did not register")
            time.sleep(0.05)
        self.session.partitions = hello(grid)
        self.grid = grid
        self.start_seconds = time.perf_counter() - self.started
        self.ready.set()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(grid))
            except BaseException as err:  # noqa: BLE001 -- the caller re-raises it
                fut.set_exception(err)

    def _fail_pending(self) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job[1].set_exception(FadError("flower backend: the simulation stopped"))

    # ----------------------------------------------------------------------- API

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.grid is not None

    def submit(self, fn):
        """Run ``fn(grid)`` in the ServerApp and return its result."""
        if not self.alive:
            raise FadError(f"flower backend: the simulation is not running ({self.error!r})")
        fut: Future = Future()
        self.jobs.put((fn, fut))
        while True:
            try:
                return fut.result(timeout=1.0)
            except TimeoutError:
                if not self.thread.is_alive():
                    raise FadError(f"flower backend: the simulation stopped while running a "
                                   f"graph ({self.error!r})") from self.error

    def nodes(self, n: int) -> list:
        """Node ids of partitions 0..n-1 (client i runs on partition i)."""
        if n > self.num_nodes:
            raise FadError(f"flower backend: {n} clients but the simulation has "
                           f"{self.num_nodes} nodes")
        return [self.session.partitions[p] for p in range(n)]

    def spares(self, n: int) -> list:
        return [self.session.partitions[p] for p in range(n, self.num_nodes)]

    def stage_data(self, per_client: list) -> str:
        """Write each client's arrays for its node; returns the directory (by content)."""
        h = hashlib.sha256()
        for arrays in per_client:
            for a in arrays:
                h.update(f"{a.dtype.str}{a.shape}".encode())
                h.update(memoryview(a).cast("B") if a.flags.c_contiguous and a.size else
                         a.tobytes())
            h.update(b"|")
        d = os.path.join(self.stage, h.hexdigest()[:32])
        P.write_staged(d, per_client)
        if d in self._staged:
            self._staged.remove(d)
        self._staged.append(d)
        while len(self._staged) > 64:
            shutil.rmtree(self._staged.pop(0), ignore_errors=True)
        return d

    def close(self) -> None:
        """Stop the simulation (Ray included) and remove the staged data; idempotent."""
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join(timeout=120)
        shutil.rmtree(self.stage, ignore_errors=True)


_DEFAULT: dict = {}
_LOCK = threading.Lock()


def default_simulation(min_nodes: int = 1) -> Simulation:
    """The process's simulation, started on first use (restarted with more nodes if a run
    needs more than it has)."""
    with _LOCK:
        sim = _DEFAULT.get("sim")
        if sim is not None and sim.alive and sim.num_nodes >= min_nodes:
            return sim
        if sim is not None:
            sim.close()
        sim = Simulation(max(DEFAULT_NODES, min_nodes))
        _DEFAULT["sim"] = sim
        return sim


def set_default_simulation(sim: Simulation | None) -> None:
    """Use ``sim`` for ``backend="flower"`` runs (e.g. one with client mods)."""
    with _LOCK:
        old = _DEFAULT.pop("sim", None)
        if old is not None and old is not sim:
            old.close()
        if sim is not None:
            _DEFAULT["sim"] = sim


def shutdown() -> None:
    """Stop the default simulation (Ray included)."""
    with _LOCK:
        sim = _DEFAULT.pop("sim", None)
    if sim is not None:
        sim.close()
