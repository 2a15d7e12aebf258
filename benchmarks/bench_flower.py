"""The Flower backend: start-up, seconds per round, and bytes per round from the messages
beside ``fad.cost``'s prediction, for fed_mse in every mode and the FedAvg hypergradient.

    python benchmarks/bench_flower.py [--nodes 10] [--repeat 3]

Prints one table; every value is also checked against the numba backend (1e-12).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import fadcore as fad
from fadcore.backends import flower
from fadcore.examples import (example_args_fed_mse, example_args_fedavg_round, fed_mse,
                              fedavg_round, two_round)


def graphs():
    a = example_args_fed_mse()
    h = example_args_fedavg_round()
    yield "fed_mse primal", fed_mse.graph(*a), a
    for name, kw in [("reverse", {}), ("reverse remat", dict(state="remat")),
                     ("forward", dict(mode="forward")), ("mixed", dict(mode="mixed")),
                     ("auto", dict(mode="auto"))]:
        yield f"fed_mse {name}", fad.grad(fed_mse, **kw).graph(*a), a
    yield "two_round reverse", fad.grad(two_round).graph(*a), a
    yield "fedavg hypergrad (eta, alpha)", fad.grad(fedavg_round, argnums=(0, 1)).graph(*h), h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    sim = flower.Simulation(args.nodes)
    flower.set_default_simulation(sim)
    print(f"simulation start (Ray, {args.nodes} nodes): {sim.start_seconds:.1f}s "
          f"(constructor returned after {time.perf_counter() - t0:.1f}s)")
    print(f"{'graph':32s} {'round':>5s} {'down B/node':>12s} {'cost':>6s} {'up B/node':>10s} "
          f"{'cost':>6s} {'all down B':>10s} {'all up B':>9s} {'first s':>8s} {'warm s':>7s}")
    for name, g, a in graphs():
        t = time.perf_counter()
        got = fad.run(g, *a, backend="flower")
        first = time.perf_counter() - t
        traffic = flower.last_traffic()
        warm = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fad.run(g, *a, backend="flower")
            warm.append(time.perf_counter() - t)
        want = fad.run(g, *a, backend="numba")
        for x, y in zip(fad.pytree.flatten(got)[0], fad.pytree.flatten(want)[0]):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-14)
        c = fad.cost(g, clients=len(a[1]), rows=1)
        pred = {r: (d, u) for r, d, u, _ in c.per_round}
        for i, tr in enumerate(traffic):
            d, u = pred.get(tr.round, ("-", "-"))
            print(f"{name if i == 0 else '':32s} {tr.round:5d} {tr.down_values:12d} {d!s:>6s} "
                  f"{tr.up_values:10d} {u!s:>6s} {tr.down_bytes:10d} {tr.up_bytes:9d} "
                  + (f"{first:8.2f} {min(warm):7.2f}" if i == 0 else ""))
    flower.shutdown()


if __name__ == "__main__":
    main()
