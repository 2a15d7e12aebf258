"""fadcore-numba vs the reference evaluator vs hand-written NumPy (vs JAX if importable).

    python benchmarks/bench_numba.py            # everything (a few minutes)
    python benchmarks/bench_numba.py --quick    # skip cold start and the reference at scale

Prints, per (clients, rows, dim): the federated MSE loss and its gradient (best of several
runs, milliseconds), one streaming pass over the client data (np.sum over X), the machine's
memory bandwidth, and the ratios the targets are stated in; then a FedAvg round with 5 local
steps and its gradient w.r.t. (server step, client weights); then cold start (empty numba
cache) and warm start (new process, cache present). "kernel" times ``execute`` on checked
inputs; "end-to-end" is ``fad.run`` (argument checking included). Never a test: ratios only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import fadcore as fad
from fadcore.examples import make_fedavg_round
from fadcore import numpy as fnp
from fadcore.backends import numba_backend as nb
from fadcore.backends import reference
from fadcore.backends.inputs import prepare_inputs

SHAPES = [(1000, 64, 32), (100, 1000, 256), (10000, 16, 16)]


def best(fn, reps=7, budget=5.0):
    fn()
    ts = []
    t_end = time.perf_counter() + budget
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
        if time.perf_counter() > t_end:
            break
    return min(ts) * 1e3


def fed_mse(w, X, y):
    r = X @ fad.broadcast(w) - y
    return fad.mean(fnp.mean(r * r))


def numpy_mse(w, X, y):
    r = X @ w - y
    return np.mean(np.mean(r * r, axis=1))


def numpy_mse_grad(w, X, y):
    n, R, _ = X.shape
    r = X @ w - y
    return np.einsum("ci,cij->j", r, X) * (2.0 / (n * R))


def bandwidth_gbs():
    a = np.ones(2 ** 25)          # 256 MiB
    b = np.empty_like(a)
    t = best(lambda: np.copyto(b, a), reps=5)
    return 2 * a.nbytes / (t / 1e3) / 1e9     # read + write


def jax_fns():
    try:
        import jax
        import jax.numpy as jnp
        jax.config.update("jax_enable_x64", True)
    except Exception:
        return None

    def loss(w, X, y):
        r = jnp.einsum("cij,j->ci", X, w) - y
        return jnp.mean(jnp.mean(r * r, axis=1))
    try:
        import drjax  # noqa: F401   (DrJAX's map/reduce lower to the same XLA ops)
        name = "JAX (jit, x64; drjax importable)"
    except Exception:
        name = "JAX (jit, x64)"
    return name, jax.jit(loss), jax.jit(jax.grad(loss)), jax


def mse_table(quick):
    bw = bandwidth_gbs()
    print(f"memory bandwidth (copy, read+write): {bw:.1f} GB/s; threads: {nb._num_threads()}")
    jx = jax_fns()
    hdr = ["clients,rows,dim", "stream", "numba loss", "numba grad", "e2e grad", "numpy loss",
           "numpy grad", "ref loss", "ref grad"] + ([jx[0] + " grad"] if jx else []) + [
        "grad/stream", "grad/numpy", "grad/primal"]
    rows_out = []
    for n, R, d in SHAPES:
        rng = np.random.default_rng(0)
        X = rng.normal(size=(n, R, d))
        y = rng.normal(size=(n, R))
        w = rng.normal(size=d)
        Xc, yc = fad.clients(X), fad.clients(y)
        gl = fad.trace(fed_mse).graph(w, Xc, yc)
        gg = fad.grad(fed_mse).graph(w, Xc, yc)
        il = prepare_inputs(gl, [w, Xc, yc])
        ig = prepare_inputs(gg, [w, Xc, yc])
        np.testing.assert_allclose(nb.execute(gg, ig)[0], numpy_mse_grad(w, X, y), rtol=1e-10)
        t_stream = best(lambda: X.sum())
        t_l = best(lambda: nb.execute(gl, il))
        t_g = best(lambda: nb.execute(gg, ig))
        t_e2e = best(lambda: fad.run(gg, w, Xc, yc, backend="numba"), reps=3)
        t_nl = best(lambda: numpy_mse(w, X, y))
        t_ng = best(lambda: numpy_mse_grad(w, X, y))
        if quick and n * R * d > 3e6:
            t_rl = t_rg = float("nan")
        else:
            t_rl = best(lambda: reference.execute(gl, il), reps=1)
            t_rg = best(lambda: reference.execute(gg, ig), reps=1)
        row = [f"{n},{R},{d}", t_stream, t_l, t_g, t_e2e, t_nl, t_ng, t_rl, t_rg]
        if jx:
            _, jl, jg, jax = jx
            Xj, yj, wj = (jax.device_put(a) for a in (X, y, w))
            row.append(best(lambda: jg(wj, Xj, yj).block_until_ready()))
        row += [t_g / t_stream, t_g / t_ng, t_g / t_l]
        rows_out.append(row)
    _print(hdr, rows_out)


def fedavg_table():
    K, lr = 5, 0.1

    after_round = make_fedavg_round(K, lr)

    def numpy_round(eta, alpha, w, X, y):
        n, R, _ = X.shape
        local = np.broadcast_to(w, (n, w.size)).copy()
        for _ in range(K):
            z = np.einsum("cij,cj->ci", X, local)
            s = 1.0 / (1.0 + np.exp(-z)) - y
            local -= lr * np.einsum("ci,cij->cj", s, X) / R
        w_new = w - eta * (alpha @ (w - local)) / alpha.sum()
        z = X @ w_new
        return np.mean(np.mean(np.logaddexp(0.0, z) - y * z, axis=1))

    print("\nFedAvg round, 5 local steps (value; value_and_grad w.r.t. (eta, alpha))")
    hdr = ["clients,rows,dim", "numba value", "numba v&g", "numpy value", "ref value",
           "ref v&g", "v&g/value"]
    rows_out = []
    for n, R, d in [(1000, 64, 32), (100, 1000, 256)]:
        rng = np.random.default_rng(1)
        X = rng.normal(size=(n, R, d)) / np.sqrt(d)
        y = (rng.random((n, R)) < 0.5).astype(np.float64)
        w = rng.normal(size=d)
        alpha = rng.uniform(0.5, 1.5, size=n)
        args = (np.float64(0.5), fad.clients(alpha), w, fad.clients(X), fad.clients(y))
        gv = after_round.graph(*args)
        gg = fad.value_and_grad(after_round, argnums=(0, 1)).graph(*args)
        iv = prepare_inputs(gv, list(args))
        ig = prepare_inputs(gg, list(args))
        np.testing.assert_allclose(nb.execute(gv, iv)[0], numpy_round(0.5, alpha, w, X, y),
                                   rtol=1e-10)
        rows_out.append([
            f"{n},{R},{d}", best(lambda: nb.execute(gv, iv)), best(lambda: nb.execute(gg, ig)),
            best(lambda: numpy_round(0.5, alpha, w, X, y)),
            best(lambda: reference.execute(gv, iv), reps=1),
            best(lambda: reference.execute(gg, ig), reps=1)])
        rows_out[-1].append(rows_out[-1][2] / rows_out[-1][1])
    _print(hdr, rows_out)


STARTUP = r"""
import time, resource
t0 = time.perf_counter()
import numpy as np, fadcore as fad
from fadcore import numpy as fnp
def fed_mse(w, X, y):
    r = X @ fad.broadcast(w) - y
    return fad.mean(fnp.mean(r * r))
rng = np.random.default_rng(0)
X = fad.clients(rng.normal(size=(10, 8, 4))); y = fad.clients(rng.normal(size=(10, 8)))
w = rng.normal(size=4)
g = fad.grad(fed_mse).graph(w, X, y)
fad.run(g, w, X, y, backend="numba")
ru = resource.getrusage(resource.RUSAGE_SELF)
print(time.perf_counter() - t0, ru.ru_utime + ru.ru_stime)
"""


def startup(cache_dir=None):
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    out = subprocess.run([sys.executable, "-c", STARTUP], capture_output=True, text=True,
                         env=env, timeout=1200)
    if out.returncode:
        raise RuntimeError(out.stderr)
    wall, cpu = map(float, out.stdout.split()[-2:])
    return wall, cpu


def startup_table(quick):
    print("\nstart-up (new process: import, trace, derive, lower, first run)")
    if not quick:
        with tempfile.TemporaryDirectory() as tmp:
            wall, cpu = startup(tmp)
            print(f"  cold (empty numba cache): {wall:6.2f} s wall, {cpu:6.2f} s CPU")
    startup()     # make sure the default cache is populated
    res = [startup() for _ in range(3)]
    wall, cpu = min(r[0] for r in res), min(r[1] for r in res)
    print(f"  warm (cache present):     {wall:6.2f} s wall, {cpu:6.2f} s CPU")


def _print(hdr, rows):
    w = [max(len(h), 10) for h in hdr]
    print("  ".join(h.rjust(k) for h, k in zip(hdr, w)))
    for r in rows:
        cells = [r[0]] + [f"{v:.2f}" if isinstance(v, float) else str(v) for v in r[1:]]
        print("  ".join(c.rjust(k) for c, k in zip(cells, w)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(f"fadcore numba backend benchmark (ms, best of several runs); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    mse_table(args.quick)
    fedavg_table()
    startup_table(args.quick)


if __name__ == "__main__":
    main()
