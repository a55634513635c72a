"""Crash-safe writes, hashing, locks and the JSONL log (adapter_deploy.common.fsutil)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from adapter_deploy.common.errors import Locked
from adapter_deploy.common.fsutil import (
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


WRITER = """
import sys, itertools
from pathlib import Path
from adapter_deploy.common.fsutil import atomic_write_json, append_jsonl
path, mode = Path(sys.argv[1]), sys.argv[2]
for i in itertools.count():
    if mode == "status":
        atomic_write_json(path, {{"n": i, "pad": "x" * 200_000}})
    else:
        append_jsonl(path, {{"writer": sys.argv[3], "n": i, "pad": "y" * 5000}})
        if i == 199:
            break
"""


def _writer(tmp_path: Path, *args: str) -> list[str]:
    import sys

    script = tmp_path / "writer.py"
    script.write_text(WRITER.format())
    return [sys.executable, str(script), *args]


def test_kill_9_while_writing_status_never_leaves_half_a_file(tmp_path: Path) -> None:
    import signal
    import subprocess
    import time

    path = tmp_path / "status.json"
    for delay in (0.15, 0.3, 0.45, 0.6, 0.75):
        proc = subprocess.Popen(_writer(tmp_path, str(path), "status"))
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if path.exists():
            data = json.loads(path.read_text())  # complete, whatever moment it died
            assert len(data["pad"]) == 200_000


def test_two_writers_never_interleave_log_lines(tmp_path: Path) -> None:
    import subprocess

    log = tmp_path / "deploy_log.jsonl"
    procs = [subprocess.Popen(_writer(tmp_path, str(log), "log", w)) for w in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=60) == 0
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is whole JSON
    assert len(records) == 400
    for w in ("a", "b"):
        assert [r["n"] for r in records if r["writer"] == w] == list(range(200))
