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


def _load(spec: str):
    import importlib
    mod_name, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"fad inspect: expected module:function, got {spec!r}")
    mod = importlib.import_module(mod_name)
    try:
        return mod, getattr(mod, attr)
    except AttributeError:
        raise SystemExit(f"fad inspect: module {mod_name} has no {attr!r}") from None


def _inspect(args) -> int:
    """Print a function's graph, its derivative graphs in every mode and their costs."""
    import fadcore as fad
    from fadcore.ir.cost import cost_table
    mod, fn = _load(args.function)
    fname = args.function.partition(":")[2]
    if args.args:
        _, make = _load(args.args)
    else:
        make = getattr(mod, f"example_args_{fname}", None) or getattr(mod, "example_args", None)
        if make is None:
            raise SystemExit(f"fad inspect: give --args module:callable returning the arguments "
                             f"(or define example_args_{fname} in {mod.__name__})")
    call_args = tuple(make())
    fn = fad.trace(fn)
    argnums = tuple(int(a) for a in args.argnums.split(",")) if args.argnums else 0
    argnums = argnums[0] if isinstance(argnums, tuple) and len(argnums) == 1 else argnums
    graphs = {"primal": fn.graph(*call_args)}
    variants = [("reverse", dict(mode="reverse")),
                ("reverse/remat", dict(mode="reverse", state="remat")),
                ("forward", dict(mode="forward")),
                ("mixed", dict(mode="mixed")),
                ("auto", dict(mode="auto"))]
    notes = []
    for name, kw in variants:
        try:
            graphs[name] = fad.grad(fn, argnums=argnums, **kw).graph(*call_args)
        except fad.FadError as e:
            notes.append(f"{name}: {e}")
    for name, g in graphs.items():
        print(f"== {name}: {len(g.eqns)} equations ==")
        print(g if not args.quiet else "(graph omitted: --quiet)")
        print()
    print(f"== cost (clients={args.clients}, rows={args.rows}) ==")
    print(cost_table({n: fad.cost(g, clients=args.clients, rows=args.rows)
                      for n, g in graphs.items()}))
    if "auto" in graphs:
        print()
        print(fad.explain(graphs["auto"]))
    for n in notes:
        print(f"(not available) {n}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fad", description="fadcore: federated automatic "
                                     "differentiation")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="run the demo")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo_regression)
    p = sub.add_parser(
        "inspect", help="print a function's graph, derivative graphs and cost tables",
        description="Trace module:function at example arguments and print its graph, its "
        "gradient graphs in every mode (reverse stateful/remat, forward, mixed, auto) and their "
        "cost tables side by side. Try: fad inspect fadcore.examples:fedavg_round --argnums 0,1")
    p.add_argument("function", help="module:function (a @fad.trace function or plain function)")
    p.add_argument("--args", help="module:callable returning the argument tuple "
                   "(default: example_args_<function> in the same module)")
    p.add_argument("--argnums", default="", help="comma-separated argument indices (default 0)")
    p.add_argument("--clients", type=int, default=100, help="clients for the cost table")
    p.add_argument("--rows", type=int, default=100, help="rows per client for the cost table")
    p.add_argument("--quiet", action="store_true", help="print the cost tables only")
    p.set_defaults(func=_inspect)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
