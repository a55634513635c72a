"""Deploys to an endpoint with a running inference service: acknowledged hot reload,
a service that never acknowledges (automatic rollback), and the restart reload method."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from adapter_deploy.kit.net import free_port
from fixtures_fleet import Fleet
from fixtures_repo import ROOT, run_script


def _wait_until(ready, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, {}
    except OSError:
        return 0, {}


def _translate(url: str, text: str) -> dict:
    body = json.dumps({"model": "gemma_4b", "text": text}).encode()
    req = urllib.request.Request(f"{url}/translate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _wait_healthy(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while _get(f"{url}/health")[0] != 200:
        assert time.monotonic() < deadline, "service never became healthy"
        time.sleep(0.1)


@pytest.fixture
def served(fleet: Fleet, tmp_path: Path):
    """ep1 with cycle 1 active and the real service running on it (reload_method sigusr1)."""
    assert (
        fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1").returncode == 0
    )
    url = f"http://127.0.0.1:{free_port()}"
    pidfile = tmp_path / "serve.pid"
    fleet.set_endpoint(
        "ep1",
        reload_method="sigusr1",
        service_url=url,
        pidfile=str(pidfile),
        models=["gemma_4b"],
        base_models={},
    )
    data = fleet.params.read_text().replace("reload_timeout_s: 120.0", "")
    fleet.params.write_text(data)
    started = run_script("service.py", "start", "--endpoint", "ep1", params=fleet.params)
    assert started.returncode == 0, started.stderr
    _wait_healthy(url)
    yield url, pidfile
    for path in (pidfile,):
        try:
            os.kill(int(path.read_text()), signal.SIGTERM)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    subprocess.run(["pkill", "-f", f"--params {fleet.params}"], capture_output=True)


def test_sigusr1_deploy_is_acknowledged_and_verified_through_the_service(fleet, served) -> None:
    url, pidfile = served
    v2 = fleet.versions["cycle2"]
    pid = int(pidfile.read_text())
    proc = fleet.deploy("--cycle", "2", "--models", "gemma_4b", "--endpoints", "ep1", "--json")
    assert proc.returncode == 0, proc.stderr
    post = json.loads(proc.stdout)["endpoints"][0]["models"][0]["health"]["post_activation"]
    assert post["all_passed"] and post["release"]["version_id"] == v2
    assert int(pidfile.read_text()) == pid  # hot reload: same process
    assert _get(f"{url}/status")[1]["models"]["gemma_4b"]["version_id"] == v2
    assert "Jacobo" in _translate(url, "The apostle James wrote about faith and works.")["text"]
    status = json.loads(run_script("status.py", "--json", params=fleet.params).stdout)
    ep1 = next(e for e in status["endpoints"] if e["endpoint"] == "ep1")
    assert ep1["service"]["models"]["gemma_4b"]["version_id"] == v2


@pytest.mark.e2e
def test_service_that_never_acknowledges_makes_the_deploy_roll_back(fleet, served, tmp_path):
    url, _ = served
    v1, v2 = fleet.versions["cycle1"], fleet.versions["cycle2"]
    deaf = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time; from pathlib import Path; "
            "from adapter_deploy.common import pidfile; pidfile.hold(Path(sys.argv[1])); "
            "signal.signal(signal.SIGUSR1, signal.SIG_IGN); time.sleep(120)",
            str(tmp_path / "deaf.pid"),
        ]
    )
    try:
        deaf_pidfile = tmp_path / "deaf.pid"
        _wait_until(lambda: deaf_pidfile.exists() and deaf_pidfile.read_text().strip())
        fleet.set_endpoint("ep1", pidfile=str(deaf_pidfile))
        data = fleet.params.read_text() + "health_check: {reload_timeout_s: 3}\n"
        fleet.params.write_text(data)
        proc = fleet.deploy("--cycle", "2", "--models", "gemma_4b", "--endpoints", "ep1")
        assert proc.returncode == 5, proc.stdout + proc.stderr
        assert f"expected {v2}" in proc.stdout + proc.stderr or v2 in proc.stdout
        assert fleet.links("ep1")[0] == v1
        assert _get(f"{url}/status")[1]["models"]["gemma_4b"]["version_id"] == v1
        assert fleet.log()[-1]["status"] == "rolled_back"
    finally:
        deaf.kill()


@pytest.mark.e2e
def test_restart_reload_method_waits_for_readiness(fleet, served) -> None:
    url, pidfile = served
    v2 = fleet.versions["cycle2"]
    old_pid = int(pidfile.read_text())
    command = [
        sys.executable,
        str(ROOT / "scripts" / "service.py"),
        "restart",
        "--endpoint",
        "ep1",
        "--params",
        str(fleet.params),
    ]
    fleet.set_endpoint("ep1", reload_method="restart", restart_command=command)
    proc = fleet.deploy("--cycle", "2", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert int(pidfile.read_text()) != old_pid  # a real restart: a new process
    assert _get(f"{url}/status")[1]["models"]["gemma_4b"]["version_id"] == v2


@pytest.mark.e2e
def test_stale_pidfile_never_signals_a_stranger(fleet: Fleet, served, tmp_path: Path) -> None:
    """kill -9 leaves the service's pidfile behind; its pid now belongs to an unrelated
    process. Neither a deploy's SIGUSR1 nor `service.py stop`'s SIGTERM may reach it."""
    url, pidfile = served
    v1 = fleet.versions["cycle1"]
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    _wait_until(lambda: _get(f"{url}/health")[0] != 200)
    stranger = subprocess.Popen(["sleep", "120"])
    try:
        pidfile.write_text(f"{stranger.pid}\n")  # the pid, reused by a stranger
        proc = fleet.deploy("--cycle", "2", "--models", "gemma_4b", "--endpoints", "ep1")
        assert proc.returncode == 5, proc.stdout + proc.stderr
        assert "is stale: no running service holds it" in proc.stdout + proc.stderr
        assert fleet.links("ep1")[0] == v1  # the links went back
        stop = run_script("service.py", "stop", "--endpoint", "ep1", params=fleet.params)
        assert stop.returncode == 0, stop.stderr
        time.sleep(0.2)
        assert stranger.poll() is None, "the stranger was signalled"
    finally:
        stranger.kill()
        stranger.wait()


def _live(url: str) -> tuple[str, str]:
    """A live request: (X-Adapter-Version, text)."""
    body = json.dumps({"model": "gemma_4b", "text": JAMES}).encode()
    req = urllib.request.Request(f"{url}/translate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.headers["X-Adapter-Version"], json.loads(resp.read())["text"]


JAMES = "The apostle James wrote about faith and works."


@pytest.mark.e2e
def test_precheck_runs_inside_the_service_and_refuses_a_regressed_candidate(
    fleet: Fleet, served, tmp_path: Path
) -> None:
    """The agent cannot import torch at all: a pre-check that loaded a base beside the
    service would fail. The regressed cycle 3 is refused while live requests flow, every one
    answered by cycle 1; cycle 2 then passes with its shadow replay in the deploy log."""
    from fixtures_fleet import agent_wrapper

    url, _ = served
    v1, v2, v3 = (fleet.versions[f"cycle{n}"] for n in (1, 2, 3))
    no_torch = "import sys; sys.modules.update(dict.fromkeys(('torch', 'transformers', 'peft')))"
    fleet.set_endpoint("ep1", python=str(agent_wrapper(tmp_path, no_torch)))
    answers, stop = [], threading.Event()

    def client() -> None:
        while not stop.is_set():
            answers.append(_live(url))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        proc = fleet.deploy("--cycle", "3", "--models", "gemma_4b", "--endpoints", "ep1")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    pre = fleet.log()[-1]["health_check_results_per_model"]["gemma_4b"]["pre_activation"]
    assert pre["via"] == "service" and not pre["all_passed"] and pre["failures"]
    assert answers and all(version == v1 and "Santiago" in text for version, text in answers)
    assert v3 not in {version for version, _ in answers}
    proc = fleet.deploy("--cycle", "2", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pre = fleet.log()[-1]["health_check_results_per_model"]["gemma_4b"]["pre_activation"]
    assert pre["via"] == "service" and pre["all_passed"]
    assert pre["shadow"]["compared"] >= 1 and pre["shadow"]["changed"] >= 1
    assert pre["shadow"]["worst"][0]["input"] == JAMES
    status = _get(f"{url}/status")[1]
    assert status["base_loads"] == 1 and status["models"]["gemma_4b"]["version_id"] == v2
    shown = run_script("status.py", params=fleet.params).stdout
    assert "(service), shadow" in shown
    from test_records import check_all

    check_all(fleet)
