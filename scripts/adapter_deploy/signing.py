"""Signed releases: a minimal TUF-style check with Ed25519 (cryptography).

The training side signs each version's metadata (model, version_id, cycle,
every file's sha256 and size, base model, created, expires). An endpoint that
holds a trusted public key accepts into releases/ only what verifies against
it; without a trusted key it accepts unsigned releases as before, with a
warning in its status.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from adapter_deploy.common.clock import utc_text
from adapter_deploy.common.errors import ConfigError, SignatureRefused, UsageError

#: the words of the refusal of an expired release (a pull does not hold it against the release:
#: an endpoint whose clock runs ahead refuses it until its clock is set right)
EXPIRED = "signed metadata expired"

__all__ = ["SignatureRefused", "generate", "sign", "verify", "version_metadata"]

DEFAULT_EXPIRY_DAYS = 365


def canonical(metadata: dict[str, Any]) -> bytes:
    return json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()


def key_id(public_pem: bytes) -> str:
    return hashlib.sha256(public_pem.strip()).hexdigest()[:16]


def generate(private_path: Path) -> tuple[Path, str]:
    """A new Ed25519 key pair: private PEM (0600) and `<path>.pub`. Never overwrites."""
    if private_path.exists():
        raise UsageError(f"{private_path} exists", "keep it, or move it away to make a new key")
    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    private_path.touch(mode=0o600)
    private_path.write_bytes(pem)
    public = public_pem(key)
    pub_path = private_path.with_name(private_path.name + ".pub")
    pub_path.write_bytes(public)
    return pub_path, key_id(public)


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise ConfigError(f"signing key {path} is unreadable ({err})", "run make keygen") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is not Ed25519", "run make keygen")
    return key


def sign(key: Ed25519PrivateKey, metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": metadata,
        "signature": base64.b64encode(key.sign(canonical(metadata))).decode(),
        "key_id": key_id(public_pem(key)),
    }


def version_metadata(entry: dict[str, Any], model: str, expiry_days: int) -> dict[str, Any]:
    created = datetime.strptime(entry["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return {
        "model": model,
        "version_id": entry["version_id"],
        "cycle": entry["cycle"],
        "files": entry["files"],
        "base_model": entry.get("base_model"),
        "created": entry["created"],
        "expires": utc_text(created + timedelta(days=expiry_days)),
    }


def conversion_metadata(
    version: dict[str, Any], conversion: dict[str, Any], model: str, expiry_days: int
) -> dict[str, Any]:
    """A conversion is signed like its version (same id, cycle, created and expiry, so the
    endpoint's rollback check orders it the same), with the converted files in place of the
    adapter's and what it was converted to."""
    metadata = version_metadata({**version, "files": conversion["files"]}, model, expiry_days)
    metadata["conversion"] = {
        "format": conversion["format"],
        "gguf_type": conversion.get("gguf_type"),
        "key": conversion["key"],
        # The signed adapter it was made from, by the hashes the version's signature covers.
        "adapter_sha256": version["files"]["adapter_model.safetensors"]["sha256"],
        "adapter_files": {name: info["sha256"] for name, info in version["files"].items()},
    }
    return metadata


def verify(
    signed: dict[str, Any] | None,
    trusted: dict[str, bytes],
    model: str,
    version_id: str,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The verified metadata, or SignatureRefused naming why."""
    if not signed:
        raise SignatureRefused(
            f"{model} {version_id} is unsigned and this endpoint trusts signed releases only",
            "version it with a signing key (make keygen, then make version)",
        )
    pem = trusted.get(signed.get("key_id", ""))
    if pem is None:
        raise SignatureRefused(
            f"{model} {version_id} is signed by an untrusted key {signed.get('key_id')}",
            "install the training machine's key with make trust ENDPOINT=<name>",
        )
    public = serialization.load_pem_public_key(pem)
    assert isinstance(public, Ed25519PublicKey)
    metadata = signed["metadata"]
    try:
        public.verify(base64.b64decode(signed["signature"]), canonical(metadata))
    except (InvalidSignature, ValueError):
        raise SignatureRefused(
            f"{model} {version_id}: signature does not match its metadata (tampered)",
            "re-version the adapter on the training machine",
        ) from None
    if (metadata.get("model"), metadata.get("version_id")) != (model, version_id):
        raise SignatureRefused(
            f"signed metadata is for {metadata.get('model')} {metadata.get('version_id')}, "
            f"not {model} {version_id}",
            "deploy the version the metadata names",
        )
    expires = datetime.strptime(metadata["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    if now > expires:
        raise SignatureRefused(
            f"{model} {version_id}: {EXPIRED} at {metadata['expires']} "
            f"(this machine's clock reads {utc_text(now)})",
            "re-sign it on the training machine (make version re-signs); if this machine's "
            "clock is wrong, set it right first (NTP: timedatectl set-ntp true)",
        )
    return metadata
