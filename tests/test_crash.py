"""Crashes at every step of activation and rollback, and hostile names: the endpoint always ends up
serving a complete, verified release, and nothing injected ever runs."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from adapter_deploy.common import failpoints
from adapter_deploy.common.failpoints import arm
from fixtures_fleet import Fleet
from fixtures_repo import ROOT

POINTS = ["activate.before_flip", "activate.after_flip", "activate.after_reload"]
RESTORE_POINTS = ["restore.before_links", "restore.after_links"]
GEMMA_EP1 = ("--models", "gemma_4b", "--endpoints", "ep1")


def _assert_complete(fleet: Fleet, ep: str) -> None:
    """active and previous (where present) resolve to complete releases; no lock is held."""
    root = fleet.endpoints[ep] / "gemma_4b"
    for link in ("active", "previous"):
        if os.path.islink(root / link):
            target = (root / link).resolve(strict=True)
            assert {p.name for p in target.iterdir()} >= {
                "adapter_config.json",
                "adapter_model.safetensors",
            }
    # The endpoint died with os._exit, so its flock must be gone with it: no waiting.
    with open(fleet.endpoints[ep] / ".deploy.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _armed(fleet: Fleet, ep: str) -> dict:
    """Failpoints still armed: a crash somewhere else than the armed step leaves its own."""
    path = fleet.endpoints[ep] / failpoints.FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _assert_settled(fleet: Fleet, ep: str, active: str, bad: str) -> None:
    """Where an uninterrupted run ends: `active` serves, verified; `bad` is never picked again."""
    assert fleet.links(ep)[0] == active
    adapter_dir = fleet.endpoints[ep]
    status = json.loads((adapter_dir / "status.json").read_text())["models"]["gemma_4b"]
    assert status["verified"] == active
    assert bad in json.loads((adapter_dir / "gemma_4b" / "bad.json").read_text())


def _assert_crashed(fleet: Fleet, point: str, proc) -> None:
    """The endpoint died at `point` (its failpoint used up): exit 3, complete releases, and
    ep1 serves cycle 1 or cycle 2."""
    assert proc.returncode == 3, (point, proc.stdout + proc.stderr)
    assert _armed(fleet, "ep1") == {}
    _assert_complete(fleet, "ep1")
    assert fleet.links("ep1")[0] in (fleet.versions["cycle1"], fleet.versions["cycle2"])


def test_endpoint_killed_right_after_the_flip_converges_on_the_rerun(fleet: Fleet) -> None:
    """The default tier's kill -9 case: the endpoint dies between the link flip and the reload
    (the new release active, not yet served); the rerun ends verified on it. Every other step
    is the e2e tier's matrix below."""
    v2, ep1 = fleet.versions["cycle2"], fleet.endpoints["ep1"]
    assert fleet.deploy("--cycle", "1", *GEMMA_EP1).returncode == 0
    arm(ep1, "activate.after_flip", "crash")
    _assert_crashed(fleet, "activate.after_flip", fleet.deploy("--cycle", "2", *GEMMA_EP1))
    again = fleet.deploy("--cycle", "2", *GEMMA_EP1)
    assert again.returncode == 0, again.stdout + again.stderr
    assert fleet.links("ep1")[0] == v2
    assert json.loads((ep1 / "status.json").read_text())["models"]["gemma_4b"]["verified"] == v2


@pytest.mark.e2e
def test_endpoint_killed_at_every_activation_and_rollback_step_converges(fleet: Fleet) -> None:
    v1, v2 = fleet.versions["cycle1"], fleet.versions["cycle2"]
    ep1 = fleet.endpoints["ep1"]
    assert fleet.deploy("--cycle", "1", *GEMMA_EP1).returncode == 0
    for i, point in enumerate(POINTS):
        arm(ep1, point, "crash")
        _assert_crashed(fleet, point, fleet.deploy("--cycle", "2", *GEMMA_EP1))
        again = fleet.deploy("--cycle", "2", *GEMMA_EP1)  # the lock is free; the rerun converges
        assert again.returncode == 0, (point, again.stdout + again.stderr)
        assert fleet.links("ep1")[0] == v2
        status = json.loads((ep1 / "status.json").read_text())
        assert status["models"]["gemma_4b"]["verified"] == v2
        # The way back to v1 is a manual rollback: kill the endpoint at each of its steps too.
        if i < len(RESTORE_POINTS):
            arm(ep1, RESTORE_POINTS[i], "crash")
            cut = fleet.deploy("--rollback", *GEMMA_EP1, "--to", v1)
            _assert_crashed(fleet, RESTORE_POINTS[i], cut)
        back = fleet.deploy("--rollback", *GEMMA_EP1, "--to", v1)
        assert back.returncode == 0, back.stdout + back.stderr
        _assert_settled(fleet, "ep1", active=v1, bad=v2)


@pytest.mark.e2e
def test_endpoint_killed_during_automatic_rollback_converges(fleet: Fleet) -> None:
    """A failed VERIFY rolls back through the same restore step; kill the endpoint there."""
    v1, v2 = fleet.versions["cycle1"], fleet.versions["cycle2"]
    ep1 = fleet.endpoints["ep1"]
    assert fleet.deploy("--cycle", "1", *GEMMA_EP1).returncode == 0
    for point in RESTORE_POINTS:
        arm(ep1, "verify", "fail")
        arm(ep1, point, "crash")
        _assert_crashed(fleet, point, fleet.deploy("--cycle", "2", *GEMMA_EP1))
        # v2 still fails VERIFY: the rerun must end on v1 verified, never on v2 (which is
        # still `active` after a crash before the links went back).
        arm(ep1, "verify", "fail")
        again = fleet.deploy("--cycle", "2", *GEMMA_EP1, "--json")
        assert again.returncode == 4, (point, again.stdout + again.stderr)
        assert json.loads(again.stdout)["endpoints"][0]["models"][0]["status"] == "rolled_back"
        _assert_settled(fleet, "ep1", active=v1, bad=v2)


def test_hostile_names_are_rejected_and_never_run(fleet: Fleet, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    hostile = [
        f"x;touch {canary}", f"$(touch {canary})", f"`touch {canary}`", "-rf", "../ep1",
        "/etc/passwd", "a\nb", "a b", "ép1", "'quoted'",
    ]  # fmt: skip
    # The matrix runs in this process; the first name also through a real process and every
    # name a shell would read through make (the recipe's quoting is what is under test there).
    for i, name in enumerate(hostile):
        for args in (
            ("--cycle", "1", "--models", name, "--endpoints", "ep1"),
            ("--cycle", "1", "--models", "gemma_4b", "--endpoints", name),
            ("--rollback", "--endpoints", "ep1", "--to", name),
        ):
            proc = fleet.deploy(*args) if i == 0 else fleet.deploy_here(*args)
            assert proc.returncode == 2, (name, args, proc.stdout + proc.stderr)
        if i < 3:
            proc = subprocess.run(
                ["make", "-s", "deploy", "CYCLE=1", f"ENDPOINT={name}", f"PARAMS={fleet.params}"],
                cwd=ROOT, capture_output=True, text=True,
            )  # fmt: skip
            assert proc.returncode != 0
    data = yaml.safe_load(fleet.params.read_text())
    data["endpoints"]["ep\x001"] = data["endpoints"]["ep2"]  # argv cannot carry NUL; YAML can
    fleet.params.write_text(yaml.safe_dump(data))
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep2")
    assert proc.returncode == 2 and "invalid model/endpoint names" in proc.stderr
    del data["endpoints"]["ep\x001"]
    data["endpoints"]["ep1"]["host"] = f"-oProxyCommand=touch {canary}"
    fleet.params.write_text(yaml.safe_dump(data))
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 2 and "endpoints.ep1.host" in proc.stderr
    assert not canary.exists()
    assert not (fleet.endpoints["ep1"] / "gemma_4b").exists()
