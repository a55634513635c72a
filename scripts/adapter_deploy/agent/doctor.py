"""The endpoint's answer to `make doctor` (protocol request `doctor`): facts, never changes.

Everything a deploy will rely on here is looked at the way the deploy will use it: the
interpreter, rsync, free space under adapter_dir, each base model as the engines load it
(a local dir with config.json, or a hub id in the Hugging Face cache), the trusted keys,
the service's pidfile and /status, and whether the restart command runs without a
password. The deployer judges the facts (`adapter_deploy.deploy.doctor`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from adapter_deploy import protocol as p
from adapter_deploy.common.errors import AdapterDeployError
from adapter_deploy.config import DEFAULT_RESTART_COMMAND

PROBE_TIMEOUT_S = 10


def facts(adapter_dir: Path, req: p.Doctor) -> dict[str, Any]:
    """What the deployer's doctor checks against; the clock is read last, just before the
    reply leaves, so the deployer can compare it with the moment it arrives."""
    result = {
        "python": list(sys.version_info[:3]),
        "python_executable": sys.executable,
        "rsync_version": rsync_version(req.rsync_path or "rsync"),
        "disk": _disk(adapter_dir),
        "base_models": {m: base_model_state(name) for m, name in req.base_models.items()},
        "trusted_keys": _trusted_key_ids(adapter_dir),
        "service": _service(req.service_url) if req.service_url else None,
        "pidfile": _pidfile(req.reload.pidfile) if req.reload.method == "sigusr1" else None,
        "restart": _restart_probe(req.reload) if req.reload.method == "restart" else None,
    }
    result["time"] = time.time()
    return result


def rsync_version(binary: str = "rsync") -> list[int] | None:
    """rsync's version as [major, minor, patch], None when it is missing or unreadable."""
    found = shutil.which(os.path.expanduser(binary))
    if found is None:
        return None
    try:
        out = subprocess.run(
            [found, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"version v?(\d+)\.(\d+)(?:\.(\d+))?", out.stdout)
    return [int(x or 0) for x in match.groups()] if match else None


def _disk(adapter_dir: Path) -> dict[str, Any]:
    """Free space where releases will land; before the first deploy, on the nearest parent
    that exists (the first session creates adapter_dir there)."""
    where = adapter_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    return {
        "path": str(where),
        "exists": adapter_dir.is_dir(),
        "writable": os.access(where, os.W_OK | os.X_OK),
        "free_bytes": shutil.disk_usage(where).free,
    }


def hub_cache() -> Path:
    """The Hugging Face hub cache as transformers and mlx-lm find it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "~", ".")) or name.count("/") > 1 or Path(name).exists()


def base_model_state(name: str) -> dict[str, Any]:
    """A local dir with a readable config.json, or a hub id with a cached snapshot that has
    one: {"ok", "name", "kind": "path"|"hub", "where", "detail"}."""
    if _looks_like_path(name):
        config = Path(name) / "config.json"
        state: dict[str, Any] = {"name": name, "kind": "path", "where": name}
        if not Path(name).is_dir():
            return {**state, "ok": False, "detail": f"{name} is not a directory"}
    else:
        repo = hub_cache() / ("models--" + name.replace("/", "--"))
        configs = sorted((repo / "snapshots").glob("*/config.json"))
        state = {"name": name, "kind": "hub", "where": str(repo)}
        if not configs:
            return {**state, "ok": False, "detail": f"{name} is not in the HF cache {repo.parent}"}
        config = configs[-1]
    try:
        json.loads(config.read_text())
    except OSError as err:
        return {**state, "ok": False, "detail": f"{config} is unreadable ({err.strerror})"}
    except ValueError:
        return {**state, "ok": False, "detail": f"{config} is not valid JSON"}
    return {**state, "ok": True, "detail": str(config.parent)}


def _trusted_key_ids(adapter_dir: Path) -> list[str]:
    folder = adapter_dir / "trusted_keys"  # agent/trust.py's KEYS (no cryptography import)
    return sorted(k.stem for k in folder.glob("*.pub")) if folder.is_dir() else []


def _service(url: str) -> dict[str, Any]:
    from adapter_deploy.engines.service_client import service_status

    try:
        status = service_status(url, timeout=5)
    except (AdapterDeployError, OSError) as err:
        return {"error": getattr(err, "message", str(err))}
    return {"pid": status.get("pid"), "ready": status.get("ready")}


def _pidfile(path: str | None) -> dict[str, Any] | None:
    """The pid of the live service holding the pidfile (the pid a reload would signal)."""
    if not path:
        return None
    from adapter_deploy.common.pidfile import live_pid

    try:
        return {"pid": live_pid(Path(path))}
    except AdapterDeployError as err:
        return {"error": err.message}
    except OSError as err:
        return {"error": f"cannot read {path} ({err.strerror})"}


def restart_probe_argv(command: list[str]) -> list[str] | None:
    """The harmless call that proves `command` can run without a password, or None when
    it is enough that the binary exists (`command -v`)."""
    if command[0] == "sudo":
        rest = [a for a in command[1:] if a != "-n"]
        return ["sudo", "-n", "-l", *rest]
    if command[:2] == ["systemctl", "--user"]:
        return ["systemctl", "--user", "show-environment"]
    return None


def _restart_probe(reload: p.Reload) -> dict[str, Any]:
    command = list(reload.restart_command or DEFAULT_RESTART_COMMAND)
    probe = restart_probe_argv(command)
    binary = probe[0] if probe else command[0]
    state: dict[str, Any] = {"command": command, "probe": probe}
    if shutil.which(binary) is None:
        return {**state, "ok": False, "missing": binary, "detail": f"{binary}: not found"}
    if probe is None:
        return {**state, "ok": True, "detail": f"{binary} is {shutil.which(binary)}"}
    try:
        proc = subprocess.run(
            probe, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return {**state, "ok": False, "detail": f"{' '.join(probe)} did not answer"}
    except OSError as err:
        return {**state, "ok": False, "detail": f"{' '.join(probe)}: {err.strerror}"}
    said = (proc.stderr or proc.stdout).strip().splitlines()
    detail = said[-1][-200:] if said else f"exit {proc.returncode}"
    return {**state, "ok": proc.returncode == 0, "detail": detail}
