"""PEFT -> MLX conversion: names, transposes, scale, refusals, and logits that agree."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from adapter_deploy.common.errors import AdapterError
from adapter_deploy.engines.base import prompt_text
from adapter_deploy.engines.convert_mlx import convert_peft_to_mlx, mlx_skeleton
from adapter_deploy.engines.hf_engine import HFEngine
from adapter_deploy.engines.mlx_engine import MLXGemmaEngine
from adapter_deploy.kit.gemma import KIT_LAYERS, VOCAB_SIZE
from safetensors.torch import load_file, save_file


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_conversion_layout(kit, tmp_path):
    out = convert_peft_to_mlx(kit.good, tmp_path / "mlx", mlx_skeleton(kit.base))
    peft = load_file(str(kit.good / "adapter_model.safetensors"))
    mlx = load_file(str(out / "adapters.safetensors"))
    assert len(mlx) == len(peft) == KIT_LAYERS * 7 * 2  # layers x 7 linears x (A, B)
    a = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.equal(mlx["model.layers.0.self_attn.q_proj.lora_a"], a.T)
    assert torch.equal(mlx["model.layers.0.self_attn.q_proj.lora_b"], b.T)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora"
    assert config["num_layers"] == KIT_LAYERS
    params = config["lora_parameters"]
    assert (params["rank"], params["scale"], params["dropout"]) == (8, 2.0, 0.0)
    assert "self_attn.q_proj" in params["keys"] and len(params["keys"]) == 7


def test_rslora_scale(kit, tmp_path):
    src = _copy(kit.good, tmp_path / "src")
    _edit_config(src, use_rslora=True)
    out = convert_peft_to_mlx(src, tmp_path / "mlx", mlx_skeleton(kit.base))
    scale = json.loads((out / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    assert scale == pytest.approx(16 / math.sqrt(8))


def test_refuses_modules_to_save(kit, tmp_path):
    src = _copy(kit.good, tmp_path / "src")
    _edit_config(src, modules_to_save=["lm_head"])
    with pytest.raises(AdapterError, match="modules_to_save") as err:
        convert_peft_to_mlx(src, tmp_path / "mlx", mlx_skeleton(kit.base))
    assert err.value.fix


def test_refuses_full_lm_head_weight(kit, tmp_path):
    src = _copy(kit.good, tmp_path / "src")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] = torch.zeros(VOCAB_SIZE, 64)
    save_file(tensors, str(src / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="lm_head"):
        convert_peft_to_mlx(src, tmp_path / "mlx", mlx_skeleton(kit.base))


def test_peft_and_mlx_logits_agree(kit):
    hf = HFEngine(kit.good)
    mlx = MLXGemmaEngine(kit.base, adapter_path=kit.good)
    text = "By grace you have been saved through faith, not of works."
    ids = hf.tokenizer.encode(prompt_text(hf.tokenizer, text), add_special_tokens=False)
    with torch.no_grad():
        expected = hf.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = np.array(mlx.logits(ids))
    # fp32 on both sides; differences are kernel rounding only.
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)
