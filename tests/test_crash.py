"""Crashes at every step of activation, and hostile names: the endpoint always ends up
serving a complete, verified release, and nothing injected ever runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from deploycore.failpoints import arm
from fixtures_fleet import Fleet
from fixtures_repo import ROOT

POINTS = ["activate.before_flip", "activate.after_flip", "activate.after_reload"]


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


@pytest.mark.slow
def test_endpoint_killed_at_every_activation_step_converges(fleet: Fleet) -> None:
    v1, v2 = fleet.versions["cycle1"], fleet.versions["cycle2"]
    deploy = ("--models", "gemma_4b", "--endpoints", "ep1")
    assert fleet.deploy("--cycle", "1", *deploy).returncode == 0
    for point in POINTS:
        arm(fleet.endpoints["ep1"], point, "crash")
        crashed = fleet.deploy("--cycle", "2", *deploy)
        assert crashed.returncode == 3, (point, crashed.stdout + crashed.stderr)
        _assert_complete(fleet, "ep1")
        assert fleet.slots("ep1")[0] in (v1, v2)
        again = fleet.deploy("--cycle", "2", *deploy)  # the lock is free; the rerun converges
        assert again.returncode == 0, (point, again.stdout + again.stderr)
        assert fleet.slots("ep1")[0] == v2
        status = yaml.safe_load((fleet.endpoints["ep1"] / "status.json").read_text())
        assert status["models"]["gemma_4b"]["verified"] == v2
        back = fleet.deploy("--rollback", *deploy, "--to", v1)
        assert back.returncode == 0, back.stderr
        bad = fleet.endpoints["ep1"] / "gemma_4b" / "bad.json"
        bad.unlink(missing_ok=True)


def test_hostile_names_are_rejected_and_never_run(fleet: Fleet, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    hostile = [
        f"x;touch {canary}", f"$(touch {canary})", f"`touch {canary}`", "-rf", "../ep1",
        "/etc/passwd", "a\nb", "a b", "ép1", "'quoted'",
    ]  # fmt: skip
    for name in hostile:
        for args in (
            ("--cycle", "1", "--models", name, "--endpoints", "ep1"),
            ("--cycle", "1", "--models", "gemma_4b", "--endpoints", name),
            ("--rollback", "--endpoints", "ep1", "--to", name),
        ):
            proc = fleet.deploy(*args)
            assert proc.returncode == 2, (name, args, proc.stdout + proc.stderr)
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
