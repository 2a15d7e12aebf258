"""Transforms made in a loop, and the price of ``mode="auto"``'s search.

    python benchmarks/bench_transforms.py

1. ``fad.grad(f)(x)`` written inside a Python loop (the transform made anew each iteration)
   against the same gradient function made once: transforms are memoized per function and
   options, so the loop pattern no longer re-traces, re-derives and re-lowers.
2. ``per-example gradients``: ``fad.vmap(fad.grad(loss))`` inside a client against a Python
   loop of ``fad.grad(loss)`` calls, one per row.
3. derive time of ``mode="auto"`` (every candidate mode built and costed) against reverse
   mode's, on the FedAvg server-learning-rate hypergradient.

Prints ratios; the numbers are machine-dependent.
"""

from __future__ import annotations

import time

import numpy as np

import fadcore as fad
from fadcore import numpy as fnp


def best(fn, repeat=5, number=20):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number)
    return min(times)


def loss(w, X, y):
    r = X @ fad.broadcast(w) - y
    return fad.mean(fnp.mean(r * r))


def example_loss(w, x, y):
    z = fnp.dot(x, w)
    return fnp.logaddexp(0.0, z) - y * z


def main():
    rng = np.random.default_rng(0)
    w = rng.normal(size=8)
    X = fad.clients([rng.normal(size=(n, 8)) for n in rng.integers(20, 40, size=16)])
    y = fad.clients([rng.normal(size=len(x)) for x in X.tolist()])

    fad.grad(loss)(w, X, y)
    made_once = fad.grad(loss)
    t_loop = best(lambda: fad.grad(loss)(w, X, y))
    t_once = best(lambda: made_once(w, X, y))
    print(f"fad.grad(f)(x) in a loop: {t_loop * 1e3:.3f} ms/call, made once "
          f"{t_once * 1e3:.3f} ms/call: ratio {t_loop / t_once:.2f}")

    xs, ys = rng.normal(size=(64, 8)), (rng.random(64) > 0.5).astype(float)
    per_example = fad.vmap(fad.grad(example_loss), in_axes=(None, 0, 0))
    one = fad.grad(example_loss)
    per_example(w, xs, ys)
    t_vmap = best(lambda: per_example(w, xs, ys), number=5)
    t_rows = best(lambda: [one(w, xs[i], ys[i]) for i in range(64)], number=1)
    print(f"64 per-example gradients: vmap {t_vmap * 1e3:.3f} ms, a loop of grad calls "
          f"{t_rows * 1e3:.3f} ms: ratio {t_rows / t_vmap:.1f}")

    from fadcore.examples import example_args_fedavg_round, fedavg_round
    args = example_args_fedavg_round()
    fedavg_round.graph(*args)
    for argnums in (0, (0, 1)):
        t = time.perf_counter()
        fad.grad(fedavg_round, argnums=argnums, mode="reverse").graph(*args)
        t_rev = time.perf_counter() - t
        t = time.perf_counter()
        g = fad.grad(fedavg_round, argnums=argnums, mode="auto").graph(*args)
        t_auto = time.perf_counter() - t
        n = sum("cost" in r for r in g.meta["auto"]["candidates"])
        print(f"fedavg_round argnums={argnums}: auto derives {n} candidates in "
              f"{t_auto * 1e3:.0f} ms, reverse alone {t_rev * 1e3:.0f} ms: ratio "
              f"{t_auto / t_rev:.1f}; chose {g.meta['auto']['chosen']}")


if __name__ == "__main__":
    main()
