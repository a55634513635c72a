"""Every record the project writes has the shape of the plan (the operator's plan), checked
against the JSON Schemas in adapter_deploy/schemas after each kind of run."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from adapter_deploy.common.failpoints import arm
from adapter_deploy.kit.net import free_port
from fixtures_fleet import Fleet
from fixtures_repo import run_script
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

DEPLOY_EP1 = ("--models", "gemma_4b", "--endpoints", "ep1")


def _schemas() -> dict[str, dict[str, Any]]:
    folder = resources.files("adapter_deploy") / "schemas"
    return {p.name: json.loads(p.read_text()) for p in folder.iterdir() if p.name.endswith(".json")}


SCHEMAS = _schemas()
REGISTRY = Registry().with_resources(
    (name, Resource.from_contents(schema)) for name, schema in SCHEMAS.items()
)


def check(record: Any, schema: str) -> None:
    Draft202012Validator(SCHEMAS[schema], registry=REGISTRY).validate(record)


def check_all(fleet: Fleet) -> list[dict[str, Any]]:
    """The training side's log, manifest and status, and each endpoint's status.json."""
    log = fleet.log()
    for entry in log:
        check(entry, "deploy_log_entry.schema.json")
    check(fleet.store.manifest(), "manifest.schema.json")
    status = fleet.store.adapters / "status.json"
    if status.exists():
        check(json.loads(status.read_text()), "status.schema.json")
    for adapter_dir in fleet.endpoints.values():
        if (adapter_dir / "status.json").exists():
            check(
                json.loads((adapter_dir / "status.json").read_text()), "endpoint_status.schema.json"
            )
    return log


def test_the_schemas_are_valid_and_refuse_the_old_shapes() -> None:
    for schema in SCHEMAS.values():
        Draft202012Validator.check_schema(schema)
    old_entry = {
        "timestamp": "2026-03-15T15:00:00Z", "action": "deploy", "cycle": 1,
        "models": ["gemma_4b"], "endpoint": "mac-dev", "status": "success", "duration_s": 1.0,
        "phases_completed": ["activate", "health_check", "transfer", "verify"],
        "health_check_results": {"gemma_4b": {"pre_activation": {"all_passed": True}}},
    }  # fmt: skip
    with pytest.raises(Exception, match="latency_p50_ms|all_passed"):
        check(old_entry, "deploy_log_entry.schema.json")


@pytest.mark.e2e
def test_healthy_aborted_rolled_back_and_manual_rollback_records(fleet: Fleet) -> None:
    v1, v2 = fleet.versions["cycle1"], fleet.versions["cycle2"]
    assert fleet.deploy("--cycle", "1", *DEPLOY_EP1).returncode == 0
    log = check_all(fleet)
    assert log[-1]["phases_completed"] == [
        "version",
        "transfer",
        "health_check",
        "activate",
        "verify",
    ]
    assert log[-1]["health_check_results"]["post_activation"]["all_passed"] is True
    assert log[-1]["health_check_results"]["pre_activation"]["latency_p50_ms"] > 0
    assert fleet.deploy("--cycle", "3", *DEPLOY_EP1).returncode == 4  # regressed: aborted
    log = check_all(fleet)
    assert log[-1]["status"] == "aborted"
    assert log[-1]["health_check_results"]["pre_activation"]["all_passed"] is False
    arm(fleet.endpoints["ep1"], "verify", "fail")
    assert fleet.deploy("--cycle", "2", *DEPLOY_EP1).returncode == 4  # rolled back
    log = check_all(fleet)
    assert log[-1]["status"] == "rolled_back"
    assert fleet.deploy("--cycle", "2", *DEPLOY_EP1).returncode == 0
    assert fleet.deploy("--rollback", *DEPLOY_EP1).returncode == 0
    log = check_all(fleet)
    assert log[-1]["action"] == "rollback" and fleet.links("ep1")[0] == v1
    deployments = fleet.store.manifest()["deployments"]
    assert deployments[-1]["endpoints"] == ["ep1"] and deployments[-1]["models"] == ["gemma_4b"]
    endpoint = json.loads((fleet.endpoints["ep1"] / "status.json").read_text())
    assert endpoint["endpoint"] == "ep1"
    model = endpoint["models"]["gemma_4b"]
    assert model["active_version"] == v1 and model["previous_version"] == v2
    assert model["health_status"] == "healthy" and model["last_reload"].endswith("Z")


def test_a_single_phase_writes_its_log_entry(fleet: Fleet) -> None:
    proc = run_script("phase.py", "transfer", "--cycle", "1", *DEPLOY_EP1, params=fleet.params)
    assert proc.returncode == 0, proc.stderr
    log = check_all(fleet)
    assert [(e["action"], e["phases_completed"]) for e in log] == [("transfer", ["transfer"])]
    assert not (fleet.store.adapters / "status.json").exists()  # nothing runs differently


@pytest.mark.e2e
def test_a_service_session_lists_every_model(fleet: Fleet, tmp_path: Path) -> None:
    """The plan's session record names every model of the endpoint, null when none."""
    assert fleet.deploy("--cycle", "1", *DEPLOY_EP1).returncode == 0
    from test_serve import Service

    diagnostics = tmp_path / "diag.jsonl"
    args = ["--adapter-dir", str(fleet.endpoints["ep1"]), "--models", "gemma_4b", "whisper"]
    args += ["--platform", "cpu", "--diagnostics", str(diagnostics)]
    svc = Service(tmp_path, args, free_port())
    try:
        svc.wait(200)
    finally:
        svc.stop()
    session = json.loads(diagnostics.read_text().splitlines()[0])
    check(session, "session.schema.json")
    assert session["adapters"] == {"gemma_4b": fleet.versions["cycle1"], "whisper": None}
