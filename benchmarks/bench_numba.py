"""fadcore (public API, end to end) vs ``jax.jit`` of the DrJAX program vs hand-written NumPy.

    python benchmarks/bench_numba.py             # everything (several minutes)
    python benchmarks/bench_numba.py --quick     # fewer repetitions, no cold compile
    python benchmarks/bench_numba.py --no-startup

Workloads (float64): the gradient of the FedSGD loss ``fed_mse`` at (clients, rows, dim), and
the FedAvg-round hypergradient (``fadcore.examples.make_fedavg_round``: K local SGD steps,
gradient w.r.t. the server step eta and the client weights alpha). fadcore is timed as a
user calls it: ``fad.grad(f)(w, X, y)`` on ``fad.clients(...)`` values (argument checks,
input preparation and output building included). JAX: ``jax.jit(jax.grad(...))`` of the same
program written with DrJAX (``drjax.program``, ``broadcast``, ``map_fn``, ``reduce_mean``),
arguments already on the device. NumPy: vectorized over stacked clients. Times are medians of
interleaved repetitions (the three contenders take turns), milliseconds; the machine's load
average is printed beside them. Then start-up: a new process's first gradient (numba cache
present), and a cold compile (empty numba cache, ``--quick`` skips it). Results are checked
against each other before timing. Never a test: ratios only.
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
from fadcore import numpy as fnp
from fadcore.examples import make_fedavg_round

MSE_SHAPES = [(100, 16, 16), (1000, 16, 16), (10000, 16, 16), (100000, 16, 16),
              (1000, 64, 32), (100, 1000, 256)]
FEDAVG_SHAPES = [(50, 32, 20, 5), (1000, 16, 16, 20)]
CLIENT_LR = 0.1


def load() -> str:
    return "load average %.1f %.1f %.1f" % os.getloadavg()


def interleaved(fns: dict, reps: int, budget: float) -> dict:
    """Median wall time and median CPU time (ms, the process's CPU summed over its threads)
    of each function, the functions taking turns. On a busy machine the CPU time is the
    steadier measure of the work done: waiting for a core does not count."""
    for fn in fns.values():
        fn()
    ts = {k: [] for k in fns}
    cs = {k: [] for k in fns}
    t_end = time.perf_counter() + budget
    for _ in range(reps):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            cs[k].append(time.process_time() - c)
            ts[k].append(time.perf_counter() - t)
        if time.perf_counter() > t_end and len(ts[k]) >= 3:
            break
    out = {k: float(np.median(v)) * 1e3 for k, v in ts.items()}
    out.update({k + " cpu": float(np.median(v)) * 1e3 for k, v in cs.items()})
    return out


# --------------------------------------------------------------------------- fed_mse

def fed_mse(w, X, y):
    r = X @ fad.broadcast(w) - y
    return fad.mean(fnp.mean(r * r))


def numpy_mse_grad(w, X, y):
    n, R, _ = X.shape
    r = X @ w - y
    return np.einsum("ci,cij->j", r, X) * (2.0 / (n * R))


def drjax_mse_grad(n):
    import drjax
    import jax
    import jax.numpy as jnp

    @drjax.program(placements={"clients": n})
    def loss(w, X, y):
        def client_loss(w, X, y):
            r = X @ w - y
            return jnp.mean(r * r)
        return drjax.reduce_mean(drjax.map_fn(client_loss, (drjax.broadcast(w), X, y)))
    return jax.jit(jax.grad(loss))


# --------------------------------------------------------------------------- FedAvg hypergradient

def numpy_fedavg_hypergrad(eta, alpha, w, X, y, K, lr):
    """d loss(w_new) / d(eta, alpha), by hand: forward K local steps, then reverse."""
    n, R, _ = X.shape
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    locs = [np.broadcast_to(w, (n, w.size)).copy()]
    for _ in range(K):
        z = np.einsum("cij,cj->ci", X, locs[-1])
        locs.append(locs[-1] - lr * np.einsum("ci,cij->cj", sig(z) - y, X) / R)
    delta = w - locs[-1]                                  # [n, d]
    A = alpha.sum()
    u = alpha @ delta / A
    w_new = w - eta * u
    z = X @ w_new                                         # [n, R]
    g_w = np.einsum("ci,cij->j", sig(z) - y, X) / (n * R)
    d_eta = -g_w @ u
    # alpha: u = sum_i alpha_i delta_i / A
    d_alpha = -eta * (delta @ g_w - u @ g_w) / A
    # delta_i depends on alpha? no: the local steps depend only on w (wc), not on alpha
    return d_eta, d_alpha


def drjax_fedavg_hypergrad(n, K, lr):
    import drjax
    import jax
    import jax.numpy as jnp

    def client_loss(w, X, y):
        z = X @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    @drjax.program(placements={"clients": n})
    def after_round(eta, alpha, w, X, y):
        wc = drjax.broadcast(w)

        def local_steps(w0, X, y):
            local = w0
            for _ in range(K):
                local = local - lr * jax.grad(client_loss)(local, X, y)
            return w0 - local
        delta = drjax.map_fn(local_steps, (wc, X, y))
        w_new = w - eta * drjax.reduce_weighted_mean(delta, alpha)
        return drjax.reduce_mean(drjax.map_fn(client_loss, (drjax.broadcast(w_new), X, y)))
    return jax.jit(jax.grad(after_round, argnums=(0, 1)))


# --------------------------------------------------------------------------- tables

def _row(label, t):
    nan = float("nan")
    f, j, npy = t["fadcore"], t.get("jax", nan), t.get("numpy", nan)
    fc, jc, nc = t["fadcore cpu"], t.get("jax cpu", nan), t.get("numpy cpu", nan)
    cells = [f"{label:>18s}", f"{f:9.3f}", f"{j:9.3f}", f"{npy:9.3f}", f"{f / j:7.2f}",
             f"{f / npy:9.2f}", f"{fc / jc:7.2f}", f"{fc / nc:9.2f}"]
    print(" | ".join(cells), "|", "%.1f" % os.getloadavg()[0], flush=True)


def _header(first):
    print(" | ".join([f"{first:>18s}", f"{'fadcore':>9s}", f"{'JAX+DrJAX':>9s}",
                      f"{'NumPy':>9s}", f"{'fad/JAX':>7s}", f"{'fad/NumPy':>9s}",
                      f"{'cpu/JAX':>7s}", f"{'cpu/NumPy':>9s}"]), "| load")


def mse_table(reps, budget, jax):
    print("\nfed_mse gradient: wall ms (median of interleaved runs), wall ratios, CPU-time ratios")
    _header("clients,rows,dim")
    for n, R, d in MSE_SHAPES:
        rng = np.random.default_rng(0)
        X = rng.normal(size=(n, R, d))
        y = rng.normal(size=(n, R))
        w = rng.normal(size=d)
        Xc, yc = fad.clients(X), fad.clients(y)
        g = fad.grad(fed_mse)
        want = numpy_mse_grad(w, X, y)
        np.testing.assert_allclose(g(w, Xc, yc), want, rtol=1e-9)
        fns = {"fadcore": lambda: g(w, Xc, yc), "numpy": lambda: numpy_mse_grad(w, X, y)}
        if jax is not None:
            jg = drjax_mse_grad(n)
            wj, Xj, yj = (jax.device_put(a) for a in (w, X, y))
            np.testing.assert_allclose(np.asarray(jg(wj, Xj, yj)), want, rtol=1e-9)
            fns["jax"] = lambda: jg(wj, Xj, yj).block_until_ready()
        big = n * R * d > 5e6
        _row(f"{n},{R},{d}", interleaved(fns, max(3, reps // 3) if big else reps, budget))


def fedavg_table(reps, budget, jax):
    print("\nFedAvg-round hypergradient d loss / d(eta, alpha): same columns")
    _header("clients,rows,dim,K")
    for n, R, d, K in FEDAVG_SHAPES:
        rng = np.random.default_rng(1)
        X = rng.normal(size=(n, R, d)) / np.sqrt(d)
        y = (rng.random((n, R)) < 0.5).astype(np.float64)
        w = rng.normal(size=d)
        alpha = rng.uniform(0.5, 1.5, size=n)
        eta = np.float64(0.5)
        f = make_fedavg_round(K, CLIENT_LR)
        g = fad.grad(f, argnums=(0, 1))
        args = (eta, fad.clients(alpha), w, fad.clients(X), fad.clients(y))
        d_eta, d_alpha = numpy_fedavg_hypergrad(eta, alpha, w, X, y, K, CLIENT_LR)
        got = g(*args)
        np.testing.assert_allclose(got[0], d_eta, rtol=1e-8)
        np.testing.assert_allclose(np.asarray(got[1]), d_alpha, rtol=1e-8, atol=1e-14)
        fns = {"fadcore": lambda: g(*args),
               "numpy": lambda: numpy_fedavg_hypergrad(eta, alpha, w, X, y, K, CLIENT_LR)}
        if jax is not None:
            jg = drjax_fedavg_hypergrad(n, K, CLIENT_LR)
            jargs = [jax.device_put(a) for a in (eta, alpha, w, X, y)]
            out = jg(*jargs)
            np.testing.assert_allclose(float(out[0]), d_eta, rtol=1e-8)
            fns["jax"] = lambda: jax.block_until_ready(jg(*jargs))
        _row(f"{n},{R},{d},{K}", interleaved(fns, reps, budget))


# --------------------------------------------------------------------------- start-up

STARTUP = r"""
import time
t0 = time.perf_counter()
import numpy as np, fadcore as fad
from fadcore import numpy as fnp
t_import = time.perf_counter()
def fed_mse(w, X, y):
    r = X @ fad.broadcast(w) - y
    return fad.mean(fnp.mean(r * r))
rng = np.random.default_rng(0)
X = fad.clients(rng.normal(size=(10, 8, 4))); y = fad.clients(rng.normal(size=(10, 8)))
w = rng.normal(size=4)
g = fad.grad(fed_mse)
t1 = time.perf_counter()
g(w, X, y)
t2 = time.perf_counter()
g(w, X, y)
t3 = time.perf_counter()
print(t_import - t0, t2 - t1, t2 - t0, t3 - t2, time.process_time())
"""

JAX_STARTUP = r"""
import time
t0 = time.perf_counter()
import numpy as np, jax, drjax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
@drjax.program(placements={"clients": 10})
def loss(w, X, y):
    def cl(w, X, y):
        r = X @ w - y
        return jnp.mean(r * r)
    return drjax.reduce_mean(drjax.map_fn(cl, (drjax.broadcast(w), X, y)))
g = jax.jit(jax.grad(loss))
rng = np.random.default_rng(0)
X = rng.normal(size=(10, 8, 4)); y = rng.normal(size=(10, 8)); w = rng.normal(size=4)
t1 = time.perf_counter()
g(w, X, y).block_until_ready()
t2 = time.perf_counter()
print(t1 - t0, t2 - t1, t2 - t0, 0.0, time.process_time())
"""


def _process(code, cache_dir=None):
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return [float(x) for x in out.stdout.split()[-5:]], out.stderr.strip()


def startup_table(quick, jax):
    print("\nstart-up, seconds (a new process; a 10-client fed_mse gradient)")
    print(f"{'':>34s} | {'import':>7s} | {'1st call':>8s} | {'total':>7s} | {'2nd call':>8s}"
          f" | {'CPU s':>6s}")
    runs = [("fadcore, numba cache present", STARTUP, None)]
    if jax is not None:
        runs.append(("JAX+DrJAX (jit compile)", JAX_STARTUP, None))
    tmp = None
    if not quick:
        tmp = tempfile.TemporaryDirectory()
        runs.append(("fadcore, cold (empty numba cache)", STARTUP, tmp.name))
    _process(STARTUP)           # make sure the cache exists
    for label, code, cache in runs:
        (imp, first, total, second, cpu), err = _process(code, cache)
        print(f"{label:>34s} | {imp:7.2f} | {first:8.2f} | {total:7.2f} | {second * 1e3:6.2f}ms"
              f" | {cpu:6.2f} | {load()}")
        if err and cache is not None:
            print(f"{'':>34s}   stderr: {err.splitlines()[-1]}")
    if tmp is not None:
        tmp.cleanup()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-startup", action="store_true")
    ap.add_argument("--only", choices=["mse", "fedavg", "startup"])
    args = ap.parse_args()
    try:
        import logging
        logging.getLogger("absl").setLevel(logging.ERROR)     # DrJAX: "no mesh" notes
        import jax
        jax.config.update("jax_enable_x64", True)
        import drjax  # noqa: F401
    except ImportError:
        print("JAX/DrJAX not installed (pip install jax drjax): their column stays empty")
        jax = None
    import numba
    print(f"fadcore {fad.__version__ if hasattr(fad, '__version__') else ''}; numba "
          f"{numba.__version__}; threads {numba.get_num_threads()}; cpus {os.cpu_count()}; "
          f"{load()}")
    reps, budget = (7, 4.0) if args.quick else (21, 15.0)
    if args.only in (None, "mse"):
        mse_table(reps, budget, jax)
    if args.only in (None, "fedavg"):
        fedavg_table(reps, budget, jax)
    if args.only in (None, "startup") and not args.no_startup:
        startup_table(args.quick, jax)


if __name__ == "__main__":
    main()
