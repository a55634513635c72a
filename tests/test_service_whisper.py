"""Whisper in the inference service: a real `python -m adapter_deploy.service` process serving a
`task: transcription` model (the tiny kit Whisper) next to a Gemma, real WAV clips posted to
/transcribe, real SIGUSR1 reloads, and a deploy over the real sshd verified through the service.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from adapter_deploy.common.errors import ReloadFailed
from adapter_deploy.engines.service_client import ServiceEngine, service_status, wait_for_version
from adapter_deploy.health import (
    HealthClip,
    HealthSentence,
    judge,
    load_clips,
    run_transcription_check,
)
from adapter_deploy.kit.net import free_port
from adapter_deploy.kit.whisper import synthesize, write_wav
from fixtures_fleet import version
from fixtures_repo import run_script
from test_deploy_service import _get, _translate, _wait_healthy, served  # noqa: F401 - fixture
from test_records import check
from test_serve import JAMES, START_TIMEOUT_S, Service, add_release, flip, http

W1, W2, WBAD = "cycle1_20260201_11111111", "cycle2_20260202_22222222", "cycle3_20260203_33333333"
G1 = "cycle1_20260101_aaaaaaaa"


def passes(clip: HealthClip, text: str) -> bool:
    """The health check's own rule for this clip."""
    return judge(HealthSentence(clip.name, clip.any_of, clip.all_of), text, 0.0, 1e9) == ""


def transcribe(
    url: str,
    data: bytes,
    model: str | None = "whisper",
    content_type: str = "audio/wav",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST raw bytes to /transcribe over a plain socket, so any header can be sent as is."""
    port = int(url.rsplit(":", 1)[1])
    target = "/transcribe" + (f"?model={model}" if model is not None else "")
    head = {"Host": f"127.0.0.1:{port}", "Content-Type": content_type}
    head["Content-Length"] = str(len(data))
    head.update(headers or {})
    lines = [f"POST {target} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall("\r\n".join(lines).encode() + data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(body)


def wav_bytes(tmp: Path, samples: np.ndarray, rate: int = 16_000) -> bytes:
    return write_wav(tmp / f"clip-{len(samples)}-{rate}.wav", samples, rate).read_bytes()


def wav_header(channels: int, rate: int, width: int, frames: bytes) -> bytes:
    """A PCM WAV whose header says what the test wants, whatever the samples are."""
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * width, channels * width,
                      8 * width)  # fmt: skip
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    chunks += b"data" + struct.pack("<I", len(frames)) + frames
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, kit: Any, whisper_kit: Any) -> Any:
    """whisper (W1 good, W2 broken, WBAD corrupt; active W1) and gemma_4b (G1) in one
    service; the whisper task comes from --task, as params.yaml gives it on an endpoint."""
    tmp = tmp_path_factory.mktemp("serve-whisper")
    whisper = tmp / "adapters" / "whisper"
    add_release(whisper, W1, whisper_kit.good)
    add_release(whisper, W2, whisper_kit.broken)
    add_release(whisper, WBAD, whisper_kit.good, corrupt=True)
    flip(whisper, W1)
    add_release(tmp / "adapters" / "gemma_4b", G1, kit.good)
    flip(tmp / "adapters" / "gemma_4b", G1)
    args = ["--adapter-dir", str(tmp / "adapters"), "--models", "gemma_4b", "whisper"]
    args += ["--task", "whisper=transcription", "--base-model", f"gemma_4b={kit.base}"]
    args += ["--platform", "cpu", "--diagnostics", str(tmp / "diag.jsonl")]
    service = Service(tmp, args, free_port())
    service.wait(200, START_TIMEOUT_S)
    service.tmp, service.model_dir = tmp, whisper
    yield service
    service.stop()


@pytest.fixture(scope="module")
def clips(whisper_kit: Any) -> tuple[HealthClip, ...]:
    return load_clips(whisper_kit.clips_json)


def deploy_whisper(svc: Service, version_id: str, timeout: float = 60) -> dict[str, Any]:
    flip(svc.model_dir, version_id)
    svc.signal_reload()
    return wait_for_version(svc.url, "whisper", version_id, timeout)


def test_transcribe_answers_each_clip_with_its_words_and_release(svc, clips) -> None:
    for clip in clips:
        code, answer = transcribe(svc.url, clip.audio.read_bytes())
        assert code == 200, answer
        assert passes(clip, answer["text"]), (clip.name, answer)
        assert answer["version_id"] == W1 and answer["latency_s"] > 0
    # the generic binary type is taken as well
    code, answer = transcribe(
        svc.url, clips[0].audio.read_bytes(), content_type="application/octet-stream"
    )
    assert code == 200 and passes(clips[0], answer["text"])


def test_status_and_diagnostics_name_task_engine_and_release(svc) -> None:
    models = service_status(svc.url)["models"]
    whisper, gemma = models["whisper"], models["gemma_4b"]
    assert (whisper["task"], whisper["engine"], whisper["version_id"]) == (
        "transcription",
        "whisper",
        W1,
    )
    assert whisper["ready"] and whisper["source"] == "active" and whisper["kind"] == "peft"
    assert (gemma["task"], gemma["engine"], gemma["version_id"]) == ("translation", "hf", G1)
    session = json.loads((svc.tmp / "diag.jsonl").read_text().splitlines()[0])
    assert session["event"] == "session"
    assert session["adapters"] == {"gemma_4b": G1, "whisper": W1}
    assert session["models"]["whisper"] == {"task": "transcription", "engine": "whisper"}
    assert session["models"]["gemma_4b"] == {"task": "translation", "engine": "hf"}
    check(session, "session.schema.json")


def test_undecodable_audio_is_a_one_line_400_and_never_queued(svc, clips) -> None:
    before = service_status(svc.url)["models"]["whisper"]["requests"]
    cases = {
        "not a readable PCM WAV": b"\x00garbage bytes, not audio" * 40,
        "holds no audio samples": wav_header(1, 16_000, 2, b""),
        # a rate this low would make resampling to 16 kHz allocate gigabytes
        "is not an audio rate": wav_header(1, 1, 2, b"\x01\x00" * 4096),
        "24-bit samples are not supported": wav_header(1, 16_000, 3, b"\x00" * 3000),
    }
    for problem, data in cases.items():
        code, answer = transcribe(svc.url, data)
        assert code == 400, (problem, answer)
        assert problem in answer["error"] and "Fix: send a PCM WAV" in answer["error"]
        assert "\n" not in answer["error"]
    status = service_status(svc.url)
    assert status["models"]["whisper"]["requests"] == before and status["queued"] == 0
    assert transcribe(svc.url, clips[0].audio.read_bytes())[0] == 200  # still serving


def test_a_request_for_the_other_task_is_a_clear_400(svc, clips) -> None:
    code, answer = http(svc.url + "/translate", {"model": "whisper", "text": str(clips[0].audio)})
    assert code == 400 and "transcription model" in answer["error"]
    assert "/transcribe?model=whisper" in answer["error"]
    code, answer = transcribe(svc.url, clips[0].audio.read_bytes(), model="gemma_4b")
    assert code == 400 and "translation model" in answer["error"]
    assert "/translate" in answer["error"]
    assert transcribe(svc.url, clips[0].audio.read_bytes(), model=None)[0] == 400
    code, answer = transcribe(svc.url, clips[0].audio.read_bytes(), model="nope")
    assert code == 404 and "not served" in answer["error"]
    code, answer = svc.translate(JAMES)  # the Gemma beside it is untouched
    assert code == 200 and "Santiago" in answer["text"]


def test_transcribe_keeps_the_services_hardening(svc, clips, tmp_path: Path) -> None:
    clip = clips[0].audio.read_bytes()
    assert transcribe(svc.url, clip, content_type="text/plain")[0] == 415
    assert transcribe(svc.url, clip, content_type="application/json")[0] == 415
    assert transcribe(svc.url, clip, headers={"Host": "evil.example:80"})[0] == 403
    origin = {"Origin": "http://evil.example"}
    assert transcribe(svc.url, clip, headers=origin)[0] == 403
    # Only the header says 9 MB: refused before a byte of the body is read.
    code, answer = transcribe(svc.url, b"", headers={"Content-Length": str(9 * 1024 * 1024)})
    assert code == 413 and "over 8388608 bytes" in answer["error"]
    assert transcribe(svc.url, b"", headers={"Content-Length": "-1"})[0] == 400
    # The kit Whisper hears 2 s at once; 3 s would be cut, so it is refused.
    code, answer = transcribe(svc.url, wav_bytes(tmp_path, synthesize("Amén.", seconds=3.0)))
    assert code == 413 and "over the model's 2 s window" in answer["error"]


def test_sigusr1_hot_reloads_whisper_to_broken_and_back(svc, clips) -> None:
    pid = svc.proc.pid
    entry = deploy_whisper(svc, W2)
    assert entry["last_reload"]["result"] == "ok" and entry["engine"] == "whisper"
    code, answer = transcribe(svc.url, clips[0].audio.read_bytes())
    assert code == 200 and answer["version_id"] == W2
    assert not passes(clips[0], answer["text"])  # the broken adapter answers the wrong phrase
    with pytest.raises(ReloadFailed, match=f"failed to load {WBAD}"):
        deploy_whisper(svc, WBAD, timeout=30)
    status = service_status(svc.url)["models"]["whisper"]
    assert status["version_id"] == W2 and status["last_reload"]["result"] == "error"
    assert deploy_whisper(svc, W1)["version_id"] == W1
    code, answer = transcribe(svc.url, clips[0].audio.read_bytes())
    assert code == 200 and answer["version_id"] == W1 and passes(clips[0], answer["text"])
    assert svc.proc.pid == pid and svc.proc.poll() is None  # hot: the same process throughout
    records = [json.loads(line) for line in (svc.tmp / "diag.jsonl").read_text().splitlines()]
    reloads = [r for r in records if r["event"] == "reload" and r["model"] == "whisper"]
    assert [(r["from"], r["version_id"], r["result"]) for r in reloads[-3:]] == [
        (W1, W2, "ok"),
        (W2, WBAD, "error"),
        (W2, W1, "ok"),
    ]
    assert all(r["task"] == "transcription" and r["engine"] == "whisper" for r in reloads)


def test_clip_health_check_runs_through_the_service(svc, clips) -> None:
    deploy_whisper(svc, W1)
    before = service_status(svc.url)["models"]["whisper"]["requests"]
    result = run_transcription_check(ServiceEngine(svc.url, "whisper"), clips)
    assert result.all_passed, result.failures()
    assert result.release["version_id"] == W1
    assert [r.input for r in result.results] == [c.name for c in clips]
    # every clip (plus the untimed first one) was answered by the service
    after = service_status(svc.url)["models"]["whisper"]["requests"]
    assert after - before == len(clips) + 1
    deploy_whisper(svc, W2)
    broken = run_transcription_check(ServiceEngine(svc.url, "whisper"), clips)
    assert not broken.all_passed and broken.release["version_id"] == W2
    deploy_whisper(svc, W1)


@pytest.mark.e2e
def test_deploy_verifies_whisper_and_gemma_through_the_service(
    fleet, whisper_kit, request: pytest.FixtureRequest
) -> None:
    """One endpoint, reload_method sigusr1: a deploy of gemma_4b (a hot reload) and whisper
    (its first release on this service) is acknowledged and health-checked for both through
    the running service: the Gemma's sentences via /translate, the clips via /transcribe."""
    url, pidfile = request.getfixturevalue("served")  # test_deploy_service's: ep1 + service
    data = yaml.safe_load(fleet.params.read_text())
    data["models"]["whisper"].update(
        base_model=str(whisper_kit.base), sentences=str(whisper_kit.clips_json)
    )
    fleet.params.write_text(yaml.safe_dump(data))
    fleet.set_endpoint("ep1", models=["gemma_4b", "whisper"])
    restarted = run_script("service.py", "restart", "--endpoint", "ep1", params=fleet.params)
    assert restarted.returncode == 0, restarted.stderr
    _wait_healthy(url)
    pid = int(pidfile.read_text())
    assert _get(f"{url}/status")[1]["not_served"] == ["whisper"]
    w2 = version(fleet.store, fleet.params, whisper_kit.good, 2, model="whisper")
    v2 = fleet.versions["cycle2"]

    proc = fleet.deploy(
        "--cycle", "2", "--models", "gemma_4b", "whisper", "--endpoints", "ep1", "--json"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    models = {m["model"]: m for m in json.loads(proc.stdout)["endpoints"][0]["models"]}
    for model, want in (("gemma_4b", v2), ("whisper", w2)):
        post = models[model]["health"]["post_activation"]
        assert post["all_passed"] and post["release"]["version_id"] == want, post
    clip_names = [r["input"] for r in models["whisper"]["health"]["post_activation"]["results"]]
    assert clip_names == ["clip1.wav", "clip2.wav", "clip3.wav", "clip4.wav"]
    assert int(pidfile.read_text()) == pid  # hot reload: the same process
    status = _get(f"{url}/status")[1]["models"]
    assert (status["whisper"]["version_id"], status["whisper"]["engine"]) == (w2, "whisper")
    assert status["gemma_4b"]["version_id"] == v2
    # VERIFY went through the service: it answered every clip and sentence (+ one untimed)
    assert status["whisper"]["requests"] == 5 and status["gemma_4b"]["requests"] == 6
    code, answer = transcribe(url, whisper_kit.clip_paths()[2].read_bytes())
    assert code == 200 and "Santiago" in answer["text"] and answer["version_id"] == w2
    assert "Jacobo" in _translate(url, JAMES)["text"]
