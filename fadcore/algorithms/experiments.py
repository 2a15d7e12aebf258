"""The paper's two experiments, as run by ``fad demo``.

1. **Learned server learning rate** (:func:`lr_experiment`): FedAvg with a fixed server
   learning rate for every value of a grid, then FedAvg whose rate is learned online by
   hypergradient descent (:class:`HypergradientLR`, FAD hypergradient through the round),
   started 10x below and 10x above the best rate of the grid.
2. **Learned client weights** (:func:`weights_experiment`): a fraction of the clients have
   corrupted labels (:meth:`FederatedDataset.corrupt_labels`); FedAvg with uniform weights vs
   weights learned from FAD gradients of a clean server-held validation loss
   (:class:`ClientWeights`), with FedAvg on the clean clients only as a reference.

Everything is reproducible from :attr:`DemoConfig.seed`. The reported test set is the pooled
held-out split minus the rows given to the server as validation data (the same test rows for
both experiments).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from fadcore import datasets

from .client_weights import ClientWeights
from .fedopt import FedOpt
from .hypergradient import HypergradientLR
from .models import mlp, softmax_regression
from .optimizers import server_optimizer
from .training import RunResult, split_server_data, train

__all__ = ["DemoConfig", "load_data", "make_algorithm", "lr_experiment", "weights_experiment",
           "results_tables", "results_json", "plot_results", "total_rounds"]


@dataclass
class DemoConfig:
    """Every knob of the demo; :func:`DemoConfig.quick` and ``smoke`` are smaller presets."""

    dataset: str | None = None            # "synthetic" (Synthetic(1,1)) or "digits" for both
                                          # experiments; None: synthetic for the learning
                                          # rate, digits for the client weights
    model: str = "softmax"                # "softmax" (softmax regression) or "mlp"
    hidden: int = 32                      # MLP hidden units
    rounds: int = 150
    clients_per_round: int = 10
    seed: int = 0
    local_steps: int = 10
    client_lr: float = 0.1
    server_optimizer: str = "sgd"         # FedAvg; "momentum", "adam": FedOpt
    lr_grid: tuple = (0.3, 1.0, 3.0, 10.0, 30.0)
    hyper_beta: float = 0.3               # HypergradientLR step (log-eta units per round)
    hyper_rule: str = "normalized"
    noisy_fraction: float = 0.5
    weights_lr: float = 0.3               # ClientWeights step (log-weight units per round)
    weights_shrink: float = 0.0
    weights_eta: float = 1.0              # server rate of the client-weights runs (FedAvg)
    validation_fraction: float = 0.3      # share of the pooled held-out rows the server keeps
    target: float | None = None           # accuracy for "rounds to target" (None: see below)
    experiments: tuple = ("lr", "weights")
    data_kwargs: dict = field(default_factory=dict)   # {dataset: generator keyword args}

    @classmethod
    def quick(cls, **kw) -> "DemoConfig":
        return cls(**{"rounds": 60, **kw})

    @classmethod
    def smoke(cls, **kw) -> "DemoConfig":
        """Tiny sizes for tests: a few clients, a few rounds, a two-point grid."""
        base = {"rounds": 4, "clients_per_round": 3, "lr_grid": (1.0, 3.0), "local_steps": 2,
                "data_kwargs": {"synthetic": {"num_clients": 8, "dim": 10, "num_classes": 4,
                                              "max_samples": 60},
                                "digits": {"num_clients": 6}}}
        return cls(**{**base, **kw})


def total_rounds(cfg: DemoConfig) -> int:
    """Rounds the demo runs in all (for a progress bar)."""
    n = 0
    if "lr" in cfg.experiments:
        n += cfg.rounds * (len(cfg.lr_grid) + 2)
    if "weights" in cfg.experiments:
        n += cfg.rounds * 3
    return n


# --------------------------------------------------------------------------- set-up

def load_data(cfg: DemoConfig, default: str = "synthetic") -> datasets.FederatedDataset:
    """``cfg.dataset`` (or ``default`` when it is None), generated from ``cfg.seed``."""
    name = cfg.dataset or default
    kw = cfg.data_kwargs.get(name, {})
    if name == "synthetic":
        return datasets.synthetic(1.0, 1.0, seed=cfg.seed, **kw)
    if name == "digits":
        return datasets.digits(seed=cfg.seed, **kw)
    raise ValueError(f"dataset must be 'synthetic' or 'digits', got {name!r}")


def make_algorithm(cfg: DemoConfig, data) -> FedOpt:
    if cfg.model == "softmax":
        model = softmax_regression(data.dim, data.num_classes)
    elif cfg.model == "mlp":
        model = mlp(data.dim, cfg.hidden, data.num_classes)
    else:
        raise ValueError(f"model must be 'softmax' or 'mlp', got {cfg.model!r}")
    return FedOpt(model, server_optimizer(cfg.server_optimizer), local_steps=cfg.local_steps,
                  client_lr=cfg.client_lr)


def _fmt_eta(x: float) -> str:
    return f"{x:g}"


# --------------------------------------------------------------------------- experiment 1

def lr_experiment(cfg: DemoConfig, progress: Callable | None = None) -> dict:
    """Fixed rates of ``cfg.lr_grid`` vs the FAD-learned rate from best/10 and best*10."""
    data = load_data(cfg, "synthetic")
    _, test = split_server_data(data, cfg.validation_fraction, cfg.seed)
    alg = make_algorithm(cfg, data)
    runs: list[RunResult] = []

    def run(label, eta, kind, start=None):
        res = train(alg, data, rounds=cfg.rounds, clients_per_round=cfg.clients_per_round,
                    eta=eta, test=test, seed=cfg.seed, label=label,
                    progress=progress and (lambda r: progress(label, r)))
        res.info.update(kind=kind, eta0=start if start is not None else eta)
        runs.append(res)
        return res

    for eta in cfg.lr_grid:
        run(f"fixed eta={_fmt_eta(eta)}", float(eta), "fixed")
    fixed = list(runs)
    best = max(fixed, key=lambda r: (_final_acc(r), -r.final("test_loss")))
    best_eta = best.info["eta0"]
    for factor, word in ((0.1, "10x too small"), (10.0, "10x too large")):
        start = best_eta * factor
        lr = HypergradientLR(start, beta=cfg.hyper_beta, rule=cfg.hyper_rule)
        run(f"learned from {_fmt_eta(start)} ({word})", lr, "learned", start)
    target = cfg.target if cfg.target is not None else _default_target(best)
    return {"dataset": data.name, "best_fixed_eta": best_eta, "target": target,
            "num_traces": alg.num_traces, "runs": runs}


def _final_acc(r: RunResult) -> float:
    a = r.final("test_acc")
    return a if math.isfinite(a) else -1.0


def _default_target(best: RunResult) -> float:
    """95% of the best fixed rate's final accuracy, rounded down to 0.01."""
    return math.floor(95.0 * _final_acc(best)) / 100.0


# --------------------------------------------------------------------------- experiment 2

def _weights_default_dataset() -> tuple[str, str | None]:
    """digits if scikit-learn is there, else Synthetic(1,1) and a note saying so."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return "synthetic", ("scikit-learn is not installed, so the client-weights experiment "
                             "runs on Synthetic(1,1) instead of digits, where label noise is "
                             "much harder to tell from client heterogeneity (see "
                             "docs/experiments.md); pip install scikit-learn for digits")
    return "digits", None


def weights_experiment(cfg: DemoConfig, progress: Callable | None = None) -> dict:
    """Uniform vs FAD-learned client weights with ``cfg.noisy_fraction`` of the clients'
    labels replaced by noise, at the server rate ``cfg.weights_eta``. Runs on digits unless
    ``cfg.dataset`` says otherwise (on Synthetic(1,1), with a note, without scikit-learn)."""
    default, note = _weights_default_dataset() if cfg.dataset is None else (cfg.dataset, None)
    clean_data = load_data(cfg, default)
    data = clean_data.corrupt_labels(cfg.noisy_fraction, seed=cfg.seed + 1)
    noisy = np.zeros(data.num_clients, dtype=bool)
    noisy[data.meta["noisy_clients"]] = True
    validation, test = split_server_data(data, cfg.validation_fraction, cfg.seed)
    alg = make_algorithm(cfg, data)
    eta = float(cfg.weights_eta)
    runs: list[RunResult] = []

    def run(label, kind, d, weights=None):
        m = min(cfg.clients_per_round, d.num_clients)
        res = train(alg, d, rounds=cfg.rounds, clients_per_round=m, eta=eta, weights=weights,
                    validation=validation, test=test, seed=cfg.seed, label=label,
                    progress=progress and (lambda r: progress(label, r)))
        res.info.update(kind=kind, eta=eta)
        # the weights each run gives every client of the population, normalised to mean 1
        if res.client_weights is not None:
            w = res.client_weights
        elif kind == "uniform":
            w = np.ones(data.num_clients)
        else:
            w = (~noisy) / np.mean(~noisy)
        res.info.update(mean_weight_noisy=float(w[noisy].mean()) if noisy.any() else None,
                        mean_weight_clean=float(w[~noisy].mean()) if (~noisy).any() else None)
        runs.append(res)
        return res

    run("uniform weights", "uniform", data)
    run("learned weights (FAD)", "learned", data,
        ClientWeights(data.num_clients, lr=cfg.weights_lr, shrink=cfg.weights_shrink))
    clean_ids = np.flatnonzero(~noisy)
    if len(clean_ids) >= 2:
        run("clean clients only (reference)", "clean_only", data.subset(clean_ids))
    return {"dataset": data.name, "noisy_clients": [int(i) for i in np.flatnonzero(noisy)],
            "num_clients": data.num_clients, "eta": eta, "num_traces": alg.num_traces,
            "note": note, "runs": runs}


# --------------------------------------------------------------------------- reporting

def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None or not math.isfinite(x) else fmt.format(x)


def results_tables(results: dict, cfg: DemoConfig) -> str:
    """The printed tables of :func:`lr_experiment` / :func:`weights_experiment` results."""
    out = []
    if "lr" in results:
        res = results["lr"]
        t = res["target"]
        rows = []
        for r in res["runs"]:
            rt = r.rounds_to(t)
            rows.append([r.label, _f(r.final("test_acc")), _f(r.final("test_loss")),
                         str(rt) if rt is not None else "never",
                         _f(r.history["eta"][-1], "{:.3g}")])
        out.append(f"Learned server learning rate: {res['dataset']}, {cfg.model}, {cfg.rounds} "
                   f"rounds, {cfg.clients_per_round} clients/round, {cfg.local_steps} local steps"
                   f" (client lr {cfg.client_lr:g}); best fixed eta = {res['best_fixed_eta']:g}")
        out.append(_table(["run", "test acc", "test loss", f"rounds to {t:.2f}", "final eta"],
                          rows))
    if "weights" in results:
        res = results["weights"]
        runs = res["runs"]
        t = cfg.target if cfg.target is not None else _default_target(
            max(runs, key=_final_acc))
        rows = []
        for r in runs:
            rt = r.rounds_to(t)
            rows.append([r.label, _f(r.final("test_acc")), _f(r.final("test_loss")),
                         str(rt) if rt is not None else "never",
                         _f(r.info.get("mean_weight_noisy")), _f(r.info.get("mean_weight_clean"))])
        k, n = len(res["noisy_clients"]), res["num_clients"]
        if out:
            out.append("")
        if res.get("note"):
            out.append(f"note: {res['note']}")
        out.append(f"Learned client weights: {res['dataset']}, {k} of {n} clients with noisy "
                   f"labels, eta = {res['eta']:g}, {cfg.rounds} rounds")
        out.append(_table(["run", "test acc", "test loss", f"rounds to {t:.2f}",
                           "mean w noisy", "mean w clean"], rows))
        gain = runs[1].final("test_acc") - runs[0].final("test_acc")
        out.append(f"accuracy gain of learned over uniform weights: {gain:+.3f} "
                   "(weights normalised to mean 1 over all clients)")
    return "\n".join(out)


def results_json(results: dict, cfg: DemoConfig) -> dict:
    out = {"config": {k: (list(v) if isinstance(v, tuple) else v)
                      for k, v in asdict(cfg).items()}}
    for name, res in results.items():
        out[name] = {k: ([r.to_json() for r in v] if k == "runs" else v) for k, v in res.items()}
    return out


def plot_results(results: dict, cfg: DemoConfig, path) -> None:
    """A PNG of the curves (needs matplotlib; raises ImportError without it): per experiment,
    test accuracy per round, and the learned learning rates / the learned client weights."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [name for name in ("lr", "weights") if name in results]
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 4.0 * len(rows)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (ax_acc, ax_right), name in zip(axes, rows):
        res = results[name]
        for k, r in enumerate(res["runs"]):
            learned = r.info["kind"] == "learned"
            ax_acc.plot(r.history["round"], r.history["test_acc"], "-" if learned else "--",
                        lw=2.0 if learned else 1.2, color=colors[k % len(colors)], label=r.label)
            if name == "lr" and learned:
                ax_right.plot(range(1, len(r.history["eta"]) + 1), r.history["eta"], lw=2,
                              color=colors[k % len(colors)], label=r.label)
        ax_acc.set(xlabel="round", ylabel="test accuracy")
        ax_acc.legend(fontsize=7)
        if name == "lr":
            for eta in cfg.lr_grid:
                ax_right.axhline(eta, color="0.85", lw=0.8, zorder=0)
            ax_right.axhline(res["best_fixed_eta"], color="k", ls="--", lw=1,
                             label=f"best fixed eta = {res['best_fixed_eta']:g}")
            ax_acc.axhline(res["target"], color="0.6", lw=0.8)
            ax_acc.set_title(f"{res['dataset']}: fixed vs FAD-learned server learning rate",
                             fontsize=10)
            ax_right.set(xlabel="round", ylabel="server learning rate", yscale="log")
            ax_right.set_title("learned rate (grey: the fixed grid)", fontsize=10)
            ax_right.legend(fontsize=7)
        else:
            learned = next(r for r in res["runs"] if r.info["kind"] == "learned")
            w = learned.client_weights
            noisy = set(res["noisy_clients"])
            ax_right.bar(range(len(w)), w,
                         color=["tab:red" if i in noisy else "tab:blue" for i in range(len(w))])
            ax_right.axhline(1.0, color="k", lw=0.8)
            ax_acc.set_title(f"{res['dataset']}: {len(noisy)} of {len(w)} clients with noisy "
                             "labels", fontsize=10)
            ax_right.set(xlabel="client", ylabel="final weight (mean 1)", yscale="log")
            ax_right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax_right.set_title("FAD-learned client weights (red: noisy labels)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
