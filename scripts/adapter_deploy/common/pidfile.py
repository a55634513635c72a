"""The service's pidfile, held locked by the service for its whole life.

A pid alone proves nothing: after a `kill -9` the file stays and the kernel hands the pid
to another process. The service keeps an exclusive flock on its pidfile, so a reader can
tell a live service (the lock is held) from a stale file (nobody holds it) before it
sends any signal.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from adapter_deploy.common.errors import ReloadFailed

START_FIX = "start the inference service (python -m adapter_deploy.service) and deploy again"


def hold(path: Path) -> int:
    """Take the pidfile for this process; the returned fd must stay open while it serves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ReloadFailed(
            f"another service holds {path}", "stop it first (scripts/service.py stop)"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)
    return fd


def release(path: Path, fd: int) -> None:
    """On a clean exit: remove the pidfile (while still holding it), then let go."""
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def live_pid(path: Path) -> int:
    """The pid of the running service that holds `path`; ReloadFailed when the file is
    missing, empty or stale (nobody holds it: its pid may belong to a stranger now)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ReloadFailed(f"no service pidfile {path}", START_FIX) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode(errors="replace").strip()
            if text.isdigit():
                return int(text)
            raise ReloadFailed(f"no service pid in {path}", START_FIX) from None
        raise ReloadFailed(
            f"{path} is stale: no running service holds it, so its pid is not signalled",
            START_FIX,
        )
    finally:
        os.close(fd)
