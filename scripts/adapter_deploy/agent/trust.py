"""The endpoint's trust state: trusted public keys and the newest accepted version per model.

<adapter_dir>/trusted_keys/<key_id>.pub    installed by `make trust`
<adapter_dir>/<model>/accepted.json        newest signed version accepted (rollback guard)
<adapter_dir>/<model>/signatures.json      per release: the trusted key its signature passed

A gguf-lora release applies to a GGUF base release (`<model>-gguf-base`, named in its
base.json): on a trusting endpoint that base is held to the same rule as the release itself,
each time the release is pre-checked, activated or restored, not only when it was staged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapter_deploy.agent.releases import ModelReleases
from adapter_deploy.common.clock import utc_now
from adapter_deploy.common.errors import CorruptState
from adapter_deploy.common.fsutil import atomic_write_bytes, atomic_write_json, read_state
from adapter_deploy.common.names import check_version_id
from adapter_deploy.engines.base import read_json
from adapter_deploy.engines.llamacpp_engine import BASE_INFO, BASE_MODEL_SUFFIX
from adapter_deploy.signing import SignatureRefused, key_id

KEYS = "trusted_keys"


def trusted_keys(adapter_dir: Path) -> dict[str, bytes]:
    folder = adapter_dir / KEYS
    if not folder.is_dir():
        return {}
    return {p.stem: p.read_bytes() for p in folder.glob("*.pub")}


def install_key(adapter_dir: Path, public_pem: bytes) -> str:
    from cryptography.hazmat.primitives import serialization

    serialization.load_pem_public_key(public_pem)  # refuse garbage before trusting it
    kid = key_id(public_pem)
    atomic_write_bytes(adapter_dir / KEYS / f"{kid}.pub", public_pem.strip() + b"\n")
    return kid


def _order(metadata: dict[str, Any]) -> tuple[int, str]:
    return int(metadata["cycle"]), str(metadata["created"])


def asked_for(metadata: dict[str, Any], requested: dict[str, Any] | None) -> bool:
    """Did the operator ask for exactly this release? Compared with the signed fields, so an
    edited (unsigned) manifest cannot pass an old release off as the one asked for."""
    if not requested:
        return False
    if "version_id" in requested:
        return requested["version_id"] == metadata["version_id"]
    return "cycle" in requested and requested["cycle"] == metadata["cycle"]


def check_not_older(
    kept: ModelReleases, metadata: dict[str, Any], requested: dict[str, Any] | None
) -> None:
    """Refuse a version older than the newest accepted unless the operator asked for it."""
    path = kept.root / "accepted.json"
    if asked_for(metadata, requested) or not path.exists():
        return
    newest = _accepted(path)
    if _order(metadata) < _order(newest):
        raise SignatureRefused(
            f"{kept.model} {metadata['version_id']} is older than accepted "
            f"{newest['version_id']} (rollback attack?)",
            "roll back explicitly with make rollback or make deploy CYCLE=<older>",
        )


def record_accepted(kept: ModelReleases, metadata: dict[str, Any]) -> None:
    path = kept.root / "accepted.json"
    newest = _accepted(path) or None
    if newest is None or _order(metadata) > _order(newest):
        keep = {k: metadata[k] for k in ("version_id", "cycle", "created")}
        atomic_write_json(path, keep)


def _accepted(path: Path) -> dict[str, Any]:
    """The newest accepted version; a corrupt record refuses signed deploys (fails closed)."""
    fix = f"restore {path} on the endpoint, or remove it to accept any signed version again"
    newest = read_state(path, fix)
    if newest and not all(k in newest for k in ("version_id", "cycle", "created")):
        raise CorruptState(f"state file {path} is corrupt (fields missing)", fix)
    return newest


def _signatures_file(kept: ModelReleases) -> Path:
    return kept.root / "signatures.json"


def signatures(kept: ModelReleases) -> dict[str, dict[str, Any]]:
    path = _signatures_file(kept)
    return read_state(
        path,
        f"remove {path} on the endpoint and deploy the kept versions again to re-verify them",
    )


def record_signature(kept: ModelReleases, version_id: str, kid: str) -> None:
    """This release's signature passed verification against trusted key `kid`."""
    records = signatures(kept)
    records[version_id] = {"key_id": kid, "verified_at": utc_now()}
    atomic_write_json(_signatures_file(kept), records)


def _signed_now(kept: ModelReleases, version_id: str, trusted: dict[str, bytes]) -> bool:
    record = signatures(kept).get(version_id)
    return record is not None and record.get("key_id") in trusted


def require_signed(kept: ModelReleases, version_id: str | None, trusted: dict[str, bytes]) -> None:
    """On a trusting endpoint, only a release whose signature passed against a key trusted
    now may become active (a release staged before `make trust` has no such record); a
    gguf-lora release's base is held to the same rule."""
    if version_id is None or not trusted:
        return
    if not _signed_now(kept, version_id, trusted):
        raise SignatureRefused(
            f"{kept.model} {version_id} has no verified signature on this endpoint "
            "(it trusts signed releases only)",
            f"deploy it again (make deploy VERSION={version_id}) to verify its signature, "
            "or pick a signed release",
        )
    named = base_named_by(kept, version_id)
    if named is not None and not _signed_now(*named, trusted):
        base, base_id = named
        raise SignatureRefused(
            f"{kept.model} {version_id} applies to the GGUF base {base.model} {base_id}, "
            "which has no signature verified against a key this endpoint trusts now "
            "(staged before `make trust`, or signed by a key since removed)",
            f"deploy {kept.model} again (make deploy VERSION={version_id}): the deployer "
            "stages its base again, and the endpoint checks the base's signature",
        )


def base_named_by(kept: ModelReleases, version_id: str) -> tuple[ModelReleases, str] | None:
    """(the base's releases, its version id) when `version_id` is a gguf-lora release."""
    info_file = kept.release(version_id) / BASE_INFO
    if not info_file.is_file():
        return None
    base_id = read_json(info_file).get("version_id")
    if not isinstance(base_id, str):
        raise SignatureRefused(
            f"{info_file} names no base release (version_id missing)",
            "convert and deploy the release again",
        )
    base = ModelReleases(kept.adapter_dir, f"{kept.model}{BASE_MODEL_SUFFIX}")
    return base, check_version_id(base_id)


def signature_state(kept: ModelReleases, version_id: str | None, trusted: dict) -> str:
    """What status.json says about the active release's signature."""
    if version_id is None:
        return "none: no release active"
    if not trusted:
        return "unsigned: this endpoint trusts no signing key"
    record = signatures(kept).get(version_id)
    if record and record.get("key_id") in trusted:
        return f"verified: signed by trusted key {record['key_id']}"
    return "unverified: staged before this endpoint trusted a key; deploy it again"
