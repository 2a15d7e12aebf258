"""Hostile graphs: the files under tests/hostile/ and the memory a graph may ask for.

Every file in tests/hostile/ is a graph JSON document that once escaped ``Graph.from_json``
untyped (an ``OverflowError``), or loaded fine and then asked a backend for tens of GiB from a
few hundred bytes of text. Each must now be refused with a ``fad.SerializationError`` naming
the offending field. A new file without an entry in ``EXPECTED`` fails the suite.
"""

from __future__ import annotations

import json
import os
import pathlib
import tracemalloc

import numpy as np
import pytest

import fadcore as fad
from fadcore import numpy as fnp
from fadcore.ir import resources, serialize

HOSTILE = pathlib.Path(__file__).parent / "hostile"

#: file -> (regex the SerializationError must match, bytes a run would hold, or None)
EXPECTED = {
    "overflow_float_param.json": (r"eqns\[0\] \(reduce_sum\)\.params\.axes\[0\]: integer 1000+"
                                  r"\.\.\. is out of the float64 range", None),
    "overflow_float_literal.json": (r"literals\[0\]\.data: value 1000+\.\.\. is not a valid f64",
                                    None),
    "overflow_float_meta.json": (r"meta\.lr: integer 1000+\.\.\. is out of the float64 range",
                                 None),
    "overflow_f32_literal.json": (r"literals\[0\]\.data: value 1e\+300 is not a valid f32", None),
    # 8 bytes x 1 row x (2**31 - 1), and the scalar reduced from it
    "bomb_ragged_16gib.json": (r"eqns\[0\] \(broadcast_in_dim\): a run would hold 16\.0 GiB",
                               8 * (2**31 - 1) + 8),
    "bomb_one_hot_16gib.json": (r"eqns\[0\] \(one_hot\): a run would hold 16\.0 GiB",
                                8 * (2**31 - 1) + 8),
    "bomb_pad_16gib.json": (r"eqns\[0\] \(pad\): a run would hold 16\.0 GiB",
                            8 * (2**31 - 1) + 8),
    # the client's untake result and its sum at the server are alive together
    "bomb_untake_16gib.json": (r"eqns\[0\] \(untake\): a run would hold 32\.0 GiB",
                               2 * 8 * (2**31 - 1)),
    # the 2**32-element value plus the scalar reduced from it
    "bomb_server_32gib.json": (r"eqns\[0\] \(broadcast_in_dim\): a run would hold 32\.0 GiB",
                               8 * 2**32 + 8),
    "bomb_outer_32gib.json": (r"eqns\[0\] \(outer\): a run would hold 32\.0 GiB", 8 * 2**32 + 8),
    # 30 outputs of 2 GiB each, every one under a per-value limit
    "bomb_many_values_60gib.json": (r"a run would hold 60\.0 GiB .*f64\[16384,16384\]@SERVER",
                                    30 * 8 * 16384**2),
    # every param is validated by its type rule (issue 18 items 1, 4 and 7)
    "param_argmax_axis_minus1.json": (r"equation 0 \(argmax\): argmax: axis -1 out of range "
                                      r"for a 2-d operand", None),
    "param_argmax_axis_5.json": (r"argmax: axis 5 out of range for a 2-d operand", None),
    "param_reduce_axes_float.json": (r"reduce_sum: axes=\(0\.0,\) must be a tuple of ints", None),
    "param_transpose_perm_bool.json": (r"transpose: perm=\(True, False\) must be a tuple of ints",
                                       None),
    "param_untake_axis_9.json": (r"untake: axis 9 out of range for a 2-d operand", None),
    "param_untake_along_axis_minus1.json": (r"untake_along_axis: axis -1 out of range for a "
                                            r"2-d operand", None),
    "param_one_hot_depth_float.json": (r"one_hot: depth=3\.0 must be an int", None),
    "param_unknown.json": (r"neg: unexpected parameter 'axis' \(it takes none\)", None),
}


def test_every_hostile_file_has_an_expectation():
    files = sorted(p.name for p in HOSTILE.glob("*.json"))
    assert files == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_file_is_refused(name):
    text = (HOSTILE / name).read_text()
    assert len(text) < 6000                       # a small file...
    match, _ = EXPECTED[name]
    with pytest.raises(fad.SerializationError, match=match):
        fad.Graph.from_json(text)
    with pytest.raises(fad.SerializationError, match=match):
        fad.Graph.from_json(text.encode())


@pytest.mark.parametrize("name", sorted(n for n, (_, b) in EXPECTED.items() if b))
def test_bomb_estimate_and_run_time_refusal(name, monkeypatch):
    """Loaded with the limit lifted, the bomb's peak is the hand-counted figure, and running it
    is refused before a byte is allocated (on every backend)."""
    monkeypatch.setitem(serialize.LIMITS, "bytes", None)
    g = fad.Graph.from_json((HOSTILE / name).read_text())
    want = EXPECTED[name][1]
    assert resources.peak_bytes(g, 1, 1)[0] == want
    monkeypatch.setenv("FADCORE_MEMORY_LIMIT", str(2**30))
    args = []
    for t in g.in_types:
        shape = tuple(1 if d is None else d for d in t.shape)
        a = np.zeros(shape, t.dtype.np)
        args.append(fad.clients([a]) if t.placement is fad.CLIENTS else a)
    for backend in ("reference", "numba"):
        with pytest.raises(fad.ResourceError, match=r"over the memory budget of 1\.0 GiB"):
            fad.run(g, *args, backend=backend)


# --------------------------------------------------------------------------- the estimate

def test_peak_bytes_counts_the_live_set_by_hand():
    # exp(x) lives until the mul; at the mul both are alive: 2 x 8000 bytes
    g = fad.trace(lambda x: fnp.sum(fnp.exp(x) * 2.0)).graph(np.ones(1000))
    assert [e.prim.name for e in g.eqns] == ["exp", "mul", "reduce_sum"]
    assert resources.peak_bytes(g, 0) == (16000.0, 1)
    # clients: x * 2 is 24 bytes per row; its row sum 24 per client; their sum 24 at SERVER
    X = fad.clients([np.ones((2, 3)), np.ones((5, 3))])
    g = fad.trace(lambda X: fad.sum(fnp.sum(X * 2.0, axis=0))).graph(X)
    peak, step = resources.peak_bytes(g, np.array([2, 5]))
    assert (peak, step) == (24 * 7 + 24 * 2, 1)              # mul + reduce (two clients)
    assert resources.peak_bytes(g, 10, clients=3)[0] == 3 * 240 + 3 * 24
    # a broadcast model counts once, not once per client; what each client computes from it
    # once per client
    g = fad.trace(lambda w: fad.sum(fad.broadcast(w) * 1.0)).graph(np.ones(100))
    assert resources.peak_bytes(g, 0, clients=1000)[0] == 800 + 1000 * 800


def test_reference_memory_follows_the_estimate():
    """tracemalloc (which sees NumPy's buffers) against the estimate: the reference backend
    holds the live set, not every value it ever made."""
    x = np.ones(2**17)                                # 1 MiB

    def chain(x):
        for _ in range(20):
            x = fnp.tanh(x) + 1.0
        return fnp.sum(x)

    g = fad.trace(chain).graph(x)
    est = resources.peak_bytes(g, 0)[0]
    assert est == 2 * 2**20                           # two 1 MiB values at any time
    fad.run(g, x, backend="reference")
    tracemalloc.start()
    fad.run(g, x, backend="reference")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert est <= peak <= 2 * est + 2**20, (est, peak)   # not 40 MiB (every value kept)


def test_run_time_check_uses_the_real_row_counts(monkeypatch):
    """A graph whose memory grows with rows**2 loads at the declared size, and is refused at
    the size it is run with (or at a declared size) before anything is allocated."""
    X = fad.clients([np.ones(2), np.ones(3)])
    g = fad.trace(lambda x: fad.sum(fnp.sum(fnp.outer(x, x)))).graph(X)
    text = g.to_json()
    g2 = fad.Graph.from_json(text)                     # 1 client of 1 row: tiny
    with pytest.raises(fad.SerializationError, match=r"for 4 client\(s\) of 100000 row\(s\)"):
        fad.Graph.from_json(text, clients=4, rows=100_000)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(fad.SerializationError, match="must be an int >= 0"):
            fad.Graph.from_json(text, rows=bad)
    monkeypatch.setenv("FADCORE_MEMORY_LIMIT", "50000")
    assert float(fad.run(g2, X, backend="reference")) == 2**2 + 3**2
    big = fad.clients([np.ones(100), np.ones(20)])     # 8 x (100**2 + 20**2) bytes + 2 sums
    for backend in ("reference", "numba"):
        with pytest.raises(fad.ResourceError, match=r"83216 bytes.*outer -> \{f64\[\?,\?\]\}"):
            fad.run(g2, big, backend=backend)
    monkeypatch.setenv("FADCORE_MEMORY_LIMIT", "lots")
    with pytest.raises(fad.ResourceError, match="not a number of bytes"):
        fad.run(g2, X, backend="reference")


def test_a_resource_error_is_a_memory_error():
    assert issubclass(fad.ResourceError, MemoryError) and issubclass(fad.ResourceError,
                                                                        fad.FadError)


@pytest.mark.parametrize("where", ["param", "meta", "literal", "literal_i64", "version",
                                   "operand", "shape", "dim"])
def test_huge_json_numbers_anywhere_are_refused(where):
    huge = 10**400
    d = json.loads(fad.trace(lambda w: fnp.sum(w * 2.0)).graph(np.ones(3)).to_json())
    if where == "param":
        d["eqns"][1]["params"]["axes"] = ["tuple", [["int", huge]]]
    elif where == "meta":
        d["meta"]["x"] = ["float", -huge]
    elif where == "literal":
        d["literals"][0]["data"] = [huge]
    elif where == "literal_i64":
        d["literals"][0] = {"dtype": "i64", "shape": [], "data": [huge]}
    elif where == "version":
        d["version"] = huge
    elif where == "operand":
        d["eqns"][0]["in"][0] = huge
    elif where == "shape":
        d["literals"][0]["shape"] = [huge]
    elif where == "dim":
        d["inputs"][0] = f"f64[{huge}]@SERVER"
    with pytest.raises(fad.SerializationError):
        fad.Graph.from_json(json.dumps(d))
