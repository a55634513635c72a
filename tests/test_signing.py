"""Signed releases: keys, signatures, and what a trusting endpoint refuses."""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from adapter_deploy import protocol as p
from adapter_deploy.config import load_params
from adapter_deploy.deploy.remote import Session, connect
from adapter_deploy.signing import (
    SignatureRefused,
    generate,
    load_private,
    public_pem,
    sign,
    verify,
    version_metadata,
)
from fixtures_fleet import Fleet, version
from fixtures_repo import run_script

ENTRY = {
    "version_id": "cycle2_20260401_f1e2d3c4",
    "cycle": 2,
    "created": "2026-04-01T10:00:00Z",
    "base_model": "kit/tiny-gemma",
    "files": {"adapter_model.safetensors": {"sha256": "ab" * 32, "size": 10}},
}


def _keys(tmp_path: Path):
    generate(tmp_path / "a.pem")
    generate(tmp_path / "b.pem")
    a, b = load_private(tmp_path / "a.pem"), load_private(tmp_path / "b.pem")
    from adapter_deploy.signing import key_id

    return a, b, {key_id(public_pem(a)): public_pem(a)}


def test_signature_matrix(tmp_path: Path) -> None:
    a, b, trusted = _keys(tmp_path)
    meta = version_metadata(ENTRY, "gemma_4b", 30)
    vid = ENTRY["version_id"]
    now = datetime(2026, 4, 2, tzinfo=UTC)
    assert verify(sign(a, meta), trusted, "gemma_4b", vid, now) == meta
    tampered = copy.deepcopy(sign(a, meta))
    tampered["metadata"]["files"]["adapter_model.safetensors"]["size"] = 11
    mixed = copy.deepcopy(sign(a, meta))
    mixed["metadata"]["files"]["extra.safetensors"] = {"sha256": "cd" * 32, "size": 1}
    cases = [
        (None, now, "is unsigned"),
        (sign(b, meta), now, "untrusted key"),
        (tampered, now, "tampered"),
        (mixed, now, "tampered"),
        (sign(a, meta), now + timedelta(days=31), "expired"),
        (sign(a, {**meta, "version_id": "cycle1_20260301_00000000"}), now, "not gemma_4b"),
    ]
    for signed, when, why in cases:
        with pytest.raises(SignatureRefused, match=why):
            verify(signed, trusted, "gemma_4b", vid, when)


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    generate(tmp_path / "k.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    with pytest.raises(Exception, match="exists"):
        generate(tmp_path / "k.pem")


def _use_key(fleet: Fleet, key: Path, **extra) -> None:
    data = yaml.safe_load(fleet.params.read_text())
    data["store"].update(signing_key=str(key), **extra)
    fleet.params.write_text(yaml.safe_dump(data))


def test_trusting_endpoint_takes_signed_and_refuses_the_rest(fleet: Fleet, kit, tmp_path):
    key = tmp_path / "keys" / "signing.pem"
    _use_key(fleet, key)
    assert run_script("keygen.py", params=fleet.params).returncode == 0
    signed_v = version(fleet.store, fleet.params, kit.good2, 5)
    entry = next(v for v in fleet.store.manifest()["versions"]["gemma_4b"] if v["cycle"] == 5)
    assert entry["signed"]["metadata"]["files"] == entry["files"]

    proc = run_script("trust.py", "--endpoints", "ep1", params=fleet.params)
    assert proc.returncode == 0, proc.stderr
    ok = fleet.deploy("--cycle", "5", "--models", "gemma_4b", "--endpoints", "ep1")
    assert ok.returncode == 0, ok.stderr
    assert fleet.links("ep1")[0] == signed_v

    unsigned = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
    assert unsigned.returncode == 2 and "is unsigned" in unsigned.stdout + unsigned.stderr

    other = tmp_path / "other" / "key.pem"
    _use_key(fleet, other)
    assert run_script("keygen.py", params=fleet.params).returncode == 0
    version(fleet.store, fleet.params, kit.good, 6)
    foreign = fleet.deploy("--cycle", "6", "--models", "gemma_4b", "--endpoints", "ep1")
    assert foreign.returncode == 2 and "untrusted key" in foreign.stdout + foreign.stderr

    _use_key(fleet, key, signature_expiry_days=-1)
    version(fleet.store, fleet.params, kit.good, 7)
    expired = fleet.deploy("--cycle", "7", "--models", "gemma_4b", "--endpoints", "ep1")
    assert expired.returncode == 2 and "expired" in expired.stdout + expired.stderr
    assert fleet.links("ep1")[0] == signed_v  # nothing refused ever became active
    releases = fleet.endpoints["ep1"] / "gemma_4b" / "releases"
    assert sorted(p.name for p in releases.iterdir()) == [signed_v]


@pytest.mark.e2e
def test_older_version_needs_an_explicit_request(fleet: Fleet, kit, tmp_path) -> None:
    key = tmp_path / "signing.pem"
    _use_key(fleet, key)
    assert run_script("keygen.py", params=fleet.params).returncode == 0
    old = version(fleet.store, fleet.params, kit.good, 5)
    version(fleet.store, fleet.params, kit.good2, 6)
    assert run_script("trust.py", "--endpoints", "ep1", params=fleet.params).returncode == 0
    assert (
        fleet.deploy("--cycle", "6", "--models", "gemma_4b", "--endpoints", "ep1").returncode == 0
    )
    # push cycle 5's files into incoming by hand (as a replaying attacker would), then ask to
    # stage it without the operator's explicit request
    entry = next(
        v for v in fleet.store.manifest()["versions"]["gemma_4b"] if v["version_id"] == old
    )
    params = load_params(fleet.params)
    with tempfile.TemporaryDirectory() as control:
        conn = connect("ep1", params.endpoint("ep1"), Path(control))
        session = Session(conn, str(fleet.endpoints["ep1"]))
        prep = session.call(
            p.Prepare(model="gemma_4b", version_id=old, files=entry["files"], size=1)
        )
        conn.push(
            [fleet.store.adapters / "gemma_4b" / old / n for n in entry["files"]],
            prep["incoming"],
            progress=False,
        )
        with pytest.raises(SignatureRefused, match="rollback attack"):
            session.call(
                p.Stage(
                    model="gemma_4b",
                    version_id=old,
                    files=entry["files"],
                    signed=entry["signed"],
                    requested=None,
                )
            )
        session.close()
    # the operator's explicit deploy of the older cycle is a requested rollback: allowed
    proc = fleet.deploy("--cycle", "5", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 0, proc.stderr
    assert (
        json.loads((fleet.endpoints["ep1"] / "gemma_4b" / "accepted.json").read_text())["cycle"]
        == 6
    )


@pytest.mark.e2e
def test_conversions_are_signed_and_a_trusting_merged_endpoint_takes_them(
    fleet: Fleet, kit, tmp_path
) -> None:
    _use_key(fleet, tmp_path / "signing.pem")
    assert run_script("keygen.py", params=fleet.params).returncode == 0
    signed_v = version(fleet.store, fleet.params, kit.good2, 5)
    fleet.set_endpoint("ep2", platform="cuda", format="merged")
    assert run_script("trust.py", "--endpoints", "ep2", params=fleet.params).returncode == 0
    proc = fleet.deploy("--cycle", "5", "--models", "gemma_4b", "--endpoints", "ep2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fleet.links("ep2")[0] == signed_v
    assert (fleet.endpoints["ep2"] / "gemma_4b" / "active" / "config.json").is_file()
    conversion = next(
        c for c in fleet.store.manifest()["conversions"] if c["version_id"] == signed_v
    )
    metadata = conversion["signed"]["metadata"]
    assert metadata["files"] == conversion["files"]  # the converted files, not the adapter's
    assert metadata["conversion"]["format"] == "merged"
    assert metadata["version_id"] == signed_v and metadata["cycle"] == 5
    status = json.loads((fleet.endpoints["ep2"] / "status.json").read_text())
    assert "unsigned" not in json.dumps(status["models"]["gemma_4b"])


DEPLOY_EP1 = ("--models", "gemma_4b", "--endpoints", "ep1")


def _edit_manifest(fleet: Fleet, version_id: str, change) -> None:
    path = fleet.store.adapters / "manifest.json"
    data = json.loads(path.read_text())
    for entry in data["versions"]["gemma_4b"]:
        if entry["version_id"] == version_id:
            change(entry)
    path.write_text(json.dumps(data, indent=2))


@pytest.mark.e2e
def test_an_edited_unsigned_cycle_cannot_pass_an_old_release_off(fleet: Fleet, kit, tmp_path):
    """The manifest's unsigned `cycle` of cycle 5 edited to 9, then `deploy --cycle 9`: the
    endpoint compares the request with the signed cycle (5) and keeps its guard up."""
    _use_key(fleet, tmp_path / "signing.pem")
    assert run_script("keygen.py", params=fleet.params).returncode == 0
    old = version(fleet.store, fleet.params, kit.good, 5)
    new = version(fleet.store, fleet.params, kit.good2, 6)
    assert run_script("trust.py", "--endpoints", "ep1", params=fleet.params).returncode == 0
    assert fleet.deploy("--cycle", "6", *DEPLOY_EP1).returncode == 0
    _edit_manifest(fleet, old, lambda e: e.update(cycle=9))
    proc = fleet.deploy("--cycle", "9", *DEPLOY_EP1)
    assert proc.returncode == 2 and "rollback attack" in proc.stdout + proc.stderr
    assert fleet.links("ep1")[0] == new


@pytest.mark.e2e
def test_a_conversion_never_signs_weights_the_version_signature_does_not_cover(
    fleet: Fleet, kit, tmp_path
) -> None:
    """A signed version's weights replaced and only the manifest's (unsigned) hash edited:
    the merged endpoint that trusts the key must not get a freshly signed conversion."""
    from adapter_deploy.common.fsutil import sha256_file

    _use_key(fleet, tmp_path / "signing.pem")
    assert run_script("keygen.py", params=fleet.params).returncode == 0
    signed_v = version(fleet.store, fleet.params, kit.good2, 5)
    weights = fleet.store.adapters / "gemma_4b" / signed_v / "adapter_model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes((kit.regressed / "adapter_model.safetensors").read_bytes())
    forged = {"sha256": sha256_file(weights), "size": weights.stat().st_size}
    _edit_manifest(
        fleet, signed_v, lambda e: e["files"].update({"adapter_model.safetensors": forged})
    )
    fleet.set_endpoint("ep2", platform="cuda", format="merged")
    assert run_script("trust.py", "--endpoints", "ep2", params=fleet.params).returncode == 0
    proc = fleet.deploy("--cycle", "5", "--models", "gemma_4b", "--endpoints", "ep2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "not what the signed metadata records" in proc.stdout + proc.stderr
    assert fleet.links("ep2") == (None, None)
    assert not fleet.store.manifest().get("conversions")


@pytest.mark.e2e
def test_signed_conversions_name_the_signed_adapter(fleet: Fleet, kit, tmp_path) -> None:
    _use_key(fleet, tmp_path / "signing.pem")
    assert run_script("keygen.py", params=fleet.params).returncode == 0
    signed_v = version(fleet.store, fleet.params, kit.good2, 5)
    proc = run_script(
        "convert.py", "--model", "gemma_4b", "--cycle", "5", "--format", "merged",
        params=fleet.params,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    versions = fleet.store.manifest()["versions"]["gemma_4b"]
    entry = next(v for v in versions if v["version_id"] == signed_v)
    conversion = fleet.store.manifest()["conversions"][0]["signed"]["metadata"]["conversion"]
    signed_files = entry["signed"]["metadata"]["files"]
    assert conversion["adapter_files"] == {n: f["sha256"] for n, f in signed_files.items()}


@pytest.mark.e2e
def test_trust_covers_releases_already_there_and_rollbacks(fleet: Fleet, kit, tmp_path) -> None:
    v1, v2 = fleet.versions["cycle1"], fleet.versions["cycle2"]  # unsigned
    for cycle in ("1", "2"):
        assert fleet.deploy("--cycle", cycle, *DEPLOY_EP1).returncode == 0
    _use_key(fleet, tmp_path / "signing.pem")
    assert run_script("keygen.py", params=fleet.params).returncode == 0
    assert run_script("trust.py", "--endpoints", "ep1", params=fleet.params).returncode == 0
    status_file = fleet.endpoints["ep1"] / "status.json"
    state = json.loads(status_file.read_text())["models"]["gemma_4b"]["signature"]
    assert state.startswith("unverified: staged before this endpoint trusted a key")
    # cycle 1 is still on the endpoint, staged before trust: present is not trusted
    proc = fleet.deploy("--cycle", "1", *DEPLOY_EP1)
    assert proc.returncode == 2 and "unsigned" in proc.stdout + proc.stderr
    rollback = fleet.deploy("--rollback", "--to", v1, *DEPLOY_EP1)
    assert rollback.returncode == 2, rollback.stdout + rollback.stderr
    assert "has no verified signature" in rollback.stdout + rollback.stderr
    assert fleet.links("ep1") == (v2, v1)
    signed_v = version(fleet.store, fleet.params, kit.good2, 5)
    assert fleet.deploy("--cycle", "5", *DEPLOY_EP1).returncode == 0
    state = json.loads(status_file.read_text())["models"]["gemma_4b"]["signature"]
    assert state.startswith("verified: signed by trusted key")
    assert fleet.links("ep1")[0] == signed_v


# --- issue #27 hole 2: a gguf-lora release's base is held to the trust rule too -------------

LORA_VID = "cycle3_20260401_0a1b2c3d"
LORA_VID2 = "cycle4_20260402_0a1b2c3e"
BASE_VID = "cycle0_00000000_5e5e5e5e"
BASE_MODEL = "gemma_4b-gguf-base"
BASE_GGUF = b"GGUF" + bytes(range(256)) * 4  # a stand-in: the agent never parses it


def _release_files(contents: dict[str, bytes]) -> dict[str, dict]:
    return {
        n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in contents.items()
    }


BASE_CONTENTS = {"model.gguf": BASE_GGUF, "generate.json": b'[{"input": "Good morning."}]\n'}
BASE_INFO = {
    "version_id": BASE_VID,
    "key": "5e5e5e5e" * 8,
    "gguf_type": "Q8_0",
    **_release_files({"model.gguf": BASE_GGUF})["model.gguf"],
}


def _lora_contents(n: int) -> dict[str, bytes]:
    return {
        "adapter.gguf": b"GGUF-lora" + bytes([n]) * 64,
        "base.json": json.dumps(BASE_INFO).encode(),
    }


def _signed(key, model: str, version_id: str, cycle: int, files: dict) -> dict:
    from adapter_deploy.common.clock import utc_now

    entry = {"version_id": version_id, "cycle": cycle, "created": utc_now(), "files": files}
    return sign(key, version_metadata(entry, model, 30))


def _stage(side, model: str, version_id: str, contents: dict[str, bytes], signed=None) -> str:
    """What a deployer's transfer does: prepare, the files into the landing dir, stage."""
    files = _release_files(contents)
    prep = side.handle(p.Prepare(model, version_id, files, size=1))
    for name, data in contents.items() if not prep["present"] else ():
        (Path(prep["incoming"]) / name).write_bytes(data)
    asked = {"version_id": version_id}
    return side.handle(p.Stage(model, version_id, files, signed, asked))["result"]


def _trusting_gguf_lora_endpoint(tmp_path: Path):
    from adapter_deploy.agent.operations import EndpointSide

    adapter_dir = tmp_path / "ep1"
    adapter_dir.mkdir()
    a, b, _ = _keys(tmp_path)
    return EndpointSide(adapter_dir), adapter_dir, a, b


def test_a_gguf_lora_base_staged_before_trust_keeps_its_lora_out_until_signed(tmp_path):
    """The base arrived (and verified) while the endpoint trusted no key; after `make trust`
    the signed LoRA naming it is refused at pre-check and activate, until the deployer's
    ensure_base stages the base again with its signature (it no longer skips a verified base)."""
    from adapter_deploy.config import Params
    from adapter_deploy.deploy.base_release import ensure_base
    from adapter_deploy.deploy.plan import ModelOutcome, Release
    from adapter_deploy.deploy.steps import EndpointRun

    side, adapter_dir, a, _ = _trusting_gguf_lora_endpoint(tmp_path)
    assert _stage(side, BASE_MODEL, BASE_VID, BASE_CONTENTS) == "staged"  # unsigned, no trust
    side.handle(p.Record(model=BASE_MODEL, verified=BASE_VID, health_status="healthy"))
    side.handle(p.Trust(public_pem=public_pem(a).decode()))
    lora = _lora_contents(1)
    signed_lora = _signed(a, "gemma_4b", LORA_VID, 3, _release_files(lora))
    assert _stage(side, "gemma_4b", LORA_VID, lora, signed_lora) == "staged"
    precheck = p.Health("gemma_4b", LORA_VID, base_model=None, engine="cpu")
    for request in (precheck, p.Activate("gemma_4b", LORA_VID)):
        with pytest.raises(SignatureRefused, match=f"GGUF base {BASE_MODEL} {BASE_VID}") as no:
            side.handle(request)
        assert "staged before `make trust`" in no.value.message and "deploy" in no.value.fix
    assert not (adapter_dir / "gemma_4b" / "active").is_symlink()

    # The deployer's next run: the base is kept and verified, but still staged (0 B sent).
    local = tmp_path / "store" / BASE_VID
    local.mkdir(parents=True)
    for name, data in BASE_CONTENTS.items():
        (local / name).write_bytes(data)
    files = _release_files(BASE_CONTENTS)
    signed_base = _signed(a, BASE_MODEL, BASE_VID, 0, files)
    base = Release(BASE_MODEL, BASE_VID, 0, files, local, signed_base, {"version_id": BASE_VID})
    endpoint = {"transport": "local", "adapter_dir": str(adapter_dir), "platform": "cpu"}
    params = Params(
        models={"gemma_4b": {"base_model": "kit/tiny-gemma"}}, endpoints={"ep1": endpoint}
    )
    run = EndpointRun(params, "ep1", tmp_path / "control")
    out = ModelOutcome("gemma_4b", LORA_VID)
    try:
        run.open()
        assert ensure_base(run, base, out)
    finally:
        run.close()
    assert out.bytes_sent == 0 and "base" not in out.phases  # nothing re-sent, not re-checked
    signatures = json.loads((adapter_dir / BASE_MODEL / "signatures.json").read_text())
    assert list(signatures) == [BASE_VID]
    assert side.handle(p.Activate("gemma_4b", LORA_VID))["new"] == LORA_VID


def test_a_gguf_lora_base_signed_by_a_key_since_removed_is_refused(tmp_path: Path) -> None:
    """Base signed by key A, LoRAs by key B, both trusted: fine. Key A removed from trust:
    a LoRA on that base is refused at pre-check, activate and restore."""
    side, adapter_dir, a, b = _trusting_gguf_lora_endpoint(tmp_path)
    for key in (a, b):
        side.handle(p.Trust(public_pem=public_pem(key).decode()))
    files = _release_files(BASE_CONTENTS)
    signed_base = _signed(a, BASE_MODEL, BASE_VID, 0, files)
    assert _stage(side, BASE_MODEL, BASE_VID, BASE_CONTENTS, signed_base) == "staged"
    for version_id, cycle in ((LORA_VID, 3), (LORA_VID2, 4)):
        lora = _lora_contents(cycle)
        signed = _signed(b, "gemma_4b", version_id, cycle, _release_files(lora))
        assert _stage(side, "gemma_4b", version_id, lora, signed) == "staged"
    assert side.handle(p.Activate("gemma_4b", LORA_VID))["new"] == LORA_VID
    from adapter_deploy.signing import key_id

    (adapter_dir / "trusted_keys" / f"{key_id(public_pem(a))}.pub").unlink()
    refused = [
        p.Health("gemma_4b", LORA_VID2, base_model=None, engine="cpu"),
        p.Activate("gemma_4b", LORA_VID2),
        p.Restore("gemma_4b", active=LORA_VID, previous=None),
    ]
    for request in refused:
        with pytest.raises(SignatureRefused, match=f"GGUF base {BASE_MODEL} {BASE_VID}"):
            side.handle(request)
    assert (adapter_dir / "gemma_4b" / "active").resolve().name == LORA_VID  # untouched
