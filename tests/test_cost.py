"""Rounds and communication cost, against counts worked out by hand (d = model size)."""

from __future__ import annotations

import numpy as np
import pytest

import fadcore as fad
from fadcore.examples import (example_args_log_sum, fed_mse, log_sum, two_round)


def data(d, rows=(3, 6, 4, 5), seed=0):
    rng = np.random.default_rng(seed)
    X = fad.clients([rng.normal(size=(n, d)) for n in rows])
    y = fad.clients([rng.normal(size=n) for n in rows])
    return rng.normal(size=d), X, y


def cost_of(traced, args, clients=10, rows=7):
    return fad.cost(traced.graph(*args), clients=clients, rows=rows)


# --------------------------------------------------------------------------- DESIGN.md's table

@pytest.mark.parametrize("d", [5, 32])
def test_design_table_fedsgd(d):
    args = data(d)
    R = 7
    c = cost_of(fed_mse, args, rows=R)
    assert (c.rounds, c.bytes_down, c.bytes_up, c.client_state_bytes) == (1, 8 * d, 8, 0)

    c = cost_of(fad.grad(fed_mse), args, rows=R)              # reverse, stateful
    assert (c.rounds, c.bytes_down, c.bytes_up) == (2, 8 * d + 8, 8 + 8 * d)
    # the residual kept from round 1: 2 r, one float per row (the row count is resident)
    assert c.client_state_bytes == 8 * R

    c = cost_of(fad.grad(fed_mse, state="remat"), args, rows=R)
    assert (c.rounds, c.bytes_down, c.bytes_up, c.client_state_bytes) == (
        2, 16 * d + 8, 8 + 8 * d, 0)
    rr = fad.grad(fed_mse, state="remat").graph(*args).rounds()
    assert rr[1].state_in == []

    for mode in ("mixed", "auto"):
        c = cost_of(fad.grad(fed_mse, mode=mode), args, rows=R)
        assert (c.rounds, c.bytes_down, c.bytes_up, c.client_state_bytes) == (1, 8 * d, 8 * d, 0)
        c = cost_of(fad.value_and_grad(fed_mse, mode=mode), args, rows=R)
        assert (c.rounds, c.bytes_down, c.bytes_up) == (1, 8 * d, 8 * d + 8)

    w, X, y = args
    c = fad.cost(fad.jvp(fed_mse).graph((w, X, y), (w, None, None)), clients=10, rows=R)
    assert (c.rounds, c.bytes_down, c.bytes_up, c.client_state_bytes) == (1, 16 * d, 16, 0)


def test_costs_scale_with_clients_and_rows():
    args = data(4)
    g = fad.grad(fed_mse).graph(*args)
    a, b = fad.cost(g, clients=10, rows=7), fad.cost(g, clients=20, rows=14)
    assert a.bytes_down == b.bytes_down and a.bytes_down_total * 2 == b.bytes_down_total
    assert b.client_state_bytes == 2 * a.client_state_bytes
    assert b.client_flops > a.client_flops
    with pytest.raises(fad.ShapeError, match="rows="):
        fad.cost(g, clients=10)


@pytest.mark.parametrize("kw, error, match", [
    ({"rows": -5}, fad.ShapeError, r"rows=-5 must be at least 0"),
    ({"rows": 2.5}, fad.ShapeError, r"rows= must be an int, got float 2\.5"),
    ({"rows": True}, fad.ShapeError, r"rows= must be an int, got bool"),
    ({"rows": "7"}, fad.ShapeError, r"rows= must be an int, got str"),
    ({"clients": 0}, fad.CardinalityError, r"clients=0 must be at least 1"),
    ({"clients": -3}, fad.CardinalityError, r"clients=-3 must be at least 1"),
    ({"clients": 2.0}, fad.CardinalityError, r"clients= must be an int, got float"),
])
def test_cost_rejects_bad_counts(kw, error, match):
    g = fad.grad(fed_mse).graph(*data(4))
    with pytest.raises(error, match=match):
        fad.cost(g, **{"clients": 10, "rows": 7, **kw})
    assert fad.cost(g, clients=np.int64(10), rows=np.int64(0)).rounds == 2   # numpy ints are ints


def test_cost_of_something_else_than_a_graph():
    with pytest.raises(fad.FadError, match="expected a fad.Graph .* got TracedFunction"):
        fad.cost(fed_mse, clients=10, rows=7)


# --------------------------------------------------------------------------- two rounds

@pytest.mark.parametrize("d", [3, 8])
def test_two_round_program_every_mode(d):
    """Round 1: a FedSGD step (w down, the mean gradient up); round 2: evaluate the new model
    (w' down, the loss up)."""
    args = data(d)
    R = 7
    c = cost_of(two_round, args, rows=R)
    assert (c.rounds, c.bytes_down, c.bytes_up, c.client_state_bytes) == (2, 16 * d, 8 * d + 8, 0)

    # reverse: forward sweep (2 rounds) + one backward round per aggregation level; round 3
    # sends the loss cotangent (8) and returns ∂/∂w' (8d), round 4 sends the cotangent of the
    # mean gradient (8d) and returns ∂/∂w (8d). Kept across rounds: 2 r' (R floats) from
    # round 2; round 4 needs nothing but resident data (the round-1 step is linear in w).
    c = cost_of(fad.grad(two_round), args, rows=R)
    assert (c.rounds, c.bytes_down, c.bytes_up) == (4, 24 * d + 8, 24 * d + 8)
    assert c.client_state_bytes == 8 * R

    # remat: w' is sent again in round 3 to recompute r'; round 4 re-sends nothing (the
    # derivative of the round-1 step is linear in w: the data and the row count suffice)
    c = cost_of(fad.grad(two_round, state="remat"), args, rows=R)
    assert (c.rounds, c.bytes_down, c.bytes_up, c.client_state_bytes) == (
        4, 32 * d + 8, 24 * d + 8, 0)

    # forward: d basis directions ride beside w and w'; only tangents come back in round 2
    c = cost_of(fad.grad(two_round, mode="forward"), args, rows=R)
    assert (c.rounds, c.bytes_down, c.bytes_up, c.client_state_bytes) == (
        2, 16 * d + 16 * d * d, 8 * d + 8 * d * d + 8 * d, 0)

    # mixed/auto push both boundaries forward: round 1 also sends the d x d Jacobian of the
    # mean gradient, round 2 the loss gradient instead of the loss
    for mode in ("mixed", "auto"):
        c = cost_of(fad.grad(two_round, mode=mode), args, rows=R)
        assert (c.rounds, c.bytes_down, c.bytes_up, c.client_state_bytes) == (
            2, 16 * d, 8 * d + 8 * d * d + 8 * d, 0)

    w, X, y = args
    c = fad.cost(fad.jvp(two_round).graph((w, X, y), (w, None, None)), clients=10, rows=R)
    assert (c.rounds, c.bytes_down, c.bytes_up) == (2, 32 * d, 16 * d + 16)


def test_rounds_decomposition_of_reverse_grad():
    args = data(3)
    rs = fad.grad(fed_mse).graph(*args).rounds()
    assert len(rs) == 2
    r1, r2 = rs
    assert [e.prim.name for e in r1.broadcasts] == ["broadcast"]
    assert [e.prim.name for e in r1.aggregations] == ["mean"]
    assert [e.prim.name for e in r2.aggregations] == ["sum"]
    assert r2.broadcasts[0].inputs[0].type.shape == ()          # the loss cotangent
    assert [str(v.type) for v, made in r2.state_in] == ["{f64[?]}@CLIENTS"]
    assert all(made == 1 for _, made in r2.state_in)
    assert any(e.prim.name == "after" for e in r2.prepare)


# --------------------------------------------------------------------------- auto

def test_auto_choice_depends_on_weights():
    """log(1 + |sum_i h_i|^2) with h_i in R^4 and W in R^{3x4}: reverse needs a second round
    (the cotangent depends on the aggregate) but sends only 8*4 down and 8*12 up; push-forward
    needs one round and sends the 4 x 12 Jacobian up. Rounds-heavy weights pick push-forward,
    bytes-heavy weights pick reverse; both give the reverse gradient."""
    args = example_args_log_sum()
    fast = fad.CostWeights(rounds=1.0, bytes=1e-6)
    lean = fad.CostWeights(rounds=0.0, bytes=1.0)
    g_fast = fad.grad(log_sum, mode="auto", weights=fast).graph(*args)
    g_lean = fad.grad(log_sum, mode="auto", weights=lean).graph(*args)
    assert g_fast.meta["auto"]["chosen"] == "mixed/stateful"
    assert [b["choice"] for b in g_fast.meta["boundaries"]] == ["pushforward"]
    assert g_lean.meta["auto"]["chosen"] == "reverse/stateful"
    c_fast, c_lean = fad.cost(g_fast, clients=10, rows=7), fad.cost(g_lean, clients=10, rows=7)
    assert (c_fast.rounds, c_lean.rounds) == (1, 2)
    assert c_fast.bytes_up == 8 * 4 + 8 * 4 * 12 and c_lean.bytes_up == 8 * 4 + 8 * 12
    assert "pushforward" in fad.explain(g_fast) and "reverse" in fad.explain(g_lean)
    ref = fad.grad(log_sum)(*args)
    W, X = args
    # an independent oracle: central differences of a NumPy reimplementation
    def np_f(W):
        s = sum(np.tanh(x @ W).mean(0) for x in X)
        return np.log1p(s @ s)
    h = 1e-6
    fd = np.array([(np_f(W + h * E) - np_f(W - h * E)) / (2 * h)
                   for E in np.eye(W.size).reshape(-1, *W.shape)]).reshape(W.shape)
    np.testing.assert_allclose(ref, fd, rtol=1e-6, atol=1e-9)
    for g in (g_fast, g_lean):
        np.testing.assert_allclose(fad.run(g, *args), ref, rtol=1e-10)


def test_mixed_boundary_override():
    args = example_args_log_sum()
    g = fad.grad(log_sum, mode="mixed", boundaries={0: "reverse"}).graph(*args)
    assert fad.cost(g, clients=10, rows=7).rounds == 2
    with pytest.raises(fad.DifferentiationError, match="no boundary 3"):
        fad.grad(log_sum, mode="mixed", boundaries={3: "reverse"}).graph(*args)


def test_pushforward_infeasible_for_client_arguments():
    from fadcore.examples import example_args_fedavg_round, fedavg_round
    g = fad.grad(fedavg_round, argnums=(0, 1), mode="mixed").graph(*example_args_fedavg_round())
    reasons = [b["reason"] for b in g.meta["boundaries"] if b["choice"] == "reverse"]
    assert reasons and all("client argument" in r for r in reasons)


def test_cost_table_prints_side_by_side():
    args = data(3)
    t = fad.cost_table({"primal": cost_of(fed_mse, args),
                        "reverse": cost_of(fad.grad(fed_mse), args)})
    lines = t.splitlines()
    assert lines[0].split() == ["primal", "reverse"]
    assert lines[1].split()[-2:] == ["1", "2"]          # rounds
    assert "broadcast+mean+sum" in t


def test_inspect_cli(capsys):
    from fadcore.cli import main
    assert main(["inspect", "fadcore.examples:fed_mse", "--quiet", "--clients", "10",
                 "--rows", "7"]) == 0
    out = capsys.readouterr().out
    assert "==" not in out and "boundary" not in out          # --quiet: the cost table only
    assert out.splitlines()[0].split() == ["primal", "reverse", "reverse/remat", "forward",
                                           "mixed", "auto"]
    assert out.splitlines()[1].split() == ["rounds", "1", "2", "2", "1", "1", "1"]
    assert main(["inspect", "fadcore.examples:fed_mse", "--clients", "10", "--rows", "7"]) == 0
    out = capsys.readouterr().out
    for name in ("primal", "reverse", "reverse/remat", "forward", "mixed", "auto"):
        assert f"== {name}:" in out
    assert "{ lambda" in out and "boundary 0 (mean): pushforward" in out


def test_auto_finds_savings_that_need_several_boundaries():
    """The outer gradient of |∇_forward mse|²: its three mean boundaries sit in one round, so
    pushing any one forward alone saves nothing, all three together save the second round."""
    def mse(w, X, y):
        r = X @ fad.broadcast(w) - y
        return fad.mean(fad.numpy.mean(r * r))

    @fad.trace
    def outer(w, X, y):
        return fad.numpy.sum(fad.grad(mse, mode="forward")(w, X, y) ** 2)

    args = data(3)
    g = fad.grad(outer, mode="auto").graph(*args)
    assert fad.cost(g, clients=10, rows=7).rounds == 1
    assert fad.cost(fad.grad(outer).graph(*args), clients=10, rows=7).rounds == 2
    # auto costed every subset of the three boundaries: one alone saves no round, all together
    # do (and forward mode, one round too, is cheaper still here)
    rep = g.meta["auto"]
    rounds = {r["candidate"]: r["rounds"] for r in rep["candidates"] if "cost" in r}
    assert rounds["mixed/stateful"] == 1
    assert [rounds[f"mixed/stateful pushing {{{i}}}"] for i in range(3)] == [2, 2, 2]
    assert rep["chosen"] in ("forward", "mixed/stateful")
    np.testing.assert_allclose(fad.run(g, *args), fad.grad(outer)(*args), rtol=1e-12)


def test_cost_says_which_graphs_need_the_same_clients_back():
    args = data(3)
    assert cost_of(fad.grad(fed_mse), args).needs_same_clients          # residuals kept
    for kw in (dict(state="remat"), dict(mode="mixed"), dict(mode="forward")):
        assert not cost_of(fad.grad(fed_mse, **kw), args).needs_same_clients
    t = fad.cost_table({"reverse": cost_of(fad.grad(fed_mse), args),
                        "remat": cost_of(fad.grad(fed_mse, state="remat"), args)})
    assert next(x for x in t.splitlines()
                if x.startswith("clients across rounds")).split()[-2:] == ["same", "any"]
