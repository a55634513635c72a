"""One logging setup: UTC timestamps, level, endpoint/model context, --log-json / LOG_JSON=1."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from adapter_deploy.common import logs
from adapter_deploy.common.logs import log_context
from adapter_deploy.deploy.fleet import run_parallel
from adapter_deploy.kit.net import free_port
from fixtures_repo import ROOT, Store, make_adapter

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
TEXT_LINE = re.compile(rf"^({TS}) (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
JSON_KEYS = {"ts", "level", "logger", "endpoint", "model", "msg", "exc"}
LEVELS = {"debug", "info", "warning", "error", "critical"}


def _text_lines(stderr: str) -> list[str]:
    lines = stderr.strip().splitlines()
    assert lines, "nothing was logged"
    for line in lines:
        match = TEXT_LINE.match(line)
        assert match, f"no timestamp + level: {line!r}"
        datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S.%fZ")  # a real date and time
    return lines


def _json_lines(stderr: str) -> list[dict]:
    records = [json.loads(line) for line in stderr.strip().splitlines()]
    assert records, "nothing was logged"
    for record in records:
        assert set(record) <= JSON_KEYS | {"exit_code", "fix", "traceback"}, record
        assert re.fullmatch(TS, record["ts"]) and record["level"] in LEVELS, record
        assert isinstance(record["msg"], str) and None not in record.values(), record
    return records


def _script(name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )


def _version(store: Store, src: Path, *extra: str, env: dict | None = None):
    args = ("--model", "gemma_4b", "--cycle", "1", "--src", str(src), "--json", *extra)
    return _script("version.py", *args, env={"PARAMS": str(store.params), **(env or {})})


def test_script_logs_carry_time_level_and_model_json_on_request(store: Store, tmp_path) -> None:
    src = make_adapter(tmp_path / "out")
    proc = _version(store, src, env={"LOG_JSON": "0"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == "gemma_4b"  # stdout: the result, untouched
    lines = _text_lines(proc.stderr)
    assert any(" INFO [gemma_4b] pushing " in line for line in lines), lines
    assert any(" WARNING [gemma_4b] no signing key" in line for line in lines), lines

    for extra, env in ((("--log-json",), {}), ((), {"LOG_JSON": "1"})):
        again = _version(store, src, *extra, env=env)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["model"] == "gemma_4b"
        [record] = _json_lines(again.stderr)
        assert record["level"] == "info" and record["model"] == "gemma_4b"
        assert record["logger"] == "adapter_deploy.store.versioning"
        assert "already holds these bytes" in record["msg"]


def test_the_error_at_exit_is_one_json_line_in_json_mode(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    text = _script("versions.py", env={"PARAMS": str(missing), "LOG_JSON": ""})
    assert text.returncode == 2 and text.stderr.startswith("error: params file")
    for extra, env in ((("--log-json",), {}), ((), {"LOG_JSON": "1"})):
        proc = _script("versions.py", *extra, env={"PARAMS": str(missing), **env})
        assert proc.returncode == 2 and proc.stdout == ""
        [record] = _json_lines(proc.stderr)
        assert record["level"] == "error" and record["exit_code"] == 2
        assert record["msg"] == f"params file {missing} not found"
        assert "--params FILE" in record["fix"]


def test_a_bug_in_json_mode_is_still_one_json_line_with_its_traceback(tmp_path: Path) -> None:
    script = tmp_path / "buggy.py"
    script.write_text(
        "from adapter_deploy.common.runner import make_parser, run\n"
        "def main(args):\n"
        "    raise RuntimeError('a bug')\n"
        "run(main, make_parser('a buggy script'))\n"
    )
    env = {**os.environ, "LOG_JSON": "1"}
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    [record] = _json_lines(proc.stderr)
    assert record["exit_code"] == 1 and "RuntimeError('a bug')" in record["msg"]
    assert "Traceback" in record["traceback"]
    env["LOG_JSON"] = ""
    plain = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env)
    assert plain.returncode == 1 and plain.stderr.startswith("Traceback")  # Python's own


@pytest.fixture
def captured(monkeypatch) -> io.StringIO:
    """The project's JSON log setup writing into a buffer; pytest's own handlers kept."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    monkeypatch.setattr(logs, "_PROCESS", {})
    buffer = io.StringIO()
    logs.setup(as_json=True, stream=buffer)
    yield buffer
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def _records(buffer: io.StringIO) -> dict[str, dict]:
    return {r["msg"]: r for r in map(json.loads, buffer.getvalue().splitlines())}


def test_context_reaches_records_from_worker_threads(captured: io.StringIO) -> None:
    log = logging.getLogger("adapter_deploy.test")

    def job(name: str, control_dir: Path) -> str:
        log.info("%s starts", name)
        with log_context(model="gemma_4b"):
            log.warning("%s checks", name)
        return name

    with log_context(model="whisper"):  # the caller's context travels into each worker
        done = run_parallel(SimpleNamespace(release=SimpleNamespace(parallel=2)), ["e1", "e2"], job)
    log.info("after")
    assert done == ["e1", "e2"]
    records = _records(captured)
    for name in ("e1", "e2"):
        assert records[f"{name} starts"]["endpoint"] == name
        assert records[f"{name} starts"]["model"] == "whisper"
        assert records[f"{name} checks"]["model"] == "gemma_4b"
    assert "endpoint" not in records["after"] and "model" not in records["after"]

    # A thread started by hand begins empty; the process context reaches it anyway.
    logs.set_process_context(endpoint="mac-dev")
    with log_context(model="gemma_4b"):
        thread = threading.Thread(target=log.info, args=("from a bare thread",))
        thread.start()
        thread.join()
    assert records_of(captured, "from a bare thread") == {"endpoint": "mac-dev"}


def records_of(buffer: io.StringIO, msg: str) -> dict[str, str]:
    record = _records(buffer)[msg]
    return {k: record[k] for k in ("endpoint", "model") if k in record}


def test_text_format_names_endpoint_and_model(monkeypatch) -> None:
    monkeypatch.setattr(logs, "_PROCESS", {})
    record = logging.LogRecord("adapter_deploy.x", logging.INFO, __file__, 1, "pre-check", (), None)
    record.created = 1795972801.25  # 2026-11-29T17:20:01.250Z, exact in binary
    with log_context(endpoint="ep1", model="gemma_4b"):
        logs.ContextFilter().filter(record)
    line = logs.TextFormatter().format(record)
    assert line == "2026-11-29T17:20:01.250Z INFO [ep1] [gemma_4b] pre-check"
    assert logs.utc_timestamp(0.5) == "1970-01-01T00:00:00.500Z"


def test_the_agent_logs_its_endpoint_and_the_requests_model(tmp_path: Path) -> None:
    """The endpoint agent (run by the deployer, --endpoint NAME) names both on its lines."""
    adapter_dir = tmp_path / "ep1"
    (adapter_dir / "status.json").mkdir(parents=True)  # a real I/O error on the endpoint
    request = '{"op": "record", "model": "gemma_4b", "health_status": "healthy"}\n'
    argv = [sys.executable, "-m", "adapter_deploy.agent", "session"]
    argv += ["--adapter-dir", str(adapter_dir), "--endpoint", "ep1"]
    for json_mode in ("0", "1"):
        env = {**os.environ, "LOG_JSON": json_mode}
        proc = subprocess.run(argv, input=request, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.splitlines()[-1])["error"]["type"] == "RemoteError"
        if json_mode == "1":
            [record] = _json_lines(proc.stderr)
            assert (record["endpoint"], record["model"]) == ("ep1", "gemma_4b")
            assert record["msg"] == "endpoint operation failed"
            assert "IsADirectoryError" in record["exc"]
        else:
            first = proc.stderr.splitlines()[0]
            assert TEXT_LINE.match(first), first
            assert first.endswith(" ERROR [ep1] [gemma_4b] endpoint operation failed")


def _service_params(tmp_path: Path) -> tuple[Path, str]:
    """A local endpoint with no release yet: the service starts in a second, serving none."""
    port = free_port()
    adapter_dir = tmp_path / "ep1"
    adapter_dir.mkdir()
    endpoint = {
        "transport": "local",
        "adapter_dir": str(adapter_dir),
        "platform": "cpu",
        "models": ["gemma_4b"],
        "reload_method": "sigusr1",
        "service_url": f"http://127.0.0.1:{port}",
        "pidfile": str(adapter_dir / "serve.pid"),
    }
    data = {
        "store": {"adapters_dir": str(tmp_path / "adapters")},
        "models": {"gemma_4b": {"task": "translation", "base_model": "kit/tiny-gemma"}},
        "endpoints": {"ep1": endpoint},
    }
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    return params, endpoint["service_url"]


def _run_service(params: Path, url: str, log: Path, env: dict[str, str]) -> str:
    """scripts/service.py start, wait for /health, stop; the service's log file."""
    start = _script("service.py", "start", "--endpoint", "ep1", "--log", str(log), env=env)
    assert start.returncode == 0, start.stderr
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"service never ready:\n{log.read_text()}"
            time.sleep(0.1)
    finally:
        stop = _script("service.py", "stop", "--endpoint", "ep1", env={"PARAMS": str(params)})
        assert stop.returncode == 0, stop.stderr
    return log.read_text()


def test_the_service_log_has_timestamps_and_its_endpoint(tmp_path: Path) -> None:
    params, url = _service_params(tmp_path)
    env = {"PARAMS": str(params), "LOG_JSON": "0"}
    lines = _text_lines(_run_service(params, url, tmp_path / "service.log", env))
    assert all(" [ep1] " in line for line in lines), lines
    assert any("ready on" in line for line in lines) and "stopped" in lines[-1]

    env["LOG_JSON"] = "1"
    records = _json_lines(_run_service(params, url, tmp_path / "service.jsonl", env))
    assert {r["endpoint"] for r in records} == {"ep1"}
    assert {r["logger"] for r in records} == {"adapter_deploy.service"}
    assert records[-1]["msg"] == "stopped"


def test_every_script_has_the_log_json_flag() -> None:
    proc = _script("status.py", "--help", env={})
    assert "--log-json" in proc.stdout and "LOG_JSON=1" in proc.stdout
