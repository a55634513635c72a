"""Staged rollout over real sshd endpoints: a canary wave (ep1), then the church group (ep2,
ep3); each wave verified (and soaked) before the next; a failure holds the later waves."""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from adapter_deploy.common import failpoints
from adapter_deploy.common.errors import RolloutHalted
from adapter_deploy.common.failpoints import arm
from adapter_deploy.config import load_params
from adapter_deploy.deploy.rollout import held_back, plan_lines, plan_waves, progress_of
from fixtures_fleet import Fleet
from fixtures_repo import run_script_here

GEMMA = ("--models", "gemma_4b")
ROLLOUT = {
    "groups": {"church": ["ep2", "ep3"]},
    "waves": [
        {"name": "canary", "endpoints": ["ep1"], "soak_s": 1},
        {"name": "church", "endpoints": ["church"]},
    ],
}


@pytest.fixture
def waves(fleet: Fleet, sshd, tmp_path: Path) -> Fleet:
    """The fleet with a third endpoint and the rollout above."""
    fleet.endpoints["ep3"] = tmp_path / "ep3" / "adapters"
    data = yaml.safe_load(fleet.params.read_text())
    data["endpoints"]["ep3"] = sshd.endpoint(fleet.endpoints["ep3"])
    data["rollout"] = ROLLOUT
    fleet.params.write_text(yaml.safe_dump(data))
    return fleet


def _untouched(fleet: Fleet, *names: str) -> None:
    """Nothing of any release reached these endpoints: no link, no release, no landing."""
    for name in names:
        root = fleet.endpoints[name]
        found = [p for p in root.rglob("*") if "releases" in p.parts or p.name == "active"]
        assert not found, (name, found)


def _stamp(entry: dict) -> float:
    return datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()


def test_a_canary_that_fails_verify_holds_the_later_waves(waves: Fleet) -> None:
    arm(waves.endpoints["ep1"], "verify", "fail")
    proc = waves.deploy("--cycle", "1", *GEMMA)
    out = proc.stdout + proc.stderr
    assert proc.returncode == RolloutHalted.exit_code, out
    assert "rollout plan: wave 1/2 canary: ep1, then soak 1 s" in out
    assert "rollout halted at wave canary" in out
    _untouched(waves, "ep2", "ep3")
    log = waves.log()
    assert [(e["endpoint"], e["status"]) for e in log] == [
        ("ep1", "rolled_back"),
        ("ep2", "held"),
        ("ep3", "held"),
    ]
    assert log[1]["rollout"]["halted"]["failed"] == ["ep1"]
    status = json.loads(run_script_here("status.py", "--json", params=waves.params).stdout)
    held = {e["endpoint"]: e["rollout"] for e in status["endpoints"]}
    assert held["ep1"] is None and "halted at wave canary" in held["ep2"], held
    history = json.loads(run_script_here("history.py", "--json", params=waves.params).stdout)
    cycle1 = history["gemma_4b"][0]
    assert cycle1["rollouts"] == [f"{log[0]['run_id']}: 1/2 waves, halted at canary "
                                  f"({log[1]['rollout']['halted']['reason']})"]  # fmt: skip


def test_dry_run_prints_only_the_plan(waves: Fleet) -> None:
    proc = waves.deploy_here("--cycle", "1", *GEMMA, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "wave 1/2 canary: ep1, then soak 1 s and check again" in proc.stdout
    assert "wave 2/2 church: ep2, ep3" in proc.stdout
    assert not waves.log()
    _untouched(waves, "ep1", "ep2", "ep3")


def test_waves_follow_the_rollout_and_keep_only_the_chosen_endpoints(waves: Fleet) -> None:
    params = load_params(waves.params)
    assert [(w.name, w.endpoints) for w in plan_waves(params, ["ep3", "ep1", "ep2"])] == [
        ("canary", ["ep1"]),
        ("church", ["ep2", "ep3"]),
    ]
    assert [(w.name, w.endpoints) for w in plan_waves(params, ["ep3"])] == [("church", ["ep3"])]
    # a soak protects the waves after it: a deploy to the canary alone does not wait
    assert plan_lines(plan_waves(params, ["ep1"])) == ["wave 1/1 canary: ep1"]


@pytest.mark.parametrize(
    "rollout, problem",
    [
        ({"waves": [{"name": "a", "endpoints": ["nowhere"]}]}, "neither an endpoint nor a group"),
        (
            {"waves": [{"name": "a", "endpoints": ["ep1"]}, {"name": "b", "endpoints": ["ep1"]}]},
            "ep1 is in waves a and b",
        ),
        ({"groups": {"g": ["ep9"]}, "waves": [{"name": "a", "endpoints": ["g"]}]}, "unknown"),
        ({"waves": []}, "waves"),
    ],
)
def test_a_wrong_rollout_is_refused_when_params_load(waves: Fleet, rollout, problem) -> None:
    data = yaml.safe_load(waves.params.read_text())
    waves.params.write_text(yaml.safe_dump({**data, "rollout": rollout}))
    proc = waves.deploy_here("--cycle", "1", *GEMMA)
    assert proc.returncode == 2 and problem in proc.stderr, proc.stderr
    assert not waves.log()


def test_held_and_progress_read_from_the_deploy_log() -> None:
    where = {"wave": "canary", "index": 1, "waves": ["canary", "church"]}
    halted = {**where, "halted": {"wave": "canary", "failed": ["ep1"], "reason": "ep1: boom"}}
    log = [
        {"action": "deploy", "run_id": "r1", "endpoint": "ep1", "status": "rolled_back",
         "versions": {"m": "v1"}, "rollout": halted},
        {"action": "deploy", "run_id": "r1", "endpoint": "ep2", "status": "held",
         "versions": {"m": "v1"}, "rollout": halted},
        {"action": "deploy", "run_id": "r1", "endpoint": "ep3", "status": "held",
         "versions": {"m": "v1"}, "rollout": halted},
        {"action": "deploy", "run_id": "r2", "endpoint": "ep3", "status": "success",
         "versions": {"m": "v1"}},  # a plain deploy reached ep3 since
    ]  # fmt: skip
    assert held_back(log) == {"ep2": "held: rollout r1 halted at wave canary"}
    assert progress_of(log, "m", "v1") == ["r1: 1/2 waves, halted at canary (ep1: boom)"]


@pytest.mark.e2e
def test_a_good_cycle_goes_wave_by_wave_each_after_the_last_verified_and_soaked(
    waves: Fleet,
) -> None:
    proc = waves.deploy("--cycle", "1", *GEMMA)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = waves.log()
    assert [(e["endpoint"], e["status"], e["rollout"]["index"]) for e in log] == [
        ("ep1", "success", 1),
        ("ep2", "success", 2),
        ("ep3", "success", 2),
    ]
    soak = log[0]["health_check_results_per_model"]["gemma_4b"]["soak"]
    assert soak["all_passed"] is True
    # One deployer logs in order: the second wave starts after the canary's soak passed.
    said = proc.stderr
    assert said.index("wave canary passed its soak check") < said.index("rollout wave 2/2 church")
    canary_done = _stamp(log[0])  # recorded after its soak; records keep whole seconds
    for entry in log[1:]:
        assert _stamp(entry) - entry["duration_s"] >= canary_done - 1.0, entry
    v1 = waves.versions["cycle1"]
    assert all(waves.links(name)[0] == v1 for name in ("ep1", "ep2", "ep3"))
    history = json.loads(run_script_here("history.py", "--json", params=waves.params).stdout)
    assert history["gemma_4b"][0]["rollouts"] == [f"{log[0]['run_id']}: 2/2 waves"]


@pytest.mark.e2e
def test_a_failed_soak_rolls_the_canary_back_holds_the_rest_and_the_rerun_completes(
    waves: Fleet,
) -> None:
    v1, v2 = waves.versions["cycle1"], waves.versions["cycle2"]
    assert waves.deploy("--cycle", "1", *GEMMA).returncode == 0
    arm(waves.endpoints["ep1"], "verify", ["pass", "fail"])  # VERIFY passes, the soak does not
    proc = waves.deploy("--cycle", "2", *GEMMA)
    assert proc.returncode == RolloutHalted.exit_code, proc.stdout + proc.stderr
    assert waves.links("ep1")[0] == v1  # rolled back
    assert waves.links("ep2")[0] == v1 and waves.links("ep3")[0] == v1  # held
    assert [(e["endpoint"], e["status"]) for e in waves.log()[3:]] == [
        ("ep1", "rolled_back"),
        ("ep2", "held"),
        ("ep3", "held"),
    ]
    again = waves.deploy("--cycle", "2", *GEMMA)  # the cause fixed (the failpoint is spent)
    assert again.returncode == 0, again.stdout + again.stderr
    assert all(waves.links(name)[0] == v2 for name in ("ep1", "ep2", "ep3"))


@pytest.mark.e2e
def test_a_failed_soak_of_a_first_release_leaves_the_canary_with_no_release(waves: Fleet) -> None:
    arm(waves.endpoints["ep1"], "verify", ["pass", "fail"])  # VERIFY passes, the soak does not
    proc = waves.deploy("--cycle", "1", *GEMMA)
    assert proc.returncode == RolloutHalted.exit_code, proc.stdout + proc.stderr
    assert waves.links("ep1") == (None, None)  # nothing earlier: the release is taken away
    bad = json.loads((waves.endpoints["ep1"] / "gemma_4b" / "bad.json").read_text())
    assert waves.versions["cycle1"] in bad
    _untouched(waves, "ep2", "ep3")


@pytest.mark.e2e
def test_a_deployer_killed_between_waves_leaves_the_later_waves_untouched(
    waves: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as env:
        env.setenv(failpoints.DEPLOYER_ENV, "rollout.after_wave")
        killed = waves.deploy("--cycle", "1", *GEMMA)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    _untouched(waves, "ep2", "ep3")
    assert [(e["endpoint"], e["status"]) for e in waves.log()] == [("ep1", "success")]
    deadline = time.monotonic() + 20
    while (again := waves.deploy("--cycle", "1", *GEMMA)).returncode == 7:  # lock let go
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert again.returncode == 0, again.stdout + again.stderr
    rerun = waves.log()[1:]
    assert [(e["endpoint"], e["per_model"]["gemma_4b"]["status"]) for e in rerun] == [
        ("ep1", "unchanged"),  # already verified on this release: skipped, nothing to soak
        ("ep2", "success"),
        ("ep3", "success"),
    ]
    assert rerun[0]["bytes_sent"] == 0 and "soaking" not in again.stderr
