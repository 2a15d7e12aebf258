"""The engine's architecture, checked on its source: layering, import cycles, pass checks.

The IR is the lowest layer: no module under ``fadcore/ir`` imports (at top level or inside a
function) a fadcore module outside ``fadcore/ir``, ``fadcore/errors.py`` and
``fadcore/pytree.py``. Between fadcore's folders (each subpackage, and each module at the top of
``fadcore/``) imports go one way: no cycle, package ``__init__`` files aside.
"""

from __future__ import annotations

import ast
import os

import networkx as nx
import numpy as np
import pytest

import fadcore as fad
from fadcore import examples as ex

PKG = os.path.dirname(fad.__file__)


def _module_files():
    for d, _, files in os.walk(PKG):
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(d, f)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _exists(mod: str) -> bool:
    base = os.path.join(os.path.dirname(PKG), *mod.split("."))
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def imports_of(path: str) -> set[str]:
    """The fadcore modules ``path`` imports, anywhere in the file (functions included)."""
    mod = _module_name(path)
    package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            # `from pkg import name`: name may be a submodule
            names = [f"{target}.{a.name}" if _exists(f"{target}.{a.name}") else target
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n == "fadcore" or n.startswith("fadcore."))
    return out


def _unit(mod: str) -> str:
    """A module's folder: the subpackage of fadcore holding it (fadcore.ir, fadcore.backends
    with its own subpackages, ...), or the module itself at the top of fadcore."""
    return ".".join(mod.split(".")[:2])


def test_ir_imports_nothing_above_it():
    allowed = {"fadcore.errors", "fadcore.pytree"}
    bad = []
    for path in _module_files():
        mod = _module_name(path)
        if not mod.startswith("fadcore.ir"):
            continue
        for target in imports_of(path):
            if not (target.startswith("fadcore.ir") or target in allowed):
                bad.append(f"{mod} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_folders():
    g = nx.DiGraph()
    for path in _module_files():
        if path.endswith("__init__.py"):
            continue
        src = _unit(_module_name(path))
        for target in imports_of(path):
            dst = _unit(target)
            if dst != src and dst != "fadcore":
                g.add_edge(src, dst)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"import cycles between folders: {cycles}"


def test_the_import_scanner_sees_imports_inside_functions(tmp_path):
    # the scanner the two tests above rely on must not miss a late import
    src = os.path.join(PKG, "ir", "rounds.py")
    assert "fadcore.ir.graph" in imports_of(src)
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from fadcore import ops\n    import fadcore.core\n")
    assert {"fadcore.ops", "fadcore.core"} <= imports_of(str(fake))


# --------------------------------------------------------------------------- FAD_CHECKS

def test_checks_name_the_pass_that_broke_a_graph(monkeypatch):
    from fadcore.ir import passes
    real_cse = passes.cse

    def broken_cse(g):          # drops the first equation: its result is then undefined
        g = real_cse(g)
        return g.replace(eqns=g.eqns[1:]) if len(g.eqns) > 3 else g

    def fresh():                # a new function each time: no cached graph hides the pass
        return fad.trace(lambda w, X, y: ex.fed_mse.fun(w, X, y), name="fresh_fed_mse")

    monkeypatch.setattr(passes, "cse", broken_cse)
    args = ex.example_args_fed_mse()
    monkeypatch.setenv("FAD_CHECKS", "1")
    with pytest.raises(fad.VerificationError, match=r"after pass 'cse': equation \d+ \(\w+\).*"
                                                    r"operand used before it is defined") as info:
        fad.grad(fresh()).graph(*args)
    assert "\n  >> " in str(info.value)                # the offending equation, marked
    monkeypatch.setenv("FAD_CHECKS", "0")
    with pytest.raises(Exception) as unchecked:        # unchecked: it breaks somewhere later
        fad.grad(fresh()).graph(*args)
    assert "after pass" not in str(unchecked.value)


def test_verifier_prints_the_equation_with_its_neighbours():
    g = ex.fed_mse.graph(*ex.example_args_fed_mse())
    bad = g.replace(eqns=g.eqns[:4] + g.eqns[5:])     # drops equation 4 (reduce_sum)
    with pytest.raises(fad.VerificationError) as info:
        bad.verify()
    lines = str(info.value).splitlines()
    assert lines[0].startswith("equation 5 (div)") and "used before it is defined" in lines[0]
    marked = [ln for ln in lines if ln.startswith("  >>")]
    assert len(marked) == 1 and " = div " in marked[0]
    assert sum(" = " in ln for ln in lines[1:]) == 1 + 3 + 1   # 3 before, the last one after


def test_graphs_are_immutable():
    g = ex.fed_mse.graph(*ex.example_args_fed_mse())
    with pytest.raises(AttributeError, match="immutable"):
        g.name = "other"
    with pytest.raises(TypeError, match="immutable"):
        g.eqns.append(g.eqns[0])
    h = g.replace(name="other")
    assert h.name == "other" and g.name != "other" and h.eqns == g.eqns


def test_derivatives_with_checks_on(monkeypatch):
    monkeypatch.setenv("FAD_CHECKS", "1")
    args = ex.example_args_fedavg_round()
    want = fad.grad(ex.fedavg_round, argnums=(0, 1), mode="reverse", state="remat")(*args)
    for mode in ("reverse", "mixed", "auto"):
        got = fad.grad(ex.fedavg_round, argnums=(0, 1), mode=mode)(*args)
        for a, b in zip(want, got):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
    # and against central differences in eta (argument 0)
    eps, (eta, *rest) = 1e-6, args
    fd = (fad.run(ex.fedavg_round.graph(*args), eta + eps, *rest)
          - fad.run(ex.fedavg_round.graph(*args), eta - eps, *rest)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(want[0]), fd, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------- docs/extending.md

def test_docs_extending_runs_and_prints_what_it_shows():
    """docs/extending.md adds primitives: its ```python blocks run in order in a fresh
    interpreter (the registry of this process stays as it is), and each ```text block right
    after one is exactly what that block prints."""
    import json
    import re
    import subprocess
    import sys
    page = os.path.join(os.path.dirname(PKG), "docs", "extending.md")
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", open(page, encoding="utf-8").read(),
                        re.M | re.S)
    script = (
        "import contextlib, io, json, sys\n"
        f"blocks = json.loads({json.dumps(json.dumps(blocks))})\n"
        "ns, outs = {'__name__': 'docs_example'}, []\n"
        "for lang, src in blocks:\n"
        "    buf = io.StringIO()\n"
        "    if lang == 'python':\n"
        "        with contextlib.redirect_stdout(buf):\n"
        "            exec(compile(src, 'extending.md', 'exec'), ns)\n"
        "    outs.append(buf.getvalue())\n"
        "print(json.dumps(outs))\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    outs = json.loads(res.stdout.strip().splitlines()[-1])
    shown = 0
    for k, (lang, _) in enumerate(blocks):
        if lang == "python" and k + 1 < len(blocks) and blocks[k + 1][0] == "text":
            want = [s.rstrip() for s in blocks[k + 1][1].strip("\n").splitlines()]
            assert [s.rstrip() for s in outs[k].strip("\n").splitlines()] == want, \
                f"block {k} printed:\n{outs[k]}"
            shown += 1
    assert shown >= 5
