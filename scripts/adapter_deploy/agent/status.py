"""The endpoint's own `status.json` (seed §7.2): per model, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapter_deploy.common.clock import utc_now
from adapter_deploy.common.fsutil import atomic_write_json

STATUS = "status.json"
_RENAMED = {"active": "active_version", "previous": "previous_version"}


def read_status(adapter_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((adapter_dir / STATUS).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"models": {}}


def record_status(adapter_dir: Path, model: str, **fields: Any) -> None:
    status = read_status(adapter_dir)
    entry = status.setdefault("models", {}).setdefault(model, {})
    for key, value in fields.items():
        entry[_RENAMED.get(key, key)] = value
    status["updated"] = utc_now()
    atomic_write_json(adapter_dir / STATUS, status)
