"""``fad export flower``: a fadcore graph as a deployable Flower app.

The app is a directory ``flwr run`` accepts::

    DIR/pyproject.toml            Flower app metadata, components, run config
    DIR/<package>/server_app.py   ServerApp: runs the graph's rounds on the connected nodes
    DIR/<package>/client_app.py   ClientApp: fadcore's (each node loads its own data)
    DIR/<package>/graph.json      the graph (fadcore's safe JSON format)
    DIR/<package>/server_args.json  the graph's SERVER arguments (e.g. the initial model)
    DIR/README.md                 how to run it

The run config (``[tool.flwr.app.config]``, overridable with ``flwr run --run-config``):
``client-data`` the ``"module:function"`` each node calls with its ``node_config`` to load its
own arrays for the graph's client arguments (a tuple, in argument order); ``num-clients`` the
cohort size (0: every node); ``timeout`` seconds per round; ``on-dropout`` ``fail`` or
``resample``; ``output`` the ``.npz`` file the ServerApp writes the results to.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time

import numpy as np

from ... import pytree
from ...errors import FadError
from ...ir.graph import Graph
from ...ir.types import SERVER

__all__ = ["export_app", "serve", "load_server_args", "save_results"]

FLWR_REQUIREMENT = "flwr[simulation]==1.42.*"


# --------------------------------------------------------------------------- writing the app

def _package_name(name: str) -> str:
    pkg = re.sub(r"[^0-9a-zA-Z_]", "_", name).strip("_").lower() or "fad"
    return f"{pkg}_app" if not pkg.endswith("_app") else pkg


def _encode_args(graph: Graph, leaves: list) -> list:
    out = []
    for k, (v, x) in enumerate(zip(graph.inputs, leaves)):
        if v.type.placement is SERVER:
            a = np.asarray(x, dtype=v.type.dtype.np)
            out.append({"input": k, "dtype": a.dtype.str, "shape": list(a.shape),
                        "data": a.reshape(-1).tolist()})
    return out


def load_server_args(path: str, graph: Graph) -> list:
    """One value per graph input: the SERVER arguments saved with the app, None for client
    inputs (the nodes load those)."""
    with open(path) as f:
        doc = json.load(f)
    values: list = [None] * len(graph.inputs)
    for a in doc["args"]:
        k = int(a["input"])
        t = graph.inputs[k].type
        arr = np.asarray(a["data"], dtype=np.dtype(a["dtype"])).reshape(a["shape"])
        if t.placement is not SERVER or arr.dtype != t.dtype.np or arr.shape != t.shape:
            raise FadError(f"{path}: argument {k} is {arr.dtype}{list(arr.shape)}, the graph "
                           f"takes {t}")
        values[k] = arr
    missing = [k for k, v in enumerate(graph.inputs)
               if v.type.placement is SERVER and values[k] is None]
    if missing:
        raise FadError(f"{path}: no value for the graph's SERVER argument(s) {missing}")
    return values


def _pyproject(app: str, pkg: str, client_data: str, num_clients: int, doc: str) -> str:
    return f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{app}"
version = "1.0.0"
description = "{doc}"
license = "Apache-2.0"
# every node (SuperNode) and the SuperLink's ServerApp process need these installed
dependencies = ["{FLWR_REQUIREMENT}", "fadcore"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fadcore"

[tool.flwr.app.components]
serverapp = "{pkg}.server_app:app"
clientapp = "{pkg}.client_app:app"

[tool.flwr.app.config]
client-data = "{client_data}"
num-clients = {num_clients}
timeout = 600.0
on-dropout = "fail"
output = "fad-result.npz"
'''


_SERVER_APP = '''"""ServerApp of {name}, written by `fad export flower` (fadcore)."""

from pathlib import Path

from flwr.serverapp import ServerApp

from fadcore.backends.flower.export import serve

app = ServerApp()


@app.main()
def main(grid, context):
    serve(grid, context, Path(__file__).parent)
'''

_CLIENT_APP = '''"""ClientApp of {name}, written by `fad export flower`: fadcore's ClientApp. Each node loads
its own data with the run config's `client-data` function and runs each round's client step."""

from fadcore.backends.flower import client

app = client.app
'''

_README = '''# {name} on Flower

Written by `fad export flower {spec}`. The graph: `{pkg}/graph.json` ({rounds} round(s));
its SERVER arguments: `{pkg}/server_args.json`. Clients: {clients}.

Every node (SuperNode) and the SuperLink need `fadcore` and `{flwr}` installed, plus the
module of the `client-data` function (`{client_data}`), which each node calls with its
`node_config` to load its own arrays for the graph's client arguments, in order:
{client_args}

Run it on a local SuperLink (simulation), nothing installed at run time:

```sh
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
flwr run . local --stream --run-config 'output="/tmp/fad-result.npz"'
```

or against your own SuperLink and SuperNodes (`flower-superlink --insecure`,
`flower-supernode --insecure --superlink 127.0.0.1:9092 --node-config "partition-id=0"`, ...).
The ServerApp writes the graph's outputs to `output` (`out0`, `out1`, ...; a client-placed
output as `out<k>.client<i>`) and logs the bytes each round moved.
'''


def export_app(fn, args: tuple, out: str, client_data: str, name: str | None = None,
               spec: str = "") -> str:
    """Write the Flower app running the traced function ``fn`` (``fad.trace``: backends import
    nothing from the tracing layer above them) at ``args`` into directory ``out``; returns the
    app's package directory. ``args`` give the SERVER arguments' values and the client
    arguments' types (their values stay behind: the nodes load their own)."""
    if ":" not in client_data:
        raise FadError(f"fad export flower: --client-data must be 'module:function', got "
                       f"{client_data!r}")
    graph = fn.graph(*args)
    leaves, _ = pytree.flatten(tuple(args))
    name = name or graph.name
    app = re.sub(r"[^0-9a-zA-Z]+", "-", name).strip("-").lower() + "-app"
    pkg = _package_name(name)
    pdir = os.path.join(out, pkg)
    os.makedirs(pdir, exist_ok=True)
    client_k = [k for k, v in enumerate(graph.inputs) if v.type.placement is not SERVER]
    n = next((len(x) for x, v in zip(leaves, graph.inputs) if v.type.placement is not SERVER),
             0)
    files = {
        os.path.join(out, "pyproject.toml"): _pyproject(
            app, pkg, client_data, n, f"fadcore graph {name} on Flower"),
        os.path.join(pdir, "__init__.py"): f'"""{name} on Flower (fad export flower)."""\n',
        os.path.join(pdir, "server_app.py"): _SERVER_APP.format(name=name),
        os.path.join(pdir, "client_app.py"): _CLIENT_APP.format(name=name),
        os.path.join(pdir, "graph.json"): graph.to_json(),
        os.path.join(pdir, "server_args.json"): json.dumps(
            {"format": "fadcore.server-args", "version": 1,
             "args": _encode_args(graph, leaves)}),
        os.path.join(out, "README.md"): _README.format(
            name=name, spec=spec or name, pkg=pkg, rounds=len(graph.rounds()),
            clients=f"{n} in the exported config (num-clients)" if n else "none",
            flwr=FLWR_REQUIREMENT, client_data=client_data,
            client_args="\n".join(f"- graph input {k}: `{graph.inputs[k].type}`"
                                  for k in client_k) or "- (none)"),
    }
    for path, text in files.items():
        with open(path, "w") as f:
            f.write(text)
    return pdir


# --------------------------------------------------------------------------- the ServerApp

def save_results(path: str, outs: list, graph: Graph) -> None:
    arrays = {}
    for k, (o, t) in enumerate(zip(outs, graph.out_types)):
        if t.placement is SERVER:
            arrays[f"out{k}"] = np.asarray(o)
        else:
            for i, m in enumerate(o):
                arrays[f"out{k}.client{i}"] = np.asarray(m)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    np.savez(path, **arrays)


def _wait_for_nodes(grid, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise FadError(f"flower app: {len(list(grid.get_node_ids()))} node(s) connected "
                           f"within {timeout:.0f}s, the graph needs {n}")
        time.sleep(0.5)


def serve(grid, context, app_dir) -> list:
    """The exported ServerApp's main: run the app's graph on the connected nodes, write the
    results to the run config's ``output`` and log each round's traffic beside fad.cost."""
    from flwr.common import log
    from logging import INFO

    from ...ir.cost import cost
    from .server import Session, hello, run_graph

    cfg = dict(context.run_config)
    with open(os.path.join(app_dir, "graph.json")) as f:
        graph = Graph.from_json(f.read())
    server_values = load_server_args(os.path.join(app_dir, "server_args.json"), graph)
    timeout = float(cfg.get("timeout", 600.0)) or None
    n = int(cfg.get("num-clients", 0))
    _wait_for_nodes(grid, max(n, 1), timeout or 600.0)
    partitions = hello(grid, timeout)
    nodes = list(partitions.values())
    n = n or len(nodes)
    if n > len(nodes):
        raise FadError(f"flower app: num-clients={n} but {len(nodes)} node(s) answered")
    importlib.invalidate_caches()
    outs, traffic = run_graph(grid, graph, server_values, nodes[:n], session=Session(),
                              spares=nodes[n:], timeout=timeout,
                              on_dropout=str(cfg.get("on-dropout", "fail")))
    out = str(cfg.get("output", "fad-result.npz"))
    save_results(out, outs, graph)
    # the prediction at one row per client: exact unless ragged values are communicated
    predicted = {r: (d, u) for r, d, u, _ in cost(graph, clients=n, rows=1).per_round}
    for t in traffic:
        d, u = predicted.get(t.round, (None, None))
        log(INFO, "fad round %d: %d nodes, %d B down / %d B up per node (fad.cost at rows=1: "
            "%s / %s), %.2fs", t.round, t.nodes, t.down_values, t.up_values, d, u, t.seconds)
    log(INFO, "fad: results of %s written to %s", graph.name, os.path.abspath(out))
    return outs
