"""Telling the endpoint's inference service that `active` changed."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from adapter_deploy.common.clock import utc_now
from adapter_deploy.common.errors import ReloadFailed
from adapter_deploy.common.pidfile import live_pid
from adapter_deploy.protocol import Reload


def signal_reload(reload: Reload) -> dict[str, Any]:
    """Tell the service to load what `active` points at now."""
    method, pidfile, restart_command = reload.method, reload.pidfile, reload.restart_command
    when = utc_now()
    if method == "none":
        return {"method": "none", "at": when}
    if method == "sigusr1":
        if not pidfile:
            raise ReloadFailed(
                "reload_method sigusr1 needs a pidfile", "set pidfile: in params.yaml"
            )
        pid = live_pid(Path(pidfile))
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            raise ReloadFailed(
                f"service pid {pid} from {pidfile} is not running",
                "start the inference service (python -m adapter_deploy.service) and deploy again",
            ) from None
        return {"method": "sigusr1", "pid": pid, "at": when}
    # imported here: the params schema (pydantic) would add most of a session's start-up
    from adapter_deploy.config import DEFAULT_RESTART_COMMAND, SERVICE_UNIT

    command = restart_command or DEFAULT_RESTART_COMMAND
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ReloadFailed(
            f"restart command {command} failed: {proc.stderr.strip()[-200:]}",
            "check the service on the endpoint (systemctl --user status "
            f"{SERVICE_UNIT}; `make doctor` checks it runs without a password)",
        )
    return {"method": "restart", "command": command, "at": when}
