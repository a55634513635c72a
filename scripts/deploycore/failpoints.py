"""Failpoints: named places in the endpoint side where a test or the demo injects a fault.

An endpoint's `<adapter_dir>/.failpoints.json` maps a failpoint name to an action:
    "crash"  the endpoint process dies at once (os._exit), as under kill -9
    "fail"   the operation fails (a health check reports a forced failure)
Each failpoint fires once and is removed, so the recovery that follows runs clean.
Without that file (every real endpoint) this costs one stat() per failpoint.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from deploycore.fsutil import atomic_write_json

log = logging.getLogger(__name__)
FILE = ".failpoints.json"
CRASH_EXIT = 137


def trigger(adapter_dir: Path, name: str) -> str | None:
    """The action armed at `name` (consumed), or None; "crash" never returns."""
    path = adapter_dir / FILE
    if not path.exists():
        return None
    try:
        armed = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    action = armed.pop(name, None)
    if action is None:
        return None
    atomic_write_json(path, armed)
    log.warning("failpoint %s: %s", name, action)
    if action == "crash":
        os._exit(CRASH_EXIT)
    return action


def arm(adapter_dir: Path, name: str, action: str) -> None:
    path = adapter_dir / FILE
    armed = json.loads(path.read_text()) if path.exists() else {}
    armed[name] = action
    adapter_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, armed)
