"""The endpoint side of a deploy: one session per deploy, driven by JSON lines on stdin.

The deployer starts `python -m adapter_deploy.agent session` over ssh (or locally) and
sends one request per line (`adapter_deploy.protocol`); each gets one JSON line back. The
session holds the endpoint's lock for its whole life and exits when stdin closes, so a
dropped ssh connection releases the lock.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, TextIO

from adapter_deploy import __version__, protocol
from adapter_deploy.agent.operations import EndpointSide
from adapter_deploy.common.errors import AdapterDeployError, RemoteError, UsageError
from adapter_deploy.common.fsutil import file_lock
from adapter_deploy.common.logs import log_context

log = logging.getLogger(__name__)
LOCK = ".deploy.lock"


def _error_reply(err: AdapterDeployError) -> dict[str, Any]:
    return {
        "ok": False,
        "error": {
            "type": type(err).__name__,
            "exit_code": err.exit_code,
            "message": err.message,
            "fix": err.fix,
        },
    }


def _reply(out: TextIO, payload: dict[str, Any]) -> None:
    out.write(json.dumps(payload) + "\n")
    out.flush()


def _ready() -> dict[str, Any]:
    ready = protocol.ready_line(os.getpid(), __version__, _rsync_version())
    return {"ok": True, "result": ready}


def _rsync_version() -> list[int] | None:
    rsync = shutil.which("rsync")
    if rsync is None:
        return None
    try:
        out = subprocess.run([rsync, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"version v?(\d+)\.(\d+)(?:\.(\d+))?", out.stdout)
    return [int(x or 0) for x in found.groups()] if found else None


def serve_session(
    adapter_dir: Path, holder: str, inp: TextIO, out: TextIO, endpoint: str | None = None
) -> int:
    """Answer requests until stdin closes; hold the endpoint lock throughout."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    side = EndpointSide(adapter_dir, endpoint)
    try:
        with file_lock(adapter_dir / LOCK, holder, f"endpoint {adapter_dir}"):
            _reply(out, _ready())
            for line in inp:
                _reply(out, dispatch(side, line))
    except AdapterDeployError as err:
        _reply(out, _error_reply(err))
        return err.exit_code
    return 0


def dispatch(side: EndpointSide, line: str) -> dict[str, Any]:
    try:
        request = protocol.decode(line)
    except AdapterDeployError as err:
        return _error_reply(err)
    with log_context(model=getattr(request, "model", None)):  # on the agent's log lines
        return _answer(side, request)


def _answer(side: EndpointSide, request: protocol.Request) -> dict[str, Any]:
    try:
        if isinstance(request, protocol.Doctor):  # read-only facts, agent/doctor.py
            # imported here: it loads the params schema, which a deploy session never needs
            from adapter_deploy.agent import doctor

            return {"ok": True, "result": doctor.facts(side.adapter_dir, request)}
        return {"ok": True, "result": side.handle(request)}
    except AdapterDeployError as err:
        return _error_reply(err)
    except OSError as err:
        log.exception("endpoint operation failed")
        return _error_reply(RemoteError(f"endpoint I/O error: {err}", "check the endpoint's disk"))


def read_only_session(adapter_dir: Path, inp: TextIO, out: TextIO) -> int:
    """Status and doctor queries only: no lock, nothing created (an endpoint never deployed
    is empty)."""
    _reply(out, _ready())
    for line in inp:
        try:
            request = protocol.decode(line)
        except AdapterDeployError as err:
            _reply(out, _error_reply(err))
            continue
        if not isinstance(request, protocol.Status | protocol.Doctor):
            _reply(out, _error_reply(UsageError("read-only session", "open a deploy session")))
        elif not adapter_dir.is_dir() and isinstance(request, protocol.Status):
            _reply(out, {"ok": True, "result": {"models": {}}})
        else:
            _reply(out, _answer(EndpointSide(adapter_dir), request))
    return 0
