"""Placements, dtypes, tensor types and federated types: construction, notation, invariants."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fadcore as fad
from fadcore.ir.serialize import parse_type
from fadcore.ir.types import DTYPES, FederatedType, TensorType, clients_type, dtype_of, server_type


# --------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dt, np_name, size, is_float, is_int", [
    (fad.f64, "float64", 8, True, False), (fad.f32, "float32", 4, True, False),
    (fad.i64, "int64", 8, False, True), (fad.i32, "int32", 4, False, True),
    (fad.bool_, "bool", 1, False, False)])
def test_dtypes(dt, np_name, size, is_float, is_int):
    assert dt.np == np.dtype(np_name) and dt.itemsize == size
    assert (dt.is_float, dt.is_int) == (is_float, is_int)
    assert DTYPES[dt.name] is dt and str(dt) == dt.name
    assert dtype_of(np.zeros(1, np_name)) is dt and dtype_of(np.dtype(np_name)) is dt


def test_dtype_of_python_scalars_and_unsupported():
    assert dtype_of(1.5) is fad.f64 and dtype_of(3) is fad.i64 and dtype_of(True) is fad.bool_
    assert dtype_of(np.float32(1)) is fad.f32
    for bad in (np.zeros(1, np.float16), np.zeros(1, complex), np.zeros(1, np.uint8)):
        with pytest.raises(fad.DTypeError, match="is not supported by fadcore"):
            dtype_of(bad)


# --------------------------------------------------------------------------- tensor types

def test_tensor_type_notation():
    assert str(fad.f64[32]) == "f64[32]"
    assert str(fad.f32[10, 5]) == "f32[10,5]"
    assert str(fad.i64[None]) == "i64[?]"
    assert str(fad.f64[None, 32]) == "f64[?,32]"
    assert str(fad.f64[()]) == "f64[]"
    assert str(fad.bool_[2, None, 0]) == "bool[2,?,0]"
    assert fad.f64[np.int64(3)].shape == (3,) and type(fad.f64[np.int64(3)].shape[0]) is int


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", (2, -3)])
def test_bad_dimensions(bad):
    with pytest.raises(fad.ShapeError, match="bad dimension"):
        fad.f64[bad]


def test_tensor_type_sizes():
    t = fad.f64[None, 3]
    assert t.ragged and t.ndim == 2
    assert t.size(rows=5) == 15 and t.nbytes(rows=5) == 120
    assert t.concrete_shape(5) == (5, 3)
    with pytest.raises(fad.ShapeError, match="needs a row count"):
        t.size()
    assert fad.f32[4, 2].size() == 8 and fad.f32[4, 2].nbytes() == 32
    assert fad.f64[()].size() == 1 and not fad.f64[()].ragged
    assert t.with_dtype(fad.f32) == fad.f32[None, 3] and t.with_shape((2,)) == fad.f64[2]


def test_types_are_immutable_values():
    a, b = fad.f64[None, 3], fad.f64[None, 3]
    assert a == b and hash(a) == hash(b) and a is not b
    assert a != fad.f32[None, 3] and a != fad.f64[3]
    assert len({a @ fad.CLIENTS, b @ fad.CLIENTS, a @ fad.CLIENTS}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.shape = (1,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        (fad.f64[3] @ fad.SERVER).placement = fad.CLIENTS


# --------------------------------------------------------------------------- federated types

def test_federated_type_notation():
    assert str(fad.f64[32] @ fad.SERVER) == "f64[32]@SERVER"
    assert str(fad.f64[None, 32] @ fad.CLIENTS) == "{f64[?,32]}@CLIENTS"
    assert str(FederatedType(fad.f64[32], fad.CLIENTS, True)) == "f64[32]@CLIENTS"
    assert str(clients_type(fad.i64[None])) == "{i64[?]}@CLIENTS"
    assert str(clients_type(fad.f64[2], all_equal=True)) == "f64[2]@CLIENTS"
    assert str(server_type(fad.f32[()])) == "f32[]@SERVER"
    assert repr(fad.SERVER) == "SERVER" and str(fad.CLIENTS) == "CLIENTS"


def test_all_equal_defaults_from_the_placement():
    assert (fad.f64[3] @ fad.SERVER).all_equal
    assert not (fad.f64[3] @ fad.CLIENTS).all_equal
    # a server value is always all-equal, whatever is asked
    t = FederatedType(fad.f64[3], fad.SERVER, False)
    assert t.all_equal and str(t) == "f64[3]@SERVER"
    assert t == fad.f64[3] @ fad.SERVER


def test_ragged_dimensions_live_only_at_clients():
    with pytest.raises(fad.ShapeError, match=r"f64\[\?,3\]@SERVER: a ragged dimension \(\?\) "
                                             r"exists only at CLIENTS"):
        fad.f64[None, 3] @ fad.SERVER


def test_no_nested_federated_types():
    inner = fad.f64[3] @ fad.SERVER
    with pytest.raises(fad.ShapeError, match="a federated type holds a tensor type"):
        FederatedType(inner, fad.CLIENTS)
    assert fad.f64[3].__matmul__("SERVER") is NotImplemented


def test_views_of_a_federated_type():
    t = fad.f32[None, 4] @ fad.CLIENTS
    assert t.dtype is fad.f32 and t.shape == (None, 4) and t.ndim == 2 and t.at_clients
    assert t.with_tensor(fad.f32[4]) == fad.f32[4] @ fad.CLIENTS


# --------------------------------------------------------------------------- values to types

def test_client_values_types():
    cv = fad.clients([np.zeros((2, 3)), np.zeros((5, 3))])
    assert str(cv.type) == "{f64[?,3]}@CLIENTS"
    assert str(fad.clients([np.zeros((2, 3)), np.zeros((2, 3))]).type) == "{f64[2,3]}@CLIENTS"
    assert str(fad.clients(np.zeros((4, 2), np.float32)).type) == "{f32[2]}@CLIENTS"
    assert str(fad.clients([1.0, 2.0]).type) == "{f64[]}@CLIENTS"
    assert str(fad.clients([np.ones(2)] * 3, all_equal=True).type) == "f64[2]@CLIENTS"
    with pytest.raises(fad.ShapeError, match="different ranks"):
        fad.clients([np.zeros(2), np.zeros((2, 1))])
    with pytest.raises(fad.ShapeError, match="at least one client"):
        fad.clients([])


def test_client_values_container():
    ms = [np.arange(2.0), np.arange(2.0) + 1]
    cv = fad.clients(ms)
    assert len(cv) == 2 and cv[1] is cv.members[1] and cv.tolist() == cv.members
    np.testing.assert_array_equal(np.asarray(cv), np.stack(ms))
    np.testing.assert_array_equal(cv.stack(), np.stack(ms))
    assert len(cv[:1]) == 1 and fad.clients(cv) is cv
    with pytest.raises(fad.ShapeError, match="different shapes"):
        fad.clients([np.zeros(2), np.zeros(3)]).stack()


def test_traced_functions_take_types_or_values():
    f = fad.trace(lambda w, X: X @ fad.broadcast(w))
    g1 = f.graph(fad.f64[3] @ fad.SERVER, fad.f64[None, 3] @ fad.CLIENTS)
    g2 = f.graph(np.zeros(3), fad.clients([np.zeros((1, 3)), np.zeros((2, 3))]))
    g3 = f.graph(fad.f64[3], fad.f64[None, 3] @ fad.CLIENTS)    # bare tensor type = SERVER
    assert str(g1) == str(g2) == str(g3)
    assert [str(t) for t in g1.in_types] == ["f64[3]@SERVER", "{f64[?,3]}@CLIENTS"]
    assert [str(t) for t in g1.out_types] == ["{f64[?]}@CLIENTS"]


# --------------------------------------------------------------------------- notation round trip

dims = st.one_of(st.none(), st.integers(0, 1000))
tensor_types = st.builds(lambda d, s: TensorType(d, tuple(s)),
                         st.sampled_from(list(DTYPES.values())), st.lists(dims, max_size=3))


@st.composite
def federated_types(draw):
    t = draw(tensor_types)
    if t.ragged or draw(st.booleans()):
        return FederatedType(t, fad.CLIENTS, draw(st.booleans()))
    return FederatedType(t, fad.SERVER, True)


@given(federated_types())
def test_printed_types_parse_back(t):
    s = str(t)
    assert parse_type(s) == t
    assert ("{" in s) == (t.at_clients and not t.all_equal)
    assert ("?" in s) == t.tensor.ragged


@pytest.mark.parametrize("bad", ["f64[?]@SERVER", "{f64[3]}@SERVER", "f16[3]@SERVER",
                                 "f64[3]@EVERYWHERE", "f64[3]", "{f64[3]@CLIENTS",
                                 "f64[-1]@SERVER", "f64[03]@SERVER", "f64[3,]@SERVER", 3, None])
def test_malformed_type_strings(bad):
    with pytest.raises(fad.SerializationError):
        parse_type(bad)


def test_pickle_keeps_singletons_and_rules():
    """Graphs pickle (e.g. to dask workers): primitives, placements and dtypes come back as the
    registered objects, so rule tables and `is` comparisons still work."""
    import pickle

    from fadcore import ops
    from fadcore.examples import example_args_fed_mse, fed_mse
    for obj in (ops.mul_p, ops.broadcast_p, fad.SERVER, fad.CLIENTS, fad.f32, fad.i64):
        assert pickle.loads(pickle.dumps(obj)) is obj
    args = example_args_fed_mse()
    g = fad.grad(fed_mse).graph(*args)
    g2 = pickle.loads(pickle.dumps(g))
    assert str(g2) == str(g)
    np.testing.assert_array_equal(fad.run(g2, *args), fad.run(g, *args))


def test_clients_ragged_flag_types_rows_as_the_row_count():
    same = [np.ones((3, 2)), np.ones((3, 2))]
    assert str(fad.clients(same).type) == "{f64[3,2]}@CLIENTS"
    assert str(fad.clients(same, ragged=True).type) == "{f64[?,2]}@CLIENTS"
    assert fad.clients(same, ragged=True)[0:1].ragged
    with pytest.raises(fad.ShapeError, match="scalar members have no rows"):
        fad.clients([np.float64(1.0)], ragged=True)
    with pytest.raises(IndexError, match="client 5 out of range for 2 clients"):
        fad.clients(same)[5]
    assert repr(fad.clients(same[:1])).startswith("fad.clients(1 member,")


def test_ragged_flag_lets_equal_cohorts_share_the_ragged_graph():
    from fadcore.examples import fed_mse
    X = fad.clients([np.ones((2, 4)), np.ones((3, 4))])
    y_fixed = fad.clients([np.ones(3), np.ones(3)])
    with pytest.raises(fad.ShapeError, match=r"ragged=True"):
        fed_mse(np.ones(4), X, y_fixed)
    Xr = fad.clients([np.ones((3, 4)), 2 * np.ones((3, 4))], ragged=True)
    yr = fad.clients([np.ones(3), np.ones(3)], ragged=True)
    assert fed_mse.graph(np.ones(4), Xr, yr) is fed_mse.graph(
        np.ones(4), X, fad.clients([np.ones(2), np.ones(3)]))
    np.testing.assert_allclose(fed_mse(np.ones(4), Xr, yr), (9.0 + 49.0) / 2)


def test_traced_call_takes_num_clients():
    f = fad.trace(lambda w: fad.num_clients() * w)
    np.testing.assert_array_equal(f(np.ones(2), num_clients=4), [4.0, 4.0])
    with pytest.raises(fad.CardinalityError, match="pass num_clients="):
        f(np.ones(2))
