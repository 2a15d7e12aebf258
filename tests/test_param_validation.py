"""Every parameter of every primitive is validated by its type rule.

The registry is enumerated: each primitive has a well-typed example below (a new primitive
without one fails ``test_every_primitive_has_an_example``), and each of its parameters is hit
with hostile values (floats and bools where ints belong, negative and out-of-range axes, huge
sizes, wrong tuple lengths, lists, None, unknown parameters). A type rule either refuses a value
with a fad error, or accepts it; every accepted graph is then run on the reference and numba
backends in a subprocess (fadcore.testing.fuzz), where it must not crash, must not raise an
untyped exception, and must give equal results or the same error: a graph that verifies cannot
make a kernel read or write out of bounds.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import fadcore as fad
from fadcore.ir.graph import Eqn, Graph, Var
from fadcore.ir.primitives import infer_type, primitives
from fadcore.ir.serialize import parse_type
from fadcore.testing import fuzz

T = parse_type
U = "{f64[?,3]}@CLIENTS"
F64 = fad.f64

#: primitive -> (operand types, well-typed params)
EXAMPLES: dict[str, tuple[list[str], dict]] = {
    **{n: ([U], {}) for n in ("neg", "exp", "log", "log1p", "expm1", "sqrt", "tanh",
                              "logistic", "sin", "cos", "sign", "abs", "stop_gradient",
                              "zeros_like")},
    **{n: ([U, U], {}) for n in ("add", "sub", "mul", "div", "pow", "max", "min", "logaddexp",
                                 "lt", "le", "gt", "ge", "eq", "ne")},
    "select": (["{bool[?,3]}@CLIENTS", U, U], {}),
    "convert": ([U], {"dtype": fad.f32}),
    "reduce_sum": (["{f64[?,3,2]}@CLIENTS"], {"axes": (1,)}),
    "reduce_max": (["{f64[?,3,2]}@CLIENTS"], {"axes": (0, 2)}),
    "argmax": (["{f64[?,3]}@CLIENTS"], {"axis": 1}),
    "broadcast_in_dim": ([U], {"shape": (None, 2, 3), "dims": (0, 2)}),
    "reshape": (["{f64[?,6]}@CLIENTS"], {"shape": (None, 2, 3)}),
    "transpose": (["f64[2,3,4]@SERVER"], {"perm": (2, 0, 1)}),
    "slice": (["{f64[?,5]}@CLIENTS"], {"starts": (0, 1), "limits": (None, 5),
                                        "strides": (1, 2)}),
    "pad": (["{f64[?,2]}@CLIENTS"], {"shape": (None, 5), "starts": (0, 1),
                                      "limits": (None, 5), "strides": (1, 2)}),
    "concatenate": (["{f64[?,2]}@CLIENTS", "{f64[?,1]}@CLIENTS"], {"axis": 1}),
    "rows": (["{f64[?,2]}@CLIENTS"], {"axis": 0}),
    "matmul": ([U, "f64[3,2]@CLIENTS"], {}),
    "matvec": ([U, "f64[3]@CLIENTS"], {}),
    "vecmat": (["f64[3]@SERVER", "f64[3,2]@SERVER"], {}),
    "vdot": (["f64[3]@SERVER", "f64[3]@SERVER"], {}),
    "outer": (["f64[3]@SERVER", "f64[2]@SERVER"], {}),
    "take": (["{f64[?,4]}@CLIENTS", "i64[2]@CLIENTS"], {"axis": 1}),
    "untake": (["{f64[?,2]}@CLIENTS", "i64[2]@CLIENTS"], {"axis": 1, "dim": 4}),
    "take_along_axis": (["{f64[?,4]}@CLIENTS", "{i64[?,1]}@CLIENTS"], {"axis": 1}),
    "untake_along_axis": (["{f64[?,1]}@CLIENTS", "{i64[?,1]}@CLIENTS"], {"axis": 1, "dim": 4}),
    "one_hot": (["{i64[?]}@CLIENTS"], {"depth": 3, "dtype": F64}),
    "broadcast": (["f64[3]@SERVER"], {}),
    "sum": (["{f64[3]}@CLIENTS"], {}),
    "mean": (["{f64[3]}@CLIENTS"], {}),
    "secure_sum": (["{f64[3]}@CLIENTS"], {}),
    "weighted_mean": (["{f64[3]}@CLIENTS", "{f64[]}@CLIENTS"], {}),
    "num_clients": ([], {}),
    "after": (["f64[2]@SERVER", "f64[]@SERVER"], {}),
}

# a loop applying an identity body (loops are built by fad.fori_loop/fad.scan; tests/test_loops.py)
_i, _c = Var(parse_type("i64[]@SERVER")), Var(parse_type("f64[3]@SERVER"))
EXAMPLES["loop"] = (["i64[]@SERVER", "i64[]@SERVER", "f64[3]@SERVER"],
                    {"body": Graph([_i, _c], [], [_c], name="body"), "num_carry": 1,
                     "num_xs": 0, "length": None, "reverse": False, "out": 0})

INTS = (-(2**63), -(2**31), -9, -3, -2, -1, 0, 1, 2, 3, 4, 5, 9, 2**31 - 1, 2**31, 2**62,
        2**63 - 1)
NON_INTS = (0.0, 1.0, -1.0, 0.5, True, False, None, "0", np.float64(1.0), fad.f64, fad.SERVER)


def hostile_values(v):
    """Values to put in place of the param value ``v``."""
    out = [*NON_INTS, (), [], {}, (None,), ((0,),)]
    if isinstance(v, tuple):
        out += [list(v), v + (0,), v[:-1], v + (None,), tuple(reversed(v)), v + v]
        for i, x in enumerate(v):
            for new in INTS + NON_INTS:
                out.append(v[:i] + (new,) + v[i + 1:])
    elif isinstance(v, int) and not isinstance(v, bool):
        out += list(INTS)
    else:
        out += [fad.i64, fad.bool_, fad.f32, 0, 1]
    return out


def cases():
    for name in sorted(EXAMPLES):
        types, params = EXAMPLES[name]
        for pname, v in params.items():
            for new in hostile_values(v):
                yield name, types, {**params, pname: new}, f"{pname}={new!r}"
        yield name, types, {**params, "bogus": 1}, "bogus=1"
        for pname in params:
            yield name, types, {k: x for k, x in params.items() if k != pname}, f"no {pname}"


def one_eqn_graph(name, types, params):
    prim = primitives[name]
    ins = [Var(T(t)) for t in types]
    out = Var(infer_type(prim, [v.type for v in ins], params))
    return Graph(ins, [Eqn(prim, ins, out, params, "hostile.py:1")], [out])


def test_every_primitive_has_an_example():
    assert sorted(EXAMPLES) == sorted(primitives)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_are_well_typed_and_agree(name):
    types, params = EXAMPLES[name]
    g = one_eqn_graph(name, types, params)
    g.verify()
    assert fad.Graph.from_json(g.to_json()).to_json() == g.to_json()


def test_hostile_params_are_refused_or_run_the_same_everywhere():
    """Every (primitive, param, value): a typed refusal, or a graph that runs identically on
    both backends (judged in a subprocess: a segfault is reported, not fatal)."""
    untyped, accepted = [], []
    n = 0
    for name, types, params, what in cases():
        n += 1
        try:
            g = one_eqn_graph(name, types, params)
        except fad.FadError:
            continue
        except Exception as e:  # noqa: BLE001
            untyped.append(f"{name} {what}: {type(e).__name__}: {e}")
            continue
        try:
            text = g.to_json()
        except fad.SerializationError:
            continue
        accepted.append(fuzz.Case(len(accepted), f"param:{name} {what}", text, seed=n))
    assert not untyped, "\n".join(untyped[:40])
    assert n > 1000
    report = fuzz.run_cases(accepted)
    assert report.ok, report.summary()
    assert report.verdicts["ok"] >= len(EXAMPLES)          # the examples themselves ran


@pytest.mark.parametrize("name, params, match", [
    ("reduce_sum", {"axes": (0.0,)}, r"reduce_sum: axes=\(0\.0,\) must be a tuple of ints"),
    ("reduce_sum", {"axes": (True,)}, r"must be a tuple of ints"),
    ("reduce_sum", {"axes": [1]}, r"must be a tuple of ints"),
    ("reduce_sum", {"axes": (-1,)}, r"axes .* sorted, distinct and non-negative"),
    ("transpose", {"perm": (True, False, 2)}, r"transpose: perm=\(True, False, 2\) must be a "
                                              r"tuple of ints"),
    ("argmax", {"axis": -1}, r"argmax: axis -1 out of range for a 2-d operand"),
    ("argmax", {"axis": 5}, r"argmax: axis 5 out of range"),
    ("argmax", {"axis": 1.0}, r"argmax: axis=1\.0 must be an int"),
    ("untake", {"axis": 9, "dim": 4}, r"untake: axis 9 out of range"),
    ("untake_along_axis", {"axis": -1, "dim": 4}, r"untake_along_axis: axis -1 out of range"),
    ("untake_along_axis", {"axis": 7, "dim": 4}, r"untake_along_axis: axis 7 out of range"),
    ("take", {"axis": -1}, r"take: axis -1 out of range"),
    ("take_along_axis", {"axis": -1}, r"take_along_axis: axis -1 out of range"),
    ("concatenate", {"axis": -1}, r"concatenate: axis -1 out of range"),
    ("one_hot", {"depth": 2**40, "dtype": F64}, r"one_hot: depth=1099511627776 .* at most"),
    ("one_hot", {"depth": 3.0, "dtype": F64}, r"one_hot: depth=3\.0 must be an int"),
    ("one_hot", {"depth": 3, "dtype": "f64"}, r"one_hot: dtype='f64' must be a fad dtype"),
    ("broadcast_in_dim", {"shape": (None, 2**31, 3), "dims": (0, 2)},
     r"between 0 and 2147483647"),
    ("broadcast_in_dim", {"shape": (None, 2**20, 2**20, 2**20), "dims": (0, 3)},
     r"elements"),
    ("slice", {"starts": (0, 1), "limits": (None, 5), "strides": (1, 0)}, r"stride"),
    ("slice", {"starts": (0, 1.0), "limits": (None, 5), "strides": (1, 1)}, r"must be"),
    ("pad", {"shape": (None, 5), "starts": (0, 1), "limits": (None, 5),
             "strides": (1, 2**63 - 1)}, r"pad"),
    ("add", {"bogus": 1}, r"add: unexpected parameter 'bogus'"),
    ("broadcast", {"axis": 0}, r"broadcast: unexpected parameter 'axis'"),
    ("argmax", {}, r"argmax: missing parameter 'axis'"),
])
def test_named_refusals(name, params, match):
    types, good = EXAMPLES[name]
    if name in ("reduce_sum",):
        types = ["{f64[?,3]}@CLIENTS"]
    with pytest.raises((fad.ShapeError, fad.DTypeError, fad.VerificationError), match=match):
        one_eqn_graph(name, types, params)


@pytest.mark.parametrize("name, params, match", [
    ("add", {"bogus": 1}, r"add: unexpected parameter 'bogus' \(it takes none\)"),
    ("broadcast", {"axis": 0}, r"broadcast: unexpected parameter 'axis'"),
    ("argmax", {}, r"argmax: missing parameter 'axis'"),
    ("reduce_sum", {"axes": (1,), "keepdims": True}, r"unexpected parameter 'keepdims' "
                                                     r"\(it takes axes\)"),
    ("broadcast_in_dim", {"shape": (None, 2**20, 2**20, 3), "dims": (0, 3)},
     r"broadcast_in_dim: the shape would hold 3298534883328 static elements "
     r"\(at most 1099511627776\)"),
    ("broadcast_in_dim", {"shape": (None,) + (1,) * 8 + (3,), "dims": (0, 9)},
     r"the shape would have 10 dimensions \(at most 8\)"),
])
def test_generic_refusals(name, params, match):
    types, _ = EXAMPLES[name]
    with pytest.raises(fad.ShapeError, match=match):
        one_eqn_graph(name, types, params)


def test_the_rank_limit_is_what_numba_runs():
    from fadcore.backends import _numba_kernels as K
    from fadcore.ir import primitives as P
    assert P.MAX_NDIM == K.MAX_NDIM
