"""TRANSFER's rsync starts with the ssh connection, before the endpoint session holds the
lock (deploy/early.py): what it may and may not change, over the real sshd."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from adapter_deploy.common.errors import ChecksumMismatch
from adapter_deploy.common.fsutil import sha256_file
from adapter_deploy.config import load_params
from adapter_deploy.deploy.early import EarlyPush
from adapter_deploy.deploy.plan import ModelOutcome, Release
from adapter_deploy.deploy.steps import EndpointRun
from fixtures_fleet import Fleet

# The end-to-end tier (make test-e2e): the early rsync's races, damage and refusals.
pytestmark = pytest.mark.e2e


EARLY = "starting with the connection"
ARGS = ("--models", "gemma_4b", "--endpoints", "ep1")


def _store_release(fleet: Fleet, label: str, local_dir: Path | None = None) -> Release:
    vid = fleet.versions[label]
    stored = fleet.store.adapters / "gemma_4b" / vid
    files = {
        p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(stored.iterdir())
    }
    return Release("gemma_4b", vid, int(label[-1]), files, local_dir or stored)


def test_rsync_starts_with_the_connection_unless_the_record_shows_it_there(fleet: Fleet) -> None:
    first = fleet.deploy("--cycle", "1", *ARGS, "--json")
    assert first.returncode == 0, first.stderr
    assert EARLY in first.stderr
    assert json.loads(first.stdout)["endpoints"][0]["models"][0]["bytes_sent"] > 0
    landing = fleet.endpoints["ep1"] / "incoming"
    assert landing.is_dir() and not any(landing.iterdir())  # staged: nothing left behind
    # Recorded active and healthy there: no early rsync, and the session finds it unchanged.
    again = fleet.deploy("--cycle", "1", *ARGS, "--json")
    assert again.returncode == 0, again.stderr
    assert EARLY not in again.stderr
    assert json.loads(again.stdout)["endpoints"][0]["models"][0]["status"] == "unchanged"
    # A release already kept there (cycle 1, now previous) is skipped by --compare-dest.
    assert fleet.deploy("--cycle", "2", *ARGS).returncode == 0
    back = fleet.deploy("--cycle", "1", *ARGS, "--json")
    assert back.returncode == 0, back.stderr
    assert EARLY in back.stderr
    assert json.loads(back.stdout)["endpoints"][0]["models"][0]["bytes_sent"] == 0
    assert fleet.links("ep1") == (fleet.versions["cycle1"], fleet.versions["cycle2"])


def test_an_rsync_before_the_lock_can_spoil_a_transfer_but_never_a_release(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Deploy A holds the lock and has its files in the landing dir; deploy B's early rsync
    (other bytes under the same release id) lands over them. A's staging verifies what it
    claimed and refuses it: nothing unverified becomes a release."""
    params = load_params(fleet.params)
    good = _store_release(fleet, "cycle1")
    tampered_dir = tmp_path / "tampered"
    shutil.copytree(good.local_dir, tampered_dir)
    weights = tampered_dir / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))
    tampered = Release(good.model, good.version_id, 1, good.files, tampered_dir)
    control = tmp_path / "control"
    control.mkdir()
    a = EndpointRun(params, "ep1", control)
    try:
        a.open()  # A holds the endpoint's lock from here on
        a.push_all([good], params.adapters_dir, control / "a.landing")
        b = EndpointRun(params, "ep1", control / "b")
        (control / "b").mkdir()
        pushed = EarlyPush(b.conn, [tampered], control / "b.landing", reserve=0).finish()
        b.conn.close()
        assert pushed is not None and pushed > 0  # B's bytes did land, without the lock
        with pytest.raises(ChecksumMismatch, match="sha256 differs"):
            a.transfer(good, ModelOutcome(good.model, good.version_id))
    finally:
        a.close()
    adapter_dir = fleet.endpoints["ep1"]
    assert not (adapter_dir / "gemma_4b" / "releases" / good.version_id).exists()
    assert len(list((adapter_dir / "quarantine").iterdir())) == 1
    proc = fleet.deploy("--cycle", "1", *ARGS)  # resent and verified
    assert proc.returncode == 0, proc.stderr
    assert fleet.links("ep1")[0] == good.version_id


def test_a_kept_copy_damaged_without_a_size_or_time_change_is_resent_whole(fleet: Fleet) -> None:
    """--compare-dest trusts size and mtime; prepare's hash does not: the damaged copy is
    reported and its files are sent again, not skipped."""
    v1 = fleet.versions["cycle1"]
    for cycle in ("1", "2"):
        assert fleet.deploy("--cycle", cycle, *ARGS).returncode == 0
    weights = fleet.endpoints["ep1"] / "gemma_4b" / "releases" / v1 / "adapter_model.safetensors"
    whole, st = weights.read_bytes(), weights.stat()
    weights.chmod(0o644)
    weights.write_bytes(whole[:-1] + bytes([whole[-1] ^ 0xFF]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    proc = fleet.deploy("--version", v1, *ARGS, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert EARLY in proc.stderr  # cycle 2 is what the record shows active
    assert json.loads(proc.stdout)["endpoints"][0]["models"][0]["bytes_sent"] > 0
    assert fleet.links("ep1")[0] == v1 and weights.read_bytes() == whole
    assert len(list((fleet.endpoints["ep1"] / "quarantine").iterdir())) == 1


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"min_free_bytes": 1 << 60}, "bytes free"),
        ({"python": "/nonexistent/python3"}, "no agent of this protocol here"),
    ],
    ids=["short-of-space", "no-agent-of-this-protocol"],
)
def test_the_endpoint_checks_before_an_early_rsync_lands_anything(
    fleet: Fleet, tmp_path: Path, change: dict, why: str
) -> None:
    fleet.set_endpoint("ep1", **change)
    params = load_params(fleet.params)
    run = EndpointRun(params, "ep1", tmp_path)
    reserve = params.endpoint("ep1").min_free_bytes
    early = EarlyPush(run.conn, [_store_release(fleet, "cycle1")], tmp_path / "landing", reserve)
    assert early.finish() is None
    assert why in early.why_not()
    run.conn.close()
    landing = fleet.endpoints["ep1"] / "incoming"
    assert not landing.exists() or not [p for p in landing.rglob("*") if p.is_file()]
