"""The endpoint's own `status.json` (seed §7.2): per model, written atomically."""

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


def record_status(adapter_dir: Path, model: str, **fields: Any) -> None:
    status = read_status(adapter_dir)
    entry = status.setdefault("models", {}).setdefault(model, {})
    for key, value in fields.items():
        entry[_RENAMED.get(key, key)] = value
    status["updated"] = utc_now()
    atomic_write_json(adapter_dir / STATUS, status)
