"""GGUF releases: F16 written with the gguf package, Q8_0 / Q4_K_M by llama.cpp's quantizer,
served and health-checked by the llama.cpp engine, deployed to a cuda endpoint over sshd."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from adapter_deploy.common.errors import AdapterError
from adapter_deploy.convert import gguf as convert_gguf
from adapter_deploy.convert.gguf import convert_to_gguf, gguf_metadata
from adapter_deploy.convert.merge import merge_adapter
from adapter_deploy.engines.hf_engine import HFEngine
from adapter_deploy.engines.llamacpp_engine import LlamaCppEngine
from adapter_deploy.health import check_release, run_health_check
from adapter_deploy.kit.multimodal import build_multimodal, multimodal_adapter
from adapter_deploy.store import conversions
from fixtures_convert import Versioned
from fixtures_fleet import Fleet, restart_deploy_and_rollback

pytestmark = pytest.mark.skipif(
    not convert_gguf.tools_available("Q4_K_M"),
    reason="llama.cpp tools missing: `make gguf-tools` installs llama-cpp-python and gguf",
)


@pytest.fixture(scope="module")
def f16(versioned: Versioned) -> dict:
    return versioned.convert_json("--cycle", "1", "--format", "gguf", "--gguf-type", "F16")


def test_f16_release_is_one_gguf_file_and_nothing_of_the_adapter(f16: dict) -> None:
    release = Path(f16["path"])
    assert sorted(p.name for p in release.iterdir()) == ["conversion.json", "model.gguf"]
    meta = gguf_metadata(release / "model.gguf")
    assert meta["architecture"] == "gemma3"
    assert meta["tensor_types"] == ["F16", "F32"]  # matrices F16, norms F32
    assert f16["gguf_type"] == "F16" and not f16["cache_hit"]


def test_llamacpp_answers_like_transformers_on_the_merged_weights(f16: dict, kit) -> None:
    """Same greedy text for every health-check sentence: the tensor map, the norm shift, the
    rope bases and the tokenizer all carried over."""
    gguf_engine = LlamaCppEngine(f16["path"])
    hf_engine = HFEngine(merge_adapter(kit.good, kit.base, Path(f16["path"]).parent / "hf-ref"))
    gguf_result, hf_result = run_health_check(gguf_engine), run_health_check(hf_engine)
    assert gguf_result.all_passed, gguf_result.failures()
    assert [r.output for r in gguf_result.results] == [r.output for r in hf_result.results]
    assert gguf_engine.loaded.kind == "gguf"


def test_q8_0_release_passes_the_health_check(versioned: Versioned) -> None:
    result = versioned.convert_json("--cycle", "1", "--format", "gguf", "--gguf-type", "Q8_0")
    meta = gguf_metadata(Path(result["path"]) / "model.gguf")
    assert "Q8_0" in meta["tensor_types"]
    health = check_release(result["path"], None)
    assert health.all_passed, health.failures() or health.error


def test_regressed_gguf_fails_the_same_check(kit, tmp_path: Path) -> None:
    merged = merge_adapter(kit.regressed, kit.base, tmp_path / "merged")
    release = convert_to_gguf(merged, tmp_path / "gguf", "F16").parent
    health = check_release(release, None)
    assert not health.all_passed
    assert [r.passed for r in health.results] == [True, True, False, True, True]


def test_q4_k_m_on_the_wide_kit_uses_k_quants(wide_kit, tmp_path: Path) -> None:
    base, good = wide_kit
    merged = merge_adapter(good, base, tmp_path / "merged")
    path = convert_to_gguf(merged, tmp_path / "gguf", "Q4_K_M")
    meta = gguf_metadata(path)
    assert {"Q4_K", "Q6_K"} <= set(meta["tensor_types"])  # Q4_K_M: Q4_K with some Q6_K
    f16_size = convert_to_gguf(merged, tmp_path / "f16", "F16").stat().st_size
    assert path.stat().st_size < 0.6 * f16_size
    answer = LlamaCppEngine(path.parent).translate("Good morning, welcome to the service.")
    assert answer.text  # 4-bit on a tiny model may drift; it must still load and answer


def test_same_inputs_again_are_a_cache_hit_and_types_do_not_share(versioned, f16) -> None:
    again = versioned.convert_json("--cycle", "1", "--format", "gguf", "--gguf-type", "F16")
    assert again["cache_hit"] and again["key"] == f16["key"]
    q8 = versioned.convert_json("--cycle", "1", "--format", "gguf", "--gguf-type", "Q8_0")
    assert q8["key"] != f16["key"]
    entries = [c for c in versioned.conversions() if c["format"] == "gguf"]
    assert {c["gguf_type"] for c in entries} >= {"F16", "Q8_0"}
    for c in entries:
        assert c["sha256"] == c["files"]["model.gguf"]["sha256"]


def test_a_non_gemma_model_is_refused_naming_the_supported_one(kit, tmp_path: Path) -> None:
    merged = merge_adapter(kit.good, kit.base, tmp_path / "merged")
    config = json.loads((merged / "config.json").read_text())
    (merged / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(AdapterError) as refused:
        convert_to_gguf(merged, tmp_path / "gguf", "F16")
    assert "'llama'" in refused.value.one_line() and "Gemma 3" in refused.value.one_line()
    assert not (tmp_path / "gguf" / "model.gguf").exists()


def test_unknown_gguf_type_exits_2(versioned: Versioned) -> None:
    proc = versioned.convert("--cycle", "1", "--format", "gguf", "--gguf-type", "Q2_K")
    assert proc.returncode == 2
    assert "Q2_K" in proc.stderr


def test_missing_tools_simulated_error_says_how_to_install(versioned, monkeypatch) -> None:
    """Simulated: the tools are installed in this venv, so their absence is patched in."""
    monkeypatch.setattr(convert_gguf, "tools_available", lambda gguf_type: False)
    from adapter_deploy.config import load_params

    params = load_params(versioned.store.params)
    before = versioned.store.manifest()
    with pytest.raises(AdapterError) as refused:
        conversions.convert_release(params, "gemma_4b", versioned.version_id, "gguf")
    assert "pip install llama-cpp-python gguf" in refused.value.one_line()
    assert refused.value.exit_code == 2 and versioned.store.manifest() == before


def test_cuda_gguf_endpoint_with_restart_reload_and_rollback(fleet: Fleet, tmp_path) -> None:
    def check_active(active: Path) -> None:
        assert sorted(p.name for p in active.iterdir()) == ["conversion.json", "model.gguf"]
        assert "Q8_0" in gguf_metadata(active / "model.gguf")["tensor_types"]

    restart_deploy_and_rollback(fleet, tmp_path, check_active, format="gguf", gguf_type="Q8_0")


def test_a_gguf_release_is_checked_and_served_without_torch(f16: dict) -> None:
    """On an NVIDIA box torch's CUDA and a CUDA build of llama.cpp crash in one process (seen
    on an H200: a segfault loading either after the other), so the llama.cpp path must never
    import torch: the endpoint's pre-check and the service module alike."""
    code = (
        "import sys; from adapter_deploy.health import check_release\n"
        "import adapter_deploy.service.serve\n"
        f"result = check_release({f16['path']!r}, None)\n"
        "print(result.all_passed, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["True", "False", "False"], proc.stdout + proc.stderr


def test_multimodal_checkpoint_converts_to_a_text_only_gguf(kit, tmp_path: Path) -> None:
    """The TranslateGemma layout (Gemma3ForConditionalGeneration: language model under
    `language_model`, plus a vision tower): an adapter trained on it merges, the GGUF holds
    the language model only, and it passes the same health check."""
    base = build_multimodal(kit.base, tmp_path / "base")
    adapter = multimodal_adapter(kit.good, base, tmp_path / "adapter")
    merged = merge_adapter(adapter, base, tmp_path / "merged")
    assert json.loads((merged / "config.json").read_text())["model_type"] == "gemma3"
    path = convert_to_gguf(merged, tmp_path / "gguf", "Q8_0")
    text_only = convert_to_gguf(
        merge_adapter(kit.good, kit.base, tmp_path / "text"), tmp_path / "text-gguf", "Q8_0"
    )
    assert gguf_metadata(path)["tensors"] == gguf_metadata(text_only)["tensors"]  # no vision
    health = check_release(path.parent, None)
    assert health.all_passed, health.failures() or health.error
