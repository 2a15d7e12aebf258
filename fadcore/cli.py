"""The ``fad`` command."""

from __future__ import annotations

import argparse
import sys


_DEMO_DESCRIPTION = """\
Run the paper's two applications of federated automatic differentiation (Rush, Charles &
Garrett, JMLR 2024) and report them.

1. Learned server learning rate. FedAvg (softmax regression, local gradient steps on each
   client of a sampled cohort) with a fixed server learning rate for each value of a grid, then
   FedAvg whose server learning rate is learned online by hypergradient descent (Baydin et al.
   2018): each round, FAD differentiates the cohort's loss after the round w.r.t. the server
   rate, through the round's communication (broadcast, local training, weighted mean, server
   step, broadcast, mean). The learned rate starts 10x below and 10x above the best rate of the
   grid.
2. Learned client weights. A fraction of the clients get random labels. FedAvg with uniform
   client weights vs weights learned from FAD gradients of a clean server-held validation loss
   w.r.t. each client's weight in the weighted mean (one gradient per client); FedAvg on the
   clean clients only is shown as a reference.

Data is generated (Synthetic(1,1) of Li et al.) or ships with scikit-learn (digits); nothing is
downloaded. A progress bar goes to stderr; the results tables (final test accuracy and loss,
rounds to a target accuracy, learned rates and weights) to stdout; every curve to
OUT/fad-demo.json and a plot to OUT/fad-demo.png (needs matplotlib).
"""


class _ProgressBar:
    """A plain text progress bar on stderr: redrawn in place on a terminal, one line per
    finished run otherwise."""

    def __init__(self, total: int, stream=None, width: int = 28):
        import time
        self.total, self.done, self.width = max(1, total), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last = time.perf_counter()

    def __call__(self, label: str, round_: int, rounds: int) -> None:
        import time
        self.done += 1
        now = time.perf_counter()
        finished_run = round_ == rounds
        if not (finished_run or (self.tty and now - self.last > 0.1)):
            return
        self.last = now
        frac = min(1.0, self.done / self.total)
        bar = "#" * int(round(frac * self.width))
        elapsed = now - self.start
        left = elapsed * (1 - frac) / frac if frac > 0 else 0.0
        line = (f"[{bar:<{self.width}}] {100 * frac:3.0f}%  {label}: round {round_}/{rounds}  "
                f"{elapsed:5.0f}s elapsed, ~{left:.0f}s left")
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _demo_config(args):
    from fadcore.algorithms.experiments import DemoConfig
    kw = {"dataset": args.dataset, "seed": args.seed, "model": args.model,
          "noisy_fraction": args.noisy_fraction,
          "experiments": tuple(e for e in args.experiments.split(",") if e)}
    for name in ("rounds", "clients_per_round", "target"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.lr_grid:
        kw["lr_grid"] = tuple(float(x) for x in args.lr_grid.split(","))
    bad = set(kw["experiments"]) - {"lr", "weights"}
    if bad or not kw["experiments"]:
        raise SystemExit("fad demo: --experiments takes lr and/or weights, got "
                         f"{args.experiments!r}")
    if kw.get("rounds", 1) < 1:
        raise SystemExit("fad demo: --rounds must be at least 1")
    if kw.get("clients_per_round", 2) < 2:
        raise SystemExit("fad demo: --clients-per-round must be at least 2 (a cohort of clients "
                         "with different row counts keeps one ragged graph for every round)")
    if args.smoke:
        return DemoConfig.smoke(**kw)
    return DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)


def _demo(args) -> int:
    """Run the learned-LR and learned-client-weights experiments; tables, JSON and plot."""
    import fadcore as fad

    cfg = _demo_config(args)
    previous_backend = fad.default_backend()
    try:
        if args.backend:
            fad.set_default_backend(args.backend)
    except fad.FadError as e:
        raise SystemExit(f"fad demo: {e}") from None
    try:
        return _run_demo(cfg, args)
    finally:
        fad.set_default_backend(previous_backend)


def _run_demo(cfg, args) -> int:
    import json
    import os
    import time

    import fadcore as fad
    from fadcore.algorithms import experiments as ex

    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    bar = _ProgressBar(ex.total_rounds(cfg))
    results = {}
    print(f"fad demo: {cfg.model}, {cfg.rounds} rounds, {cfg.clients_per_round} clients/round, "
          f"seed {cfg.seed}, backend {fad.default_backend()}", file=sys.stderr)
    try:
        if "lr" in cfg.experiments:
            results["lr"] = ex.lr_experiment(cfg, lambda lab, r: bar(lab, r, cfg.rounds))
        if "weights" in cfg.experiments:
            results["weights"] = ex.weights_experiment(cfg,
                                                       lambda lab, r: bar(lab, r, cfg.rounds))
    except (ValueError, ImportError) as e:   # e.g. a cohort larger than the data set; no
        raise SystemExit(f"fad demo: {e}") from None   # scikit-learn for --dataset digits
    seconds = time.perf_counter() - t0
    print(ex.results_tables(results, cfg))
    doc = ex.results_json(results, cfg)
    doc.update(seconds=round(seconds, 2), backend=fad.default_backend(),
               fadcore_version=fad.__version__)
    json_path = os.path.join(args.out, "fad-demo.json")
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\ncurves: {json_path}")
    png_path = os.path.join(args.out, "fad-demo.png")
    try:
        ex.plot_results(results, cfg, png_path)
        print(f"plot:   {png_path}")
    except ImportError:
        print("plot:   skipped, matplotlib is not installed (pip install matplotlib); "
              "the JSON above has every curve")
    print(f"total time {seconds:.1f}s")
    return 0


def _load(spec: str):
    """``module:attr`` imported as ``python -m`` would: the current directory comes first on
    the module path, so ``fad inspect mymod:fn`` finds ./mymod.py."""
    import importlib
    import os
    mod_name, _, attr = spec.partition(":")
    if not attr or not mod_name:
        raise SystemExit(f"fad inspect: expected module:function (e.g. mymod:loss for "
                         f"./mymod.py), got {spec!r}")
    if mod_name.endswith(".py"):
        raise SystemExit(f"fad inspect: give the module name, not the file: "
                         f"{mod_name[:-3].replace(os.sep, '.')}:{attr}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise SystemExit(
                f"fad inspect: no module named {mod_name!r} in {cwd} or on the module path; run "
                "fad from the directory holding it, or add that directory to PYTHONPATH"
            ) from None
        raise
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
    _write_graphs(graphs, fname, args)
    if not args.quiet:
        for name, g in graphs.items():
            print(f"== {name}: {len(g.eqns)} equations ==")
            print(g)
            print()
        print(f"== cost (clients={args.clients}, rows={args.rows}) ==")
    print(cost_table({n: fad.cost(g, clients=args.clients, rows=args.rows)
                      for n, g in graphs.items()}))
    if args.quiet:
        return 0
    if "auto" in graphs:
        print()
        print(fad.explain(graphs["auto"]))
    for n in notes:
        print(f"(not available) {n}")
    return 0


def _export(args) -> int:
    """Write a deployable Flower app (ServerApp, ClientApp, pyproject.toml) for a function."""
    import fadcore as fad
    from fadcore.backends.flower.export import export_app
    mod, fn = _load(args.function)
    fname = args.function.partition(":")[2]
    make = (_load(args.args)[1] if args.args else
            getattr(mod, f"example_args_{fname}", None) or getattr(mod, "example_args", None))
    if make is None:
        raise SystemExit(f"fad export: give --args module:callable returning the arguments "
                         f"(or define example_args_{fname} in {mod.__name__})")
    client_data = args.client_data
    if client_data is None:
        if not hasattr(mod, f"client_data_{fname}"):
            raise SystemExit(f"fad export: give --client-data module:function (what each node "
                             f"calls to load its own data), or define client_data_{fname} in "
                             f"{mod.__name__}")
        client_data = f"{mod.__name__}:client_data_{fname}"
    try:
        pdir = export_app(fad.trace(fn), tuple(make()), args.out, client_data,
                          spec=args.function)
    except fad.FadError as e:
        raise SystemExit(f"fad export: {e}") from None
    print(f"wrote a Flower app to {args.out} ({pdir}); see {args.out}/README.md")
    return 0


def _write_graphs(graphs: dict, fname: str, args) -> None:
    """``--dot DIR`` / ``--json DIR``: one file per graph, ``<function>.<variant>.dot|json``."""
    import os
    for flag, ext in (("dot", "dot"), ("json", "json")):
        out = getattr(args, flag)
        if not out:
            continue
        os.makedirs(out, exist_ok=True)
        for name, g in graphs.items():
            path = os.path.join(out, f"{fname}.{name.replace('/', '-')}.{ext}")
            with open(path, "w") as f:
                f.write(g.to_dot() if ext == "dot" else g.to_json(indent=1))
            print(f"wrote {path}", file=sys.stderr)


def _version() -> str:
    from fadcore import __version__
    return __version__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fad", description="fadcore: federated automatic "
                                     "differentiation")
    parser.add_argument("--version", action="version", version=f"fad (fadcore) {_version()}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser(
        "demo", help="learned server learning rate and learned client weights (FAD)",
        description=_DEMO_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="60 rounds instead of 150 (well under two minutes on 2 cores)")
    p.add_argument("--rounds", type=int, help="rounds per run (default 150, --quick 60)")
    p.add_argument("--clients-per-round", type=int,
                   help="clients sampled per round, without replacement (default 10)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data, the initial model, the cohorts and the label noise")
    p.add_argument("--out", default="fad-demo-out",
                   help="directory for fad-demo.json and fad-demo.png (default fad-demo-out/)")
    p.add_argument("--dataset", choices=("synthetic", "digits"),
                   help="data of both experiments (default: synthetic for the learning rate, "
                   "digits for the client weights). synthetic: Synthetic(1,1), 30 clients, 60 "
                   "features, 10 classes, generated; digits: scikit-learn's 8x8 digits over 20 "
                   "non-IID clients (Dirichlet 0.5 label skew)"),
    p.add_argument("--backend", help="execution backend (default: fadcore's default; "
                   "reference, numba, dask or flower where available: flower runs every "
                   "round on a Flower simulation, see docs/flower.md)")
    p.add_argument("--model", choices=("softmax", "mlp"), default="softmax",
                   help="softmax regression (default) or an MLP with one tanh hidden layer")
    p.add_argument("--lr-grid", default="",
                   help="comma-separated fixed server rates (default 0.3,1,3,10,30)")
    p.add_argument("--noisy-fraction", type=float, default=0.5,
                   help="fraction of clients whose labels are replaced by noise (default 0.5)")
    p.add_argument("--target", type=float, help="accuracy for 'rounds to target' (default: "
                   "95%% of the best fixed rate's final accuracy, rounded down)")
    p.add_argument("--experiments", default="lr,weights",
                   help="which to run: lr, weights or lr,weights (default)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_demo)
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
    p.add_argument("--quiet", action="store_true", help="print the cost table only")
    p.add_argument("--dot", metavar="DIR", help="also write each graph as Graphviz DOT to "
                   "DIR/<function>.<variant>.dot (render: dot -Tsvg FILE -o FILE.svg)")
    p.add_argument("--json", metavar="DIR", help="also write each graph as JSON "
                   "(fad.Graph.from_json loads it) to DIR/<function>.<variant>.json")
    p.set_defaults(func=_inspect)
    p = sub.add_parser(
        "export", help="write a deployable app for a federated runtime (flower)",
        description="Trace module:function at example arguments and write a Flower app "
        "(ServerApp, ClientApp, pyproject.toml) that runs its graph with `flwr run`; each node "
        "loads its own data with the --client-data function. See docs/flower.md.")
    p.add_argument("runtime", choices=("flower",), help="the runtime (flower)")
    p.add_argument("function", help="module:function (a @fad.trace function, fad.grad(...), "
                   "or a plain function)")
    p.add_argument("--out", required=True, help="directory to write the app to")
    p.add_argument("--args", help="module:callable returning the argument tuple (default: "
                   "example_args_<function>): SERVER values are saved, client types kept")
    p.add_argument("--client-data", help="module:function each node calls with its "
                   "node_config, returning its arrays for the client arguments (default: "
                   "client_data_<function> in the same module)")
    p.set_defaults(func=_export)
    p = sub.add_parser("warmup", help="compile the numba backend into its disk cache now",
                       description="Compile (or load) the numba backend's kernels so that no "
                       "later call pays the first-run compile (same as python -m fadcore.warmup)")
    p.set_defaults(func=lambda args: (__import__("fadcore.warmup").warmup.warmup(), 0)[1])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
