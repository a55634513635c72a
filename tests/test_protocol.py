"""The versioned endpoint protocol: typed requests, and a mismatched endpoint refused early."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from adapter_deploy import protocol as p
from adapter_deploy.common.errors import ProtocolError, ProtocolMismatch
from fixtures_fleet import Fleet, agent_wrapper

EXAMPLES = [
    p.Hello(models=["gemma_4b"]),
    p.Prepare("gemma_4b", "cycle1_20260101_abcdef12", {"a": {"sha256": "0", "size": 1}}, 1),
    p.DropIncoming("gemma_4b", "cycle1_20260101_abcdef12"),
    p.Stage("gemma_4b", "cycle1_20260101_abcdef12", {}, signed={"x": 1}, requested={"cycle": 1}),
    p.Trust("-----BEGIN PUBLIC KEY-----"),
    p.Health("gemma_4b", None, "/base", sentences="/s.json", service_url="http://127.0.0.1:1"),
    p.Activate("gemma_4b", "v", p.Reload("sigusr1", "/run/x.pid"), {"link": "gemma_4b"}),
    p.Restore("gemma_4b", None, "v", p.Reload("restart", None, ["true"])),
    p.RollbackTarget("gemma_4b", "v"),
    p.MarkBad("gemma_4b", "v", "failed verify"),
    p.ClearBad("gemma_4b", "v"),
    p.Prune("gemma_4b", 3),
    p.Record("gemma_4b", verified="v"),
    p.Status("http://127.0.0.1:1"),
    p.Doctor({"gemma_4b": "/base"}, p.Reload("restart", None, ["true"]), None, "/opt/rsync"),
]


def test_every_request_type_round_trips() -> None:
    assert {type(r) for r in EXAMPLES} == set(p.REQUESTS.values())
    for request in EXAMPLES:
        assert p.decode(p.encode(request)) == request


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"op": "format_disk"}', "unknown endpoint operation 'format_disk'"),
        ('{"op": "prune", "model": "m"}', "keep"),
        ('{"op": "prune", "model": "m", "keep": 2, "force": true}', "unknown fields ['force']"),
        ('{"op": "activate", "model": "m", "version_id": "v", "reload": {"how": 1}}', "how"),
        ("not json", "not JSON"),
    ],
)
def test_unreadable_requests_are_protocol_errors(line: str, why: str) -> None:
    with pytest.raises(ProtocolError) as info:
        p.decode(line)
    assert why in info.value.message and info.value.exit_code == 2
    assert "make bootstrap" in info.value.fix


def _old_agent(tmp_path: Path, version: int) -> Path:
    """An endpoint interpreter whose agent speaks another protocol version (a real process
    reached over the real sshd: only the number it announces differs)."""
    return agent_wrapper(
        tmp_path, f"import adapter_deploy.protocol as p; p.PROTOCOL_VERSION = {version}"
    )


def test_mismatched_endpoint_is_refused_before_anything_moves(fleet: Fleet, tmp_path) -> None:
    fleet.set_endpoint("ep1", python=str(_old_agent(tmp_path, 1)))
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1", "--json")
    assert proc.returncode == 2, proc.stderr
    error = json.loads(proc.stdout)["endpoints"][0]["error"]
    assert f"endpoint ep1 runs protocol 1, this deployer speaks {p.PROTOCOL_VERSION}" in error
    assert "make bootstrap ENDPOINT=ep1" in error
    adapter_dir = fleet.endpoints["ep1"]
    assert not (adapter_dir / "gemma_4b").exists() and not (adapter_dir / "incoming").exists()
    # The refused session let go of the endpoint's lock: the right code deploys at once.
    fleet.set_endpoint("ep1", python=sys.executable)
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 0, proc.stderr
    assert fleet.links("ep1")[0] == fleet.versions["cycle1"]


@pytest.mark.e2e
def test_endpoint_without_the_package_names_bootstrap(fleet: Fleet) -> None:
    bare = Path(sys.base_prefix) / "bin" / "python3"  # the interpreter under .venv, no project
    probe = subprocess.run([str(bare), "-c", "import adapter_deploy"], capture_output=True)
    assert probe.returncode != 0, "the base interpreter must not see the project"
    fleet.set_endpoint("ep1", python=str(bare))
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 3, proc.stderr
    assert "not installed for the endpoint's python" in proc.stderr
    assert "make bootstrap ENDPOINT=ep1" in proc.stderr


def test_check_ready_treats_an_unversioned_agent_as_protocol_1() -> None:
    with pytest.raises(ProtocolMismatch, match="runs protocol 1"):
        p.check_ready("mac-dev", {"ready": True, "pid": 1})
    p.check_ready("mac-dev", p.ready_line(1, "x"))
    assert dataclasses.is_dataclass(p.Hello)
