"""Differential fuzzing of the backends: every loadable graph runs the same everywhere.

Cases come from two sources:

- **programs**: random federated programs of :func:`fadcore.testing.strategies.programs`, with
  their reverse- and mixed-mode gradient graphs (which hold the primitives only derivatives
  use: ``pad``, ``untake``, ``untake_along_axis``, ...);
- **mutations** of those graphs: *typed* ones change one parameter of one equation (an axis to
  ``-1`` or ``9``, a size to ``2**62``, an int to ``0.0`` or ``True``, ...) and re-infer every
  type after it, so whatever the shape rules accept becomes a graph that verifies; *raw* ones
  damage the JSON text (a type, an operand, a literal, a primitive name, a field).

Each case is a graph's JSON text and a seed. A worker **subprocess** loads it with
``Graph.from_json``, makes arguments from its input types (1-3 clients, 0-4 rows each, labels
mostly in range) and runs it on every backend. The verdict of a case is one of

- ``rejected``: ``from_json`` raised ``SerializationError`` (the loader's job);
- ``ok``: every backend returned the same dtypes, shapes and values (``allclose``, NaN = NaN);
- ``same-error``: every backend raised a fad error of the same type;
- ``untyped``: some backend (or the loader) raised something that is not a ``fad.FadError``;
- ``disagree``: the backends returned different values, or different outcomes;
- ``crash`` / ``hang``: the worker died of a signal, or went silent, on this case.

A crash does not stop a campaign: the parent notes the case and restarts the worker after it.
The first four verdicts are fine; the last four are failures. ``python -m
fadcore.testing.fuzz --programs 300 --seed 0`` runs a campaign by hand and prints the tally
(``--save DIR`` writes every failing case for replay with ``--replay``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Case", "Report", "program_cases", "mutants", "make_cases", "run_cases",
           "FAILURES", "main"]

FAILURES = ("untyped", "disagree", "crash", "hang")

#: graph texts that make the worker die of SIGSEGV / stall (to test the harness itself)
SELFTEST_CRASH = "fadcore fuzz self-test: crash"
SELFTEST_HANG = "fadcore fuzz self-test: hang"

#: ints a typed mutation puts where an int was (axes, sizes, strides, depths, dims)
HOSTILE_INTS = (-(2**63), -(2**31), -9, -3, -2, -1, 0, 1, 2, 3, 5, 9, 64, 2**31 - 1, 2**32,
                2**62, 2**63 - 1)
#: non-int values a typed mutation puts where an int was
HOSTILE_NON_INTS = (0.0, 1.0, True, False, None, -0.5, "0")


@dataclass
class Case:
    id: int
    origin: str          # "program", "grad-reverse", "mutation:param", "raw:type", ...
    graph: str           # JSON text
    seed: int


@dataclass
class Report:
    verdicts: collections.Counter = field(default_factory=collections.Counter)
    by_origin: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)     # (Case, verdict, detail)
    seconds: float = 0.0

    @property
    def cases(self) -> int:
        return sum(self.verdicts.values())

    @property
    def ok(self) -> bool:
        return not any(self.verdicts[v] for v in FAILURES)

    def add(self, case: Case, verdict: str, detail: str) -> None:
        self.verdicts[verdict] += 1
        kind = case.origin.split(":")[0]
        self.by_origin.setdefault(kind, collections.Counter())[verdict] += 1
        if verdict in FAILURES:
            self.failures.append((case, verdict, detail))

    def summary(self) -> str:
        order = ("rejected", "ok", "same-error") + FAILURES
        lines = [f"{self.cases} cases in {self.seconds:.0f} s: " + ", ".join(
            f"{self.verdicts[v]} {v}" for v in order)]
        for kind, c in sorted(self.by_origin.items()):
            lines.append(f"  {kind:<10} " + ", ".join(f"{c[v]} {v}" for v in order if c[v]))
        for case, verdict, detail in self.failures[:20]:
            lines.append(f"  FAIL case {case.id} ({case.origin}, seed {case.seed}): {verdict}: "
                         f"{detail[:300]}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- case generation

def program_cases(n: int, seed: int = 0, max_ops: int = 6) -> list[tuple[str, str]]:
    """``(origin, graph JSON)`` for ``n`` random programs and their gradient graphs."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    import fadcore as fad
    from .strategies import programs

    out: list[tuple[str, str]] = []

    @hseed(seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(programs(max_ops=max_ops))
    def collect(prog):
        f, args = prog
        out.append(("program", f.graph(*args).to_json()))
        for mode in ("reverse", "mixed"):
            try:
                out.append((f"grad-{mode}", fad.grad(f, mode=mode).graph(*args).to_json()))
            except fad.FadError:
                pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        collect()
    return out


def _retype(graph, k: int, params: dict):
    """``graph`` with equation ``k``'s params replaced and every type re-inferred from there
    on, or None if a shape rule refuses (the verifier would)."""
    from ..errors import FadError
    from ..ir.graph import Eqn, Graph, Var
    from ..ir.primitives import infer_type
    env: dict = {}
    eqns = []
    for j, e in enumerate(graph.eqns):
        ins = [env.get(a, a) for a in e.inputs]
        p = params if j == k else e.params
        if j < k and not any(a in env for a in e.inputs):
            eqns.append(e)
            continue
        try:
            t = infer_type(e.prim, [a.type for a in ins], p)
        except (FadError, TypeError, ValueError, KeyError, IndexError, AttributeError,
                AssertionError, OverflowError, ZeroDivisionError):
            return None
        if t == e.out.type and all(a is b for a, b in zip(ins, e.inputs)) and p is e.params:
            eqns.append(e)
            continue
        out = Var(t)
        env[e.out] = out
        eqns.append(Eqn(e.prim, ins, out, p, e.source))
    outputs = [env.get(a, a) for a in graph.outputs]
    return Graph(graph.inputs, eqns, outputs, in_tree=graph.in_tree, out_tree=graph.out_tree,
                 name=graph.name, meta=dict(graph.meta))


def _int_slots(v, path=()):
    """Paths to the ints inside a param value (tuples/lists nest)."""
    if isinstance(v, bool):
        return
    if isinstance(v, int):
        yield path
    elif isinstance(v, (tuple, list)):
        for i, x in enumerate(v):
            yield from _int_slots(x, path + (i,))


def _replace(v, path, new):
    if not path:
        return new
    items = list(v)
    items[path[0]] = _replace(items[path[0]], path[1:], new)
    return tuple(items) if isinstance(v, tuple) else items


def _typed_mutant(graph, rng: random.Random):
    """One parameter of one equation changed, types re-inferred; None if refused."""
    cands = [(k, name) for k, e in enumerate(graph.eqns) for name, v in e.params.items()
             if any(True for _ in _int_slots(v)) or v is None]
    if not cands:
        return None
    k, name = rng.choice(cands)
    v = graph.eqns[k].params[name]
    slots = list(_int_slots(v))
    r = rng.random()
    if slots and r < 0.75:
        path = rng.choice(slots)
        old = v
        for i in path:
            old = old[i]
        near = (old - 1, old + 1, -old - 1, -1, 0)          # often still well typed
        new = rng.choice(near if r < 0.3 else HOSTILE_INTS if r < 0.6 else HOSTILE_NON_INTS)
        nv = _replace(v, path, new)
    elif isinstance(v, tuple) and r < 0.9:
        nv = v + (rng.choice(HOSTILE_INTS),) if rng.random() < 0.5 else v[:-1]
    else:
        nv = rng.choice(HOSTILE_NON_INTS + ((),))
    params = dict(graph.eqns[k].params)
    params[name] = nv
    return _retype(graph, k, params)


def _raw_mutant(doc: dict, rng: random.Random) -> tuple[str, dict]:
    """One damage to the JSON document."""
    d = json.loads(json.dumps(doc))
    kind = rng.choice(["type", "input", "operand", "literal", "prim", "drop", "param"])
    eqns = d["eqns"]
    if not eqns:
        kind = "input"
    if kind in ("type", "input"):
        seq, key = (eqns, "type") if kind == "type" else (d["inputs"], None)
        if not seq:
            return kind, d
        i = rng.randrange(len(seq))
        s = seq[i][key] if key else seq[i]
        s = _mutate_type_str(s, rng)
        if key:
            seq[i][key] = s
        else:
            seq[i] = s
    elif kind == "operand":
        e = rng.choice(eqns)
        if e["in"]:
            j = rng.randrange(len(e["in"]))
            e["in"][j] = rng.choice([0, rng.randrange(len(d["inputs"]) + len(eqns)), -1,
                                     {"lit": 0}, 10**6])
    elif kind == "literal":
        if d["literals"]:
            lit = rng.choice(d["literals"])
            if "data" in lit and lit["data"]:
                j = rng.randrange(len(lit["data"]))
                lit["data"][j] = rng.choice([-1, 0, 2**40, 1e308, -1e308, 0.5, 10**30])
            else:
                lit["shape"] = lit["shape"][:-1] if lit["shape"] else [2]
    elif kind == "prim":
        from ..ir.primitives import primitives
        rng.choice(eqns)["prim"] = rng.choice(sorted(primitives))
    elif kind == "drop":
        del eqns[rng.randrange(len(eqns))]
    else:
        e = rng.choice(eqns)
        e.setdefault("params", {})[rng.choice(["axis", "axes", "shape", "perm", "x"])] = \
            rng.choice([["int", -1], ["tuple", [["int", 0], ["int", 0]]], ["float", 1e400],
                        ["none"], ["int", 2**63 - 1]])
    return kind, d


def _mutate_type_str(s: str, rng: random.Random) -> str:
    import re
    r = rng.random()
    if r < 0.3:
        return re.sub(r"\d+", lambda m: str(rng.choice([0, 1, 2, 7, 2**31 - 1])), s, count=1)
    if r < 0.5:
        return s.replace("?", "3", 1) if "?" in s else s.replace("[", "[?,", 1)
    if r < 0.7:
        for a, b in (("f64", "f32"), ("f32", "i64"), ("i64", "f64"), ("bool", "i64")):
            if a in s:
                return s.replace(a, b, 1)
        return s
    if r < 0.85:
        return s.replace("@CLIENTS", "@SERVER") if "CLIENTS" in s else \
            s.replace("@SERVER", "@CLIENTS")
    return s.replace("[", "[1,", 1)


def mutants(text: str, count: int, rng: random.Random) -> list[tuple[str, str]]:
    """``count`` mutants of one graph: about two typed for one raw."""
    import fadcore as fad
    g = fad.Graph.from_json(text)
    doc = json.loads(text)
    out = []
    typed = (2 * count + 2) // 3
    for _ in range(20 * typed):
        if len(out) == typed:
            break
        m = _typed_mutant(g, rng)
        if m is not None:
            try:
                out.append(("mutation:param", m.to_json()))
            except fad.FadError:
                pass
    while len(out) < count:
        kind, d = _raw_mutant(doc, rng)
        out.append((f"raw:{kind}", json.dumps(d)))
    return out


def make_cases(programs: int, mutations: int = 6, seed: int = 0, max_ops: int = 6
               ) -> list[Case]:
    """Graphs of ``programs`` random programs (and their gradients), each with ``mutations``
    mutants; one data seed per case."""
    rng = random.Random(seed)
    graphs = program_cases(programs, seed, max_ops)
    cases = []
    for origin, text in graphs:
        cases.append(Case(len(cases), origin, text, rng.randrange(2**31)))
        for morigin, mtext in mutants(text, mutations, rng):
            cases.append(Case(len(cases), morigin, mtext, rng.randrange(2**31)))
    return cases


# --------------------------------------------------------------------------- the worker

def _make_args(graph, seed: int):
    """Arguments for ``graph`` from its input types: 1-3 clients of 0-4 rows (a zero-row client
    now and then), floats ~ N(0, 1), ints mostly in [0, 2), sometimes in [-3, 6)."""
    from ..ir.types import CLIENTS
    from ..values import clients as make_clients
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    rows = [int(r) for r in rng.integers(0 if rng.random() < 0.15 else 1, 5, size=n)]

    def leaf(t, r):
        shape = tuple(r if d is None else d for d in t.shape)
        dt = t.dtype.np
        if t.dtype.name == "bool":
            return rng.random(shape) < 0.5
        if t.dtype.is_int:
            lo, hi = (-3, 6) if rng.random() < 0.1 else (0, 2)
            return rng.integers(lo, hi, size=shape).astype(dt)
        return rng.normal(size=shape).astype(dt)

    leaves = []
    for t in graph.in_types[:graph.num_user_inputs]:
        if t.placement is CLIENTS:
            if t.all_equal:
                x = leaf(t.tensor, 0)
                leaves.append(make_clients([x] * n))
            else:
                leaves.append(make_clients([leaf(t.tensor, r) for r in rows]))
        else:
            leaves.append(leaf(t.tensor, 0))
    return leaves, n


def _outcome(graph, leaves, n, backend):
    from ..backends import run_flat
    from ..errors import FadError
    from ..values import ClientValues
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            outs = run_flat(graph, leaves, backend=backend, num_clients=n)
    except FadError as e:
        return ("error", type(e).__name__, str(e)[:300])
    except Exception as e:  # noqa: BLE001 - what the fuzzer is looking for
        return ("untyped", type(e).__name__, str(e)[:300])
    vals = []
    for o in outs:
        if isinstance(o, ClientValues):
            vals.append([np.asarray(m) for m in o.members])
        else:
            vals.append([np.asarray(o)])
    return ("ok", vals, "")


def _same(a, b) -> str | None:
    for i, (xa, xb) in enumerate(zip(a, b, strict=True)):
        if len(xa) != len(xb):
            return f"output {i}: {len(xa)} vs {len(xb)} members"
        for j, (u, v) in enumerate(zip(xa, xb)):
            if u.dtype != v.dtype or u.shape != v.shape:
                return f"output {i}[{j}]: {u.dtype}{u.shape} vs {v.dtype}{v.shape}"
            if u.dtype.kind == "f":
                tol = (1e-4, 1e-5) if u.dtype == np.float32 else (1e-7, 1e-9)
                if not np.allclose(u, v, rtol=tol[0], atol=tol[1], equal_nan=True) or \
                        not np.array_equal(np.where(np.isinf(u), np.sign(u), 0),
                                           np.where(np.isinf(v), np.sign(v), 0)):
                    bad = np.argmax(~np.isclose(u, v, rtol=tol[0], atol=tol[1],
                                                equal_nan=True).reshape(-1)) if u.size else 0
                    return (f"output {i}[{j}] differs at flat index {bad}: "
                            f"{u.reshape(-1)[bad] if u.size else ''} vs "
                            f"{v.reshape(-1)[bad] if v.size else ''}")
            elif not np.array_equal(u, v):
                return f"output {i}[{j}]: {u.reshape(-1)[:6]} vs {v.reshape(-1)[:6]}"
    return None


def judge(text: str, seed: int, backends=("reference", "numba")) -> tuple[str, str]:
    """The verdict and a detail for one case (run in the worker)."""
    import fadcore as fad
    try:
        g = fad.Graph.from_json(text)
    except fad.SerializationError:
        return "rejected", ""
    except Exception as e:  # noqa: BLE001
        return "untyped", f"from_json: {type(e).__name__}: {e}"[:400]
    try:
        leaves, n = _make_args(g, seed)
    except fad.FadError as e:        # e.g. an input type no data can have
        return "same-error", f"arguments: {type(e).__name__}"
    outs = {b: _outcome(g, leaves, n, b) for b in backends}
    untyped = [f"{b}: {o[1]}: {o[2]}" for b, o in outs.items() if o[0] == "untyped"]
    if untyped:
        return "untyped", "; ".join(untyped)
    kinds = {(o[0], o[1] if o[0] == "error" else None) for o in outs.values()}
    if len(kinds) > 1:
        return "disagree", "; ".join(
            f"{b}: {o[1] if o[0] == 'error' else 'ok'} {o[2][:150]}" for b, o in outs.items())
    first = next(iter(outs.values()))
    if first[0] == "error":
        return "same-error", first[1]
    ref = first[1]
    for b, o in outs.items():
        diff = _same(ref, o[1])
        if diff:
            return "disagree", f"{b} vs {backends[0]}: {diff}"
    return "ok", ""


def _worker(path: str, start: int, out_path: str) -> None:
    os.environ.setdefault("FADCORE_MEMORY_LIMIT", str(512 * 2**20))
    with open(path) as f:
        cases = [json.loads(line) for line in f]
    with open(out_path, "a") as out:
        for c in cases[start:]:
            out.write(json.dumps({"begin": c["id"]}) + "\n")
            out.flush()
            if c["graph"] == SELFTEST_CRASH:          # the harness's own tests
                os.kill(os.getpid(), signal.SIGSEGV)
            if c["graph"] == SELFTEST_HANG:
                time.sleep(3600)
            verdict, detail = judge(c["graph"], c["seed"])
            out.write(json.dumps({"id": c["id"], "verdict": verdict, "detail": detail}) + "\n")
            out.flush()


# --------------------------------------------------------------------------- the parent

def run_cases(cases: list[Case], *, per_case_timeout: float = 60.0,
              startup_timeout: float = 300.0, memory_limit: int = 512 * 2**20,
              progress=None) -> Report:
    """Judge every case in worker subprocesses; a crash or hang restarts the worker after the
    case that caused it."""
    report = Report()
    t0 = time.time()
    by_id = {c.id: c for c in cases}
    with tempfile.TemporaryDirectory(prefix="fadfuzz") as tmp:
        path = os.path.join(tmp, "cases.jsonl")
        with open(path, "w") as f:
            for c in cases:
                f.write(json.dumps({"id": c.id, "graph": c.graph, "seed": c.seed}) + "\n")
        out_path = os.path.join(tmp, "results.jsonl")
        start = 0
        env = dict(os.environ, FADCORE_MEMORY_LIMIT=str(memory_limit))
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        while start < len(cases):
            open(out_path, "w").close()
            cmd = [sys.executable, "-c",
                   "import sys; from fadcore.testing.fuzz import _worker; "
                   "_worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])",
                   path, str(start), out_path]
            err_path = os.path.join(tmp, "stderr.txt")
            with open(err_path, "w") as err_file:
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                        stderr=err_file)
                status = _watch(proc, out_path, per_case_timeout, startup_timeout)
            with open(err_path, errors="replace") as f:
                err = f.read()
            done, begun = _read(out_path)
            for cid, verdict, detail in done:
                report.add(by_id[cid], verdict, detail)
                if progress:
                    progress(report)
            nxt = (done[-1][0] + 1) if done else start
            if status == "exit" and nxt >= len(cases):
                break
            if begun is not None and begun >= nxt:
                # the case it was running when it died or stalled
                what = "hang" if status == "hang" else "crash"
                detail = (f"signal {-proc.returncode}" if proc.returncode and proc.returncode < 0
                          else f"exit {proc.returncode}") + f"; {err.strip()[-300:]}"
                report.add(by_id[begun], what, detail)
                nxt = begun + 1
            elif status != "exit" or nxt == start:
                raise RuntimeError(f"fuzz worker failed before any case ({status}, exit "
                                   f"{proc.returncode}): {err[-2000:]}")
            start = nxt
    report.seconds = time.time() - t0
    return report


def _watch(proc, out_path, per_case, startup) -> str:
    """Wait for the worker: "exit" when it ends by itself, "hang" when it writes nothing for
    too long (``startup`` until its first verdict: the first numba run loads the kernels)."""
    last_size, last_change = 0, time.time()
    judged = False
    while True:
        try:
            proc.wait(timeout=0.5)
            return "exit"
        except subprocess.TimeoutExpired:
            pass
        size = os.path.getsize(out_path)
        if size != last_size:
            last_size, last_change = size, time.time()
            judged = judged or bool(_read(out_path)[0])
        if time.time() - last_change > (per_case if judged else startup):
            proc.kill()
            proc.wait()
            return "hang"


def _read(out_path):
    done, begun = [], None
    with open(out_path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                break                        # a line cut short by the crash
            if "begin" in r:
                begun = r["begin"]
            else:
                done.append((r["id"], r["verdict"], r["detail"]))
                begun = None
    return done, begun


# --------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fadcore.testing.fuzz",
        description="Differential fuzzing of the reference and numba backends.")
    ap.add_argument("--programs", type=int, default=200, help="random programs to draw")
    ap.add_argument("--mutations", type=int, default=6, help="mutants per graph")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-ops", type=int, default=6)
    ap.add_argument("--save", metavar="DIR", help="write every failing case there")
    ap.add_argument("--replay", metavar="FILE", nargs="+",
                    help="judge saved cases (in this process) instead of a campaign")
    a = ap.parse_args(argv)
    if a.replay:
        for p in a.replay:
            c = json.load(open(p))
            print(p, *judge(c["graph"], c["seed"]))
        return 0
    t0 = time.time()
    cases = make_cases(a.programs, a.mutations, a.seed, a.max_ops)
    print(f"{len(cases)} cases from {a.programs} programs (seed {a.seed}) made in "
          f"{time.time() - t0:.0f} s", flush=True)
    report = run_cases(cases, progress=lambda r: (r.cases % 500 == 0) and print(
        f"  {r.cases} judged: {dict(r.verdicts)}", flush=True))
    print(report.summary())
    if a.save and report.failures:
        os.makedirs(a.save, exist_ok=True)
        for case, verdict, detail in report.failures:
            with open(os.path.join(a.save, f"case{case.id}_{verdict}.json"), "w") as f:
                json.dump({"graph": case.graph, "seed": case.seed, "origin": case.origin,
                           "verdict": verdict, "detail": detail}, f)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
