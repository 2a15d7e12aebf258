"""The Flower client side: one node runs its round's client sub-graph on its own data.

A node receives, per round, a ``query.fad`` message (see :mod:`.protocol`): the round's client
sub-graph (its JSON the first time this node sees it, afterwards only its hash), the broadcast
values, and where its inputs come from (its own data, or values it kept from an earlier round
of the same call). It loads its data itself, runs the sub-graph for one client, keeps the values
later rounds need in its own ``context.state`` (they never leave the node) and replies with its
contribution to each aggregation (and its members of client-placed graph outputs).

Data: a node's data is the tuple of the graph's client-placed arguments for this one client.
It comes from the function named by the run config's ``client-data`` (``"module:function"``,
called with the node's ``node_config``; a deployed node), or, in fadcore's own simulation, from
the arrays :func:`fadcore.run` staged for the node before the run (``message["fad"]["data"]``).
"""

from __future__ import annotations

import importlib
import threading
import traceback
from collections import OrderedDict

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ...errors import FadError
from ...ir.graph import Graph
from ...values import ClientValues
from ..executor import run_client_step, subgraph_from_text
from ..inputs import prepare_inputs
from . import protocol as P

__all__ = ["app", "handle", "hello", "load_node_data"]

app = ClientApp()

_DATA: OrderedDict = OrderedDict()         # per process: (source, node) -> arrays
_LOCK = threading.Lock()


class NodeError(FadError):
    """Raised on a node; its message travels to the server in the reply."""


# --------------------------------------------------------------------------- data

def _import(spec: str):
    mod, _, attr = spec.partition(":")
    if not mod or not attr:
        raise NodeError(f"client-data must be 'module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as err:
        raise NodeError(f"client-data {spec!r} cannot be imported on this node "
                        f"({type(err).__name__}: {err})") from None


def load_node_data(context: Context, cfg) -> list:
    """This node's client arrays, aligned with the graph's client-placed arguments."""
    spec = context.run_config.get(P.RUN_CLIENT_DATA) if context.run_config else None
    staged = str(cfg.get(P.DATA, ""))
    if spec:
        key = ("loader", str(spec), context.node_id)
    elif staged:
        key = ("staged", staged, int(context.node_config.get("partition-id", -1)))
    else:
        raise NodeError("no client data: the run config names no client-data function and "
                        "nothing was staged for this node")
    with _LOCK:
        hit = _DATA.get(key)
        if hit is not None:
            _DATA.move_to_end(key)
            return hit
    if spec:
        try:
            got = _import(str(spec))(dict(context.node_config))
        except NodeError:
            raise
        except Exception as err:  # noqa: BLE001 -- the user's loader: report what it raised
            raise NodeError(f"client-data {spec} raised {type(err).__name__}: {err}") from None
        if got is None:
            raise NodeError(f"client-data {spec} returned no data for this node")
        arrays = [np.asarray(a) for a in (got if isinstance(got, (tuple, list)) else [got])]
    else:
        arrays = P.read_staged(staged, key[2])
    with _LOCK:
        _DATA[key] = arrays
        while len(_DATA) > 32:
            _DATA.popitem(last=False)
    return arrays


# --------------------------------------------------------------------------- graphs

def _graph(cfg, context: Context) -> Graph | None:
    key = str(cfg[P.GRAPH])
    text = cfg.get(P.GRAPH_TEXT)
    known = context.state.config_records.get(P.STATE_GRAPHS)
    if text is None and known is not None and key in known:
        text = known[key]
    if text is None:
        return None
    if P.digest(str(text)) != key:
        raise NodeError(f"the sub-graph sent does not match its hash {key[:12]}")
    g = subgraph_from_text(key, str(text))      # parsed once per process
    if known is None:
        known = context.state.config_records[P.STATE_GRAPHS] = ConfigRecord()
    known[key] = str(text)
    while len(known) > 64:
        del known[next(iter(known))]
    return g


# --------------------------------------------------------------------------- one round

def _first_use(g: Graph, k: int) -> str:
    v = g.inputs[k]
    for e in g.eqns:
        if v in e.inputs and e.source:
            return f" (used at {e.source})"
    return ""


def _inputs(g: Graph, cfg, context: Context, bcast: list):
    srcs = list(cfg.get(P.INPUTS, []))
    data = None
    values = list(bcast)
    for s in srcs:
        if s.startswith("d"):
            if data is None:
                data = load_node_data(context, cfg)
            pos = list(cfg.get(P.DATA_INPUTS, [])).index(int(s[1:]))
            if pos >= len(data):
                raise NodeError(f"the node's data has {len(data)} arrays; the graph needs its "
                                f"client argument {pos} (graph input {s[1:]})")
            values.append(ClientValues([data[pos]]))
        else:
            r, j = (int(x) for x in s[1:].split("."))
            rec = context.state.array_records.get(P.state_key(str(cfg[P.CALL]), r))
            if rec is None or str(j) not in rec:
                raise NodeError(f"the client state kept from round {r} is not on this node (a "
                                "node must stay for every round of a graph that keeps client "
                                "state)")
            values.append(ClientValues([rec[str(j)].numpy()]))
    try:
        inputs = prepare_inputs(g, values, 1)
    except FadError as err:
        k = next((i for i in range(len(g.inputs)) if f"argument {i} " in str(err)), None)
        where = _first_use(g, k) if k is not None else ""
        raise NodeError(f"its data does not fit the graph{where}: {err}") from None
    rows = cfg.get(P.ROWS)
    if rows is not None and inputs.rows is None:
        # this round reads no ragged input but its values are ragged: the node's row count
        # comes from its own data (graph input rows[0], axis rows[1])
        if data is None:
            data = load_node_data(context, cfg)
        pos = list(cfg.get(P.DATA_INPUTS, [])).index(int(rows[0]))
        inputs.rows = np.array([np.shape(data[pos])[int(rows[1])]], dtype=np.int64)
    return inputs


def _run_round(msg: Message, context: Context) -> RecordDict:
    cfg = msg.content.config_records[P.CONFIG]
    call = str(cfg[P.CALL])
    for name in list(context.state.array_records.keys()):
        if name.startswith(P.STATE_PREFIX) and not name.startswith(P.state_prefix(call)):
            del context.state[name]                # an earlier call's leftovers
    g = _graph(cfg, context)
    if g is None:
        return RecordDict({P.REPLY: ConfigRecord({P.STATUS: P.NEED_GRAPH})})
    bcast = msg.content.array_records.get(P.BROADCAST)
    bvals = [] if bcast is None else [bcast[str(i)].numpy() for i in range(len(bcast))]
    inputs = _inputs(g, cfg, context, bvals)
    k, nb = int(cfg[P.NUM_PARTIALS]), len(bvals)
    try:
        res = run_client_step(g, k, inputs.values[:nb], inputs.values[nb:], 1, inputs.rows,
                              str(cfg.get(P.EVALUATOR, "auto")), str(cfg[P.GRAPH]))
    except FadError as err:
        raise NodeError(str(err)) from None
    partials = ArrayRecord({str(i): P.array(o) for i, o in enumerate(res.partials)})
    kept = [ms[0] for ms in res.kept]
    if kept:
        context.state[P.state_key(call, int(cfg[P.ROUND]))] = ArrayRecord(
            {str(j): P.array(m) for j, m in enumerate(kept)})
    reply = RecordDict({P.PARTIALS: partials,
                        P.REPLY: ConfigRecord({P.STATUS: P.OK})})
    wanted = [int(j) for j in cfg.get(P.RETURN, [])]
    if wanted:
        reply[P.OUTPUTS] = ArrayRecord({str(j): P.array(kept[j]) for j in wanted})
    for r in cfg.get(P.DROP, []):
        name = P.state_key(call, int(r))
        if name in context.state:
            del context.state[name]
    return reply


@app.query(P.HELLO_ACTION)
def hello(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition id (-1 if its node_config has none)."""
    pid = context.node_config.get(P.PARTITION, -1) if context.node_config else -1
    return Message(RecordDict({P.REPLY: ConfigRecord({P.PARTITION: int(pid)})}),
                   reply_to=msg)


@app.query(P.ACTION)
def handle(msg: Message, context: Context) -> Message:
    """Run one round's client sub-graph on this node (a ``query.fad`` message)."""
    try:
        content = _run_round(msg, context)
    except NodeError as err:
        content = RecordDict({P.REPLY: ConfigRecord({P.STATUS: P.ERROR, P.ERROR: str(err)})})
    except Exception as err:  # noqa: BLE001 -- reported to the server, never swallowed
        tb = traceback.format_exc(limit=3)
        content = RecordDict({P.REPLY: ConfigRecord(
            {P.STATUS: P.ERROR, P.ERROR: f"{type(err).__name__}: {err}\n{tb}"})})
    return Message(content, reply_to=msg)
