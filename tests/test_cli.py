"""The ``fad demo`` command: a smoke run at tiny sizes (hidden ``--smoke``), its table, JSON,
plot and progress bar, and its help."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fadcore import cli


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["demo", "--smoke", "--seed", "3", "--out", str(out)])
    return code, stdout.getvalue(), stderr.getvalue(), out


def test_demo_prints_both_tables(smoke_run):
    code, stdout, _, _ = smoke_run
    assert code == 0
    assert "Learned server learning rate: synthetic(1,1)" in stdout
    assert "Learned client weights: digits" in stdout
    for label in ("fixed eta=1", "fixed eta=3", "(10x too small)", "(10x too large)",
                  "uniform weights", "learned weights (FAD)", "clean clients only"):
        assert label in stdout, label
    for col in ("test acc", "test loss", "rounds to", "final eta", "mean w noisy"):
        assert col in stdout, col
    assert "accuracy gain of learned over uniform weights" in stdout


def test_demo_progress_bar_on_stderr(smoke_run):
    _, stdout, stderr, _ = smoke_run
    assert "[" in stderr and "100%" in stderr and "round 4/4" in stderr
    assert "100%" not in stdout


def test_demo_json_has_sane_curves(smoke_run):
    _, _, _, out = smoke_run
    doc = json.loads((out / "fad-demo.json").read_text())
    assert doc["config"]["seed"] == 3 and doc["config"]["rounds"] == 4
    lr = doc["lr"]
    labels = [r["label"] for r in lr["runs"]]
    assert len(labels) == 4 and sum("learned" in lab for lab in labels) == 2
    best = lr["best_fixed_eta"]
    assert best in (1.0, 3.0)
    starts = sorted(r["info"]["eta0"] for r in lr["runs"] if r["info"]["kind"] == "learned")
    np.testing.assert_allclose(starts, [best / 10, best * 10])
    for r in lr["runs"]:
        h = r["history"]
        assert h["round"] == [0, 1, 2, 3, 4]
        assert len(h["test_acc"]) == 5 and all(0 <= a <= 1 for a in h["test_acc"])
        assert len(h["eta"]) == 4 and all(e > 0 for e in h["eta"])
        if r["info"]["kind"] == "learned":
            assert len(h["hypergradient"]) == 4 and h["eta"][0] != r["info"]["eta0"]
        else:
            assert set(h["eta"]) == {r["info"]["eta0"]}
    assert lr["num_traces"] == 2            # step + round_loss, shared by every run and cohort
    w = doc["weights"]
    learned = next(r for r in w["runs"] if r["info"]["kind"] == "learned")
    assert len(learned["client_weights"]) == w["num_clients"]
    assert abs(np.mean(learned["client_weights"]) - 1) < 1e-9
    assert len(w["noisy_clients"]) == 3                    # half of 6 digits clients
    assert doc["seconds"] > 0 and doc["backend"]


def test_demo_writes_plot(smoke_run):
    pytest.importorskip("matplotlib")
    _, stdout, _, out = smoke_run
    png = out / "fad-demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in stdout


def test_demo_without_matplotlib_still_writes_json(tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kw):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert cli.main(["demo", "--smoke", "--experiments", "lr", "--rounds", "2",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out
    doc = json.loads((tmp_path / "fad-demo.json").read_text())
    assert "lr" in doc and "weights" not in doc
    assert not (tmp_path / "fad-demo.png").exists()


def test_demo_help_explains_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--quick", "--rounds", "--clients-per-round", "--seed", "--out", "--dataset",
                "--backend", "hypergradient", "client weights", "fad-demo.json"):
        assert opt in text, opt
    assert "--smoke" not in text


def test_demo_rejects_unknown_experiment(tmp_path):
    with pytest.raises(SystemExit, match="--experiments"):
        cli.main(["demo", "--smoke", "--experiments", "lr,sideways", "--out", str(tmp_path)])


def test_demo_backend_option_is_used_and_restored(tmp_path, capsys):
    import fadcore as fad
    before = fad.default_backend()
    assert cli.main(["demo", "--smoke", "--experiments", "lr", "--rounds", "1",
                     "--backend", "reference", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "fad-demo.json").read_text())["backend"] == "reference"
    assert fad.default_backend() == before
    with pytest.raises(SystemExit, match="unknown backend"):
        cli.main(["demo", "--smoke", "--backend", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="at least 2"):
        cli.main(["demo", "--smoke", "--clients-per-round", "1", "--out", str(tmp_path)])


def test_demo_without_scikit_learn_falls_back_to_synthetic(tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kw):
        if name.split(".")[0] == "sklearn":
            raise ImportError("no scikit-learn here")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    assert cli.main(["demo", "--smoke", "--experiments", "weights", "--rounds", "2",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "scikit-learn is not installed" in out
    assert "Learned client weights: synthetic(1,1)" in out
    with pytest.raises(SystemExit, match="scikit-learn"):
        cli.main(["demo", "--smoke", "--dataset", "digits", "--out", str(tmp_path)])
