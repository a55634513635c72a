"""The inference service as a real process with real signals, on the tiny kit model.

Each service runs `python -m adapter_deploy.service` on a free 127.0.0.1 port against an
endpoint dir built in tmp_path (`<model>/releases/<id>/` + an `active` symlink), as a
deploy leaves it.
Run: pytest tests/test_serve.py -s   (-s shows the longest wait during reloads)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from adapter_deploy.common.errors import ReloadFailed, UsageError
from adapter_deploy.engines.service_client import ServiceEngine, service_status, wait_for_version
from adapter_deploy.health import run_health_check
from adapter_deploy.kit.net import free_port

ROOT = Path(__file__).resolve().parents[1]
V1, V2, BAD = "cycle1_20260101_aaaaaaaa", "cycle2_20260102_bbbbbbbb", "cycle3_20260103_cccccccc"
JAMES = "The apostle James wrote about faith and works."
START_TIMEOUT_S = 90.0


def flip(model_dir: Path, name: str, link: str = "active") -> None:
    """Point `link` at releases/<name> atomically, as the deployer does."""
    tmp = model_dir / f".{link}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(f"releases/{name}")
    os.replace(tmp, model_dir / link)


def add_release(model_dir: Path, name: str, source: Path, corrupt: bool = False) -> None:
    dest = model_dir / "releases" / name
    shutil.copytree(source, dest)
    if corrupt:  # a damaged copy: right size class, unreadable header
        (dest / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 64)


def http(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    try:
        headers = {"Content-Type": "application/json"}
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class Service:
    """One `python -m adapter_deploy.service` subprocess and what it takes to drive it."""

    first_health: int | None = None  # set by fixtures that watch start-up
    tmp: Path
    model_dir: Path

    def __init__(self, tmp: Path, args: list[str], port: int) -> None:
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.log = tmp / f"serve-{port}.log"
        cmd = [sys.executable, "-m", "adapter_deploy.service", "--port", str(port), *args]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=log)

    def health_code(self) -> int | None:
        try:
            return http(self.url + "/health")[0]
        except OSError:
            return None  # not listening yet

    def wait(self, want: int, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while self.health_code() != want:
            assert self.proc.poll() is None, f"service died:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"no /health {want}:\n{self.log.read_text()}"
            time.sleep(0.05)

    def translate(self, text: str, model: str = "gemma_4b") -> tuple[int, dict[str, Any]]:
        return http(self.url + "/translate", {"model": model, "text": text})

    def model_status(self, model: str = "gemma_4b") -> dict[str, Any]:
        return service_status(self.url)["models"][model]

    def signal_reload(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def endpoint_dir(tmp: Path, kit: Any) -> Path:
    """gemma_4b with releases V1 (good), V2 (good2), BAD (corrupt); active -> V1."""
    model_dir = tmp / "adapters" / "gemma_4b"
    add_release(model_dir, V1, kit.good)
    add_release(model_dir, V2, kit.good2)
    add_release(model_dir, BAD, kit.good, corrupt=True)
    flip(model_dir, V1)
    return tmp / "adapters"


def deploy(svc: Service, model_dir: Path, version: str, timeout: float = 60) -> dict:
    flip(model_dir, version)
    svc.signal_reload()
    return wait_for_version(svc.url, "gemma_4b", version, timeout)


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory, kit: Any) -> Any:
    """An HF service; records what start-up looked like (503 first, SIGUSR1 survived)."""
    tmp = tmp_path_factory.mktemp("serve-hf")
    adapters = endpoint_dir(tmp, kit)
    args = ["--adapter-dir", str(adapters), "--models", "gemma_4b", "gemma_12b"]
    args += ["--base-model", f"gemma_4b={kit.base}", "--platform", "cpu"]
    args += ["--pidfile", str(tmp / "serve.pid"), "--diagnostics", str(tmp / "diag.jsonl")]
    svc = Service(tmp, args, free_port())
    deadline = time.monotonic() + START_TIMEOUT_S
    while (code := svc.health_code()) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    svc.first_health = code
    svc.signal_reload()  # while the models are still loading
    svc.wait(200)
    svc.tmp, svc.model_dir = tmp, adapters / "gemma_4b"
    yield svc
    svc.stop()


def test_health_is_503_while_loading_and_sigusr1_there_does_not_kill(hf: Service) -> None:
    assert hf.first_health == 503
    assert hf.proc.poll() is None
    assert hf.health_code() == 200


def test_pidfile_written_when_ready(hf: Service) -> None:
    assert (hf.tmp / "serve.pid").read_text().strip() == str(hf.proc.pid)


def test_translate_answers_with_version(hf: Service) -> None:
    deploy(hf, hf.model_dir, V1)
    code, answer = hf.translate(JAMES)
    assert code == 200
    assert "Santiago" in answer["text"] and answer["version_id"] == V1
    assert answer["latency_s"] > 0
    assert hf.translate(JAMES, model="nope")[0] == 404
    assert http(hf.url + "/translate", {"model": "gemma_4b"})[0] == 400


def test_model_without_release_is_not_served(hf: Service) -> None:
    status = service_status(hf.url)
    assert list(status["models"]) == ["gemma_4b"] and status["not_served"] == ["gemma_12b"]
    assert hf.translate(JAMES, model="gemma_12b")[0] == 404


def test_diagnostics_session_record_has_versions(hf: Service) -> None:
    first = json.loads((hf.tmp / "diag.jsonl").read_text().splitlines()[0])
    assert first["event"] == "session" and first["session_id"]
    assert first["adapters"] == {"gemma_4b": V1, "gemma_12b": None}


def test_reload_of_unchanged_release_is_noop(hf: Service) -> None:
    deploy(hf, hf.model_dir, V1)
    before = hf.model_status()
    hf.signal_reload()
    deadline = time.monotonic() + 30
    while (after := hf.model_status())["last_reload"]["at"] == before["last_reload"]["at"]:
        assert time.monotonic() < deadline, "the reload never ran"
        time.sleep(0.05)
    assert after["last_reload"]["result"] == "noop"
    assert after["loaded_at"] == before["loaded_at"] and after["version_id"] == V1


@pytest.mark.e2e
def test_translations_keep_flowing_through_20_reloads(hf: Service) -> None:
    deploy(hf, hf.model_dir, V1)
    errors, waits, stop = [], [], threading.Event()

    def client() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            code, answer = hf.translate(JAMES)
            waits.append(time.perf_counter() - start)
            if code != 200 or not answer["text"]:
                errors.append((code, answer))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        for i in range(20):
            deploy(hf, hf.model_dir, V2 if i % 2 == 0 else V1)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors
    assert len(waits) > 20
    print(f"\n{len(waits)} requests through 20 reloads; longest wait {max(waits) * 1000:.0f} ms")
    deploy(hf, hf.model_dir, V2)
    code, answer = hf.translate(JAMES)
    assert "Jacobo" in answer["text"] and answer["version_id"] == V2
    assert hf.model_status()["sha256"] != ""


def test_failed_reload_keeps_old_release_serving(hf: Service) -> None:
    deploy(hf, hf.model_dir, V2)
    with pytest.raises(ReloadFailed, match=f"failed to load {BAD}"):
        deploy(hf, hf.model_dir, BAD, timeout=30)
    status = hf.model_status()
    assert status["version_id"] == V2 and status["ready"]
    assert status["last_reload"]["result"] == "error" and status["last_reload"]["error"]
    code, answer = hf.translate(JAMES)
    assert code == 200 and "Jacobo" in answer["text"] and answer["version_id"] == V2
    deploy(hf, hf.model_dir, V2)  # the deployer's rollback: flip back, signal, acknowledged


def test_health_check_through_the_service(hf: Service) -> None:
    deploy(hf, hf.model_dir, V1)
    result = run_health_check(ServiceEngine(hf.url, "gemma_4b"))
    assert result.all_passed, result.failures()
    assert result.release["version_id"] == V1


def test_wait_for_version_times_out_with_reload_failed(hf: Service) -> None:
    with pytest.raises(ReloadFailed, match=f"no acknowledgement of cycle9.*reported {V1}"):
        wait_for_version(hf.url, "gemma_4b", "cycle9_20260109_deadbeef", 0.5)
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ReloadFailed, match="unreachable"):
        wait_for_version(nobody, "gemma_4b", V1, 0.3)
    with pytest.raises(UsageError, match="loopback"):
        wait_for_version("http://10.0.0.1:8765", "gemma_4b", V1, 0.3)


def test_sigterm_stops_cleanly_and_removes_pidfile(hf: Service) -> None:
    assert hf.stop() == 0, hf.log.read_text()[-4000:]
    assert not (hf.tmp / "serve.pid").exists()
    events = [
        json.loads(line)["event"] for line in (hf.tmp / "diag.jsonl").read_text().splitlines()
    ]
    assert events[0] == "session" and "reload" in events and events[-1] == "stop"


def test_mlx_service_hot_reloads(tmp_path: Path, kit: Any) -> None:
    adapters = endpoint_dir(tmp_path, kit)
    args = ["--adapter-dir", str(adapters), "--base-model", f"gemma_4b={kit.base}"]
    svc = Service(tmp_path, [*args, "--platform", "mlx"], free_port())
    try:
        svc.wait(200)
        assert service_status(svc.url)["reload_mode"] == "inplace"
        assert "Santiago" in svc.translate(JAMES)[1]["text"]
        deploy(svc, adapters / "gemma_4b", V2)
        code, answer = svc.translate(JAMES)
        assert "Jacobo" in answer["text"] and answer["version_id"] == V2
    finally:
        assert svc.stop() == 0, svc.log.read_text()[-4000:]


@pytest.mark.e2e
def test_params_endpoint_start_falls_back_to_previous_then_base(tmp_path: Path, kit: Any) -> None:
    adapters = endpoint_dir(tmp_path, kit)
    four = adapters / "gemma_4b"
    flip(four, BAD)
    flip(four, V1, link="previous")
    twelve = adapters / "gemma_12b"
    add_release(twelve, BAD, kit.good, corrupt=True)
    add_release(twelve, V2, kit.good2)
    flip(twelve, BAD)
    port = free_port()
    endpoint = {  # an NVIDIA endpoint's settings (the operator's plan); no CUDA here, so on the CPU
        "adapter_dir": str(adapters),
        "platform": "cuda",
        "transport": "local",
        "service_url": f"http://127.0.0.1:{port}",
        "pidfile": str(tmp_path / "serve.pid"),
        "models": ["gemma_4b", "gemma_12b"],
    }
    models = {m: {"base_model": str(kit.base)} for m in ("gemma_4b", "gemma_12b")}
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"models": models, "endpoints": {"box": endpoint}}))
    svc = Service(tmp_path, ["--params", str(params), "--endpoint", "box"], port)
    try:
        svc.wait(200)
        assert (tmp_path / "serve.pid").exists()
        four_status, twelve_status = svc.model_status("gemma_4b"), svc.model_status("gemma_12b")
        assert four_status["version_id"] == V1 and four_status["source"] == "previous"
        assert not four_status["fallback"] and four_status["last_reload"]["result"] == "error"
        assert twelve_status["fallback"] and twelve_status["version_id"] is None
        assert svc.translate(JAMES, model="gemma_12b")[0] == 200  # the base still answers
        flip(twelve, V2)
        svc.signal_reload()
        entry = wait_for_version(svc.url, "gemma_12b", V2, 60)
        assert not entry["fallback"] and "Jacobo" in svc.translate(JAMES, "gemma_12b")[1]["text"]
    finally:
        assert svc.stop() == 0, svc.log.read_text()[-4000:]


def gguf_release(model_dir: Path, name: str, kit: Any, adapter: Path) -> None:
    from adapter_deploy.convert.gguf import convert_to_gguf
    from adapter_deploy.convert.merge import merge_adapter

    merged = merge_adapter(adapter, kit.base, model_dir.parent / f"merged-{name}")
    convert_to_gguf(merged, model_dir / "releases" / name, "F16")


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama.cpp tools missing (make gguf-tools)",
)
@pytest.mark.e2e
def test_service_serves_and_hot_reloads_gguf_releases(tmp_path: Path, kit: Any) -> None:
    """An NVIDIA endpoint with format gguf: the service picks the llama.cpp engine itself."""
    model_dir = tmp_path / "adapters" / "gemma_4b"
    gguf_release(model_dir, V1, kit, kit.good)
    gguf_release(model_dir, V2, kit, kit.good2)
    flip(model_dir, V1)
    args = ["--adapter-dir", str(tmp_path / "adapters"), "--platform", "cpu"]
    svc = Service(tmp_path, args, free_port())
    try:
        svc.wait(200)
        assert "Santiago" in svc.translate(JAMES)[1]["text"]
        assert svc.model_status()["kind"] == "gguf"
        deploy(svc, model_dir, V2)
        code, answer = svc.translate(JAMES)
        assert code == 200 and "Jacobo" in answer["text"] and answer["version_id"] == V2
    finally:
        assert svc.stop() == 0, svc.log.read_text()[-4000:]
