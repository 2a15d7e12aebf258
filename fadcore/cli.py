"""The ``fad`` command."""

from __future__ import annotations

import argparse
import sys


def _demo_regression(args) -> int:
    """Trace a federated regression on generated ragged client data; print graph and value."""
    import numpy as np

    import fadcore as fad
    from fadcore import numpy as fnp

    rng = np.random.default_rng(args.seed)
    d = 8
    w_true = rng.normal(size=d)
    sizes = rng.integers(5, 40, size=args.clients)
    X = [rng.normal(size=(n, d)) for n in sizes]
    y = [x @ w_true + 0.1 * rng.normal(size=len(x)) for x in X]

    @fad.trace
    def fed_mse(w, X, y):
        r = X @ fad.broadcast(w) - y
        return fad.mean(fnp.mean(r * r))

    w0 = np.zeros(d)
    Xc, yc = fad.clients(X), fad.clients(y)
    print(fed_mse.graph(w0, Xc, yc))
    print(f"\nfederated MSE at w=0 over {args.clients} clients "
          f"(rows {sizes.min()}..{sizes.max()}): {float(fed_mse(w0, Xc, yc)):.6f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fad", description="fadcore: federated automatic "
                                     "differentiation")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="run the demo")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo_regression)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
