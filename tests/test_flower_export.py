"""``fad export flower``: the exported app runs with ``flwr run`` against a local SuperLink.

One test starts a SuperLink in simulation mode on 127.0.0.1 (a free port, its own FLWR_HOME,
telemetry off, no dependency installation at run time), runs the exported app of a stateful
reverse gradient (2 rounds, residuals in each node's context.state) with ``flwr run`` and
compares the results the ServerApp wrote with the numba backend's. About a minute: ``flwr run``
starts its own Ray.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

import fadcore as fad
from fadcore.examples import example_args_fed_mse, fed_mse

pytest.importorskip("flwr", reason="the flower extra is not installed: pip install "
                    "'fadcore[flower]'")

pytestmark = pytest.mark.flower

#: the graph the app runs: a stateful reverse gradient, w at SERVER, ragged clients
grad_fed_mse = fad.grad(fed_mse)
example_args_grad_fed_mse = example_args_fed_mse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(fad.__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home) -> dict:
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0",
               RAY_USAGE_STATS_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_DISABLE_UPDATE_CHECK="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS] + [p for p in
                                         env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


@pytest.fixture
def superlink(tmp_path):
    """A SuperLink in simulation mode on a free loopback port; stopped afterwards."""
    home, port = tmp_path / "flwr-home", _free_port()
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fadtest"\n\n[superlink.fadtest]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    exe = os.path.join(os.path.dirname(sys.executable), "flower-superlink")
    proc = subprocess.Popen([exe, "--insecure", "--simulation", "--host", "127.0.0.1",
                             "--port", str(port)], env=_env(home), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("flower-superlink did not start")
                time.sleep(0.5)
        yield home, port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)     # the SuperLink and what it started
        proc.wait(timeout=60)


def test_exported_app_runs_with_flwr_run(tmp_path, superlink):
    home, _ = superlink
    app = tmp_path / "app"
    from fadcore.cli import main
    assert main(["export", "flower", "test_flower_export:grad_fed_mse", "--out", str(app),
                 "--client-data", "fadcore.examples:client_data_fed_mse"]) == 0
    assert (app / "pyproject.toml").exists() and (app / "grad_fed_mse_app" / "graph.json").exists()
    out = tmp_path / "result.npz"
    exe = os.path.join(os.path.dirname(sys.executable), "flwr")
    run = subprocess.run(
        [exe, "run", str(app), "fadtest", "--stream", "--federation-config",
         "num-supernodes=4", "--run-config", f"output={json.dumps(str(out))}"],
        env=_env(home), capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert out.exists(), log[-3000:]
    args = example_args_fed_mse()
    want = fad.run(grad_fed_mse.graph(*args), *args, backend="numba")
    np.testing.assert_allclose(np.load(out)["out0"], want, rtol=1e-12, atol=1e-14)
    # the ServerApp logged each round's bytes beside fad.cost's prediction
    assert "fad round 1: 4 nodes, 24 B down / 8 B up per node (fad.cost at rows=1: 24 / 8)" \
        in log
    assert "fad round 2: 4 nodes, 8 B down / 24 B up per node (fad.cost at rows=1: 8 / 24)" \
        in log


def test_process_with_the_default_simulation_exits(tmp_path):
    """A script that ran a graph on the default simulation (never shut down by hand) exits:
    Flower's threads are stopped before Python joins them at exit."""
    script = tmp_path / "script.py"
    script.write_text(
        "import fadcore as fad\n"
        "from fadcore.examples import fed_mse, example_args_fed_mse\n"
        "a = example_args_fed_mse()\n"
        "print(repr(float(fad.run(fed_mse.graph(*a), *a, backend='flower'))))\n")
    run = subprocess.run([sys.executable, str(script)], env=_env(tmp_path / "home"),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    args = example_args_fed_mse()
    assert float(run.stdout.strip().splitlines()[-1]) == float(fed_mse(*args))
