"""Golden tests of the text form: printed graphs are pinned as exact strings."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import textwrap

import numpy as np
import pytest

import fadcore as fad
from fadcore import numpy as fnp
from fadcore.ir.printer import _name, pp_literal, pp_param
from fadcore.ir.graph import Literal

X = fad.clients([np.ones((2, 3)), np.ones((4, 3))])            # {f64[?,3]}@CLIENTS
Y = fad.clients([np.ones(2), np.ones(4)])                        # {f64[?]}@CLIENTS
LABELS = fad.clients([np.zeros(2, np.int64), np.zeros(4, np.int64)])
W = np.zeros(3)


def golden(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def check(graph, text):
    got = str(graph)
    assert got == golden(text), "\n" + got
    assert str(fad.Graph.from_json(graph.to_json())) == got        # and the JSON round trip


def test_fed_mse():
    @fad.trace
    def fed_mse(w, X, y):
        r = X @ fad.broadcast(w) - y
        return fad.mean(fnp.mean(r * r))

    check(fed_mse.graph(W, X, Y), """
        { lambda a:f64[3]@SERVER b:{f64[?,3]}@CLIENTS c:{f64[?]}@CLIENTS .
          let d:f64[3]@CLIENTS = broadcast a
              e:{f64[?]}@CLIENTS = matvec b d
              f:{f64[?]}@CLIENTS = sub e c
              g:{f64[?]}@CLIENTS = mul f f
              h:{f64[]}@CLIENTS = reduce_sum[axes=(0,)] g
              i:{f64[]}@CLIENTS = rows[axis=0] g
              j:{f64[]}@CLIENTS = div h i
              k:f64[]@SERVER = mean j
          in ( k ) }
    """)


def test_all_equal_values_print_without_braces():
    # a broadcast value stays all-equal through local ops; meeting per-client data ends it
    f = fad.trace(lambda w, X: (fnp.exp(fad.broadcast(w)) * 2.0, X[:, 0] * fad.broadcast(w)[0]))
    check(f.graph(W, X), """
        { lambda a:f64[3]@SERVER b:{f64[?,3]}@CLIENTS .
          let c:f64[3]@CLIENTS = broadcast a
              d:f64[3]@CLIENTS = exp c
              e:f64[3]@CLIENTS = mul d 2.0
              f:{f64[?,1]}@CLIENTS = slice[starts=(0,0), limits=(?,1), strides=(1,1)] b
              g:{f64[?]}@CLIENTS = reshape[shape=(?,)] f
              h:f64[3]@CLIENTS = broadcast a
              i:f64[1]@CLIENTS = slice[starts=(0,), limits=(1,), strides=(1,)] h
              j:f64[]@CLIENTS = reshape[shape=()] i
              k:{f64[?]}@CLIENTS = mul g j
          in ( e, k ) }
    """)


def test_every_aggregation_and_num_clients():
    a = fad.clients([1.0, 2.0])
    f = fad.trace(lambda X, a: (fad.weighted_mean(fnp.sum(X, axis=0), a),
                                fad.secure_sum(fnp.sum(X, axis=0)), fad.sum(fnp.max(X)),
                                fad.num_clients()))
    check(f.graph(X, a), """
        { lambda a:{f64[?,3]}@CLIENTS b:{f64[]}@CLIENTS .
          let c:{f64[3]}@CLIENTS = reduce_sum[axes=(0,)] a
              d:f64[3]@SERVER = weighted_mean c b
              e:{f64[3]}@CLIENTS = reduce_sum[axes=(0,)] a
              f:f64[3]@SERVER = secure_sum e
              g:{f64[]}@CLIENTS = reduce_max[axes=(0,1)] a
              h:f64[]@SERVER = sum g
              i:f64[]@SERVER = num_clients
          in ( d, f, h, i ) }
    """)


def test_params_and_ragged_shapes():
    f = fad.trace(lambda X, L: (fnp.take_along_axis(X, L[:, None], axis=1),
                                fnp.one_hot(L, 3, dtype=np.float32), X[:, 1:], fnp.transpose(X),
                                X.reshape(-1, 3, 1), fnp.sum(X, axis=0, keepdims=True)))
    check(f.graph(X, LABELS), """
        { lambda a:{f64[?,3]}@CLIENTS b:{i64[?]}@CLIENTS .
          let c:{i64[?,1]}@CLIENTS = reshape[shape=(?,1)] b
              d:{f64[?,1]}@CLIENTS = take_along_axis[axis=1] a c
              e:{f32[?,3]}@CLIENTS = one_hot[depth=3, dtype=f32] b
              f:{f64[?,2]}@CLIENTS = slice[starts=(0,1), limits=(?,3), strides=(1,1)] a
              g:{f64[3,?]}@CLIENTS = transpose[perm=(1,0)] a
              h:{f64[?,3,1]}@CLIENTS = reshape[shape=(?,3,1)] a
              i:{f64[3]}@CLIENTS = reduce_sum[axes=(0,)] a
              j:{f64[1,3]}@CLIENTS = reshape[shape=(1,3)] i
          in ( d, e, f, g, h, j ) }
    """)


def test_constant_broadcast_to_client_rows():
    f = fad.trace(lambda X: X - np.array([1.0, 2.0, 3.0]))
    check(f.graph(X), """
        { lambda a:{f64[?,3]}@CLIENTS .
          let b:{f64[?,3]}@CLIENTS = broadcast_in_dim[shape=(?,3), dims=(1,)] f64[3][1.,2.,3.]
              c:{f64[?,3]}@CLIENTS = sub a b
          in ( c ) }
    """)


def test_scalar_literals_by_dtype():
    check(fad.trace(lambda x: (x * np.float32(2.5), x + 1, x > 0.5)).graph(
        np.zeros(2, np.float32)), """
        { lambda a:f32[2]@SERVER .
          let b:f32[2]@SERVER = mul a 2.5:f32
              c:f32[2]@SERVER = add a 1.0:f32
              d:bool[2]@SERVER = gt a 0.5:f32
          in ( b, c, d ) }
    """)
    check(fad.trace(lambda a: (a * 3, a - 7, a == True)).graph(np.zeros(2, np.int64)), """
        { lambda a:i64[2]@SERVER .
          let b:i64[2]@SERVER = mul a 3
              c:i64[2]@SERVER = sub a 7
              d:bool[2]@SERVER = eq a 1
          in ( b, c, d ) }
    """)
    check(fad.trace(lambda a: (a * np.int32(-3), fnp.where(a > 0, a, -1))).graph(
        np.zeros(2, np.int32)), """
        { lambda a:i32[2]@SERVER .
          let b:i32[2]@SERVER = mul a -3:i32
              c:bool[2]@SERVER = gt a 0:i32
              d:i32[2]@SERVER = select c a -1:i32
          in ( b, d ) }
    """)


def test_array_literals_and_constant_folding():
    M = np.arange(9.0).reshape(3, 3)
    f = fad.trace(lambda x: (x + np.array([1.0, 2.0, 3.0]), x * M, x @ np.eye(3)[:, :2],
                             x[0] * np.array([True, False, True]), np.float64(2.0) * 3.0))
    check(f.graph(np.zeros((3, 3))), """
        { lambda a:f64[3,3]@SERVER .
          let b:f64[3,3]@SERVER = add a f64[3,3]{...}
              c:f64[3,3]@SERVER = mul a f64[3,3]{...}
              d:f64[3,2]@SERVER = matmul a f64[3,2][[1.,0.], [0.,1.], [0.,0.]]
              e:f64[1,3]@SERVER = slice[starts=(0,0), limits=(1,3), strides=(1,1)] a
              f:f64[3]@SERVER = reshape[shape=(3,)] e
              g:f64[3]@SERVER = mul f f64[3][1.,0.,1.]
          in ( b, c, d, g, 6.0 ) }
    """)


def test_pytree_inputs_and_no_equations():
    f = fad.trace(lambda p, data: {"b": p["b"], "w": p["w"], "X": data[0]})
    g = f.graph({"w": np.zeros(3), "b": np.float64(0)}, (X, None))
    check(g, """
        { lambda a:f64[]@SERVER b:f64[3]@SERVER c:{f64[?,3]}@CLIENTS .
          in ( c, a, b ) }
    """)


def test_names_after_z():
    assert [_name(i) for i in (0, 1, 25, 26, 27, 51, 52, 26 * 26)] == [
        "a", "b", "z", "ba", "bb", "bz", "ca", "baa"]

    def chain(x):
        for _ in range(28):
            x = fnp.exp(x)
        return x
    lines = str(fad.trace(chain).graph(np.zeros(()))).splitlines()
    assert lines[0] == "{ lambda a:f64[]@SERVER ."
    assert lines[26] == "      ba:f64[]@SERVER = exp z"
    assert lines[-1] == "  in ( bc ) }"


def test_pp_helpers():
    assert pp_param((0, None, 2)) == "(0,?,2)"
    assert pp_param((3,)) == "(3,)"
    assert pp_param(None) == "?"
    assert pp_param(fad.f32) == "f32"
    assert pp_literal(Literal(np.float64(-0.0))) == "-0.0"
    assert pp_literal(Literal(np.float64(np.nan))) == "nan"
    assert pp_literal(Literal(np.bool_(True))) == "True"
    assert pp_literal(Literal(np.array([np.inf, 1.0]))) == "f64[2][inf, 1.]"
    assert pp_literal(Literal(np.zeros((2, 4)))) == "f64[2,4]{...}"


# --------------------------------------------------------------------------- the docs' examples

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


@pytest.mark.parametrize("page", ["getting-started.md", "ir.md", "ops.md", "transforms.md", "modes.md",
                                  "../README.md"])
def test_docs_examples_run_and_print_what_they_show(page):
    """Every ```python block of the page runs (in order, one namespace); a ```text block right
    after one is exactly what it prints."""
    blocks = FENCE.findall((DOCS / page).read_text(encoding="utf-8"))
    ns: dict = {"__name__": "docs_example"}
    ran = 0
    for k, (lang, src) in enumerate(blocks):
        if lang != "python":
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(src, "example.py", "exec"), ns)
        ran += 1
        if k + 1 < len(blocks) and blocks[k + 1][0] == "text":
            want = blocks[k + 1][1]
            got = out.getvalue()
            assert [s.rstrip() for s in got.strip("\n").splitlines()] == \
                [s.rstrip() for s in want.strip("\n").splitlines()], f"{page}, block {k}:\n{got}"
    assert ran > 0
