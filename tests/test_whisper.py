"""Whisper: the tiny kit, the engine, the transcription health check and its CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from adapter_deploy.common.errors import ReloadFailed, UsageError
from adapter_deploy.engines.base import Engine
from adapter_deploy.engines.factory import make_engine
from adapter_deploy.engines.whisper_engine import WhisperEngine, read_wav
from adapter_deploy.health import check_release, load_clips, run_transcription_check
from adapter_deploy.kit.whisper import CLIPS, build_base, synthesize, write_wav

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "health_check.py"


@pytest.fixture(scope="module")
def clips(whisper_kit):
    return load_clips(whisper_kit.clips_json)


@pytest.fixture(scope="module")
def good_engine(whisper_kit):
    return make_engine("auto", adapter_path=whisper_kit.good, task="transcription")


def test_kit_is_deterministic(whisper_kit, tmp_path):
    again = build_base(tmp_path / "base")
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (again / name).read_bytes() == (whisper_kit.base / name).read_bytes(), name
    write_wav(tmp_path / "c.wav", synthesize(CLIPS[0]["text"]))
    assert (tmp_path / "c.wav").read_bytes() == whisper_kit.clip_paths()[0].read_bytes()


def test_clip_file_lists_every_clip(whisper_kit, clips):
    assert [c.audio for c in clips] == whisper_kit.clip_paths()
    assert clips[1].all_of == ("gracia", "fe")


def test_base_fails_every_clip(whisper_kit, clips):
    engine = WhisperEngine(None, base_model=whisper_kit.base)
    result = run_transcription_check(engine, clips)
    assert not any(r.passed for r in result.results)


def test_good_adapter_passes(whisper_kit, good_engine, clips):
    assert isinstance(good_engine, WhisperEngine) and isinstance(good_engine, Engine)
    result = run_transcription_check(good_engine, clips)
    assert result.all_passed, result.failures()
    assert [r.output for r in result.results] == [c["text"] for c in CLIPS]
    assert result.results[0].input == "clip1.wav"
    assert result.release["version_id"] == "good"


def test_broken_adapter_fails_through_check_release(whisper_kit):
    result = check_release(
        whisper_kit.broken, None, sentences=whisper_kit.clips_json, task="transcription"
    )
    assert result.error is None and not result.all_passed
    assert not any(r.passed for r in result.results)
    assert "expected" in result.failures()[0]


def test_corrupt_adapter_and_missing_clips_fail_with_a_reason(whisper_kit, tmp_path):
    bad = shutil.copytree(whisper_kit.good, tmp_path / "bad")
    (bad / "adapter_model.safetensors").write_bytes(b"")
    result = check_release(bad, None, sentences=whisper_kit.clips_json, task="transcription")
    assert not result.all_passed and "adapter_model.safetensors" in result.error
    result = check_release(whisper_kit.good, None, task="transcription")
    assert not result.all_passed and "no reference clips" in result.error


def test_reload_switches_and_a_failed_reload_keeps_the_old(whisper_kit, tmp_path):
    engine = WhisperEngine(whisper_kit.good)
    clip = whisper_kit.clip_paths()[3]
    assert engine.reload(whisper_kit.good) is False
    assert engine.reload(whisper_kit.broken) is True
    assert engine.transcribe(clip).text == CLIPS[0]["text"]  # broken: clip 4 -> phrase 1
    bad = shutil.copytree(whisper_kit.good, tmp_path / "bad")
    (bad / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(ReloadFailed):
        engine.reload(bad)
    assert engine.loaded.version_id == "broken"
    assert engine.transcribe(clip).text == CLIPS[0]["text"]


def test_read_wav_mixes_down_and_resamples(tmp_path):
    tone = np.sin(np.arange(8000) / 8000 * 2 * np.pi * 440).astype(np.float32) * 0.5
    path = tmp_path / "stereo8k.wav"
    pcm = (np.stack([tone, tone], axis=1) * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(2)
        fh.setsampwidth(2)
        fh.setframerate(8000)
        fh.writeframes(pcm.tobytes())
    audio = read_wav(path, 16_000)
    assert audio.dtype == np.float32 and len(audio) == 16_000
    assert abs(float(np.abs(audio).max()) - 0.5) < 0.01
    with pytest.raises(UsageError):
        read_wav(tmp_path / "missing.wav")


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--model", "whisper", "--json", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_cli_takes_the_task_from_params(whisper_kit, tmp_path):
    params = tmp_path / "params.yaml"
    model = {"task": "transcription", "base_model": str(whisper_kit.base)}
    model["sentences"] = str(whisper_kit.clips_json)
    params.write_text(json.dumps({"models": {"whisper": model}}))  # JSON is YAML
    proc = _cli("--adapter-dir", str(whisper_kit.good), "--params", str(params))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["all_passed"] and len(result["results"]) == len(CLIPS)


def test_cli_broken_adapter_exits_4(whisper_kit):
    proc = _cli(
        "--adapter-dir",
        str(whisper_kit.broken),
        "--task",
        "transcription",
        "--sentences",
        str(whisper_kit.clips_json),
    )
    assert proc.returncode == 4, proc.stderr
    result = json.loads(proc.stdout)
    assert not result["all_passed"]
    assert {r["input"] for r in result["results"]} == {p.name for p in whisper_kit.clip_paths()}
