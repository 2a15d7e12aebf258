"""Precision of gradients computed under secure aggregation (docs/secure-aggregation.md).

Prints, for the secure FedAvg hypergradient and the clipped second-order secure-sum program of
tests/test_secure_aggregation.py (8 clients, d = 5), the largest absolute difference between
the gradient under secure aggregation (in-process runtime, numba client steps) and the exact
gradient (numba backend), per mode and fixed point fraction bits, with the per-sum bound
n * 2**-(f+1). Run: python benchmarks/secure_precision.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import fadcore as fad  # noqa: E402
from test_secure_aggregation import SECURE, _max_err, _programs  # noqa: E402

FRAC_BITS = (16, 24, 32)


def main() -> None:
    print(f"{'program':24s}{'mode':9s}" + "".join(f"f={f:<10d}" for f in FRAC_BITS))
    n = None
    for name, (f, args, argnums) in _programs().items():
        n = len(args[-1])
        want = fad.grad(f, argnums=argnums)(*args)
        for mode in ("reverse", "forward", "mixed", "auto"):
            gf = fad.grad(f, argnums=argnums, mode=mode, policy=SECURE)
            errs = [_max_err(gf.run(*args, secure_aggregation=fad.SecureAggregation(
                frac_bits=fb, bound=2.0 ** 16)), want) for fb in FRAC_BITS]
            print(f"{name:24s}{mode:9s}" + "".join(f"{e:<12.1e}" for e in errs))
    bounds = [fad.SecureAggregation(frac_bits=fb, bound=2.0 ** 16).error_bound(n)
              for fb in FRAC_BITS]
    print(f"{'bound n*2^-(f+1)':33s}" + "".join(f"{b:<12.1e}" for b in bounds))


if __name__ == "__main__":
    main()
