"""Loops vs unrolled Python loops: the hypergradient of a FedAvg round with K local steps.

    python benchmarks/bench_loops.py [K] [clients] [rows]

Prints, for ``fad.grad(round, argnums=(0, 1))`` (d/d server rate, d/d local rate: through the K
local steps), the graph size (equations, loop bodies included), the time to derive it and the
time to run it, looped (``fad.fori_loop``) vs unrolled (a Python ``for``), and beside them
JAX's ``lax.fori_loop`` version under ``jax.jit`` if JAX is installed. No assertion: figures
and ratios only (docs/modes.md, "Loops").
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np

import fadcore as fad
from fadcore import numpy as fnp

logging.getLogger("fadcore").setLevel(logging.ERROR)


def client_loss(w, X, y):
    z = X @ w
    return fnp.mean(fnp.logaddexp(0.0, z) - y * z)


def make_round(K: int, looped: bool):
    def fedavg_round(eta, lr, w, X, y):
        wc, lrc = fad.broadcast(w), fad.broadcast(lr)

        def step(i, v):
            return v - lrc * fad.grad(client_loss)(v, X, y)
        if looped:
            local = fad.fori_loop(0, K, step, wc)
        else:
            local = wc
            for i in range(K):
                local = step(i, local)
        w_new = w - eta * fad.mean(wc - local)
        return fad.mean(client_loss(fad.broadcast(w_new), X, y))
    return fad.trace(fedavg_round, name="looped" if looped else "unrolled")


def best_of(fn, n=3):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def jax_version(K, args_np):
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    jax.config.update("jax_enable_x64", True)

    def loss(w, X, y):
        z = X @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    def fedavg_round(eta, lr, w, X, y):          # X: [clients, rows, d]
        def local(Xi, yi):
            return jax.lax.fori_loop(0, K, lambda i, v: v - lr * jax.grad(loss)(v, Xi, yi), w)
        locals_ = jax.vmap(local)(X, y)
        w_new = w - eta * jnp.mean(w - locals_, axis=0)
        return jnp.mean(jax.vmap(loss, in_axes=(None, 0, 0))(w_new, X, y))

    g = jax.jit(jax.grad(fedavg_round, argnums=(0, 1)))
    t = time.perf_counter()
    jax.block_until_ready(g(*args_np))
    compile_s = time.perf_counter() - t
    run_s, out = best_of(lambda: jax.block_until_ready(g(*args_np)))
    return compile_s, run_s, np.asarray(out)


def main():
    K = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    rows = int(sys.argv[3]) if len(sys.argv) > 3 else 50
    d = 10
    rng = np.random.default_rng(0)
    Xs = rng.normal(size=(n, rows, d)) / np.sqrt(d)
    ys = (rng.uniform(size=(n, rows)) < 0.5).astype(float)
    args = (1.0, 0.1, np.zeros(d), fad.clients(list(Xs)), fad.clients(list(ys)))
    print(f"FedAvg round, K={K} local steps, {n} clients x {rows} rows, d={d}: "
          "fad.grad(round, argnums=(0, 1))")
    res = {}
    for looped in (True, False):
        f = make_round(K, looped)
        t = time.perf_counter()
        g = fad.grad(f, argnums=(0, 1)).graph(*args)
        derive = time.perf_counter() - t
        size = sum(1 for _ in g.walk())
        run_ref, out = best_of(lambda: fad.run(g, *args, backend="reference"), 1 if not looped else 3)
        row = dict(eqns=size, derive=derive, run_reference=run_ref, out=np.asarray(out, dtype=float))
        if not looped:
            t = time.perf_counter()
            fad.run(g, *args, backend="numba")
            row["numba_first"] = time.perf_counter() - t
            row["run_numba"], _ = best_of(lambda: fad.run(g, *args, backend="numba"))
        res["looped" if looped else "unrolled"] = row
    L, U = res["looped"], res["unrolled"]
    print(f"  {'':28s}{'looped':>14s}{'unrolled':>14s}{'ratio':>10s}")
    print(f"  {'equations (bodies incl.)':28s}{L['eqns']:>14,d}{U['eqns']:>14,d}"
          f"{U['eqns'] / L['eqns']:>9.1f}x")
    print(f"  {'derive (s)':28s}{L['derive']:>14.3f}{U['derive']:>14.3f}"
          f"{U['derive'] / L['derive']:>9.1f}x")
    print(f"  {'run, reference (s)':28s}{L['run_reference']:>14.3f}{U['run_reference']:>14.3f}"
          f"{U['run_reference'] / L['run_reference']:>9.1f}x")
    print(f"  {'run, numba (s, warm)':28s}{'(reference)':>14s}{U['run_numba']:>14.3f}"
          f"{U['run_numba'] / L['run_reference']:>9.2f}x")
    print(f"  {'numba first call (s)':28s}{'':>14s}{U['numba_first']:>14.3f}")
    print(f"  max |looped - unrolled| = {np.max(np.abs(L['out'] - U['out'])):.2e}")
    times = []
    for mode, state in (("forward", "stateful"), ("reverse", "stateful"), ("reverse", "remat"),
                        ("mixed", "stateful"), ("auto", "stateful")):
        f = make_round(K, True)
        t = time.perf_counter()
        fad.grad(f, argnums=(0, 1), mode=mode, state=state).graph(*args)
        times.append(f"{mode}{'/remat' if state == 'remat' else ''} {time.perf_counter() - t:.3f}")
    print(f"  derive time of the looped gradient by mode (s): {', '.join(times)}")
    jx = jax_version(K, (1.0, 0.1, np.zeros(d), Xs, ys))
    if jx is None:
        print("  JAX: not installed (pip install jax)")
    else:
        compile_s, run_s, out = jx
        print(f"  JAX lax.fori_loop + jit: compile {compile_s:.3f} s, run {run_s * 1e3:.2f} ms "
              f"(looped fadcore on the reference evaluator / JAX = "
              f"{L['run_reference'] / run_s:.0f}x); max |fadcore - JAX| = "
              f"{np.max(np.abs(L['out'] - out)):.2e}")


if __name__ == "__main__":
    main()
