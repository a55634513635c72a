"""scripts/deploy_adapters.py over a real sshd to two endpoints with real kit adapters."""

from __future__ import annotations

import json

import pytest
import yaml
from fixtures_fleet import Fleet, restart_deploy_and_rollback, version


def test_deploy_cycle1_to_both_endpoints(fleet: Fleet) -> None:
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1", "ep2")
    assert proc.returncode == 0, proc.stderr
    v1 = fleet.versions["cycle1"]
    for ep in ("ep1", "ep2"):
        assert fleet.links(ep) == (v1, None)
        release = fleet.endpoints[ep] / "gemma_4b" / "releases" / v1
        assert sorted(p.name for p in release.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "training_metrics.json",
        ]
    log = fleet.log()
    assert {e["endpoint"] for e in log} == {"ep1", "ep2"}
    assert all(e["status"] == "success" for e in log)
    assert log[0]["phases_completed"] == [
        "version",
        "transfer",
        "health_check",
        "activate",
        "verify",
    ]
    assert "ep1" in (fleet.store.adapters / "status.json").read_text()
    assert "gemma_4b#ep1#1" in fleet.store.git("tag", "-l").split()


def test_regressed_aborts_then_cycle2_then_rollback_then_redeploy(fleet: Fleet) -> None:
    v1, v2 = fleet.versions["cycle1"], fleet.versions["cycle2"]
    assert (
        fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1").returncode == 0
    )
    proc = fleet.deploy("--cycle", "3", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 4, proc.stderr
    assert "pre-activation health check failed" in proc.stdout + proc.stderr
    assert fleet.links("ep1") == (v1, None)

    proc = fleet.deploy("--cycle", "2", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 0, proc.stderr
    assert fleet.links("ep1") == (v2, v1)

    proc = fleet.deploy("--rollback", "--endpoints", "ep1", "--models", "gemma_4b")
    assert proc.returncode == 0, proc.stderr
    assert fleet.links("ep1")[0] == v1

    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["endpoints"][0]["models"][0]["status"] == "unchanged"
    assert result["endpoints"][0]["models"][0]["bytes_sent"] == 0


def test_a_latency_limit_no_answer_can_meet_refuses_at_the_pre_check(fleet: Fleet) -> None:
    data = yaml.safe_load(fleet.params.read_text())
    data["health_check"]["latency_limit_s"] = 1e-6  # right answers, always too slow
    fleet.params.write_text(yaml.safe_dump(data))
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "pre-activation health check failed" in proc.stdout + proc.stderr
    assert "limit" in proc.stdout + proc.stderr
    assert fleet.links("ep1") == (None, None)


@pytest.mark.e2e
def test_whisper_adapters_deploy_with_a_transcription_check(fleet: Fleet, whisper_kit) -> None:
    import yaml
    from fixtures_fleet import version

    data = yaml.safe_load(fleet.params.read_text())
    data["models"]["whisper"].update(
        base_model=str(whisper_kit.base), sentences=str(whisper_kit.clips_json)
    )
    fleet.params.write_text(yaml.safe_dump(data))
    good = version(fleet.store, fleet.params, whisper_kit.good, 1, "whisper")
    version(fleet.store, fleet.params, whisper_kit.broken, 2, "whisper")
    proc = fleet.deploy("--cycle", "1", "--models", "whisper", "--endpoints", "ep1", "--json")
    assert proc.returncode == 0, proc.stderr
    pre = json.loads(proc.stdout)["endpoints"][0]["models"][0]["health"]["pre_activation"]
    assert pre["all_passed"] and pre["results"][0]["input"].endswith(".wav")
    proc = fleet.deploy("--cycle", "2", "--models", "whisper", "--endpoints", "ep1")
    assert proc.returncode == 4
    assert fleet.links("ep1", "whisper") == (good, None)


@pytest.mark.e2e
def test_cuda_endpoint_with_merged_format_gets_the_converted_release(fleet: Fleet) -> None:
    fleet.set_endpoint("ep2", platform="cuda", format="merged")
    v1 = fleet.versions["cycle1"]
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1", "ep2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    merged = fleet.endpoints["ep2"] / "gemma_4b" / "releases" / v1
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    adapter = fleet.endpoints["ep1"] / "gemma_4b" / "releases" / v1
    assert (adapter / "adapter_model.safetensors").is_file()


@pytest.mark.e2e
def test_cuda_merged_endpoint_with_restart_reload_and_rollback(fleet: Fleet, tmp_path) -> None:
    def check_active(active) -> None:
        assert (active / "config.json").is_file()

    restart_deploy_and_rollback(fleet, tmp_path, check_active, format="merged")


def test_store_tree_is_clean_after_version_deploy_and_rollback(fleet: Fleet, kit) -> None:
    """Deploy records are committed in their own commits; locks and caches are ignored."""
    git = fleet.store.git
    git("add", "-A")  # the fixture's own edits of params.yaml
    git("commit", "-q", "-m", "fixture settings")
    v4 = version(fleet.store, fleet.params, kit.gracia_only, 4)
    assert git("status", "--porcelain") == ""
    assert git("show", "--stat", "--format=%s", "HEAD").startswith(f"version gemma_4b {v4}")
    v1 = fleet.versions["cycle1"]
    for args in (("--cycle", "1"), ("--cycle", "2"), ("--rollback",)):
        proc = fleet.deploy(*args, "--models", "gemma_4b", "--endpoints", "ep1")
        assert proc.returncode == 0, proc.stderr
        assert git("status", "--porcelain") == "", args
    subjects = git("log", "--format=%s", "-3").splitlines()
    assert subjects[0].startswith("rollback ") and subjects[1].startswith("deploy ")
    assert f"gemma_4b {v1} on ep1: success" in subjects[2]
    changed = git("show", "--name-only", "--format=", "HEAD~2").split()
    assert changed == [
        "adapters/.gitignore",
        "adapters/deploy_log.jsonl",
        "adapters/manifest.json",
        "adapters/status.json",
    ]
    assert "/.status.lock" in (fleet.store.adapters / ".gitignore").read_text()
