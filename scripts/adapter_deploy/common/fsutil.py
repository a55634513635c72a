"""Crash-safe file writes, hashing and locks.

State files are written temp + fsync + os.replace + fsync(dir), so a reader
sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import CorruptState, Locked

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20  # 1 MiB: large enough that hashing runs at OpenSSL speed


def sha256_file(path: Path) -> str:
    """Streamed sha256 of a file (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(_HASH_CHUNK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(path, text.encode())


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line with a single write, so lines never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL log: a missing file is empty; a line that is not a JSON object (a torn
    line left by a crash, a stray value) is skipped with a warning."""
    if not path.exists():
        return []
    records, skipped = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped.append(number)
    if skipped:
        log.warning("%s: skipped line(s) %s that are not JSON objects", path, skipped)
    return records


def read_state(path: Path, fix: str) -> dict[str, Any]:
    """One state file (a JSON object): missing is empty; anything else that is not a JSON
    object is a CorruptState naming the file and `fix`, never a silent empty (for the files
    that guard safety, empty would mean fail open)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CorruptState(f"state file {path} is corrupt (line {err.lineno})", fix) from None
    if not isinstance(value, dict):
        what = type(value).__name__
        raise CorruptState(f"state file {path} is corrupt (a JSON {what}, not an object)", fix)
    return value


@contextlib.contextmanager
def file_lock(path: Path, holder: str, what: str) -> Iterator[None]:
    """Hold an exclusive flock on `path`; fail fast with Locked naming the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            current = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise Locked(
                f"{what} is locked by {current}",
                "wait for that run to finish, or stop it; the lock frees itself when it exits",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        yield
    finally:
        os.close(fd)
