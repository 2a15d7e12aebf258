"""The JSON form of graphs (exact round trips, hostile input) and the networkx / dot exports."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fadcore as fad
from fadcore import examples as ex
from fadcore import numpy as fnp
from fadcore.ir import serialize
from fadcore.ir.graph import Literal
from fadcore.testing.strategies import programs

from conftest import Ragged
from test_ops_eval import CASES, F, run_on_clients, run_on_server

X = fad.clients([np.ones((2, 3)), np.arange(12.0).reshape(4, 3)])
Y = fad.clients([np.ones(2), np.arange(4.0)])
W = np.array([0.5, -1.0, 2.0])


def fed_mse_graph():
    @fad.trace
    def fed_mse(w, X, y):
        r = X @ fad.broadcast(w) - y
        return fad.mean(fnp.mean(r * r))
    return fed_mse.graph(W, X, Y)


def roundtrip(g) -> fad.Graph:
    text = g.to_json()
    g2 = fad.Graph.from_json(text)
    assert str(g2) == str(g)
    assert g2.to_json() == text                         # stable text
    assert fad.Graph.from_json(g.to_json(indent=2)).to_json() == text
    assert g2.in_tree == g.in_tree and g2.out_tree == g.out_tree and g2.name == g.name
    assert g2.meta == g.meta
    assert [e.source for e in g2.eqns] == [e.source for e in g.eqns]
    return g2


def same_results(a, b):
    la, ta = fad.pytree.flatten(a)
    lb, tb = fad.pytree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, fad.ClientValues):
            assert isinstance(y, fad.ClientValues) and len(x) == len(y)
            for u, v in zip(x, y):
                assert u.dtype == v.dtype and np.array_equal(u, v, equal_nan=True)
        else:
            assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True)


# --------------------------------------------------------------------------- exact round trips

@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_roundtrip_every_op_graph(c):
    for g in (run_on_clients(c, 2, Ragged(np.random.default_rng(0))),
              run_on_server(c, Ragged(np.random.default_rng(0)))):
        roundtrip(g)


@pytest.mark.parametrize("c", CASES[::7], ids=[c.id for c in CASES[::7]])
def test_roundtrip_evaluates_identically(c, ragged):
    rows = ragged.rows(7)
    args = [fad.clients([ragged.array(tuple(n if d is None else d for d in a.shape), a.dtype,
                                      a.high, a.positive) for n in rows]) for a in c.args]
    f = fad.trace(lambda *xs: c.f(F, *xs), name=c.id)
    g = f.graph(*args)
    g2 = roundtrip(g)
    same_results(fad.run(g, *args, backend="reference"), fad.run(g2, *args, backend="reference"))


@pytest.mark.parametrize("mode", ["forward", "reverse", "mixed", "auto"])
@pytest.mark.parametrize("example", ["fed_mse", "fedavg_round", "secure_mse", "two_round",
                                     "log_sum"])
def test_roundtrip_derivative_graphs(mode, example):
    f = getattr(ex, example)
    args = getattr(ex, f"example_args_{example}")()
    argnums = 1 if example == "fedavg_round" and mode != "forward" else 0
    g = fad.grad(f, argnums=argnums, mode=mode).graph(*args)
    g2 = roundtrip(g)
    same_results(fad.run(g, *args, backend="reference"), fad.run(g2, *args, backend="reference"))


def test_roundtrip_pytrees_literals_and_meta():
    @fad.trace
    def f(params, data, flags):
        X, y = data
        h = X @ fad.broadcast(params["w"]) + np.float32(0.5).astype(np.float64)
        big = np.linspace(-1, 1, 100).reshape(10, 10)
        special = np.array([np.nan, np.inf, -np.inf, -0.0, 5e-324, 1.7976931348623157e308])
        return {"loss": fad.mean(fnp.mean((h - y) ** 2)), "extra": [params["b"] * 2.0, None],
                "lits": (params["w"][:1] * special[3], big @ np.ones(10), special,
                         np.array([True, False]), np.int32(7) * flags)}

    g = f.graph({"w": W, "b": np.float64(1.0)}, (X, Y), np.ones(2, np.int32))
    g.meta.update(mode="test", note=None, n=3, nums=(1.5, float("nan"), float("-inf"), -0.0),
                  nested={"a": [1, {"b": (True, "x")}]}, dt=fad.f32, where=fad.CLIENTS,
                  type=fad.f64[None] @ fad.CLIENTS)
    g2 = fad.Graph.from_json(g.to_json())           # (NaN in meta: no == on meta here)
    assert str(g2) == str(g) and g2.to_json() == g.to_json()
    assert g2.meta["nums"][0] == 1.5 and np.isnan(g2.meta["nums"][1])
    assert str(g2.meta["nums"][3]) == "-0.0" and isinstance(g2.meta["nums"], tuple)
    assert g2.meta["dt"] is fad.f32 and g2.meta["where"] is fad.CLIENTS
    assert g2.meta["type"] == fad.f64[None] @ fad.CLIENTS
    assert g2.meta["nested"] == {"a": [1, {"b": (True, "x")}]}
    args = ({"w": W, "b": np.float64(1.0)}, (X, Y), np.ones(2, np.int32))
    same_results(fad.run(g, *args, backend="reference"), fad.run(g2, *args, backend="reference"))
    # literals keep their exact bits, dtype and shape
    lits = {(lit.type, lit.value.tobytes()) for e in g.eqns for lit in e.inputs
            if isinstance(lit, Literal)}
    lits2 = {(lit.type, lit.value.tobytes()) for e in g2.eqns for lit in e.inputs
             if isinstance(lit, Literal)}
    assert lits == lits2 and len(lits) >= 4


def test_the_format_is_plain_versioned_json():
    doc = json.loads(fed_mse_graph().to_json(), parse_constant=lambda c: 1 / 0)
    assert doc["format"] == "fadcore.graph" and doc["version"] == 1
    assert doc["inputs"] == ["f64[3]@SERVER", "{f64[?,3]}@CLIENTS", "{f64[?]}@CLIENTS"]
    assert doc["eqns"][0] == {"prim": "broadcast", "in": [0], "type": "f64[3]@CLIENTS",
                              "source": doc["eqns"][0]["source"]}
    assert doc["eqns"][4]["params"] == {"axes": ["tuple", [["int", 0]]]}
    assert doc["outputs"] == [10] and doc["in_tree"] == ["tuple", [["leaf"]] * 3]
    assert fad.Graph.from_json(fed_mse_graph().to_json().encode()).to_json() == \
        fed_mse_graph().to_json()


def test_to_json_refuses_what_it_cannot_store():
    g = fed_mse_graph()
    g.meta["fn"] = print
    with pytest.raises(fad.SerializationError, match=r"meta\.fn: cannot serialize a "
                                                     r"builtin_function_or_method"):
        g.to_json()
    g = fed_mse_graph()
    g.meta["big"] = 2**70
    with pytest.raises(fad.SerializationError, match="does not fit in 64 bits"):
        g.to_json()
    g = fed_mse_graph().replace(eqns=fed_mse_graph().eqns[1:])
    with pytest.raises(fad.SerializationError, match=r"eqns\[0\] \(matvec\): operand is not "
                                                     r"defined"):
        g.to_json()
    with pytest.raises(fad.SerializationError, match="expected a fad.Graph"):
        serialize.to_json("graph")


def test_what_to_json_writes_from_json_reads(monkeypatch):
    g = fed_mse_graph()
    g.eqns[0].source = "x" * 20_000
    with pytest.raises(fad.SerializationError, match=r"eqns\[0\] \(broadcast\)\.source: source "
                                                     r"too long"):
        g.to_json()
    g = fad.trace(lambda w: w * 2.0).graph(fad.f64[2**20, 2**13] @ fad.SERVER)
    with pytest.raises(fad.SerializationError, match=r"inputs\[0\]: shape \[1048576,8192\] "
                                                     r"declares 8589934592 elements"):
        g.to_json()
    monkeypatch.setitem(serialize.LIMITS, "text_bytes", 1000)
    with pytest.raises(fad.SerializationError, match="the graph's JSON would be"):
        fed_mse_graph().to_json()
    g = fad.trace(lambda w: w * 2.0, name="wéird ∇ name").graph(W)
    text = g.to_json()
    assert text.isascii() and fad.Graph.from_json(text).name == "wéird ∇ name"


# --------------------------------------------------------------------------- hostile input

BASE = fed_mse_graph().to_json()


def doc():
    return json.loads(BASE)


def rejects(text, match=None):
    with pytest.raises(fad.SerializationError, match=match):
        fad.Graph.from_json(text if isinstance(text, (str, bytes)) else json.dumps(text))


def test_truncated_input_is_rejected():
    for cut in range(0, len(BASE), 7):
        rejects(BASE[:cut])
    rejects("", "does not parse")
    rejects(BASE + "x", "does not parse")


@pytest.mark.parametrize("version", [0, 2, "1", True, 1.5, None])
def test_wrong_version(version):
    d = doc()
    d["version"] = version
    rejects(d, "unsupported fadcore graph version")


def test_missing_version_and_wrong_format():
    d = doc()
    del d["version"]
    rejects(d, "unsupported fadcore graph version None")
    d = doc()
    d["format"] = "pickle"
    rejects(d, "not a fadcore graph")
    rejects("[]", "not a fadcore graph")
    rejects("null", "not a fadcore graph")


@pytest.mark.parametrize("text", [None, 3, ["x"], {"format": "fadcore.graph"}])
def test_non_text_input(text):
    with pytest.raises(fad.SerializationError, match="expected str or bytes"):
        fad.Graph.from_json(text)


def test_invalid_utf8_and_json_constants():
    rejects(b"\xff\xfe{}", "not valid UTF-8")
    rejects(BASE.replace('"version": 1', '"version": NaN'), "non-standard JSON constant NaN")
    rejects(BASE.replace('"name": "fed_mse"', '"name": "a", "name": "b"'), "duplicate key")


def test_deeply_nested_json():
    rejects("[" * 200_000 + "]" * 200_000)
    rejects('{"a":' * 100_000 + "1" + "}" * 100_000)
    d = doc()
    deep = ["int", 0]
    for _ in range(100):
        deep = ["tuple", [deep]]
    d["eqns"][4]["params"]["axes"] = deep
    rejects(d, "nested too deeply")
    d = doc()
    tree = ["leaf"]
    for _ in range(100):
        tree = ["tuple", [tree]]
    d["out_tree"] = tree
    rejects(d, "out_tree: tree definition nested too deeply")


def test_oversized_input():
    rejects(" " * (serialize.LIMITS["text_bytes"] + 1), "at most")
    rejects(b" " * (serialize.LIMITS["text_bytes"] + 1), "at most")


def test_too_many_equations(monkeypatch):
    monkeypatch.setitem(serialize.LIMITS, "eqns", 5)
    rejects(BASE, r"eqns: 8 entries \(at most 5\)")


def test_huge_declared_shapes():
    d = doc()
    d["inputs"][0] = "f64[99999999999]@SERVER"
    rejects(d, "dimension 99999999999 is too large")
    d = doc()
    d["inputs"][0] = "f64[" + ",".join(["2"] * 40) + "]@SERVER"
    rejects(d, "dimensions")
    d = doc()
    d["inputs"][1] = "{f64[?,2000000000,2000000000]}@CLIENTS"
    rejects(d, "declares 4000000000000000000 elements")
    d = doc()
    d["literals"] = [{"dtype": "f64", "shape": [10**9, 10**9], "data": [1.0]}]
    rejects(d, "declares 1000000000000000000 elements")
    d["literals"] = [{"dtype": "f64", "shape": [10**5, 10**4], "data": [1.0]}]
    rejects(d, "literal of 1000000000 elements is too large")
    d["literals"] = [{"dtype": "f64", "shape": [10**5, 10**3], "base64": "AAAA"}]
    rejects(d, r"literals\[0\]\.base64: expected 800000000 bytes")
    d["literals"] = [{"dtype": "f64", "shape": [2**62], "data": []}]
    rejects(d, "is too large")


@pytest.mark.parametrize("name", ["__import__", "os.system", "eval", "builtins.exec", "",
                                  "BROADCAST", "broadcast ", 3, None, ["broadcast"],
                                  {"name": "broadcast"}])
def test_unknown_primitives(name):
    d = doc()
    d["eqns"][0]["prim"] = name
    rejects(d, r"eqns\[0\]\.prim: unknown primitive")


@pytest.mark.parametrize("lit, msg", [
    ({"dtype": "f64", "shape": [3], "data": [1.0, 2.0]}, "expected a flat list of 3 values"),
    ({"dtype": "f64", "shape": [2], "data": [[1.0], [2.0]]}, "is not a valid f64"),
    ({"dtype": "f64", "shape": [], "data": ["1.0"]}, "is not a valid f64"),
    ({"dtype": "f64", "shape": [], "data": [True]}, "is not a valid f64"),
    ({"dtype": "i64", "shape": [], "data": [1.5]}, "is not a valid i64"),
    ({"dtype": "i64", "shape": [], "data": [2**70]}, "is not a valid i64"),
    ({"dtype": "i32", "shape": [], "data": [2**40]}, "is not a valid i32"),
    ({"dtype": "bool", "shape": [], "data": [1]}, "is not a valid bool"),
    ({"dtype": "f64", "shape": [2], "base64": base64.b64encode(b"\0" * 8).decode()},
     "expected 16 bytes"),
    ({"dtype": "f64", "shape": [1], "base64": "!!!!!!!!!!!="}, "invalid base64"),
    ({"dtype": "f64", "shape": [1], "base64": 12}, "expected 8 bytes"),
    ({"dtype": "f64", "shape": [1]}, "exactly one of 'data' and 'base64'"),
    ({"dtype": "f64", "shape": [1], "data": [1.0], "base64": "AAAAAAAAAAA="},
     "exactly one of"),
    ({"dtype": "f16", "shape": [], "data": [1.0]}, "unknown dtype 'f16'"),
    ({"dtype": "f64", "shape": [-1], "data": []}, "list of ints >= 0"),
    ({"dtype": "f64", "shape": "3", "data": []}, "list of ints >= 0"),
    ({"dtype": "f64", "shape": [], "data": [1.0], "code": "x"}, "unknown field"),
    ([1.0], "expected a JSON object"),
])
def test_literal_data_must_match_its_shape(lit, msg):
    d = doc()
    d["literals"] = [lit]
    d["eqns"][3]["in"] = [5, {"lit": 0}]
    rejects(d, msg)


def test_bad_references():
    for ref, msg in [(99, "variable 99 is not defined before it is used"),
                     (7, "variable 7 is not defined before it is used"),
                     (-1, "not defined"), (True, "a variable number or"), ("a", "variable number"),
                     ({"lit": 0}, "literal 0 does not exist"),
                     ({"lit": 0, "x": 1}, "variable number")]:
        d = doc()
        d["eqns"][1]["in"][0] = ref
        rejects(d, msg)
    d = doc()
    d["outputs"] = [42]
    rejects(d, r"outputs\[0\]: variable 42")


def test_ill_typed_graphs_are_rejected_by_the_verifier():
    d = doc()
    d["eqns"][1]["type"] = "{f64[?,2]}@CLIENTS"
    rejects(d, r"does not type-check: equation 1 \(matvec\).*result declared")
    d = doc()
    d["eqns"][0]["in"] = [1]                          # broadcast of a client value
    rejects(d, "does not type-check.*fad.broadcast: expects a value at SERVER")
    d = doc()
    d["eqns"][4]["params"] = {"axes": ["tuple", [["int", 5]]]}
    rejects(d, r"does not type-check: equation 4 \(reduce_sum\)")
    d = doc()
    d["eqns"][4]["params"] = {"axes": ["str", "0"]}
    rejects(d, "does not type-check")
    d = doc()
    d["in_tree"] = ["tuple", [["leaf"]]]
    rejects(d, "input tree does not match")
    d = doc()
    d["meta"] = {"num_captured": ["str", "x"]}
    rejects(d, r"meta\.num_captured: expected an int")


@pytest.mark.parametrize("t", ["f64[?]@SERVER", "{f64[3]}@SERVER", "f64[3]", 3, ["f64", [3]],
                               "f64[3]@SERVER; import os", "f64[1e3]@SERVER"])
def test_bad_types(t):
    d = doc()
    d["inputs"][0] = t
    rejects(d, r"inputs\[0\]")


def test_bad_structure():
    for key in ("inputs", "eqns", "outputs", "literals", "meta", "name", "in_tree"):
        d = doc()
        del d[key]
        rejects(d, f"missing field.*{key}")
    d = doc()
    d["extra"] = 1
    rejects(d, "unknown field")
    d = doc()
    d["eqns"][0]["eval"] = "__import__('os')"
    rejects(d, r"eqns\[0\]: unknown field")
    for bad in ([], {"in": [0]}, "broadcast", None):
        d = doc()
        d["eqns"][0] = bad
        rejects(d)
    d = doc()
    d["eqns"] = {"0": d["eqns"][0]}
    rejects(d, "eqns: expected a list")
    d = doc()
    d["name"] = "x" * 20_000
    rejects(d, "graph name too long")
    d = doc()
    d["eqns"][4]["params"] = {"axes": ["tuple", [["int", 0]] * 5000]}
    rejects(d, "5000 items")
    d = doc()
    d["eqns"][4]["params"] = {"axes": ["pickle", "gASVAAAA"]}
    rejects(d, "malformed tagged value")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([10**400, -10**400])
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6)
    | st.sampled_from(["f64[3]@SERVER", "int", "tuple", "lit", "broadcast", "{f64[?]}@CLIENTS"]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["lit", "prim", "in", "type", "params", "x"]), c, max_size=3),
    max_leaves=8)


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


PATHS = [p for p in _paths(json.loads(BASE)) if p]


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_documents_load_or_fail_cleanly(data):
    d = doc()
    path = data.draw(st.sampled_from(PATHS))
    parent = d
    for k in path[:-1]:
        parent = parent[k]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(json_values)
    try:
        g = fad.Graph.from_json(json.dumps(d))
    except fad.SerializationError:
        return
    str(g)                                            # a loaded graph is a valid graph
    g.verify()


@given(st.integers(0, len(BASE) - 1), st.binary(min_size=1, max_size=3))
def test_corrupted_bytes_load_or_fail_cleanly(pos, junk):
    text = BASE.encode()[:pos] + junk + BASE.encode()[pos + len(junk):]
    try:
        fad.Graph.from_json(text)
    except fad.SerializationError:
        pass


def test_a_loaded_graph_is_independent_of_the_original():
    g = fed_mse_graph()
    g2 = fad.Graph.from_json(g.to_json())
    assert not set(g.inputs) & set(g2.inputs)
    assert all(a.prim is b.prim for a, b in zip(g.eqns, g2.eqns))
    g2.meta["x"] = 1
    assert "x" not in g.meta


# --------------------------------------------------------------------------- networkx and dot

def test_to_networkx():
    g = fed_mse_graph()
    G = g.to_networkx()
    assert isinstance(G, nx.DiGraph) and nx.is_directed_acyclic_graph(G)
    assert G.number_of_nodes() == len(g.inputs) + len(g.eqns) + 1
    assert G.graph["name"] == "fed_mse"
    assert G.nodes["a"] == {"kind": "input", "index": 0, "type": "f64[3]@SERVER",
                            "placement": "SERVER", "params": {}, "communication": False}
    d = G.nodes["d"]
    assert (d["kind"], d["primitive"], d["type"], d["placement"], d["communication"]) == (
        "eqn", "broadcast", "f64[3]@CLIENTS", "CLIENTS", True)
    assert G.nodes["h"]["params"] == {"axes": (0,)} and G.nodes["h"]["primitive"] == "reduce_sum"
    assert G.nodes["k"]["placement"] == "SERVER" and G.nodes["k"]["communication"]
    assert G.nodes["out0"]["kind"] == "output"
    assert list(G.predecessors("e")) == ["b", "d"]
    assert G.edges["f", "g"]["args"] == [0, 1]                 # mul f f
    assert G.edges["b", "e"]["type"] == "{f64[?,3]}@CLIENTS"
    comm = [n for n, a in G.nodes(data=True) if a["communication"]]
    assert comm == ["d", "k"]
    order = list(nx.topological_sort(G))
    assert order.index("d") < order.index("e") < order.index("k") < order.index("out0")


def test_to_networkx_literals_and_literal_outputs():
    g = fad.trace(lambda w: (w * 2.0, np.arange(3.0), w)).graph(W)
    G = g.to_networkx()
    assert G.nodes["b"]["literals"] == {1: "2.0"}
    assert sorted(n for n, a in G.nodes(data=True) if a["kind"] == "output") == ["out0", "out2"]
    assert G.has_edge("a", "out2")


def test_to_networkx_every_op_graph():
    rag = Ragged(np.random.default_rng(0))
    for c in CASES[::5]:
        g = run_on_clients(c, 2, rag)
        G = g.to_networkx()
        assert nx.is_directed_acyclic_graph(G)
        assert sum(a["kind"] == "eqn" for _, a in G.nodes(data=True)) == len(g.eqns)


def test_to_dot():
    g = fed_mse_graph()
    dot = g.to_dot()
    assert dot.startswith('digraph "fed_mse" {') and dot.rstrip().endswith("}")
    assert "subgraph cluster_server" in dot and "subgraph cluster_clients" in dot
    assert dot.count("shape=hexagon") == 2                    # broadcast, mean
    assert '"a" -> "d"' in dot and '"k" -> "out0"' in dot
    assert 'label="d: f64[3]@CLIENTS\\nbroadcast a"' in dot
    assert "reduce_sum[axes=(0,)] g" in dot
    assert dot.count("{") == dot.count("}")
    # inputs in their placement's cluster; the round holds its broadcast, client work, aggregation
    server = dot.split("subgraph cluster_server")[1].split("}")[0]
    clients = dot.split("subgraph cluster_clients")[1].split("  }")[0]
    round1 = dot.split("subgraph cluster_round1")[1].split("\n  }")[0]
    assert '"a" [' in server and '"b" [' in clients and '"c" [' in clients
    assert '"e" [' in round1.split("subgraph cluster_r1_clients")[1]
    assert '"d" [' in round1 and '"k" [' in round1 and '"d" [' not in clients


def test_to_dot_of_a_derivative_graph_is_laid_out_by_rounds():
    g = fad.grad(ex.fed_mse).graph(*ex.example_args_fed_mse())
    dot = g.to_dot()
    assert len(g.rounds()) == 2
    assert "subgraph cluster_round1" in dot and "subgraph cluster_round2" in dot
    assert "cluster_round3" not in dot
    prims = [e.prim.name for e in g.eqns]
    assert "after" in prims and "num_clients" in prims
    hexagons = [line for line in dot.splitlines() if "shape=hexagon" in line]
    assert len(hexagons) == sum(p in ("broadcast", "mean", "sum") for p in prims) == 4
    assert not any("after" in h or "num_clients" in h for h in hexagons)
    assert ' -> "out0"' in dot and "label=" not in "".join(
        line for line in dot.splitlines() if " -> " in line)          # no edge labels


def test_to_dot_quotes_names():
    g = fad.trace(lambda w: w * 2.0, name='we"ird\\name').graph(W)
    dot = g.to_dot()
    assert dot.startswith('digraph "we\\"ird\\\\name" {')


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_graphviz_accepts_the_dot_text():
    for example in ("fed_mse", "fedavg_round"):
        f = getattr(ex, example)
        g = fad.grad(f, mode="reverse").graph(*getattr(ex, f"example_args_{example}")())
        out = subprocess.run(["dot", "-Tsvg"], input=g.to_dot(), capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert "<svg" in out.stdout


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(programs(max_ops=6))
def test_random_programs_and_their_gradients_roundtrip(prog):
    f, args = prog
    for g in (f.graph(*args), fad.grad(f, mode="reverse").graph(*args)):
        g2 = roundtrip(g)
        same_results(fad.run(g, *args, backend="reference"),
                     fad.run(g2, *args, backend="reference"))
