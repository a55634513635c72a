"""adapters/manifest.json (the operator's plan): versions per model, endpoints, deployments.

Read-modify-write happens under a lock and lands atomically, so two writers
never lose each other's entries and a crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import ConfigError, UsageError
from adapter_deploy.common.fsutil import atomic_write_json, file_lock
from adapter_deploy.common.names import check_version_id

MANIFEST = "manifest.json"
LOCK = ".manifest.lock"


def empty_manifest() -> dict[str, Any]:
    return {"versions": {}, "endpoints": {}, "deployments": [], "conversions": []}


def load_manifest(adapters_dir: Path) -> dict[str, Any]:
    path = adapters_dir / MANIFEST
    if not path.exists():
        return empty_manifest()
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON (line {exc.lineno})",
            "restore it from git: git checkout -- " + str(path),
        ) from None
    for key, value in empty_manifest().items():
        data.setdefault(key, value)
    return data


@contextlib.contextmanager
def updating_manifest(adapters_dir: Path, holder: str) -> Iterator[dict[str, Any]]:
    """Yield the manifest for changes; write it back atomically if the block succeeds."""
    ignore_in_store(adapters_dir, f"/{LOCK}")
    with file_lock(adapters_dir / LOCK, holder, f"{adapters_dir / MANIFEST}"):
        data = load_manifest(adapters_dir)
        yield data
        atomic_write_json(adapters_dir / MANIFEST, data)


def ignore_in_store(adapters_dir: Path, pattern: str) -> None:
    """Keep machine state (locks, caches) out of git: add `pattern` to the store's .gitignore.

    The .gitignore is committed with the next version or deploy record.
    """
    ignore = adapters_dir / ".gitignore"
    lines = ignore.read_text().splitlines() if ignore.exists() else []
    if pattern not in lines:
        ignore.write_text("\n".join([*lines, pattern]) + "\n")


def versions_of(manifest: dict[str, Any], model: str) -> list[dict[str, Any]]:
    return list(manifest["versions"].get(model, []))


def find_version(manifest: dict[str, Any], model: str, version_id: str) -> dict[str, Any]:
    for entry in versions_of(manifest, model):
        if entry["version_id"] == version_id:
            return entry
    raise UsageError(
        f"{model} has no version {version_id!r} in the manifest",
        "list versions with `make versions MODEL=" + model + "`",
    )


def pick_version(
    manifest: dict[str, Any], model: str, cycle: int | None, version_id: str | None
) -> dict[str, Any]:
    """`version_id` (checked against `cycle` when both are given), else the cycle's newest."""
    if version_id is None:
        if cycle is None:
            raise UsageError("no cycle given", "pass --cycle N or --version ID (make: CYCLE=N)")
        return newest_of_cycle(manifest, model, cycle)
    entry = find_version(manifest, model, check_version_id(version_id))
    if cycle is not None and entry["cycle"] != cycle:
        raise UsageError(
            f"{version_id} belongs to cycle {entry['cycle']}, not {cycle}",
            "drop the cycle or pass the matching one",
        )
    return entry


def models_in_cycle(
    manifest: dict[str, Any], models: list[str], cycle: int
) -> tuple[list[str], list[str]]:
    """(`models` with a version in `cycle`, the others): what "deploy the cycle" means."""
    have = [m for m in models if any(v["cycle"] == cycle for v in versions_of(manifest, m))]
    return have, [m for m in models if m not in have]


def newest_of_cycle(manifest: dict[str, Any], model: str, cycle: int) -> dict[str, Any]:
    candidates = [v for v in versions_of(manifest, model) if v["cycle"] == cycle]
    if not candidates:
        raise UsageError(
            f"{model} has no version in cycle {cycle}",
            f"version it first: make version MODEL={model} CYCLE={cycle} SRC=<adapter dir>",
        )
    return max(candidates, key=lambda v: v["created"])
