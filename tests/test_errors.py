"""Every error class, raised on a deliberately wrong program, with its message checked."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest

import fadcore as fad
from fadcore import numpy as fnp
from fadcore.ir.graph import Eqn, Var

W = np.zeros(3)


@pytest.fixture
def data():
    X = fad.clients([np.ones((2, 3)), np.ones((4, 3))])
    y = fad.clients([np.ones(2), np.ones(4)])
    return X, y


def _line_of(marker: str) -> int:
    """Line number, in this file, of the source line containing ``marker``."""
    lines = inspect.getsource(inspect.getmodule(_line_of)).splitlines()
    hits = [i + 1 for i, s in enumerate(lines) if marker in s and "_line_of" not in s]
    assert len(hits) == 1, hits
    return hits[0]


@pytest.mark.parametrize("cls", [
    fad.PlacementError, fad.ShapeError, fad.DTypeError, fad.TracingError, fad.CardinalityError,
    fad.VerificationError, fad.SerializationError, fad.ClosureError, fad.DifferentiationError,
    fad.LoweringError])
def test_every_error_is_a_fad_error(cls):
    assert issubclass(cls, fad.FadError) and issubclass(cls, Exception)


def test_value_errors_are_also_builtin_errors():
    # so generic ``except ValueError / TypeError`` code keeps working
    assert issubclass(fad.ShapeError, ValueError)
    assert issubclass(fad.DTypeError, TypeError)
    assert issubclass(fad.SerializationError, ValueError)
    assert issubclass(fad.CardinalityError, ValueError)


# --------------------------------------------------------------------------- PlacementError

def test_server_value_in_client_code_without_broadcast(data):
    X, _ = data

    def model(w, X):
        return X @ w                                          # <- forgot broadcast (matvec)

    with pytest.raises(fad.PlacementError) as err:
        fad.trace(model).graph(W, X)
    msg = str(err.value)
    assert msg.startswith("matvec:")                          # the op
    assert "f64[3]@SERVER" in msg and "{f64[?,3]}@CLIENTS" in msg   # both types
    assert f"test_errors.py:{_line_of('<- forgot broadcast (matvec)')} (model)" in msg
    assert "fad.broadcast" in msg                             # the fix


def test_server_value_in_broadcasting_client_op(data):
    X, _ = data

    def model(w, X):
        return X - w                                          # <- forgot broadcast (sub)

    with pytest.raises(fad.PlacementError,
                       match=re.escape("sub: operand 2 is f64[3]@SERVER but operand 1 is "
                                       "{f64[?,3]}@CLIENTS at test_errors.py:")) as err:
        fad.trace(model).graph(W, X)
    assert f":{_line_of('<- forgot broadcast (sub)')} (model)" in str(err.value)
    assert "fad.broadcast(...)" in str(err.value)


def test_client_value_in_server_code(data):
    X, _ = data
    with pytest.raises(fad.PlacementError, match=r"where: .*SERVER.*CLIENTS.*fad\.sum"):
        fad.trace(lambda w, X: fnp.where(w > 0, w, fnp.sum(X, axis=0))).graph(W, X)


def test_aggregating_a_server_value_and_broadcasting_a_client_value(data):
    X, _ = data
    with pytest.raises(fad.PlacementError,
                       match=r"fad\.sum: expects a value at CLIENTS, got f64\[3\]@SERVER; "
                             r"broadcast it first"):
        fad.trace(lambda w: fad.sum(w)).graph(W)
    with pytest.raises(fad.PlacementError,
                       match=r"fad\.broadcast: expects a value at SERVER, got "
                             r"\{f64\[\?,3\]\}@CLIENTS; aggregate it first"):
        fad.trace(lambda X: fad.broadcast(X)).graph(X)


def test_map_rejects_server_values(data):
    X, _ = data
    with pytest.raises(fad.PlacementError, match=r"fad\.map: argument 0 is f64\[3\]@SERVER"):
        fad.trace(lambda w, X: fad.map(lambda a, b: b @ a, w, X)).graph(W, X)


def test_run_time_placement_mistakes(data):
    X, _ = data
    g = fad.trace(lambda w, X: X @ fad.broadcast(w)).graph(W, X)
    with pytest.raises(fad.PlacementError, match="argument 0 .* got client values"):
        fad.run(g, X, X, backend="reference")
    with pytest.raises(fad.PlacementError, match=r"argument 1 .* wrap per-client arrays with "
                                                 r"fad\.clients"):
        fad.run(g, W, np.ones((2, 3)), backend="reference")


def test_closing_over_client_values_is_refused(data):
    X, _ = data
    with pytest.raises(fad.PlacementError, match="only enter a traced function as arguments"):
        fad.trace(lambda w: w * X).graph(W)


# --------------------------------------------------------------------------- ShapeError

def test_contracted_dimensions_differ(data):
    X, _ = data

    def model(w, X):
        return X @ fad.broadcast(w)                           # <- 3 columns, 4 weights

    with pytest.raises(fad.ShapeError,
                       match=re.escape("matvec: contracted dimensions differ: f64[?,3] and f64[4]")
                       ) as err:
        fad.trace(model).graph(np.zeros(4), X)
    assert f"test_errors.py:{_line_of('<- 3 columns, 4 weights')}" in str(err.value)


def test_ragged_shapes_do_not_broadcast_with_static_ones(data):
    X, y = data
    with pytest.raises(fad.ShapeError, match=r"could not be broadcast together with shapes "
                                             r"\[\?,3\] \[\?\].*ragged"):
        fad.trace(lambda X, y: X + y).graph(X, y)


def test_aggregating_ragged_values(data):
    X, _ = data
    with pytest.raises(fad.ShapeError, match=r"fad\.mean: cannot aggregate the ragged value "
                                             r"\{f64\[\?,3\]\}@CLIENTS .*fnp\.mean\(x, axis=0\)"):
        fad.trace(lambda X: fad.mean(X)).graph(X)


@pytest.mark.parametrize("fn, msg", [
    (lambda X: X[0], r"integer index into a ragged dimension \(\?\) of f64\[\?,3\]"),
    (lambda X: X[1:, 0], r"slicing a ragged dimension \(\?\) of f64\[\?,3\]: .*take it whole"),
    (lambda X: X[:, 5], r"index 5 out of range for a dimension of size 3"),
    (lambda X: fnp.concatenate([X, X], axis=0), r"cannot join along a ragged dimension"),
    (lambda X: fnp.reshape(X, (-1,)), r"reshape: cannot reshape f64\[\?,3\]"),
    (lambda X: fnp.sum(X, axis=2), r"axis 2 out of range for a 2-d operand"),
    (lambda X: fnp.squeeze(X, 1), r"squeeze: axis 1 of f64\[\?,3\] is not of size 1"),
    (lambda X: X @ X, r"matmul: contracted dimensions differ: f64\[\?,3\] and f64\[\?,3\]"),
])
def test_shape_errors_in_local_ops(data, fn, msg):
    X, _ = data
    with pytest.raises(fad.ShapeError, match=msg):
        fad.trace(fn).graph(X)


def test_run_time_shape_errors(data):
    X, y = data
    g = fad.trace(lambda w: w * 2.0).graph(W)
    with pytest.raises(fad.ShapeError, match=r"argument 0 of <lambda> \(f64\[3\]@SERVER\): got "
                                             r"shape \(4,\)"):
        fad.run(g, np.zeros(4), backend="reference")
    f = fad.trace(lambda X, y: X[:, 0] - y)
    bad_y = fad.clients([np.ones(3), np.ones(4)])             # client 0 has 2 rows in X
    with pytest.raises(fad.ShapeError, match=r"argument 1 .*client 0 has 3 rows but argument 0 "
                                             r"gives it 2"):
        f.run(X, bad_y, backend="reference")


def test_server_types_cannot_be_ragged():
    with pytest.raises(fad.ShapeError, match=r"ragged dimension \(\?\) exists only at CLIENTS"):
        fad.f64[None, 3] @ fad.SERVER


# --------------------------------------------------------------------------- DTypeError

def test_float_labels_where_integers_are_needed(data):
    X, y = data

    def loss(z, labels):
        return fad.nn.softmax_cross_entropy(z, labels)       # <- float labels

    with pytest.raises(fad.DTypeError,
                       match=r"softmax_cross_entropy: labels must be integer class indices, "
                       r"got f64\[\?\] at test_errors.py:\d+ .*y.astype\(np.int64\)") as e:
        fad.trace(loss).graph(X, y)
    assert "test_errors.py:" in str(e.value)
    with pytest.raises(fad.DTypeError, match=r"one_hot: indices must be integers, got f64\[\?\]"):
        fad.trace(lambda y: fnp.one_hot(y, 3)).graph(y)


def test_dtype_mismatches(data):
    X, _ = data
    a32 = fad.clients([np.float32(1.0), np.float32(2.0)])
    with pytest.raises(fad.DTypeError, match=r"fad\.weighted_mean: value \{f64\[3\]\}@CLIENTS "
                                             r"and weight \{f32\[\]\}@CLIENTS have different"):
        fad.trace(lambda X, a: fad.weighted_mean(fnp.sum(X, axis=0), a)).graph(X, a32)
    g = fad.trace(lambda w: w * 2.0).graph(W)
    with pytest.raises(fad.DTypeError, match=r"argument 0 .*: got dtype float32"):
        fad.run(g, np.zeros(3, np.float32), backend="reference")
    with pytest.raises(fad.DTypeError, match=r"fad\.clients: members have different dtypes"):
        fad.clients([np.zeros(2), np.zeros(2, np.float32)])
    with pytest.raises(fad.DTypeError, match=r"dtype complex128 is not supported"):
        fad.trace(lambda w: w).graph(np.zeros(2, complex))
    with pytest.raises(fad.DTypeError, match=r"mean: needs a floating-point operand"):
        fad.trace(lambda L: fad.mean(fnp.sum(L))).graph(fad.clients([np.arange(2), np.arange(3)]))


# --------------------------------------------------------------------------- TracingError

def test_branching_on_a_traced_value():
    def f(w):
        if fnp.sum(w) > 0:                                    # <- branch on traced value
            return w
        return -w

    with pytest.raises(fad.TracingError, match=r"cannot use the traced value bool\[\]@SERVER as a "
                                               r"Python bool") as err:
        fad.trace(f).graph(W)
    msg = str(err.value)
    assert f"test_errors.py:{_line_of('<- branch on traced value')} (f)" in msg
    assert "fadcore.numpy.where" in msg


def test_other_tracing_mistakes(data):
    X, _ = data
    with pytest.raises(fad.TracingError, match="cannot be used as a Python int or index"):
        fad.trace(lambda w: [w for _ in range(int(w[0]))]).graph(W)
    with pytest.raises(fad.TracingError, match=r"len\(\) of a ragged traced value"):
        fad.trace(lambda X: len(X)).graph(X)
    with pytest.raises(fad.TracingError, match=r"fad\.broadcast moves values between placements "
                                               r"and only runs inside a traced function"):
        fad.broadcast(W)
    leaked = []
    fad.trace(lambda w: leaked.append(w) or w).graph(W)
    with pytest.raises(fad.TracingError, match="escaped the function it was traced in"):
        fnp.exp(leaked[0])
    with pytest.raises(fad.DTypeError, match="dtype <U1 is not supported"):
        fad.trace(lambda w: w * "x").graph(W)
    with pytest.raises(fad.DTypeError, match="dtype object is not supported"):
        fad.trace(lambda w: fnp.exp({})).graph(W)


# --------------------------------------------------------------------------- CardinalityError

def test_clients_disagree_on_their_number(data):
    X, y = data
    y3 = fad.clients([np.ones(2), np.ones(4), np.ones(1)])
    f = fad.trace(lambda X, y: fad.mean(fnp.mean(X) + fnp.mean(y)))
    with pytest.raises(fad.CardinalityError, match=r"argument 1 of <lambda> \(\{f64\[\?\]\}@CLIENTS"
                                                   r"\): has 3 clients but argument 0 has 2"):
        f.run(X, y3, backend="reference")


def test_number_of_clients_unknown():
    g = fad.trace(lambda w: fad.mean(fnp.sum(fad.broadcast(w)))).graph(W)
    with pytest.raises(fad.CardinalityError, match="no argument is client-placed: pass "
                                                   "num_clients="):
        fad.run(g, W, backend="reference")
    assert fad.run(g, W, backend="reference", num_clients=4) == 0.0


# --------------------------------------------------------------------------- VerificationError

def _graph(data):
    X, y = data
    return fad.trace(lambda w, X, y: fad.mean(fnp.mean((X @ fad.broadcast(w) - y) ** 2))).graph(
        W, X, y)


def test_verifier_accepts_traced_graphs(data):
    assert _graph(data).verify() is not None


def test_wrong_declared_type(data):
    g = _graph(data)
    e = g.eqns[1]
    bad = Eqn(e.prim, e.inputs, Var(fad.f64[None, 2] @ fad.CLIENTS), e.params, e.source)
    g2 = g.replace(eqns=[g.eqns[0], bad] + g.eqns[2:])
    with pytest.raises(fad.VerificationError,
                       match=r"equation 1 \(matvec\) from test_errors\.py:\d+ \(<lambda>\): "
                             r"result declared \{f64\[\?,2\]\}@CLIENTS but the operands give "
                             r"\{f64\[\?\]\}@CLIENTS"):
        g2.verify()


def test_use_before_definition(data):
    g = _graph(data)
    g2 = g.replace(eqns=[g.eqns[1], g.eqns[0]] + g.eqns[2:])
    with pytest.raises(fad.VerificationError, match=r"equation 0 \(matvec\).*operand used before "
                                                    r"it is defined"):
        g2.verify()


def test_dropped_equation_and_undefined_output(data):
    g = _graph(data)
    with pytest.raises(fad.VerificationError, match="an output is not defined by the graph"):
        g.replace(eqns=g.eqns[:-1]).verify()


def test_placement_violation_in_a_hand_made_graph(data):
    g = _graph(data)
    # skip the broadcast: matvec of a client matrix and the server vector
    e = g.eqns[1]
    bad = Eqn(e.prim, (e.inputs[0], g.inputs[0]), e.out, e.params, e.source)
    with pytest.raises(fad.VerificationError, match=r"equation 0 \(matvec\).*matvec: operand 2 is "
                                                    r"f64\[3\]@SERVER but operand 1 is"):
        g.replace(eqns=[bad] + g.eqns[2:]).verify()


def test_bad_params_redefinition_and_trees(data):
    g = _graph(data)
    k = next(i for i, e in enumerate(g.eqns) if e.params)
    e = g.eqns[k]
    bad = Eqn(e.prim, e.inputs, e.out, {"axes": "zero"}, None)
    with pytest.raises(fad.VerificationError, match=rf"equation {k} \({e.prim.name}\): "):
        g.replace(eqns=g.eqns[:k] + [bad] + g.eqns[k + 1:]).verify()
    with pytest.raises(fad.VerificationError, match="redefines variable"):
        g.replace(eqns=g.eqns + [g.eqns[-1]]).verify()
    with pytest.raises(fad.VerificationError, match="input a is listed twice"):
        g.replace(inputs=[g.inputs[0], g.inputs[0], g.inputs[2]]).verify()
    with pytest.raises(fad.VerificationError, match="output tree does not match"):
        g.replace(outputs=g.outputs * 2).verify()


def test_unknown_primitive_in_a_hand_made_graph(data):
    from fadcore.core import Primitive, primitives
    g = _graph(data)
    e = g.eqns[0]
    fake = object.__new__(Primitive)
    for slot in Primitive.__slots__[:-1]:
        setattr(fake, slot, getattr(e.prim, slot))
    fake.name = "fake_broadcast"
    assert "fake_broadcast" not in primitives
    bad = Eqn(fake, e.inputs, e.out, e.params, e.source)
    with pytest.raises(fad.VerificationError, match="unknown primitive 'fake_broadcast'"):
        g.replace(eqns=[bad] + g.eqns[1:]).verify()


def test_num_clients_without_client_arguments_needs_a_count():
    """A graph that counts clients but takes no client argument cannot guess the count."""
    g = fad.trace(lambda w: fad.num_clients() * w).graph(np.ones(2))
    for backend in ("reference", "numba"):
        with pytest.raises(fad.CardinalityError, match="pass num_clients="):
            fad.run(g, np.ones(2), backend=backend)
        np.testing.assert_array_equal(fad.run(g, np.ones(2), backend=backend, num_clients=3),
                                      [3.0, 3.0])


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_bad_data_is_a_shape_error_naming_client_and_line(backend):
    """Data the types cannot rule out (labels out of range, a client with no rows) is reported
    by every backend as a ShapeError naming the primitive, the user's line and the client."""
    f = fad.trace(lambda X, lab: fad.mean(fnp.mean(fad.nn.softmax_cross_entropy(X, lab))))
    X = fad.clients([np.zeros((2, 3)), np.zeros((1, 3))])
    with pytest.raises(fad.ShapeError, match=r"take_along_axis \(from test_errors.py:\d+.*client 0"):
        f.run(X, fad.clients([np.array([0, 5]), np.array([1])]), backend=backend)
    g = fad.trace(lambda X: fad.mean(fnp.max(X)))
    with pytest.raises(fad.ShapeError, match=r"reduce_max \(from test_errors.py:\d+.*client 1"):
        g.run(fad.clients([np.zeros((2, 3)), np.zeros((0, 3))]), backend=backend)
