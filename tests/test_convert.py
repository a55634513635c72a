"""scripts/convert.py: merged/bitsandbytes releases of the kit model, cached by content."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from adapter_deploy.common.fsutil import sha256_file
from adapter_deploy.health import check_release
from adapter_deploy.store.conversion_cache import base_identity, conversion_key
from fixtures_repo import run_script, run_script_here
from safetensors.torch import load_file

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "training_metrics.json"}


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file of a release and its cache sidecar."""
    files = [*path.iterdir(), path.with_name(path.name + ".json")]
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}


@pytest.fixture(scope="module")
def merged(versioned) -> tuple[dict, dict]:
    """The first merged conversion (script output) and a snapshot of its files right after."""
    result = versioned.convert_json("--cycle", "1", "--format", "merged")
    return result, snapshot(Path(result["path"]))


def test_merged_release_passes_like_base_plus_adapter(versioned, merged, kit) -> None:
    result, _ = merged
    path = Path(result["path"])
    assert result["cache_hit"] is False and result["version_id"] == versioned.version_id
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not names & ADAPTER_FILES
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == "float16" and "quantization_config" not in config

    as_merged = check_release(path, None, "hf")
    as_adapter = check_release(kit.good, kit.base, "hf")
    assert as_merged.all_passed, as_merged.failures()
    assert as_adapter.all_passed
    assert as_merged.release["kind"] == "merged"
    assert [r.output for r in as_merged.results] == [r.output for r in as_adapter.results]


def test_merged_weights_differ_from_the_base(merged, kit) -> None:
    path = Path(merged[0]["path"])
    ours = load_file(str(path / "model.safetensors"))
    base = load_file(str(kit.base / "model.safetensors"))
    assert ours[Q_PROJ].dtype == torch.float16
    assert not torch.allclose(ours[Q_PROJ].float(), base[Q_PROJ], atol=1e-3)
    # LoRA on linear layers leaves the embeddings alone (up to the fp16 cast).
    assert torch.equal(ours[EMBED], base[EMBED].half())


def test_conversion_is_recorded_in_the_manifest(versioned, merged) -> None:
    result, _ = merged
    path = Path(result["path"])
    (entry,) = [c for c in versioned.conversions() if c["key"] == result["key"]]
    assert (entry["model"], entry["version_id"], entry["format"]) == (
        "gemma_4b",
        versioned.version_id,
        "merged",
    )
    assert entry["sha256"] == sha256_file(path / "model.safetensors")
    on_disk = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in path.iterdir()}
    assert entry["files"] == on_disk and entry["size"] == sum(f["size"] for f in on_disk.values())
    # The cache is ignored by git: converting leaves only the manifest (and .gitignore) changed.
    status = versioned.store.git("status", "--porcelain", "--untracked-files=all")
    assert ".conversions" not in status


def test_second_convert_is_a_cache_hit(versioned, merged) -> None:
    first, before = merged
    again = versioned.convert_json("--version", versioned.version_id, "--format", "merged")
    assert again["cache_hit"] is True
    assert (again["key"], again["path"], again["files"]) == (
        first["key"],
        first["path"],
        first["files"],
    )
    assert snapshot(Path(again["path"])) == before  # no file rewritten
    assert again["seconds"] < first["seconds"] / 5
    assert [c["key"] for c in versioned.conversions()].count(first["key"]) == 1


def test_bitsandbytes_release_loads_unquantized_on_cpu(versioned, merged, caplog) -> None:
    result = versioned.convert_json("--cycle", "1", "--format", "bitsandbytes")
    path = Path(result["path"])
    assert result["key"] != merged[0]["key"]
    spec = json.loads((path / "quantization.json").read_text())
    assert spec["load_in_4bit"] is True and spec["bnb_4bit_quant_type"] == "nf4"
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert not {p.name for p in path.iterdir()} & ADAPTER_FILES
    # Same weights as the merged release, shared on disk rather than merged again.
    merged_weights = Path(merged[0]["path"]) / "model.safetensors"
    assert (path / "model.safetensors").stat().st_ino == merged_weights.stat().st_ino
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the release would load 4-bit (covered by the GPU check)")
    with caplog.at_level(logging.INFO, logger="adapter_deploy.engines.hf_engine"):
        health = check_release(path, None, "hf")
    assert health.all_passed, health.failures()
    assert "loading it unquantized" in caplog.text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cycle", "1", "--format", "onnx"], "invalid choice"),
        (["--cycle", "9", "--format", "merged"], "no version in cycle 9"),
        (["--version", "../../etc", "--format", "merged"], "invalid version id"),
        (["--format", "merged"], "pass --cycle N or --version ID"),
        (["--cycle", "2", "--version", "cycle1_20260101_00000000", "--format", "merged"], "no ver"),
    ],
)
def test_bad_input_exits_2(versioned, args: list[str], message: str) -> None:
    # in this process: test_unknown_model_exits_2 is the real-process case of this refusal
    proc = run_script_here(
        "convert.py", "--model", "gemma_4b", *args, params=versioned.store.params
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_unknown_model_exits_2(versioned) -> None:
    proc = run_script(
        "convert.py",
        "--model",
        "nope",
        "--cycle",
        "1",
        "--format",
        "merged",
        params=versioned.store.params,
    )
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stderr


def test_key_changes_with_every_input(kit, tmp_path) -> None:
    base = shutil.copytree(kit.base, tmp_path / "base")
    memo = tmp_path / "cache"
    memo.mkdir()
    ident = base_identity("x", base, memo)
    assert ident == base_identity("x", kit.base) and ident.startswith("sha256:")
    assert base_identity("google/translategemma-4b-it", None) == "hub:google/translategemma-4b-it"
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    changed = base_identity("x", base, memo)
    assert changed != ident  # a new stat stamp invalidates the memo

    tools = {"transformers": "5.0", "peft": "0.17", "recipe": 1}
    adapter = {"adapter_model.safetensors": "a" * 64, "adapter_config.json": "b" * 64}
    keys = {
        conversion_key(adapter, ident, "merged", "float16", tools),
        conversion_key(
            {**adapter, "adapter_model.safetensors": "c" * 64}, ident, "merged", "float16", tools
        ),
        conversion_key(adapter, changed, "merged", "float16", tools),
        conversion_key(adapter, ident, "bitsandbytes", "float16", tools),
        conversion_key(adapter, ident, "merged", "bfloat16", tools),
        conversion_key(adapter, ident, "merged", "float16", {**tools, "peft": "0.18"}),
    }
    assert len(keys) == 6
    assert (
        conversion_key(adapter, ident, "merged", "float16", dict(reversed(tools.items()))) in keys
    )
