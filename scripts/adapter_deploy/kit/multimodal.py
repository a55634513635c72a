"""Test-kit variants in the multimodal TranslateGemma layout (Gemma3ForConditionalGeneration).

`build_multimodal(text_model, out)` wraps a kit text model as the language model of a tiny
multimodal checkpoint; `multimodal_adapter(adapter, base, out)` re-keys a kit adapter the way a
LoRA trained on that layout is saved. Both are built in well under a second from the kit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def build_multimodal(text_model: Path, out: Path) -> Path:
    """`text_model` (a Gemma 3 text dir) as the language model of a multimodal checkpoint
    (Gemma3ForConditionalGeneration, the TranslateGemma layout) with a tiny random vision
    tower: the same text weights under the multimodal names, plus vision tensors to skip."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        SiglipVisionConfig,
    )

    text = AutoModelForCausalLM.from_pretrained(text_model, dtype=torch.float32)
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    config = Gemma3Config(
        text_config=text.config.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(text_model).save_pretrained(out)
    return out


def multimodal_adapter(adapter: Path, base: Path, out: Path) -> Path:
    """`adapter` (trained on the text-only kit) re-keyed for `build_multimodal`'s layout, as a
    LoRA trained on the multimodal checkpoint is saved: its modules under language_model."""
    from safetensors.torch import load_file
    from safetensors.torch import save_file as save_tensors

    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(adapter / "adapter_model.safetensors")
    old, new = "base_model.model.model.layers.", "base_model.model.model.language_model.layers."
    save_tensors(
        {k.replace(old, new): v for k, v in weights.items()},
        str(out / "adapter_model.safetensors"),
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = (
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    )
    config["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
