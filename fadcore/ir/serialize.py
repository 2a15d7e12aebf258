"""A safe, versioned JSON form of graphs: ``to_json(graph)`` and ``from_json(text)``.

No pickle and no evaluation: primitives are looked up by name in
:data:`fadcore.ir.primitives.primitives`, dtypes in :data:`fadcore.ir.types.DTYPES`, and every other
value is spelled out with an explicit tag. Loading checks everything it reads (structure,
sizes, types, references) and then runs the verifier, so any malformed, truncated, oversized,
hostile, wrong-version or ill-typed input raises :class:`fadcore.SerializationError` with a
message naming the offending field. The round trip is exact: ``from_json(to_json(g))`` prints
like ``g`` and evaluates like ``g``.

The format (version 1)::

    {"format": "fadcore.graph", "version": 1, "name": "f",
     "inputs":   ["f64[8]@SERVER", "{f64[?,8]}@CLIENTS"],       # variables 0, 1, ...
     "literals": [{"dtype": "f64", "shape": [], "data": [2.0]}],
     "eqns": [{"prim": "broadcast", "in": [0], "type": "f64[8]@CLIENTS"},         # var 2
              {"prim": "matvec", "in": [1, 2], "type": "{f64[?]}@CLIENTS"},       # var 3
              {"prim": "mul", "in": [3, {"lit": 0}], "type": "{f64[?]}@CLIENTS",
               "params": {}, "source": "model.py:12 (loss)"}],
     "outputs": [4], "in_tree": [...], "out_tree": [...], "meta": {}}

- Variables are numbered: the inputs first, then one per equation, in order. An operand is a
  variable number or ``{"lit": k}``, the k-th entry of ``literals``.
- Types are strings in the printed notation: ``f64[?,3]@SERVER`` is invalid (ragged dims live
  at CLIENTS), ``{f64[?,3]}@CLIENTS`` holds per-client members, ``f64[3]@CLIENTS`` all-equal.
- Params and meta values are tagged: ``["int", 3]``, ``["float", 0.5]`` (``"nan"``, ``"inf"``,
  ``"-inf"`` as strings), ``["bool", true]``, ``["str", "x"]``, ``["none"]``,
  ``["tuple", [...]]``, ``["list", [...]]``, ``["dict", {...}]``, ``["dtype", "f64"]``,
  ``["placement", "SERVER"]``, ``["type", "f64[3]@SERVER"]``.
- Literals: ``dtype`` + ``shape`` + either ``data`` (a flat row-major list, used for small
  finite literals) or ``base64`` (little-endian bytes, exact for every value incl. NaN).
- Pytree definitions use :func:`fadcore.pytree.to_json`.
- Graphs held in params (loop bodies) are written once in an optional top-level ``"graphs"``
  list (each entry has the fields of a graph without ``format``/``version``/``graphs``) and
  referenced as ``["graph", k]``; an entry may only reference earlier entries (no cycles),
  nesting is at most ``LIMITS["graph_depth"]`` deep, and every entry is verified.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import contextvars
import re
from typing import Any

import numpy as np

from .. import pytree
from ..errors import FadError, SerializationError
from .graph import Eqn, Graph, Literal, Var
from .primitives import primitives
from .types import (CLIENTS, DTYPES, PLACEMENTS, SERVER, DType, FederatedType, Placement,
                    TensorType)

__all__ = ["to_json", "from_json", "parse_type", "FORMAT", "VERSION", "LIMITS"]

FORMAT = "fadcore.graph"
VERSION = 1

#: Sanity limits applied when loading (and writing) graphs.
LIMITS = {
    "text_bytes": 50 * 2**20,      # JSON text
    "eqns": 10**6,
    "inputs": 10**6,
    "outputs": 10**6,
    "literals": 10**6,
    "rank": 32,                    # dimensions of a type
    "dim": 2**31 - 1,              # one dimension
    "elements": 2**32,             # static elements of one type (32 GiB as f64)
    "literal_elements": 10**8,     # elements of one literal
    "string": 10_000,              # a name, a source line, a param string
    "depth": 32,                   # nesting of tagged values
    "params": 64,                  # params of one equation
    "items": 4096,                 # items of one tagged tuple/list/dict, operands of one eqn
    "meta_keys": 1_000,
    # memory a run of the graph holds at its fullest (see fadcore.ir.resources), counted for a
    # declared client size: `clients` clients of `rows` rows each (every ? dimension is `rows`)
    "bytes": 2**32,
    "clients": 1,
    "rows": 1,
    "graphs": 10_000,              # graphs held in params (loop bodies), at any depth
    "graph_depth": 16,             # nesting of graphs in graphs
}

# the graphs table of the document being written or read (graphs held in params)
_GRAPHS: contextvars.ContextVar = contextvars.ContextVar("fad_serialize_graphs")

_INT64 = (-(2**63), 2**63 - 1)
_LIST_DATA_MAX = 64                # literals up to this size may be written as a list


def _fail(where: str, msg: str) -> SerializationError:
    return SerializationError(f"{where}: {msg}" if where else msg)


# --------------------------------------------------------------------------- types

_TYPE_RE = re.compile(r"(\{)?([a-z0-9]+)\[([0-9?,]*)\](\})?@([A-Z]+)")


def parse_type(text: Any, where: str = "type") -> FederatedType:
    """Parse a federated type from its printed form, e.g. ``{f64[?,3]}@CLIENTS``."""
    if not isinstance(text, str):
        raise _fail(where, f"a type must be a string like 'f64[3]@SERVER', got {_short(text)}")
    if len(text) > 20 * LIMITS["rank"] + 32:
        raise _fail(where, f"type string too long ({len(text)} characters)")
    m = _TYPE_RE.fullmatch(text)
    if m is None:
        raise _fail(where, f"malformed type {text!r} (expected e.g. 'f64[3]@SERVER' or "
                           "'{f64[?,3]}@CLIENTS')")
    open_, dt, dims, close, place = m.groups()
    if bool(open_) != bool(close):
        raise _fail(where, f"unbalanced braces in type {text!r}")
    dtype = _dtype(dt, where)
    placement = PLACEMENTS.get(place)
    if placement is None:
        raise _fail(where, f"unknown placement {place!r} in {text!r} (SERVER or CLIENTS)")
    shape = _parse_dims(dims, text, where)
    if open_ and placement is not CLIENTS:
        raise _fail(where, f"{text!r}: braces (members may differ) exist only at CLIENTS")
    if placement is SERVER and None in shape:
        raise _fail(where, f"{text!r}: a ragged dimension (?) exists only at CLIENTS")
    return FederatedType(TensorType(dtype, shape), placement, not open_)


def _parse_dims(dims: str, text: str, where: str) -> tuple:
    if dims == "":
        return ()
    parts = dims.split(",")
    if len(parts) > LIMITS["rank"]:
        raise _fail(where, f"{text!r} has {len(parts)} dimensions (at most {LIMITS['rank']})")
    shape = []
    for p in parts:
        if p == "?":
            shape.append(None)
        elif p.isdigit() and len(p) <= 12 and (p == "0" or not p.startswith("0")):
            shape.append(int(p))
        else:
            raise _fail(where, f"bad dimension {p!r} in type {text!r}")
    return _check_shape(tuple(shape), where)


def _check_shape(shape: tuple, where: str) -> tuple:
    if len(shape) > LIMITS["rank"]:
        raise _fail(where, f"{len(shape)} dimensions (at most {LIMITS['rank']})")
    n = 1
    for d in shape:
        if d is None:
            continue
        if d > LIMITS["dim"]:
            raise _fail(where, f"dimension {d} is too large (at most {LIMITS['dim']})")
        n *= d
    if n > LIMITS["elements"]:
        raise _fail(where, f"shape {_shape_txt(shape)} declares {n} elements "
                           f"(at most {LIMITS['elements']})")
    return shape


def _shape_txt(shape) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _dtype(name: Any, where: str) -> DType:
    if not isinstance(name, str) or name not in DTYPES:
        raise _fail(where, f"unknown dtype {_short(name)} (one of {', '.join(DTYPES)})")
    return DTYPES[name]


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."


# --------------------------------------------------------------------------- tagged values

def _enc_value(v: Any, where: str, depth: int = 0) -> Any:
    if depth > LIMITS["depth"]:
        raise _fail(where, "value nested too deeply")
    if v is None:
        return ["none"]
    if isinstance(v, (bool, np.bool_)):
        return ["bool", bool(v)]
    if isinstance(v, (int, np.integer)):
        v = int(v)
        if not _INT64[0] <= v <= _INT64[1]:
            raise _fail(where, f"integer {v} does not fit in 64 bits")
        return ["int", v]
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return ["float", v if math.isfinite(v) else repr(v)]
    if isinstance(v, str):
        return ["str", _check_str(v, where)]
    if isinstance(v, DType):
        return ["dtype", v.name]
    if isinstance(v, Placement):
        return ["placement", v.name]
    if isinstance(v, FederatedType):
        return ["type", str(v)]
    if isinstance(v, Graph):
        return ["graph", _graph_ref(v, where)]
    if isinstance(v, (tuple, list, dict)) and len(v) > LIMITS["items"]:
        raise _fail(where, f"{len(v)} items (at most {LIMITS['items']})")
    if isinstance(v, tuple) and not hasattr(v, "_fields"):
        return ["tuple", [_enc_value(x, where, depth + 1) for x in v]]
    if isinstance(v, list):
        return ["list", [_enc_value(x, where, depth + 1) for x in v]]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise _fail(where, "only dicts with string keys can be serialized")
        return ["dict", {k: _enc_value(x, f"{where}.{k}", depth + 1) for k, x in v.items()}]
    raise _fail(where, f"cannot serialize a {type(v).__name__} ({_short(v)}); params and meta "
                       "may hold None, bool, int, float, str, tuple, list, dict, DType, "
                       "Placement and FederatedType values")


_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_FLOAT_MAX = int(np.finfo(np.float64).max)


def _dec_value(obj: Any, where: str, depth: int = 0) -> Any:
    if depth > LIMITS["depth"]:
        raise _fail(where, "value nested too deeply")
    if not isinstance(obj, list) or not obj or not isinstance(obj[0], str):
        raise _fail(where, f"expected a tagged value like [\"int\", 3], got {_short(obj)}")
    tag, rest = obj[0], obj[1:]
    if tag == "none" and not rest:
        return None
    if len(rest) != 1:
        raise _fail(where, f"malformed tagged value {_short(obj)}")
    x = rest[0]
    if tag == "bool" and isinstance(x, bool):
        return x
    if tag == "int" and isinstance(x, int) and not isinstance(x, bool):
        if not _INT64[0] <= x <= _INT64[1]:
            raise _fail(where, f"integer {_short(x)} does not fit in 64 bits")
        return x
    if tag == "float":
        if isinstance(x, str) and x in _FLOATS:
            return _FLOATS[x]
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            if isinstance(x, int) and not -_FLOAT_MAX <= x <= _FLOAT_MAX:
                raise _fail(where, f"integer {_short(x)} is out of the float64 range")
            return float(x)
    if tag == "str" and isinstance(x, str):
        return _check_str(x, where)
    if tag == "dtype":
        return _dtype(x, where)
    if tag == "placement" and isinstance(x, str) and x in PLACEMENTS:
        return PLACEMENTS[x]
    if tag == "type":
        return parse_type(x, where)
    if tag == "graph":
        table = _GRAPHS.get(None)
        if table is None or not (isinstance(x, int) and not isinstance(x, bool)
                                 and 0 <= x < len(table["graphs"])):
            n = 0 if table is None else len(table["graphs"])
            raise _fail(where, f"graph {_short(x)} is not an earlier entry of \"graphs\" "
                               f"({n} so far)")
        table["refs"].append(x)
        return table["graphs"][x]
    if isinstance(x, (list, dict)) and len(x) > LIMITS["items"]:
        raise _fail(where, f"{len(x)} items (at most {LIMITS['items']})")
    if tag in ("tuple", "list") and isinstance(x, list):
        items = [_dec_value(c, f"{where}[{i}]", depth + 1) for i, c in enumerate(x)]
        return tuple(items) if tag == "tuple" else items
    if tag == "dict" and isinstance(x, dict):
        return {k: _dec_value(c, f"{where}.{k}", depth + 1) for k, c in x.items()}
    raise _fail(where, f"malformed tagged value {_short(obj)}")


def _check_str(s: Any, where: str, what: str = "string") -> str:
    if not isinstance(s, str):
        raise _fail(where, f"expected a {what}, got {_short(s)}")
    if len(s) > LIMITS["string"]:
        raise _fail(where, f"{what} too long ({len(s)} characters, at most {LIMITS['string']})")
    return s


# --------------------------------------------------------------------------- literals

def _enc_literal(lit: Literal) -> dict:
    v = np.asarray(lit.value)
    dt = lit.type.dtype
    out = {"dtype": dt.name, "shape": list(v.shape)}
    if v.size <= _LIST_DATA_MAX and (not dt.is_float or np.isfinite(v).all()):
        out["data"] = v.reshape(-1).tolist()
    else:
        le = v.astype(dt.np.newbyteorder("<"), copy=False)
        out["base64"] = base64.b64encode(np.ascontiguousarray(le).tobytes()).decode("ascii")
    return out


def _dec_literal(obj: Any, where: str) -> Literal:
    _keys(obj, where, required=("dtype", "shape"), optional=("data", "base64"))
    dt = _dtype(obj["dtype"], f"{where}.dtype")
    shape = obj["shape"]
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _fail(f"{where}.shape", f"expected a list of ints >= 0, got {_short(shape)}")
    shape = _check_shape(tuple(shape), f"{where}.shape")
    size = math.prod(shape)
    if size > LIMITS["literal_elements"]:
        raise _fail(f"{where}.shape", f"literal of {size} elements is too large "
                                      f"(at most {LIMITS['literal_elements']})")
    has_data, has_b64 = "data" in obj, "base64" in obj
    if has_data == has_b64:
        raise _fail(where, "a literal needs exactly one of 'data' and 'base64'")
    if has_b64:
        text = obj["base64"]
        nbytes = size * dt.itemsize
        if not isinstance(text, str) or len(text) != 4 * ((nbytes + 2) // 3):
            raise _fail(f"{where}.base64", f"expected {nbytes} bytes for {dt}"
                                           f"{_shape_txt(shape)}, got {_short(text)[:40]}")
        try:
            raw = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError) as e:
            raise _fail(f"{where}.base64", f"invalid base64: {e}") from None
        if len(raw) != nbytes:
            raise _fail(f"{where}.base64", f"{len(raw)} bytes do not fit {dt}{_shape_txt(shape)} "
                                           f"({nbytes} bytes)")
        arr = np.frombuffer(raw, dtype=dt.np.newbyteorder("<")).astype(dt.np).reshape(shape)
    else:
        data = obj["data"]
        if not isinstance(data, list) or len(data) != size:
            n = len(data) if isinstance(data, list) else _short(data)
            raise _fail(f"{where}.data", f"expected a flat list of {size} values for "
                                         f"{dt}{_shape_txt(shape)}, got {n}")
        _check_elements(data, dt, f"{where}.data")
        with np.errstate(all="ignore"):
            arr = np.array(data, dtype=dt.np).reshape(shape)
    return Literal(arr)


def _check_elements(data: list, dt: DType, where: str) -> None:
    for x in data:
        if not _element_ok(x, dt):
            raise _fail(where, f"value {_short(x)} is not a valid {dt}")


def _element_ok(x, dt: DType) -> bool:
    if dt.name == "bool":
        return isinstance(x, bool)
    if dt.is_int:
        info = np.iinfo(dt.np)
        return isinstance(x, int) and not isinstance(x, bool) and info.min <= x <= info.max
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    # in range: no OverflowError from a huge int, no finite number turning into inf
    if isinstance(x, int) and not -_FLOAT_MAX <= x <= _FLOAT_MAX:
        return False
    with np.errstate(over="ignore"):
        return not (np.isinf(dt.np.type(x)) and math.isfinite(x))


# --------------------------------------------------------------------------- writing

def _meta_of(graph: Graph) -> dict:
    """The written ``meta`` object: the graph's meta, and ``num_captured`` where nonzero."""
    meta = dict(graph.meta)
    if graph.num_captured:
        meta["num_captured"] = graph.num_captured
    return meta


def to_json(graph: Graph, indent: int | None = None) -> str:
    """The JSON text of ``graph`` (see the module docstring for the format).

    Whatever it writes, :func:`from_json` reads back: the same limits apply to both."""
    if not isinstance(graph, Graph):
        raise SerializationError(f"to_json: expected a fad.Graph, got {type(graph).__name__}")
    table = {"graphs": [], "index": {}, "depth": 0, "keep": []}
    token = _GRAPHS.set(table)
    try:
        doc = {"format": FORMAT, "version": VERSION, **_enc_graph(graph)}
    finally:
        _GRAPHS.reset(token)
    if table["graphs"]:
        if len(table["graphs"]) > LIMITS["graphs"]:
            raise _fail("graphs", f"{len(table['graphs'])} entries (at most {LIMITS['graphs']})")
        doc["graphs"] = table["graphs"]
    text = json.dumps(doc, indent=indent, allow_nan=False)    # ASCII: chars == bytes
    if len(text) > LIMITS["text_bytes"]:
        raise SerializationError(f"the graph's JSON would be {len(text)} characters "
                                 f"(at most {LIMITS['text_bytes']})")
    return text


def _graph_ref(g: Graph, where: str) -> int:
    """The index of ``g`` in the graphs table being written (written first if new)."""
    table = _GRAPHS.get(None)
    if table is None:
        raise _fail(where, "a graph can only be serialized as a param of a graph being written")
    k = table["index"].get(id(g))
    if k is None:
        if table["depth"] >= LIMITS["graph_depth"]:
            raise _fail(where, f"graphs nested more than {LIMITS['graph_depth']} deep")
        table["depth"] += 1
        try:
            d = _enc_graph(g)
        finally:
            table["depth"] -= 1
        k = table["index"][id(g)] = len(table["graphs"])
        table["graphs"].append(d)
        table["keep"].append(g)        # ids stay valid while writing
    return k


def _enc_graph(graph: Graph) -> dict:
    """The fields of one graph (without format and version)."""
    if not isinstance(graph, Graph):
        raise SerializationError(f"to_json: expected a fad.Graph, got {type(graph).__name__}")
    _check_str(graph.name, "name", "graph name")
    index: dict[Var, int] = {}
    type_strs: dict[FederatedType, str] = {}

    def wtype(t, where):
        s = type_strs.get(t) if isinstance(t, FederatedType) else None
        if s is None:
            if not isinstance(t, FederatedType):
                raise _fail(where, f"{_short(t)} is not a federated type")
            s = type_strs[t] = str(t)
            parse_type(s, where)                  # within the limits the reader applies
        return s

    lits: list[dict] = []
    lit_index: dict[Any, int] = {}

    def operand(a, where):
        if isinstance(a, Var):
            k = index.get(a)
            if k is None:
                raise _fail(where, "operand is not defined by an earlier input or equation "
                                   "(verify the graph)")
            return k
        if isinstance(a, Literal):
            key = (a.type, a.value.tobytes())
            k = lit_index.get(key)
            if k is None:
                k = lit_index[key] = len(lits)
                lits.append(_enc_literal(a))
            return {"lit": k}
        raise _fail(where, f"operand {_short(a)} is neither a Var nor a Literal")

    inputs = []
    for i, v in enumerate(graph.inputs):
        if not isinstance(v, Var) or v in index:
            raise _fail(f"inputs[{i}]", "not a fresh variable")
        index[v] = len(index)
        inputs.append(wtype(v.type, f"inputs[{i}]"))
    eqns = []
    for k, e in enumerate(graph.eqns):
        where = f"eqns[{k}] ({e.prim.name})"
        if primitives.get(e.prim.name) is not e.prim:
            raise _fail(where, f"{e.prim.name!r} is not a registered primitive")
        ins = [operand(a, where) for a in e.inputs]
        if e.out in index:
            raise _fail(where, "redefines a variable")
        index[e.out] = len(index)
        d = {"prim": e.prim.name, "in": ins, "type": wtype(e.out.type, where)}
        if e.params:
            d["params"] = {str(n): _enc_value(v, f"{where}.params.{n}") for n, v in
                           e.params.items()}
        if e.source is not None:
            d["source"] = _check_str(e.source, f"{where}.source", "source")
        eqns.append(d)
    outputs = [operand(a, f"outputs[{i}]") for i, a in enumerate(graph.outputs)]
    doc = {
        "name": graph.name,
        "inputs": inputs,
        "literals": lits,
        "eqns": eqns,
        "outputs": outputs,
        "in_tree": _enc_tree(graph.in_tree, "in_tree"),
        "out_tree": _enc_tree(graph.out_tree, "out_tree"),
        "meta": _enc_value(_meta_of(graph), "meta")[1],
    }
    for key in ("inputs", "eqns", "outputs", "literals"):
        if len(doc[key]) > LIMITS[key]:
            raise _fail(key, f"{len(doc[key])} entries (at most {LIMITS[key]})")
    return doc


def _enc_tree(tree, where: str):
    try:
        obj = pytree.to_json(tree)
        ok = pytree.from_json(obj) == tree
    except Exception:  # noqa: BLE001 - any failure means the tree cannot be stored
        ok = False
    if not ok:
        raise _fail(where, f"the pytree definition {_short(tree)} cannot be serialized "
                           "(dict keys must be strings)")
    return obj


# --------------------------------------------------------------------------- reading

_TOP_KEYS = ("format", "version", "name", "inputs", "literals", "eqns", "outputs", "in_tree",
             "out_tree", "meta")


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise SerializationError(f"duplicate key {_short(k)} in JSON object")
        out[k] = v
    return out


def _no_constant(name):
    raise SerializationError(f"non-standard JSON constant {name} (write NaN/inf as tagged "
                             "strings)")


def _keys(obj: Any, where: str, required=(), optional=()) -> None:
    if not isinstance(obj, dict):
        raise _fail(where, f"expected a JSON object, got {_short(obj)}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise _fail(where, f"missing field(s) {', '.join(missing)}")
    extra = [k for k in obj if k not in required and k not in optional]
    if extra:
        raise _fail(where, f"unknown field(s) {', '.join(map(_short, extra[:5]))}")


def _list(obj: Any, where: str, limit: str) -> list:
    if not isinstance(obj, list):
        raise _fail(where, f"expected a list, got {_short(obj)}")
    if len(obj) > LIMITS[limit]:
        raise _fail(where, f"{len(obj)} entries (at most {LIMITS[limit]})")
    return obj


def from_json(text: str | bytes, *, clients: int | None = None,
              rows: int | None = None) -> Graph:
    """Load a graph written by :func:`to_json`; validates it fully and runs the verifier.

    ``clients`` and ``rows`` declare the client size the graph is meant to run at (default
    ``LIMITS["clients"]`` clients of ``LIMITS["rows"]`` rows): the memory a run would hold at
    that size must be at most ``LIMITS["bytes"]``, or loading fails before anything is
    allocated. (Every run checks again for the real row counts: :mod:`fadcore.ir.resources`.)
    """
    clients = _declared(clients, "clients", LIMITS["clients"])
    rows = _declared(rows, "rows", LIMITS["rows"])
    if isinstance(text, (bytes, bytearray, memoryview)):
        if len(text) > LIMITS["text_bytes"]:
            raise SerializationError(
                f"graph JSON is {len(text)} bytes (at most {LIMITS['text_bytes']})")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise SerializationError(f"graph JSON is not valid UTF-8: {e}") from None
    if not isinstance(text, str):
        raise SerializationError(f"from_json: expected str or bytes, got {type(text).__name__}")
    if len(text) > LIMITS["text_bytes"]:
        raise SerializationError(
            f"graph JSON is {len(text)} characters (at most {LIMITS['text_bytes']})")
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except SerializationError:
        raise
    except RecursionError:
        raise SerializationError("graph JSON is nested too deeply") from None
    except (ValueError, MemoryError) as e:     # JSONDecodeError, huge int literals
        raise SerializationError(f"graph JSON does not parse (truncated or malformed?): {e}") \
            from None
    try:
        graph = _build(doc)
        _check_memory(graph, clients, rows)
    except SerializationError:
        raise
    except RecursionError:
        raise SerializationError("graph JSON is nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - a safety net: nothing untyped escapes a load
        # every check above should have produced a clear message already
        raise SerializationError(f"invalid graph JSON: {type(e).__name__}: {e}") from None
    return graph


def _declared(v: Any, name: str, default: int) -> int:
    if v is None:
        return default
    if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or v < 0:
        raise SerializationError(f"from_json: {name}= must be an int >= 0, got {_short(v)}")
    return int(v)


def _check_memory(graph: Graph, clients: int, rows: int) -> None:
    from .resources import _human, largest_live, peak_bytes
    limit = LIMITS["bytes"]
    if limit is None or not graph.eqns:
        return
    seen = set()
    for e in graph.eqns:               # loop bodies: each within the limit on its own too
        body = e.params.get("body")
        if isinstance(body, Graph) and id(body) not in seen:
            seen.add(id(body))
            try:
                _check_memory(body, clients, rows)
            except SerializationError as err:
                raise SerializationError(f"the body of {e.prim.name}: {err}") from None
    peak, step = peak_bytes(graph, rows, clients)
    if peak > limit:
        k = largest_live(graph, step, rows, clients)
        e = graph.eqns[k]
        raise _fail(f"eqns[{k}] ({e.prim.name})",
                    f"a run would hold {_human(peak)} at once for {clients} client(s) of "
                    f"{rows} row(s) (the biggest value: this {e.out.type}), over the limit "
                    f"of {_human(limit)} (LIMITS['bytes']); nothing was allocated")


def _build(doc: Any) -> Graph:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SerializationError(
            f"not a fadcore graph: expected a JSON object with \"format\": \"{FORMAT}\"")
    version = doc.get("version")
    if version != VERSION or isinstance(version, bool):
        raise SerializationError(
            f"unsupported fadcore graph version {_short(version)}: this fadcore reads version "
            f"{VERSION}")
    _keys(doc, "graph", required=_TOP_KEYS, optional=("graphs",))
    table = {"graphs": [], "depths": [], "refs": []}
    token = _GRAPHS.set(table)
    try:
        total = 0
        for k, sub in enumerate(_list(doc.get("graphs", []), "graphs", "graphs")):
            table["refs"] = []
            try:
                _keys(sub, "", required=_SUB_KEYS)
                g = _build_graph(sub)
            except SerializationError as err:
                raise SerializationError(f"graphs[{k}]: {err}") from None
            depth = 1 + max((table["depths"][r] for r in table["refs"]), default=0)
            if depth > LIMITS["graph_depth"]:
                raise _fail(f"graphs[{k}]", f"graphs nested more than {LIMITS['graph_depth']} "
                                            "deep")
            total += len(g.eqns)
            if total > LIMITS["eqns"]:
                raise _fail("graphs", f"more than {LIMITS['eqns']} equations in all")
            table["graphs"].append(g)
            table["depths"].append(depth)
        table["refs"] = []
        return _build_graph(doc)
    finally:
        _GRAPHS.reset(token)


_SUB_KEYS = tuple(k for k in _TOP_KEYS if k not in ("format", "version"))


def _build_graph(doc: dict) -> Graph:
    name = _check_str(doc["name"], "name", "graph name")
    seen_types: dict[str, FederatedType] = {}

    def ptype(t: Any, where: str) -> FederatedType:
        hit = seen_types.get(t) if isinstance(t, str) else None
        if hit is None:
            hit = parse_type(t, where)
            seen_types[t] = hit
        return hit

    inputs = [Var(ptype(t, f"inputs[{i}]"))
              for i, t in enumerate(_list(doc["inputs"], "inputs", "inputs"))]
    env: list[Var] = list(inputs)

    lits = [_dec_literal(x, f"literals[{i}]")
            for i, x in enumerate(_list(doc["literals"], "literals", "literals"))]

    def operand(a: Any, where: str):
        if isinstance(a, int) and not isinstance(a, bool):
            if not 0 <= a < len(env):
                raise _fail(where, f"variable {a} is not defined before it is used "
                                   f"({len(env)} variables so far)")
            return env[a]
        if isinstance(a, dict) and len(a) == 1 and "lit" in a:
            k = a["lit"]
            if not (isinstance(k, int) and not isinstance(k, bool) and 0 <= k < len(lits)):
                raise _fail(where, f"literal {_short(k)} does not exist ({len(lits)} literals)")
            return lits[k]
        raise _fail(where, f"an operand is a variable number or {{\"lit\": k}}, got {_short(a)}")

    eqns = []
    for k, e in enumerate(_list(doc["eqns"], "eqns", "eqns")):
        where = f"eqns[{k}]"
        _keys(e, where, required=("prim", "in", "type"), optional=("params", "source"))
        pname = e["prim"]
        prim = primitives.get(pname) if isinstance(pname, str) else None
        if prim is None:
            raise _fail(f"{where}.prim", f"unknown primitive {_short(pname)}")
        where = f"eqns[{k}] ({pname})"
        ins_raw = e["in"]
        if not isinstance(ins_raw, list) or len(ins_raw) > LIMITS["items"]:
            raise _fail(f"{where}.in", f"expected a list of operands, got {_short(ins_raw)}")
        ins = [operand(a, f"{where}.in[{i}]") for i, a in enumerate(ins_raw)]
        out = Var(ptype(e["type"], f"{where}.type"))
        params_raw = e.get("params", {})
        if not isinstance(params_raw, dict) or len(params_raw) > LIMITS["params"]:
            raise _fail(f"{where}.params", f"expected an object of at most {LIMITS['params']} "
                                           f"params, got {_short(params_raw)}")
        params = {_check_str(n, f"{where}.params", "param name"):
                  _dec_value(v, f"{where}.params.{n}") for n, v in params_raw.items()}
        source = e.get("source")
        if source is not None:
            source = _check_str(source, f"{where}.source", "source")
        eqns.append(Eqn(prim, ins, out, params, source))
        env.append(out)

    outputs = [operand(a, f"outputs[{i}]")
               for i, a in enumerate(_list(doc["outputs"], "outputs", "outputs"))]
    in_tree = _dec_tree(doc["in_tree"], "in_tree")
    out_tree = _dec_tree(doc["out_tree"], "out_tree")
    meta_raw = doc["meta"]
    if not isinstance(meta_raw, dict) or len(meta_raw) > LIMITS["meta_keys"]:
        raise _fail("meta", f"expected an object of at most {LIMITS['meta_keys']} entries")
    meta = {k: _dec_value(v, f"meta.{k}") for k, v in meta_raw.items()}
    nc = meta.pop("num_captured", 0)
    if not (isinstance(nc, int) and not isinstance(nc, bool) and 0 <= nc <= len(inputs)):
        raise _fail("meta.num_captured", f"expected an int between 0 and {len(inputs)}, "
                                         f"got {_short(nc)}")

    graph = Graph(inputs, eqns, outputs, in_tree=in_tree, out_tree=out_tree, name=name,
                  meta=meta, num_captured=nc)
    from ..errors import VerificationError
    from .verifier import verify
    try:
        verify(graph)
    except VerificationError as err:
        raise SerializationError("the graph does not type-check: " + _headline(err)) from None
    return graph


def _headline(err: Exception) -> str:
    """The first line of a verifier message: the equation and its source (the rest of the
    message prints the graph around it)."""
    return str(err).splitlines()[0]


def _dec_tree(obj: Any, where: str):
    try:
        return pytree.from_json(obj)
    except (ValueError, TypeError) as e:
        raise _fail(where, str(e)) from None
