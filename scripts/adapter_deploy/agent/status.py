"""The endpoint's own `status.json` (the operator's plan): per model, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapter_deploy.common.clock import utc_now
from adapter_deploy.common.errors import CorruptState
from adapter_deploy.common.fsutil import atomic_write_json, read_state

STATUS = "status.json"
_RENAMED = {"active": "active_version", "previous": "previous_version"}


def read_status(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / STATUS
    status = read_state(path, f"remove {path} on the endpoint; the next deploy writes it again")
    if not isinstance(status.setdefault("models", {}), dict):
        raise CorruptState(
            f"state file {path} is corrupt (models is not an object)", f"remove {path}"
        )
    return status


PLAN_FIELDS = ("active_version", "previous_version", "last_reload", "health_status")


def record_status(
    adapter_dir: Path, model: str, endpoint: str | None = None, **fields: Any
) -> None:
    """Per model the plan's fields (the operator's plan) always present, richer ones beside them."""
    status = read_status(adapter_dir)
    if endpoint:
        status["endpoint"] = endpoint
    entry = status.setdefault("models", {}).setdefault(model, {})
    for key, value in fields.items():
        entry[_RENAMED.get(key, key)] = value
    for key in PLAN_FIELDS:
        entry.setdefault(key, None)
    if isinstance(entry["last_reload"], dict):  # written before the plan's shape
        entry["last_reload_detail"] = entry["last_reload"]
        entry["last_reload"] = entry["last_reload_detail"].get("at")
    status["updated"] = utc_now()
    atomic_write_json(adapter_dir / STATUS, status)
