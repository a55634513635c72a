"""Health check: pass rules, sentence files, check_release and the CLI's exit codes/JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from adapter_deploy.common.errors import UsageError
from adapter_deploy.health import (
    DEFAULT_SENTENCES,
    HealthSentence,
    check_release,
    judge,
    load_sentences,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "health_check.py"
RESULT_KEYS = {"all_passed", "timestamp", "latency_p50", "latency_p95", "results"}
SENTENCE_KEYS = {"input", "output", "latency_s", "passed", "reason"}


def cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--model", "gemma_4b", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("index", "output", "ok"),
    [
        (0, "BUENOS días", True),
        (0, "hola", False),
        (2, "el apóstol SANTIAGO", True),
        (3, "por gracia y por la fe", True),
        (3, "por gracia", False),
        (3, "por la fe", False),
        (4, "Amén.", True),
        (4, "   ", False),
    ],
)
def test_pass_rules(index, output, ok):
    assert (judge(DEFAULT_SENTENCES[index], output, 0.1, 5.0) == "") is ok


def test_latency_limit_fails_a_right_answer():
    assert "limit" in judge(DEFAULT_SENTENCES[4], "Amén.", 5.0, 5.0)


def test_sentence_file(tmp_path):
    good = tmp_path / "s.json"
    good.write_text(json.dumps([{"input": "Amen."}, {"input": "x", "all_of": ["a", "b"]}]))
    assert load_sentences(good) == (HealthSentence("Amen."), HealthSentence("x", all_of=("a", "b")))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"input": 1}, {"input": "x", "any_of": "a"}, {"inp": "y"}]))
    with pytest.raises(UsageError, match="entry 1.*entry 2.*entry 3"):
        load_sentences(bad)


def test_check_release_reports_a_corrupt_adapter(kit, tmp_path):
    bad = shutil.copytree(kit.good, tmp_path / "bad")
    (bad / "adapter_model.safetensors").write_bytes(b"")
    for kind in ("hf", "mlx"):
        result = check_release(bad, kit.base, kind)
        assert not result.all_passed and "adapter_model.safetensors" in result.error


def test_cli_good_adapter_exits_0_with_json(kit):
    proc = cli("--adapter-dir", str(kit.good), "--engine", "mlx", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # stdout holds the JSON and nothing else
    assert RESULT_KEYS <= set(result) and result["all_passed"] is True
    assert len(result["results"]) == 5
    assert all(SENTENCE_KEYS <= set(r) for r in result["results"])
    assert result["latency_p50"] <= result["latency_p95"]


def test_cli_regressed_adapter_exits_4_and_names_the_sentence(kit):
    proc = cli("--adapter-dir", str(kit.regressed), "--base-model", str(kit.base))
    assert proc.returncode == 4
    assert "Sentence 3 failed" in proc.stdout and "santiago" in proc.stdout
    assert "El apóstol escribió" in proc.stdout
    assert "Sentence 1 failed" not in proc.stdout


def test_cli_corrupt_adapter_exits_4_with_reason_as_json(kit, tmp_path):
    bad = shutil.copytree(kit.good, tmp_path / "bad")
    (bad / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    proc = cli("--adapter-dir", str(bad), "--json", "--engine", "hf")
    assert proc.returncode == 4
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout)
    assert result["all_passed"] is False and "not a readable safetensors" in result["error"]


def test_cli_own_sentences_and_latency_limit(kit, tmp_path):
    sentences = tmp_path / "sentences.json"
    sentences.write_text(json.dumps([{"input": "Amen.", "any_of": ["amén"]}]))
    proc = cli(
        "--adapter-dir",
        str(kit.good),
        "--sentences",
        str(sentences),
        "--json",
        "--latency-limit",
        "0.000001",
    )
    assert proc.returncode == 4
    (only,) = json.loads(proc.stdout)["results"]
    assert only["output"] == "Amén." and "limit" in only["reason"]
