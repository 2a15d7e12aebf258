"""What travels between fadcore's ServerApp and its ClientApps (Flower ``Message`` records).

Server -> node, message type ``query.fad``, one per node per round:

- ``"fad"`` (ConfigRecord): ``call`` (id of this graph run), ``round``, ``graph`` (sha256 of
  the client sub-graph's JSON), ``graph-json`` (the JSON itself, only the first time this node
  is sent that sub-graph), ``inputs`` (where each client input of the sub-graph comes from:
  ``"d<k>"`` graph input k from the node's own data, ``"s<r>.<j>"`` value j the node kept in
  round r), ``data-inputs`` (the graph inputs the node's data tuple is aligned with),
  ``num-partials``, ``return`` (kept values to send back: client-placed graph outputs),
  ``drop`` (rounds whose kept values are no longer needed), ``rows`` (graph input and axis
  giving the node's row count, for ragged graphs), ``data`` (simulation only: the
  directory of the arrays staged for the nodes), ``evaluator``;
- ``"broadcast"`` (ArrayRecord): the round's broadcast operands, ``"0"``, ``"1"``, ...

A ``query.fadhello`` message asks a node for its ``partition-id`` (its ``node_config``'s, or
-1): the server's map from client index to node.

Node -> server, the reply: ``"partials"`` (ArrayRecord: the node's contribution to each
aggregation: its value for sum/secure_sum/mean, ``x*w`` and ``w`` for weighted_mean), optional
``"outputs"`` (ArrayRecord: its members of client-placed graph outputs) and ``"reply"``
(ConfigRecord: ``status`` ``ok`` / ``need-graph`` / ``error`` with the ``error`` text).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from flwr.app import Array

ACTION, HELLO_ACTION = "fad", "fadhello"
MESSAGE_TYPE, HELLO_TYPE = f"query.{ACTION}", f"query.{HELLO_ACTION}"
PARTITION = "partition-id"
RUN_CLIENT_DATA = "client-data"

CONFIG, BROADCAST, PARTIALS, OUTPUTS, REPLY = "fad", "broadcast", "partials", "outputs", "reply"
CALL, ROUND, GRAPH, GRAPH_TEXT = "call", "round", "graph", "graph-json"
INPUTS, DATA_INPUTS, NUM_PARTIALS, RETURN, DROP = (
    "inputs", "data-inputs", "num-partials", "return", "drop")
DATA, EVALUATOR, ROWS = "data", "evaluator", "rows"
STATUS, OK, NEED_GRAPH, ERROR = "status", "ok", "need-graph", "error"
STATE_PREFIX, STATE_GRAPHS = "fad.state.", "fad.graphs"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def state_prefix(call: str) -> str:
    return f"{STATE_PREFIX}{call}."


def state_key(call: str, round_: int) -> str:
    return f"{state_prefix(call)}r{round_}"


def array(x) -> Array:
    x = np.asarray(x)
    return Array(x if x.flags.c_contiguous else np.ascontiguousarray(x))


def value_bytes(record) -> int:
    """Bytes of the values an ArrayRecord holds (float64: 8 per entry), as fad.cost counts."""
    if record is None:
        return 0
    return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
               for a in record.values())


def record_bytes(content) -> int:
    """Bytes of a message's records as Flower counts them (array buffers with their NumPy
    headers, config values, keys)."""
    return sum(r.count_bytes() for r in content.values())


# --------------------------------------------------------------------------- staged data

def read_staged(where: str, partition: int) -> list:
    """The arrays staged in directory ``where`` for the node of ``partition`` (simulation)."""
    path = os.path.join(where, f"{partition}.npz")
    if not os.path.exists(path):
        from .client import NodeError
        raise NodeError(f"no client data staged for this node (partition {partition}, "
                        f"{where})")
    with np.load(path, allow_pickle=False) as z:
        return [z[f"a{i}"] for i in range(len(z.files))]


def write_staged(d: str, per_client: list) -> None:
    """Stage each client's arrays (``per_client[i]``: a list) for the node of partition i."""
    if os.path.isdir(d):
        return
    tmp = f"{d}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    for i, arrays in enumerate(per_client):
        np.savez(os.path.join(tmp, f"{i}.npz"), **{f"a{j}": a for j, a in enumerate(arrays)})
    os.replace(tmp, d)
