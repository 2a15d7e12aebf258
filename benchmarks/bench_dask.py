"""The dask backend against numba (and the reference evaluator): time per call, the crossover,
and the bytes dask moved per round beside ``fad.cost``'s per-client bytes x clients.

    python benchmarks/bench_dask.py                      # 1,000 / 10,000 / 100,000 clients
    python benchmarks/bench_dask.py --clients 10000 100000 --rows 8 --dim 8 --repeat 3
    python benchmarks/bench_dask.py --mode mixed          # the fused one-round gradient

The graph is a gradient of the FedSGD loss, by default reverse mode (stateful: two rounds, the
residuals stay on the workers between them); clients hold ragged data (``rows`` on average, ``dim``
features). Dask runs on the backend's default cluster (a 2-worker, 1-thread-each LocalCluster
on loopback). Times are the best of ``--repeat`` warm calls (numba compiled, the client data
already on the workers); ``dask first`` is the first call on new data, which ships it.

Bytes per round come from dask's own accounting: the scheduler's ``TaskState.nbytes`` of the
round's broadcast leaf (sent once to a worker inside its task spec) and of the partial sums the
driver gathers, and the workers' ``transfer_incoming_log`` (worker-to-worker copies, e.g. the
broadcast replicated to the second worker).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import fadcore as fad
from fadcore.backends import available
from fadcore.backends import dask_backend as db
from fadcore.backends.inputs import prepare_inputs
from fadcore.examples import fed_mse


MODES = {"reverse": dict(mode="reverse", state="stateful"),
         "remat": dict(mode="reverse", state="remat"),
         "mixed": dict(mode="mixed")}


def make_data(n, rows, dim, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(max(1, rows // 2), rows + rows // 2 + 1, size=n)
    X = fad.clients([rng.normal(size=(k, dim)) for k in sizes])
    y = fad.clients([rng.normal(size=k) for k in sizes])
    return rng.normal(size=dim), X, y, float(sizes.mean())


def best(fn, repeat):
    times = []
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


# --------------------------------------------------------------------------- dask's byte counts

def _task_bytes(dask_scheduler, keys):
    """(nbytes, number of workers holding it) per key, from the scheduler's task states."""
    out = {}
    for k in keys:
        ts = dask_scheduler.tasks.get(k)
        out[k] = (0, 0) if ts is None else (ts.nbytes or 0, len(ts.who_has or ()))
    return out


def _transfers_so_far(dask_worker):
    return dask_worker.state.transfer_incoming_count_total


def _incoming(dask_worker, since):
    """Per-key bytes of the worker-to-worker transfers this worker received since its
    ``transfer_incoming_count_total`` was ``since``."""
    new = dask_worker.state.transfer_incoming_count_total - since.get(dask_worker.address, 0)
    log = list(dask_worker.transfer_incoming_log)
    return [dict(e["keys"]) for e in (log[-new:] if new > 0 else [])]


class ByteMeter:
    """An ``on_round`` hook recording what dask moved in each round (call ``start`` first:
    worker transfer counters are read between rounds, never while one runs)."""

    def __init__(self):
        self.rounds = []
        self._since = {}

    def start(self, client):
        self._since = client.run(_transfers_so_far)
        return self

    def __call__(self, info):
        if info["phase"] != "done":
            return
        c = info["client"]
        bkey = [info["broadcast"].key] if info["broadcast"] is not None else []
        pkeys = [f.key for f in info["partials"]]
        tb = c.run_on_scheduler(_task_bytes, keys=bkey + pkeys)
        moved = [kb for per in c.run(_incoming, since=self._since).values() for kb in per]
        self._since = c.run(_transfers_so_far)
        w2w_bcast = sum(nb or 0 for kb in moved for k, nb in kb.items() if k in bkey)
        w2w_other = sum(nb or 0 for kb in moved for k, nb in kb.items() if k not in bkey)
        down = sum(tb[k][0] for k in bkey)                         # spec -> first worker
        up = sum(tb[k][0] for k in pkeys)                          # partials -> driver
        self.rounds.append(dict(round=info["round"], chunks=len(info["chunks"]),
                                down=down + w2w_bcast, up=up, w2w_other=w2w_other,
                                bcast_copies=sum(tb[k][1] for k in bkey)))


def data_bytes(client):
    def f(dask_scheduler):
        return sum((ts.nbytes or 0) * max(1, len(ts.who_has or ()))
                   for k, ts in dask_scheduler.tasks.items() if str(k).startswith("fad-data-"))
    return client.run_on_scheduler(f)


# --------------------------------------------------------------------------- main

def fmt_s(t):
    return "    n/a" if t is None else f"{t:7.3f}"


def fmt_b(b):
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= k:
            return f"{b / k:.1f} {unit}"
    return f"{b:.0f} B"


def crossover(ns, ta, tb):
    """Clients where a straight-line fit of ``tb`` drops below ``ta`` (None if never)."""
    if len(ns) < 2 or any(t is None for t in ta + tb):
        return None
    (sa, ia), (sb, ib) = np.polyfit(ns, ta, 1), np.polyfit(ns, tb, 1)
    if sb >= sa:
        return None if ib > ia else 0.0
    return max(0.0, (ib - ia) / (sa - sb))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reference-max", type=int, default=100000,
                    help="skip the (slow) reference evaluator above this many clients")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--evaluator", default="auto", choices=["auto", "numba", "reference"],
                    help="what dask tasks run sub-graphs with")
    ap.add_argument("--no-numba", action="store_true", help="skip the numba backend column")
    ap.add_argument("--mode", default="reverse", choices=list(MODES),
                    help="which gradient of fed_mse: reverse (stateful, 2 rounds), remat "
                         "(2 rounds, no client state), mixed (1 round)")
    args = ap.parse_args(argv)

    have_numba = "numba" in available() and not args.no_numba
    client = db.default_client()
    client.wait_for_workers(2, timeout=120)
    nthreads = sum(client.nthreads().values())
    print(f"dask: {len(client.nthreads())} workers, {nthreads} threads; numba backend "
          f"{'available' if have_numba else 'NOT available (tasks use the reference evaluator)'}")
    grad = fad.grad(fed_mse, **MODES[args.mode])
    # warm up: numba compiled (or loaded from its cache) here and on every worker
    w, X, y, _ = make_data(50, args.rows, args.dim, seed=1)
    g = grad.graph(w, X, y)
    if have_numba:
        fad.run(g, w, X, y, backend="numba")
    fad.run(g, w, X, y, backend="dask", chunk_size=10, evaluator=args.evaluator)
    rows_table, bytes_table = [], []
    for n in args.clients:
        w, X, y, mean_rows = make_data(n, args.rows, args.dim, seed=n)
        g = grad.graph(w, X, y)
        t_chk, _ = best(lambda: prepare_inputs(g, [w, X, y]), args.repeat)
        t_ref = None
        if n <= args.reference_max:
            t_ref, want = best(lambda: fad.run(g, w, X, y, backend="reference"), 1)
        t_nb = None
        if have_numba:
            fad.run(g, w, X, y, backend="numba")                     # compile
            t_nb, got_nb = best(lambda: fad.run(g, w, X, y, backend="numba"), args.repeat)
        # dask, tasks with numba when it is importable (the default)
        kw = dict(backend="dask", chunk_size=args.chunk_size, evaluator=args.evaluator)
        before = data_bytes(client)
        t0 = time.perf_counter()
        got = fad.run(g, w, X, y, **kw)
        t_first = time.perf_counter() - t0
        shipped = data_bytes(client) - before
        t_dask, got = best(lambda: fad.run(g, w, X, y, **kw), args.repeat)
        meter = ByteMeter().start(client)
        fad.run(g, w, X, y, on_round=meter, **kw)
        if t_ref is not None:
            np.testing.assert_allclose(got, want, rtol=1e-10)
        if t_nb is not None:
            np.testing.assert_allclose(got, got_nb, rtol=1e-10)
        rows_table.append((n, t_chk, t_ref, t_nb, t_first, t_dask))
        cost = fad.cost(g, clients=n, rows=int(round(mean_rows)))
        for m, (r, down, up, _state) in zip(meter.rounds, cost.per_round):
            bytes_table.append((n, r, m, down * n, up * n, shipped))
    # ---- times
    print(f"\n{args.mode} grad of fed_mse ({len(g.rounds())} round(s)), rows~{args.rows}, "
          f"dim={args.dim}: seconds per call (best of {args.repeat})")
    print(f"{'clients':>9} {'checks':>8} {'reference':>10} {'numba':>8} {'dask first':>11} "
          f"{'dask':>8} {'dask/numba':>11} {'ref/dask':>9}")
    for n, t_chk, t_ref, t_nb, t_first, t_dask in rows_table:
        r1 = f"{t_dask / t_nb:10.1f}x" if t_nb else "        n/a"
        r2 = f"{t_ref / t_dask:8.1f}x" if t_ref else "      n/a"
        print(f"{n:>9,} {fmt_s(t_chk):>8} {fmt_s(t_ref):>10} {fmt_s(t_nb):>8} "
              f"{fmt_s(t_first):>11} {fmt_s(t_dask):>8} {r1} {r2}")
    print("(checks: backends/inputs.py's argument checks, included in every backend's time)")
    ns = [r[0] for r in rows_table]
    cx_nb = crossover(ns, [r[3] for r in rows_table], [r[5] for r in rows_table])
    cx_ref = crossover(ns, [r[2] for r in rows_table], [r[5] for r in rows_table])
    print("crossover (straight-line fit of time vs clients):")
    if len(ns) < 2:
        print("  needs two client counts or more")
    else:
        print("  dask beats numba:     " + (
            "never on this machine (dask's per-client cost is not below numba's)"
            if cx_nb is None else f"above ~{cx_nb:,.0f} clients"))
        print("  dask beats reference: " + (
            "never" if cx_ref is None else f"above ~{cx_ref:,.0f} clients"))
    # ---- bytes
    print("\nbytes per round: dask measured (scheduler nbytes + worker transfer logs) vs "
          "fad.cost per client x clients")
    print(f"{'clients':>9} {'round':>5} {'chunks':>6} {'dask down':>10} {'dask up':>9} "
          f"{'w2w other':>9} {'cost down':>10} {'cost up':>9} {'data (once)':>12}")
    for n, r, m, cd, cu, shipped in bytes_table:
        print(f"{n:>9,} {r:>5} {m['chunks']:>6} {fmt_b(m['down']):>10} {fmt_b(m['up']):>9} "
              f"{fmt_b(m['w2w_other']):>9} {fmt_b(cd):>10} {fmt_b(cu):>9} "
              f"{fmt_b(shipped) if r == 1 else '':>12}")
    db.shutdown()


if __name__ == "__main__":
    main()
