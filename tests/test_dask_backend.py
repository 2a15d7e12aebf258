"""The dask backend against the reference (and numba) backends, on a 2-worker LocalCluster.

One cluster per module (the backend's own default cluster, so the default path is what runs);
every graph runs in several chunkings so that partial sums are really reduced across chunks,
and the fault tests kill a worker in the middle of a multi-round derivative.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import fadcore as fad
from fadcore import numpy as fnp
from fadcore import pytree
from fadcore.backends import available
from fadcore.examples import (example_args_fed_mse, example_args_fedavg_round,
                              example_args_log_sum, fed_mse, fedavg_round, log_sum, secure_mse,
                              two_round)

distributed = pytest.importorskip("distributed")
from fadcore.backends import dask_backend  # noqa: E402

pytestmark = pytest.mark.dask

RTOL, ATOL = 1e-12, 1e-14
TIMEOUT = 60        # seconds per round: a hung cluster fails the test instead of CI
NUMBA_TIMEOUT = 600  # the first numba task on a worker may compile the interpreter


@pytest.fixture(scope="module")
def client():
    c = dask_backend.default_client()
    c.wait_for_workers(2, timeout=TIMEOUT)
    yield c
    dask_backend.shutdown()


def assert_same(got, want):
    gl, gt = pytree.flatten(got)
    wl, wt = pytree.flatten(want)
    assert gt == wt
    for g, w in zip(gl, wl, strict=True):
        if isinstance(w, fad.ClientValues):
            assert isinstance(g, fad.ClientValues) and len(g) == len(w)
            assert g.all_equal == w.all_equal
            for gm, wm in zip(g, w, strict=True):
                assert gm.dtype == wm.dtype and gm.shape == wm.shape
                np.testing.assert_allclose(gm, wm, rtol=RTOL, atol=ATOL)
        else:
            assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def run_dask(graph, *args, **kw):
    """Tasks evaluate with the reference evaluator unless a test asks for numba."""
    kw.setdefault("timeout", TIMEOUT)
    kw.setdefault("evaluator", "reference")
    return fad.run(graph, *args, backend="dask", **kw)


# --------------------------------------------------------------------------- the graphs

def client_loss(w, X, y):
    r = X @ w - y
    return fnp.mean(r * r)


@fad.trace
def weighted_mse(w, alpha, X, y):
    return fad.weighted_mean(client_loss(fad.broadcast(w), X, y), alpha)


def ragged_args(n=4, d=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = [1 + (3 * i) % 5 for i in range(n)]
    X = fad.clients([rng.normal(size=(r, d)) for r in rows])
    y = fad.clients([rng.normal(size=r) for r in rows])
    return rng, rng.normal(size=d), X, y


def args_weighted(n=4):
    rng, w, X, y = ragged_args(n)
    return w, fad.clients(rng.random(n) + 0.5), X, y


def args_softmax(n=5, d=3, k=4):
    rng, _, X, _ = ragged_args(n, d)
    labels = fad.clients([rng.integers(0, k, size=len(x)).astype(np.int64) for x in X])
    return rng.normal(size=(d, k)), X, labels


def args_one_client():
    _, w, X, y = ragged_args(1)
    return w, X, y


def G(f, **kw):
    return fad.grad(f, **kw)


# name -> (traced function, argument maker); grads take argnums over server and client args
CASES = {
    "fed_mse": (fed_mse, example_args_fed_mse),
    "fed_mse/reverse": (G(fed_mse, argnums=(0, 1)), example_args_fed_mse),
    "fed_mse/remat": (G(fed_mse, argnums=(0, 1), state="remat"), example_args_fed_mse),
    "fed_mse/mixed": (G(fed_mse, argnums=(0, 1), mode="mixed"), example_args_fed_mse),
    "fed_mse/auto": (G(fed_mse, mode="auto"), example_args_fed_mse),
    "fed_mse/forward": (G(fed_mse, mode="forward"), example_args_fed_mse),
    "fed_mse/value_and_grad": (fad.value_and_grad(fed_mse), example_args_fed_mse),
    "two_round": (two_round, example_args_fed_mse),
    "two_round/reverse": (G(two_round, argnums=(0, 2)), example_args_fed_mse),
    "two_round/remat": (G(two_round, state="remat"), example_args_fed_mse),
    "two_round/mixed": (G(two_round, mode="mixed"), example_args_fed_mse),
    "two_round/forward": (G(two_round, mode="forward"), example_args_fed_mse),
    "fedavg_round": (fedavg_round, example_args_fedavg_round),
    "fedavg_round/reverse": (G(fedavg_round, argnums=(0, 1)), example_args_fedavg_round),
    "fedavg_round/remat": (G(fedavg_round, argnums=(0, 1), state="remat"),
                           example_args_fedavg_round),
    "fedavg_round/mixed": (G(fedavg_round, argnums=(0, 1), mode="mixed"),
                           example_args_fedavg_round),
    "weighted_mean": (weighted_mse, args_weighted),
    "weighted_mean/reverse": (G(weighted_mse, argnums=(0, 1)), args_weighted),
    "secure_sum": (secure_mse, example_args_fed_mse),
    "secure_sum/reverse": (G(secure_mse), example_args_fed_mse),
    "log_sum/reverse": (G(log_sum), example_args_log_sum),
    "log_sum/mixed": (G(log_sum, mode="mixed"), example_args_log_sum),
    "one_client/reverse": (G(fed_mse, argnums=(0, 1)), args_one_client),
    "one_client/two_round": (G(two_round), args_one_client),
}


def _softmax_loss(W, X, labels):
    return fnp.mean(fad.nn.softmax_cross_entropy(X @ W, labels))


@fad.trace
def softmax_fed(W, X, labels):
    return fad.mean(_softmax_loss(fad.broadcast(W), X, labels))


CASES["int_labels/reverse"] = (G(softmax_fed), args_softmax)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(client, name, chunk_size):
    f, make = CASES[name]
    args = make()
    g = f.graph(*args)
    want = fad.run(g, *args, backend="reference")
    assert_same(run_dask(g, *args, chunk_size=chunk_size), want)


def test_traced_function_run_and_user_client(client):
    """``f.run(..., backend="dask", client=...)`` with a client the user made."""
    args = example_args_fed_mse()
    got = fad.grad(fed_mse).run(*args, backend="dask", client=client, chunk_size=2,
                                evaluator="reference")
    np.testing.assert_allclose(got, fad.grad(fed_mse).run(*args, backend="reference"),
                               rtol=RTOL)


def test_client_outputs_passthrough_and_no_client_data(client):
    @fad.trace
    def outs(w, X):
        wc = fad.broadcast(w)
        return wc, X, fad.sum(fnp.sum(X, axis=0) * wc), w * 2.0

    _, w, X, _ = ragged_args(5)
    g = outs.graph(w, X)
    assert_same(run_dask(g, w, X, chunk_size=2), fad.run(g, w, X, backend="reference"))

    @fad.trace
    def counted(w):
        return fad.sum(fad.broadcast(w)), fad.num_clients()

    g = counted.graph(w)
    assert_same(run_dask(g, w, num_clients=7, chunk_size=3),
                fad.run(g, w, num_clients=7, backend="reference"))

    @fad.trace
    def server_only(w):
        return fnp.tanh(w) * 3.0

    g = server_only.graph(w)
    assert_same(run_dask(g, w), fad.run(g, w, backend="reference"))


def test_float32(client):
    rng, w, X, y = ragged_args(6)
    args = (w.astype(np.float32), fad.clients([x.astype(np.float32) for x in X]),
            fad.clients([v.astype(np.float32) for v in y]))
    g = fad.grad(fed_mse).graph(*args)
    got = run_dask(g, *args, chunk_size=4)
    want = fad.run(g, *args, backend="reference")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)


# --------------------------------------------------------------------------- plan and data

def _state(p):
    """(var, round made) for every value a round reads from an earlier round's tasks."""
    return {(p.rounds[s[1] - 1].kept[s[2]], s[1]) for rp in p.rounds for s in rp.client_in
            if s[0] == "state"}


@pytest.mark.parametrize("f", [fed_mse, two_round, fedavg_round, log_sum])
@pytest.mark.parametrize("mode,state", [("reverse", "stateful"), ("reverse", "remat"),
                                        ("mixed", "stateful"), ("forward", "stateful")])
def test_plan_keeps_exactly_the_client_state(f, mode, state):
    make = {fedavg_round: example_args_fedavg_round, log_sum: example_args_log_sum}.get(
        f, example_args_fed_mse)
    g = fad.grad(f, mode=mode, state=state).graph(*make())
    p = dask_backend.plan(g)
    assert _state(p) == {(v, made) for v, made, _ in g.rounds().client_state()}
    if state == "remat" or mode != "reverse":
        assert _state(p) == set()
    for r in p.rounds:
        r.subgraph.verify()
        assert len(fad.Graph.from_json(r.text).outputs) == r.num_partials + len(r.kept)


def test_stateful_reverse_keeps_residuals():
    g = fad.grad(fed_mse).graph(*example_args_fed_mse())
    assert _state(dask_backend.plan(g))


@pytest.mark.parametrize("shape", [(None, 3), (4,), (), (None,), (2, None), (None, None)])
def test_pack_round_trips(shape):
    rng = np.random.default_rng(0)
    rows = [3, 1, 4, 2]
    members = [rng.normal(size=tuple(r if d is None else d for d in shape)) for r in rows]
    cd = dask_backend.pack(members, fad.TensorType(fad.f64, shape))
    import pickle
    back = pickle.loads(pickle.dumps(cd))
    for got, want in zip(back.members(), members, strict=True):
        assert got.shape == want.shape and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)
    assert back.digest() == cd.digest()
    members[1] = members[1] + 1.0
    assert dask_backend.pack(members, fad.TensorType(fad.f64, shape)).digest() != cd.digest()


def test_data_is_sent_once_and_reused_across_calls(client):
    args = example_args_fed_mse(seed=987654)          # data no other test uses
    g = fad.grad(fed_mse).graph(*args)

    def data_keys():
        return {k for k in client.run_on_scheduler(
            lambda dask_scheduler: list(dask_scheduler.tasks)) if k.startswith("fad-data-")}

    before = data_keys()
    run_dask(g, *args, chunk_size=2)
    first = data_keys() - before
    assert len(first) == 2 * 2                       # X and y, two chunks each
    run_dask(g, *args, chunk_size=2)
    run_dask(fed_mse.graph(*args), *args, chunk_size=2)
    assert data_keys() - before == first             # same content: same worker copies
    w, X, y = args
    run_dask(g, w, X, fad.clients([m + 1.0 for m in y]), chunk_size=2)
    assert len(data_keys() - before - first) == 2     # new y chunks, X reused


def test_bad_options(client):
    args = example_args_fed_mse()
    g = fed_mse.graph(*args)
    with pytest.raises(fad.FadError, match="chunk_size"):
        run_dask(g, *args, chunk_size=0)
    with pytest.raises(fad.FadError, match="evaluator"):
        run_dask(g, *args, evaluator="gpu")


# --------------------------------------------------------------------------- faults

def _kill(c, address):
    """Kill the worker process at ``address`` (its nanny starts a new one)."""
    async def die():
        os._exit(1)
    c.run(die, workers=[address], wait=False)


def _times_computed(dask_scheduler, keys):
    """How often each key went to ``memory`` on the scheduler (2+: recomputed)."""
    counts = dict.fromkeys(keys, 0)
    for key, _start, finish, *_ in dask_scheduler.story(*keys):
        if key in counts and finish == "memory":
            counts[key] += 1
    return counts


def test_worker_killed_mid_round_is_survived(client):
    """A worker holding round-1 residuals dies while round 2 of a 4-round derivative runs; what
    it held (data chunks, residuals) is recomputed from lineage and the result is unchanged."""
    args = example_args_fed_mse(d=4)
    g = fad.grad(two_round, argnums=(0, 1)).graph(*args)
    assert len(g.rounds()) == 4 and g.rounds().client_state()
    want = fad.run(g, *args, backend="reference")
    seen, killed = {}, []

    def on_round(info):
        seen.setdefault(info["round"], info["tasks"])
        if info["round"] == 2 and info["phase"] == "submitted":
            holders = client.who_has(seen[1])
            victim = sorted({w for ws in holders.values() for w in ws})[0]
            _kill(client, victim)
            killed.append(victim)

    got = run_dask(g, *args, chunk_size=1, on_round=on_round)
    assert killed
    assert_same(got, want)
    # recomputation is deterministic: bit-identical to a run without the fault
    calm = run_dask(g, *args, chunk_size=1)
    for a, b in zip(pytree.flatten(got)[0], pytree.flatten(calm)[0], strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)) \
            if isinstance(a, fad.ClientValues) else np.array_equal(a, b)
    counts = client.run_on_scheduler(_times_computed, keys=[f.key for f in seen[1]])
    assert max(counts.values()) >= 2, counts         # some round-1 task really ran again
    client.wait_for_workers(2, timeout=TIMEOUT)
    assert killed[0] not in set(client.nthreads())
    # and the cluster still works
    assert_same(run_dask(g, *args, chunk_size=2), want)


def test_lost_state_is_an_error_naming_the_round(client):
    args = example_args_fed_mse()
    g = fad.grad(fed_mse).graph(*args)

    def on_round(info):
        if info["round"] == 1 and info["phase"] == "done":
            info["client"].cancel(info["tasks"], force=True)   # the residuals, gone

    with pytest.raises(fad.FadError, match="round 2"):
        run_dask(g, *args, chunk_size=2, on_round=on_round)
    # the cluster is fine afterwards
    np.testing.assert_allclose(run_dask(g, *args, chunk_size=2),
                               fad.run(g, *args, backend="reference"), rtol=RTOL)


def test_round_over_its_timeout_is_an_error(client):
    args = example_args_fed_mse()
    g = fad.grad(fed_mse).graph(*args)
    busy = []

    def on_round(info):
        if info["round"] == 1 and info["phase"] == "done":
            # every worker thread sleeps through round 2's time allowance
            busy.extend(client.submit(time.sleep, 3, workers=[w], pure=False)
                        for w in client.nthreads())

    with pytest.raises(fad.FadError, match="round 2 .*timeout="):
        run_dask(g, *args, chunk_size=2, on_round=on_round, timeout=1)
    client.gather(busy)


# --------------------------------------------------------------------------- numba in the tasks

NUMBA_CASES = ["fed_mse/reverse", "two_round/remat", "fedavg_round/reverse",
               "weighted_mean/reverse", "secure_sum/reverse", "int_labels/reverse",
               "one_client/two_round", "fed_mse/forward"]


@pytest.mark.parametrize("name", NUMBA_CASES)
def test_numba_tasks_match_numba_backend(client, name):
    """Tasks running the numba backend (what ``evaluator="auto"`` picks when it imports)."""
    assert "numba" in available()                    # numba is a hard dependency
    f, make = CASES[name]
    args = make()
    g = f.graph(*args)
    want = fad.run(g, *args, backend="numba")        # compiles (and caches) in this process
    # the workers load the compiled interpreter from numba's cache, or compile it: be patient
    got = run_dask(g, *args, chunk_size=3, evaluator="numba", timeout=NUMBA_TIMEOUT)
    assert_same(got, want)
    assert_same(got, fad.run(g, *args, backend="reference"))


def test_workers_killed_in_successive_rounds_never_hang():
    """A worker dies in round 1 and another in round 2 of a 4-round derivative, on a cluster of
    its own (3 worker processes, so that one survives whether or not the nannies restart the
    others in time): client data and residuals are recomputed on live workers and the result
    is unchanged and no round waits on a dead worker (data tasks used to be pinned to their
    first workers' addresses; with all of those dead they waited in ``no-worker`` forever)."""
    cluster = distributed.LocalCluster(
        n_workers=3, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, env={"NUMBA_NUM_THREADS": "1"},
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
    own = distributed.Client(cluster, set_as_default=False)
    try:
        own.wait_for_workers(3, timeout=NUMBA_TIMEOUT)
        args = example_args_fed_mse(d=4, seed=31)
        g = fad.grad(two_round, argnums=(0, 1)).graph(*args)
        want = fad.run(g, *args, backend="reference")
        killed = []

        def on_round(info):
            if info["phase"] == "submitted" and info["round"] in (1, 2):
                alive = sorted(a for a in own.nthreads() if a not in killed)
                if len(alive) > 1:
                    _kill(own, alive[0])
                    killed.append(alive[0])

        got = run_dask(g, *args, client=own, chunk_size=1, on_round=on_round,
                       timeout=NUMBA_TIMEOUT)
        assert len(killed) == 2
        assert_same(got, want)
    finally:
        own.close()
        cluster.close()


def test_no_workers_is_an_error_naming_the_round_and_clients():
    """A cluster with no workers: the default per-round timeout is finite (here shortened)."""
    assert dask_backend.ROUND_TIMEOUT is not None and dask_backend.ROUND_TIMEOUT > 0
    cluster = distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None,
                                       scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
    empty = distributed.Client(cluster, set_as_default=False)
    try:
        args = example_args_fed_mse()
        with pytest.raises(fad.FadError, match=r"round 1 of 'fed_mse' failed \(chunks \[1, 2\] "
                                               r"of 2: clients 0\.\.1, 2\.\.3\).*timeout=1"):
            fad.run(fed_mse.graph(*args), *args, backend="dask", client=empty, chunk_size=2,
                    timeout=1)
    finally:
        empty.close()
        cluster.close()


def test_client_misuse_is_a_typed_error(client):
    args = example_args_fed_mse()
    g = fed_mse.graph(*args)
    want = fad.run(g, *args, backend="reference")
    # a scheduler address string: connected to (once) and used
    addr = client.scheduler.address
    np.testing.assert_allclose(run_dask(g, *args, client=addr), want, rtol=RTOL)
    with pytest.raises(fad.FadError, match="could not connect to the dask scheduler at "
                                           "client='tcp://127.0.0.1:9'"):
        run_dask(g, *args, client="tcp://127.0.0.1:9")
    closed = distributed.Client(addr, set_as_default=False)
    closed.close()
    with pytest.raises(fad.FadError, match="client= is closed"):
        run_dask(g, *args, client=closed)
    with pytest.raises(fad.FadError, match="client= must be a distributed.Client"):
        run_dask(g, *args, client=42)
    with pytest.raises(fad.FadError, match="timeout"):
        run_dask(g, *args, timeout=-1)


# --------------------------------------------------------------------------- secure aggregation

SECURE = fad.Policy(aggregation="secure_sum")


def test_secure_aggregation_masks_inside_the_workers(client):
    """Under the secure policy each chunk task masks its clients' contributions on the worker:
    what leaves the workers for the secure sums is one uniform uint64 row per client."""
    pytest.importorskip("cryptography")
    from fadcore.backends.executor import SecurePartial
    args = example_args_fed_mse(d=3)
    g = fad.grad(secure_mse, argnums=(0, 1), policy=SECURE).graph(*args)
    want = fad.run(g, *args, backend="reference", secure_aggregation=False)
    left = []

    def on_round(info):
        if info["phase"] == "done":
            left.extend(client.gather(info["partials"]))

    for chunk in (1, 3):
        left.clear()
        got = run_dask(g, *args, chunk_size=chunk, on_round=on_round)   # on by default
        bound = fad.SecureAggregation().error_bound(len(args[1]))
        for a, b in zip(pytree.flatten(got)[0], pytree.flatten(want)[0], strict=True):
            pairs = zip(a, b, strict=True) if isinstance(b, fad.ClientValues) else [(a, b)]
            for x, y in pairs:
                np.testing.assert_allclose(x, y, rtol=0, atol=4 * bound)
        rows = [p for res in left for p in (res.values if hasattr(res, "values")
                                            else res.partials)]
        assert rows and all(isinstance(p, SecurePartial) and p.rows.dtype == np.uint64
                            for p in rows)
        assert sorted(i for p in rows for i in p.clients) == sorted(
            list(range(len(args[1]))) * 2)               # two secure rounds, one row per client


def test_secure_worker_lost_with_keys_is_a_dropout_error(client):
    """The workers holding clients 0-1's private keys die after round 1 of a 2-round
    derivative: recomputed keys no longer match the agreed ones, and the run says which
    clients dropped (the keys were copied to every worker that ran those clients' tasks)."""
    pytest.importorskip("cryptography")
    args = example_args_fed_mse(d=3, seed=5)
    g = fad.grad(secure_mse, policy=SECURE).graph(*args)
    killed = []

    def on_round(info):
        if info["round"] == 1 and info["phase"] == "done":
            holders = client.who_has([info["keys"][0]])
            for victim in sorted({w for ws in holders.values() for w in ws}):
                _kill(client, victim)
                killed.append(victim)

    # round 2 reads round 1's lost residuals: the error may come from round 1's recomputation
    with pytest.raises(fad.SecureAggregationError, match=r"round [12] .*client 0 no longer "
                                                         r"holds the key it agreed on"):
        run_dask(g, *args, chunk_size=2, on_round=on_round, timeout=NUMBA_TIMEOUT)
    assert killed
    client.wait_for_workers(2, timeout=NUMBA_TIMEOUT)
