"""Crash-safe writes, hashing, locks and the JSONL log (deploycore.fsutil)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from deploycore.errors import Locked
from deploycore.fsutil import (
    append_jsonl,
    atomic_write_json,
    file_lock,
    read_jsonl,
    sha256_file,
)


def test_sha256_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_reader_drops_a_torn_last_line(tmp_path: Path) -> None:
    log = tmp_path / "deploy_log.jsonl"
    append_jsonl(log, {"n": 1})
    append_jsonl(log, {"n": 2})
    with open(log, "a") as fh:
        fh.write('{"n": 3, "tor')
    assert read_jsonl(log) == [{"n": 1}, {"n": 2}]


def test_second_lock_holder_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    with file_lock(lock, "deploy by alice pid 1", "endpoint mac-dev"):
        with pytest.raises(Locked, match="locked by deploy by alice pid 1") as info:
            with file_lock(lock, "deploy by bob", "endpoint mac-dev"):
                pass
        assert info.value.exit_code == 7
    with file_lock(lock, "deploy by bob", "endpoint mac-dev"):
        pass
