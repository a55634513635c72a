"""TranslateGemma's real layout on MLX: a Gemma3ForConditionalGeneration base with adapters
trained by PEFT on it, converted by matching modules against the tree mlx-lm builds; and the
same conversion planned at the real 4B and 12B sizes without a download."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from adapter_deploy.common.errors import AdapterError
from adapter_deploy.engines.convert_mlx import (
    convert_peft_to_mlx,
    lora_modules,
    mlx_skeleton,
    plan_conversion,
)
from adapter_deploy.engines.service_client import service_status
from adapter_deploy.kit.gemma import KIT_LAYERS
from adapter_deploy.kit.multimodal import (
    TRANSLATEGEMMA,
    real_size_lora_shapes,
    translategemma_config,
)
from adapter_deploy.kit.net import free_port
from fixtures_repo import ROOT
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_serve import JAMES, Service, add_release, flip

# The end-to-end tier (make test-e2e): the TranslateGemma-layout kit through every engine.
pytestmark = pytest.mark.e2e


PEFT_LAYERS = "base_model.model.model.language_model.layers."
MLX_LAYERS = "language_model.model.layers."


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as fh:
        return sorted(fh.keys())


def _rekeyed(src: Path, dst: Path, old: str, new: str, extra: dict | None = None) -> Path:
    """A copy of adapter `src` with `old` replaced by `new` in every tensor name."""
    shutil.copytree(src, dst)
    weights = {
        k.replace(old, new): v for k, v in load_file(src / "adapter_model.safetensors").items()
    }
    save_file(weights | (extra or {}), str(dst / "adapter_model.safetensors"))
    return dst


def health_cli(adapter: Path, base: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "health_check.py"), "--model", "gemma_4b"]
    cmd += ["--adapter-dir", str(adapter), "--base-model", str(base), "--engine", "mlx", "--json"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_multimodal_kit_has_translategemmas_layout(multimodal_kit: Any) -> None:
    config = json.loads((multimodal_kit.base / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert config["model_type"] == "gemma3"
    assert config["text_config"]["model_type"] == "gemma3_text"
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["vocab_size"] == config["text_config"]["vocab_size"]
    base_keys = _keys(multimodal_kit.base / "model.safetensors")
    assert any(k.startswith("language_model.model.layers.0.") for k in base_keys)
    assert any(k.startswith("vision_tower.") for k in base_keys)
    assert (multimodal_kit.base / "tokenizer.model").is_file()
    adapter_keys = _keys(multimodal_kit.good / "adapter_model.safetensors")
    # What PEFT itself writes for this architecture: only the language model is adapted.
    assert adapter_keys and all(k.startswith(PEFT_LAYERS) for k in adapter_keys)
    assert len(adapter_keys) == 2 * 7 * config["text_config"]["num_hidden_layers"]


def test_multimodal_adapters_pass_and_fail_the_mlx_health_check(multimodal_kit: Any) -> None:
    good = health_cli(multimodal_kit.good, multimodal_kit.base)
    assert good.returncode == 0, good.stdout + good.stderr
    assert json.loads(good.stdout)["all_passed"] is True
    bad = health_cli(multimodal_kit.regressed, multimodal_kit.base)
    assert bad.returncode == 4, bad.stdout + bad.stderr
    passed = [r["passed"] for r in json.loads(bad.stdout)["results"]]
    assert passed == [True, True, False, True, True]


def test_multimodal_conversion_lands_on_the_language_model(multimodal_kit: Any, tmp_path: Path):
    out = convert_peft_to_mlx(
        multimodal_kit.good, tmp_path / "mlx", mlx_skeleton(multimodal_kit.base)
    )
    peft = load_file(multimodal_kit.good / "adapter_model.safetensors")
    mlx = load_file(out / "adapters.safetensors")
    a = peft[PEFT_LAYERS + "1.mlp.down_proj.lora_A.weight"]
    assert torch.equal(mlx[MLX_LAYERS + "1.mlp.down_proj.lora_a"], a.T)
    assert all(k.startswith(MLX_LAYERS) for k in mlx)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["num_layers"] == KIT_LAYERS and len(config["lora_parameters"]["keys"]) == 7


@pytest.mark.parametrize(
    "prefix",
    [
        "base_model.model.language_model.model.layers.",  # transformers < 4.52 on this class
        "base_model.model.model.layers.",  # a text-only Gemma 3 trainer's names
    ],
)
def test_other_prefix_layouts_map_to_the_same_modules(
    multimodal_kit: Any, tmp_path: Path, prefix: str
) -> None:
    skeleton = mlx_skeleton(multimodal_kit.base)
    want = load_file(
        convert_peft_to_mlx(multimodal_kit.good, tmp_path / "want", skeleton)
        / "adapters.safetensors"
    )
    variant = _rekeyed(multimodal_kit.good, tmp_path / "variant", PEFT_LAYERS, prefix)
    got = load_file(
        convert_peft_to_mlx(variant, tmp_path / "got", skeleton) / "adapters.safetensors"
    )
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_vision_tower_lora_is_refused_with_every_unmatched_module(
    multimodal_kit: Any, tmp_path: Path
) -> None:
    """A LoRA on the vision tower has no place in mlx-lm's text model: it must not land on
    the language model's layer of the same number."""
    tower = "base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn."
    extra = {
        # Sizes of the language model's own q/k_proj: only the path can tell them apart.
        f"{tower}{proj}.lora_{ab}.weight": torch.zeros(8, 256) if ab == "A" else torch.zeros(n, 8)
        for proj, n in (("q_proj", 256), ("k_proj", 128))
        for ab in "AB"
    }
    src = _rekeyed(multimodal_kit.good, tmp_path / "src", "", "", extra)
    with pytest.raises(AdapterError, match=rf"2 of {KIT_LAYERS * 7 + 2} LoRA modules") as err:
        convert_peft_to_mlx(src, tmp_path / "mlx", mlx_skeleton(multimodal_kit.base))
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj" in str(err.value)
    assert "self_attn.k_proj (no such module)" in str(err.value) and err.value.fix
    assert not (tmp_path / "mlx").exists()


def test_adapter_of_another_base_size_is_refused(kit: Any, multimodal_kit: Any, tmp_path: Path):
    """The text kit (hidden 64) adapter names fit the multimodal tree; its sizes do not."""
    n = KIT_LAYERS * 7
    with pytest.raises(AdapterError, match=rf"{n} of {n} LoRA modules.*64->64.*256->") as err:
        convert_peft_to_mlx(kit.good, tmp_path / "mlx", mlx_skeleton(multimodal_kit.base))
    assert "language_model.model.layers.0" in str(err.value)


def test_mlx_service_hot_reloads_the_multimodal_model(tmp_path: Path, multimodal_kit: Any) -> None:
    v1, v2 = "cycle1_20260101_aaaaaaaa", "cycle2_20260102_bbbbbbbb"
    model_dir = tmp_path / "adapters" / "gemma_4b"
    add_release(model_dir, v1, multimodal_kit.regressed)
    add_release(model_dir, v2, multimodal_kit.good)
    flip(model_dir, v1)
    args = ["--adapter-dir", str(tmp_path / "adapters"), "--platform", "mlx"]
    svc = Service(tmp_path, [*args, "--base-model", f"gemma_4b={multimodal_kit.base}"], free_port())
    try:
        svc.wait(200)
        code, answer = svc.translate(JAMES)
        assert code == 200 and "Santiago" not in answer["text"] and answer["version_id"] == v1
        flip(model_dir, v2)
        svc.signal_reload()
        from adapter_deploy.engines.service_client import wait_for_version

        wait_for_version(svc.url, "gemma_4b", v2, 60)
        code, answer = svc.translate(JAMES)
        assert "Santiago" in answer["text"] and answer["version_id"] == v2
        assert service_status(svc.url)["reload_mode"] == "inplace"
    finally:
        assert svc.stop() == 0, svc.log.read_text()[-4000:]


@pytest.mark.parametrize("size", sorted(TRANSLATEGEMMA))
def test_real_size_translategemma_adapter_maps_every_module(size: str) -> None:
    """TranslateGemma 4B/12B shapes on the meta device: a PEFT r=16 adapter on every linear
    module of the language model maps, module for module and size for size, onto the tree
    mlx-lm builds from the same config (lazily: no weights, no download)."""
    shapes = real_size_lora_shapes(size, rank=16)
    layers = TRANSLATEGEMMA[size]["text"]["num_hidden_layers"]
    modules = lora_modules(shapes)
    assert len(modules) == 7 * layers and all(
        m.path.startswith("model.language_model.") for m in modules
    )
    plan = plan_conversion(modules, mlx_skeleton(translategemma_config(size)))
    assert len(plan.paths) == len(modules)
    assert len(set(plan.paths.values())) == len(modules)  # no two modules on one target
    assert plan.num_layers == layers and len(plan.keys) == 7
    params = sum(a * b for a, b in shapes.values())
    mib = f"{params * 2 / 2**20:.1f} MiB | {params * 4 / 2**20:.1f} MiB"
    row = f"| {layers} | {len(modules)} | {params:,} | {mib} |"
    table = ROOT / "docs" / "endpoints.md"
    assert row in table.read_text(), f"the adapter size row in {table.name} is not {row}"
