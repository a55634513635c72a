"""The operator's commands around a deploy: make deploy/rollback/status, phases, bootstrap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from adapter_deploy import protocol as p
from adapter_deploy.config import load_params
from adapter_deploy.deploy.remote import Session, connect
from fixtures_fleet import Fleet
from fixtures_repo import ROOT, run_script


def make(fleet: Fleet, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", *args, f"PARAMS={fleet.params}"], cwd=ROOT, capture_output=True, text=True
    )


def test_make_deploy_status_and_bare_rollback(fleet: Fleet) -> None:
    v1, v2 = fleet.versions["cycle1"], fleet.versions["cycle2"]
    for cycle in ("1", "2"):
        proc = make(fleet, "deploy", f"CYCLE={cycle}", "ENDPOINT=ep1 ep2", "MODELS=gemma_4b")
        assert proc.returncode == 0, proc.stderr
    assert fleet.links("ep1") == fleet.links("ep2") == (v2, v1)
    link = fleet.endpoints["ep1"].parent / "fine_tuned_gemma_mi_A"
    assert os.path.realpath(link) == str(fleet.endpoints["ep1"] / "gemma_4b" / "releases" / v2)

    proc = make(fleet, "status", "JSON=1")
    assert proc.returncode == 0, proc.stderr
    status = {e["endpoint"]: e for e in json.loads(proc.stdout)["endpoints"]}
    assert status["ep1"]["models"]["gemma_4b"]["active_version"] == v2
    assert status["ep2"]["models"]["gemma_4b"]["previous_version"] == v1
    table = make(fleet, "status").stdout
    assert "ep1" in table and v2 in table

    proc = make(fleet, "rollback")
    assert proc.returncode == 0, proc.stderr
    assert "undoing deploy" in proc.stdout and "gemma_4b on ep1, ep2" in proc.stdout
    assert fleet.links("ep1")[0] == fleet.links("ep2")[0] == v1
    assert fleet.log()[-1]["action"] == "rollback"

    # v2 was rolled back from: a rollback's own choice skips it now
    proc = make(fleet, "rollback", "ENDPOINT=ep1", "MODELS=gemma_4b")
    assert "Error 6" in proc.stderr, proc.stdout + proc.stderr  # the script exited 6
    assert "no release to roll back to" in proc.stdout + proc.stderr
    # ... but TO= names it explicitly, and an explicit deploy runs every check again
    proc = make(fleet, "rollback", "ENDPOINT=ep1", "MODELS=gemma_4b", f"TO={v2}")
    assert proc.returncode == 0, proc.stderr
    assert fleet.links("ep1")[0] == v2


def test_nothing_to_roll_back(fleet: Fleet) -> None:
    proc = make(fleet, "rollback")
    assert proc.returncode == 2  # make's own code; the script's is 6
    assert "no successful deploy" in proc.stderr
    direct = fleet.deploy("--rollback")
    assert direct.returncode == 6


@pytest.mark.e2e
def test_phases_one_by_one_are_safe_to_rerun(fleet: Fleet) -> None:
    v1 = fleet.versions["cycle1"]
    args = ("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1", "--json")
    for phase in ("transfer", "transfer", "precheck", "activate", "activate", "verify"):
        proc = run_script("phase.py", phase, *args, params=fleet.params)
        assert proc.returncode == 0, (phase, proc.stderr)
    assert fleet.links("ep1") == (v1, None)
    again = json.loads(run_script("phase.py", "transfer", *args, params=fleet.params).stdout)
    assert again["endpoints"][0]["models"][0]["bytes_sent"] == 0
    proc = run_script(
        "phase.py",
        "precheck",
        "--cycle",
        "3",
        "--models",
        "gemma_4b",
        "--endpoints",
        "ep1",
        params=fleet.params,
    )
    assert proc.returncode == 2 and "was not transferred" in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_releases_are_pruned_to_keep_but_never_active_or_previous(fleet: Fleet) -> None:
    data = fleet.params.read_text().replace("keep: 3", "keep: 2")
    fleet.params.write_text(data + "release: {keep: 2}\n" if "release:" not in data else data)
    for cycle in ("1", "2", "1"):
        proc = fleet.deploy("--cycle", cycle, "--models", "gemma_4b", "--endpoints", "ep1")
        assert proc.returncode == 0, proc.stderr
    releases = fleet.endpoints["ep1"] / "gemma_4b" / "releases"
    assert sorted(p.name for p in releases.iterdir()) == sorted(
        [fleet.versions["cycle1"], fleet.versions["cycle2"]]
    )


@pytest.mark.e2e
def test_bootstrap_copies_the_project(fleet: Fleet, tmp_path: Path) -> None:
    target = tmp_path / "endpoint-checkout"
    fleet.set_endpoint("ep1", project_dir=str(target))
    # The fleet's params file lives in a store without code: it names the checkout to send.
    proc = run_script("bootstrap.py", "--endpoints", "ep1", "--no-install", params=fleet.params)
    assert proc.returncode == 2 and "not an Adapter Deploy checkout" in proc.stderr
    args = ("--endpoints", "ep1", "--no-install", "--from", str(ROOT))
    proc = run_script("bootstrap.py", *args, params=fleet.params)
    assert proc.returncode == 0, proc.stderr
    package = target / "scripts" / "adapter_deploy"
    assert (package / "agent" / "__main__.py").is_file() and (target / "engines").is_dir()
    assert (package / "service").is_dir() and (target / "pyproject.toml").is_file()
    assert not (package / "kit").exists(), "test kits are never shipped to endpoints"
    assert not (target / ".git").exists() and not (target / "adapters").exists()
    assert not (target / "tests").exists()
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.e2e
def test_dropped_ssh_connection_releases_the_lock(fleet: Fleet) -> None:
    params = load_params(fleet.params)
    with tempfile.TemporaryDirectory() as control:
        conn = connect("ep1", params.endpoint("ep1"), Path(control))
        first = Session(conn, str(fleet.endpoints["ep1"]))
        os.kill(first.proc.pid, signal.SIGKILL)  # the ssh client dies mid-deploy
        first.proc.wait()
        deadline = time.monotonic() + 20
        while True:
            try:
                second = Session(
                    connect("ep1", params.endpoint("ep1"), Path(control)),
                    str(fleet.endpoints["ep1"]),
                )
                break
            except Exception:
                assert time.monotonic() < deadline, "lock never released"
                time.sleep(0.2)
        assert second.call(p.Hello())["pid"] > 0
        second.close()


@pytest.mark.e2e
def test_history_shows_metrics_trend_and_deployments(fleet: Fleet) -> None:
    assert (
        fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1").returncode == 0
    )
    assert (
        fleet.deploy("--cycle", "3", "--models", "gemma_4b", "--endpoints", "ep1").returncode == 4
    )
    data = json.loads(run_script("history.py", "--json", params=fleet.params).stdout)
    rows = {v["cycle"]: v for v in data["gemma_4b"]}
    assert rows[1]["deployments"] == ["deploy@ep1:success"]
    assert rows[3]["deployments"] == ["deploy@ep1:aborted"]
    table = make(fleet, "history", "MODEL=gemma_4b").stdout
    assert fleet.versions["cycle1"] in table and "deploy@ep1:aborted" in table
    assert "final_loss" in table
