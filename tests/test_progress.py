"""Progress an operator can read: rsync's output parsed into byte counts per endpoint,
bars on a terminal, plain timestamped lines when piped; hashing while files land."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from adapter_deploy.agent import receive
from adapter_deploy.agent.releases import ModelReleases, file_problems, stage
from adapter_deploy.cli.progress import BarProgress, PlainProgress, _bars, deploy_progress
from adapter_deploy.common import logs
from adapter_deploy.common.errors import ChecksumMismatch
from adapter_deploy.common.fsutil import sha256_file
from adapter_deploy.config import load_params
from adapter_deploy.deploy.fleet import endpoint_run, run_parallel
from adapter_deploy.deploy.plan import ModelOutcome, Release
from adapter_deploy.deploy.progress import RsyncOutput, local_rsync_version, progress_flags
from adapter_deploy.deploy.remote import connect
from adapter_deploy.kit.sshd import SSHServer
from fixtures_fleet import Fleet
from rich.console import Console

# Captured from rsync 3.5.0 (`rsync -a --stats --bwlimit=30000`, files of 30 MB, 5 MB, 3 B).
PROGRESS2 = (
    b"\r         32,768   0%    0.00kB/s    0:00:00  \r     30,000,000  85%   30.60MB/s    "
    b"0:00:00 (xfr#1, to-chk=2/4)\r     32,523,136  92%   29.04MB/s    0:00:00  \r     "
    b"35,000,000  99%   31.11MB/s    0:00:01 (xfr#2, to-chk=1/4)\r     35,000,003 100%   "
    b"31.08MB/s    0:00:01 (xfr#3, to-chk=0/4)\r     35,000,003 100%   31.05MB/s    0:00:01 "
    b"(xfr#3, to-chk=0/4)\n\n"
)
PER_FILE = (
    b"sending incremental file list\ncreated directory dst\n./\na.bin\n\r         32,768   0%"
    b"    0.00kB/s    0:00:00  \r     30,000,000 100%   32.22MB/s    0:00:00 (xfr#1, to-chk=2/4)"
    b"\nb.bin\n\r         32,768   0%   36.00kB/s    0:02:17  \r      2,129,920  42%    2.03MB/s"
    b"    0:00:01  \r      5,000,000 100%    4.27MB/s    0:00:01 (xfr#2, to-chk=1/4)\nc.json\n"
    b"\r              3 100%    0.03kB/s    0:00:00  \r              3 100%    0.03kB/s    "
    b"0:00:00 (xfr#3, to-chk=0/4)\n\n"
)
TOTAL = 35_000_003
CONTROL = re.compile(r"[\r\x1b]")


def _fed(output: RsyncOutput, text: bytes, size: int) -> list[int]:
    """Feed `text` in chunks of `size` bytes (lines split across reads, as from a pipe)."""
    seen = []
    for i in range(0, len(text), size):
        moved = output.feed(text[i : i + size])
        if moved is not None:
            seen.append(moved)
    return seen


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_progress2_output_gives_the_running_total(chunk: int) -> None:
    seen = _fed(RsyncOutput(per_file=False), PROGRESS2, chunk)
    assert seen == sorted(seen) and seen[-1] == TOTAL
    assert chunk > len(PROGRESS2) or {30_000_000, 32_523_136} <= set(seen)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_per_file_progress_output_adds_up_the_files(chunk: int) -> None:
    seen = _fed(RsyncOutput(per_file=True), PER_FILE, chunk)
    assert seen == sorted(seen) and seen[-1] == TOTAL
    assert chunk > len(PER_FILE) or 30_000_000 + 2_129_920 in seen  # within the second file


def _live_rsync(tmp_path: Path, flags: list[str]) -> bytes:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for name, size in (("a.bin", 3_000_000), ("b.bin", 1_000_000), ("c.json", 3)):
        (src / name).write_bytes(os.urandom(size))
    dest = tmp_path / f"dst{len(flags)}{flags[0]}"
    argv = ["rsync", "-a", "--stats", *flags, f"{src}/", f"{dest}/"]
    return subprocess.run(argv, check=True, capture_output=True).stdout


@pytest.mark.parametrize(
    ("flags", "per_file"), [(["--info=progress2"], False), (["--progress"], True)]
)
def test_the_rsync_here_prints_what_the_parser_reads(tmp_path: Path, flags, per_file) -> None:
    output = RsyncOutput(per_file)
    output.feed(_live_rsync(tmp_path, flags))
    assert output.bytes_done == 4_000_003


def test_rsync_older_than_3_1_gets_per_file_progress() -> None:
    assert progress_flags((2, 6, 9)) == (["--progress"], True)
    if local_rsync_version() >= (3, 1):
        assert progress_flags((3, 2, 7)) == (["--info=progress2"], False)


# --- the observer over a real transfer -------------------------------------------------


class Recorder:
    """A Progress that remembers every call, per endpoint."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple]] = {}
        self._lock = threading.Lock()

    def _add(self, endpoint: str, *call: object) -> None:
        with self._lock:
            self.calls.setdefault(endpoint, []).append(call)

    def start(self, endpoint: str, total_bytes: int) -> None:
        self._add(endpoint, "start", total_bytes)

    def advance(self, endpoint: str, bytes_done: int) -> None:
        self._add(endpoint, "advance", bytes_done)

    def step(self, endpoint: str, name: str) -> None:
        self._add(endpoint, "step", name)

    def done(self, endpoint: str) -> None:
        self._add(endpoint, "done")


def _release(store: Path, model: str, size: int) -> Release:
    version_id = "cycle1_20260101_0000000a"
    local = store / model / version_id
    local.mkdir(parents=True)
    (local / "adapter_model.safetensors").write_bytes(os.urandom(size))
    (local / "adapter_config.json").write_text(json.dumps({"r": 16}))
    files = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in local.iterdir()}
    return Release(model, version_id, 1, files, local)


def _params(tmp_path: Path, sshd: SSHServer, names: list[str]):
    store = tmp_path / "store"
    data = {
        "store": {"adapters_dir": str(store)},
        "models": {"gemma_4b": {"base_model": "none"}, "whisper": {"base_model": "none"}},
        "endpoints": {n: sshd.endpoint(tmp_path / n / "adapters") for n in names},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    return load_params(tmp_path / "params.yaml"), store


def test_bytes_advance_to_the_total_per_endpoint_over_ssh(sshd: SSHServer, tmp_path) -> None:
    names = ["ep1", "ep2"]
    params, store = _params(tmp_path, sshd, names)
    chosen = [_release(store, "gemma_4b", 6_000_000), _release(store, "whisper", 2_000_000)]
    total = sum(r.size for r in chosen)
    recorder = Recorder()

    def job(name: str, control: Path):
        with endpoint_run(params, name, control, recorder) as (run, outcome):
            farm = control / f"{name}.landing"
            run.open(chosen, farm)  # as deploy_endpoint: rsync starts with the connection
            run.push_all(chosen, store, farm)
            for release in chosen:
                run.transfer(release, ModelOutcome(release.model, release.version_id))
        return outcome

    outcomes = run_parallel(params, names, job)
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    for name in names:
        calls = recorder.calls[name]
        assert calls[0] == ("step", "gemma_4b,whisper transfer")
        assert calls[1] == ("start", total)
        done = [c[1] for c in calls if c[0] == "advance"]
        assert len(done) >= 2 and done == sorted(done) and done[-1] == total
        assert ("step", "whisper sha256 check") in calls and calls[-1] == ("done",)
        release = tmp_path / name / "adapters" / "whisper" / "releases" / chosen[1].version_id
        assert release.is_dir()


@pytest.mark.e2e
def test_rsync_before_3_1_reports_bytes_from_per_file_lines(sshd: SSHServer, tmp_path) -> None:
    params, store = _params(tmp_path, sshd, ["ep1"])
    release = _release(store, "gemma_4b", 3_000_000)
    dest = tmp_path / "ep1" / "landing"
    dest.mkdir(parents=True)
    seen: list[int] = []
    conn = connect("ep1", params.endpoint("ep1"), tmp_path)
    try:
        files = [release.local_dir / n for n in release.files]
        conn.push(files, str(dest), seen.append, endpoint_rsync=(2, 6, 9))
    finally:
        conn.close()
    assert seen and seen == sorted(seen) and seen[-1] == release.size


# --- what the operator sees ----------------------------------------------------------------


@pytest.fixture
def plain_log() -> Iterator[io.StringIO]:
    """What PlainProgress prints, formatted as on stderr."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(logs.ContextFilter())
    handler.setFormatter(logs.TextFormatter())
    logger = logging.getLogger("adapter_deploy.progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


def _texts(out: io.StringIO) -> list[str]:
    return [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]


def test_plain_lines_have_timestamps_byte_counts_and_no_control_codes(plain_log) -> None:
    plain = PlainProgress(every_s=0.0)
    plain.step("ep1", "gemma_4b transfer")
    plain.start("ep1", 2_000_000)
    plain.advance("ep1", 1_000_000)
    plain.advance("ep1", 2_000_000)
    plain.step("ep1", "gemma_4b pre-check")
    plain.done("ep1")
    lines = plain_log.getvalue().splitlines()
    assert not CONTROL.search(plain_log.getvalue())
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO \[ep1\] "
    assert all(re.match(stamp, line) for line in lines), lines
    assert _texts(plain_log) == [
        "gemma_4b transfer",
        "sending 2.0 MB",
        "sent 1.0 MB of 2.0 MB",
        "sent 2.0 MB of 2.0 MB",
        "gemma_4b pre-check",
        "done",
    ]


def test_plain_byte_lines_come_every_few_seconds_not_per_report(plain_log) -> None:
    plain = PlainProgress(every_s=3600)
    plain.start("ep1", 100)
    for n in range(1, 100):
        plain.advance("ep1", n)
    plain.done("ep1")  # the last count is always printed
    assert _texts(plain_log) == ["sending 100 B", "sent 99 B of 100 B", "done"]


def test_a_terminal_gets_one_bar_per_endpoint() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with _bars(console) as bars:
        shown = BarProgress(bars)
        for name in ("ep1", "ep2"):
            shown.step(name, "gemma_4b transfer")
            shown.start(name, 1000)
            shown.advance(name, 500)
        assert [t.description for t in bars.tasks] == [
            "[ep1] gemma_4b transfer",
            "[ep2] gemma_4b transfer",
        ]
        assert [(t.completed, t.total) for t in bars.tasks] == [(500, 1000), (500, 1000)]
        shown.done("ep1")
        assert bars.tasks[0].finished and not bars.tasks[1].finished


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_log_lines_go_above_the_bars(monkeypatch) -> None:
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    handler = logging.StreamHandler(term)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with deploy_progress(term) as progress:
            assert isinstance(progress, BarProgress)
            progress.step("ep1", "gemma_4b transfer")
            progress.start("ep1", 1000)
            progress.advance("ep1", 1000)
            logging.getLogger("adapter_deploy.test").warning("a line from the core")
            progress.done("ep1")
        assert handler.stream is term  # given back after the bars
    finally:
        root.removeHandler(handler)
    text = term.getvalue()
    assert "a line from the core" in text and "[ep1] done" in text and "\x1b[" in text


@pytest.mark.e2e
def test_piped_deploy_prints_byte_lines_per_endpoint_and_no_control_codes(fleet: Fleet) -> None:
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1", "ep2")
    assert not CONTROL.search(proc.stderr), proc.stderr
    for name in ("ep1", "ep2"):
        # a log line: `<ts> INFO [ep1] [gemma_4b] sent 208.3 kB of 208.3 kB` (model when known)
        sent = re.findall(rf"\[{name}\] (?:\[gemma_4b\] )?sent (.+) of (.+)", proc.stderr)
        assert sent and sent[-1][0] == sent[-1][1], proc.stderr  # the whole release arrived
        assert re.search(rf"\[{name}\] (?:\[gemma_4b\] )?gemma_4b pre-check", proc.stderr)


# --- hashing while the transfer runs -------------------------------------------------------


def _incoming(tmp_path: Path, data: bytes) -> tuple[ModelReleases, Path, dict]:
    kept = ModelReleases(tmp_path / "adapters", "gemma_4b")
    incoming = kept.incoming("cycle1_20260101_0000000a")
    incoming.mkdir(parents=True)
    files = {"adapter_model.safetensors": {"sha256": _sha(data), "size": len(data)}}
    return kept, incoming, files


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _receive(incoming: Path, files: dict, data: bytes) -> dict:
    """Land the file the way rsync does (temp name, then rename) and let it be hashed."""
    receiver = receive.Receiver(incoming, files)
    temp = incoming / ".adapter_model.safetensors.XyZ123"
    temp.write_bytes(data)
    temp.rename(incoming / "adapter_model.safetensors")
    deadline = time.monotonic() + 10
    while receiver.waiting and time.monotonic() < deadline:
        time.sleep(0.02)
    return receiver.finish()


def test_a_file_is_hashed_once_while_the_transfer_runs(tmp_path: Path, monkeypatch) -> None:
    data = os.urandom(100_000)
    kept, incoming, files = _incoming(tmp_path, data)
    hashed = _receive(incoming, files, data)
    assert hashed["adapter_model.safetensors"][1] == _sha(data)

    def no_second_read(path: Path) -> str:
        raise AssertionError(f"{path} was read a second time")

    monkeypatch.setattr("adapter_deploy.agent.releases.sha256_file", no_second_read)
    known = lambda name, st: receive.known_hash(hashed, name, st)  # noqa: E731
    assert stage(kept, "cycle1_20260101_0000000a", files, known=known) == "staged"


@pytest.mark.parametrize("how", ["replaced", "written"])
def test_a_file_changed_after_it_was_hashed_is_hashed_again(tmp_path: Path, how: str) -> None:
    data = os.urandom(100_000)
    kept, incoming, files = _incoming(tmp_path, data)
    hashed = _receive(incoming, files, data)
    target = incoming / "adapter_model.safetensors"
    evil = bytes([data[0] ^ 1]) + data[1:]  # same size, one bit flipped
    if how == "replaced":  # as a later rsync rename would
        (incoming / ".tmp").write_bytes(evil)
        os.utime(incoming / ".tmp", ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns))
        (incoming / ".tmp").rename(target)
    else:  # in place, mtime put back: only ctime tells
        st = target.stat()
        with open(target, "r+b") as fh:
            fh.write(evil[:1])
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    known = lambda name, st: receive.known_hash(hashed, name, st)  # noqa: E731
    assert file_problems(incoming, files, known) == [
        "adapter_model.safetensors: sha256 differs from the manifest"
    ]
    with pytest.raises(ChecksumMismatch):
        stage(kept, "cycle1_20260101_0000000a", files, known=known)
    assert not kept.release("cycle1_20260101_0000000a").exists()


def test_a_file_still_changing_is_not_hashed_yet(tmp_path: Path) -> None:
    data = os.urandom(1000)
    _, incoming, files = _incoming(tmp_path, data)
    (incoming / "adapter_model.safetensors").write_bytes(data)  # ctime: now
    assert receive._hash_if_whole(incoming / "adapter_model.safetensors", len(data)) is None
    time.sleep(receive.SETTLED_S * 2)
    found = receive._hash_if_whole(incoming / "adapter_model.safetensors", len(data))
    assert found is not None and found[1] == _sha(data)
    shutil.rmtree(incoming)


def test_with_log_json_even_a_terminal_gets_json_lines_not_bars(monkeypatch) -> None:
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    handler = logging.StreamHandler(term)
    handler.addFilter(logs.ContextFilter())
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    monkeypatch.setattr(root, "level", logging.INFO)
    try:
        with deploy_progress(term) as progress:
            assert isinstance(progress, PlainProgress)
            progress.start("ep1", 10)
            progress.done("ep1")
    finally:
        root.removeHandler(handler)
    records = [json.loads(line) for line in term.getvalue().splitlines()]
    assert [(r["endpoint"], r["msg"]) for r in records] == [
        ("ep1", "sending 10 B"),
        ("ep1", "done"),
    ]
