"""PEFT -> MLX adapter conversion (trainers write PEFT; mlx-lm cannot load it).

    PEFT  base_model.model.<module>.lora_A.weight  [r, in]
          base_model.model.<module>.lora_B.weight  [out, r]
    MLX   <module>.lora_a = A^T  [in, r]
          <module>.lora_b = B^T  [r, out]
    file  adapters.safetensors + adapter_config.json
          {"fine_tune_type": "lora", "num_layers": N,
           "lora_parameters": {"rank": r, "scale": alpha/r (alpha/sqrt(r) for rsLoRA),
                               "dropout": 0.0, "keys": [module paths inside a layer]}}

Anything MLX's LoRA layers cannot express (modules_to_save, full lm_head/embedding weights,
LoRA on embeddings, DoRA, per-module ranks, LoRA biases) is refused with an AdapterError that
names the problem and the fix; every problem is listed at once.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import AdapterError
from adapter_deploy.engines.base import (
    MLX_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    read_json,
    safetensors_names,
    sha256_file,
)

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers\.(?P<idx>\d+)\.(?P<rest>.+)$")


def _config_problems(config: dict[str, Any]) -> list[str]:
    """Settings of a PEFT LoRA config that an MLX LoRA adapter cannot express."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')} is not LORA")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} stores full module weights")
    if config.get("use_dora"):
        problems.append("use_dora is set (DoRA is not converted)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("rank_pattern/alpha_pattern give modules their own rank or alpha")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("bias/lora_bias trains biases")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        problems.append(f"r is {config.get('r')!r}, not a positive integer")
    return problems


def _tensor_problems(names: list[str]) -> list[str]:
    """Tensor names that are not plain lora_A/lora_B weights of a linear layer."""
    problems = []
    for name in names:
        match = _LORA_KEY.match(name.removeprefix(PEFT_PREFIX))
        if match is None:
            what = "full weight" if name.endswith(".weight") else "tensor"
            problems.append(f"{name}: {what} that is not a LoRA A/B matrix")
        elif "lm_head" in name or "embed" in name:
            problems.append(f"{name}: LoRA on lm_head/embeddings (MLX ties them to the base)")
    return problems


def _layer_keys(modules: set[str]) -> tuple[list[str], int]:
    """Module paths inside a decoder layer and the highest layer index they appear in."""
    keys, top = set(), -1
    for module in modules:
        match = _LAYER.search(module)
        if match is None:
            raise AdapterError(
                f"LoRA module {module} is not inside a decoder layer",
                fix="train LoRA only on the decoder layers' linear modules",
            )
        keys.add(match["rest"])
        top = max(top, int(match["idx"]))
    return sorted(keys), top


def peft_scale(config: dict[str, Any]) -> float:
    """PEFT's LoRA scaling: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def convert_peft_to_mlx(src: Path, dst: Path, num_layers: int | None = None) -> Path:
    """Convert the PEFT adapter in `src` to an MLX adapter in `dst`; return `dst`.

    `num_layers` is how many of the model's last layers carry LoRA (mlx-lm counts from the
    end). Default: the base model's num_hidden_layers when its config.json is reachable,
    else the highest adapted layer index + 1.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    config = read_json(src / PEFT_CONFIG)
    weights_path = src / PEFT_WEIGHTS
    names = safetensors_names(weights_path)
    with safe_open(str(weights_path), framework="pt") as fh:
        tensors = {name: fh.get_tensor(name) for name in names}
    problems = _config_problems(config) + _tensor_problems(sorted(tensors))
    if not tensors:
        problems.append("the weights file holds no tensors")
    if problems:
        raise AdapterError(
            f"cannot convert {src} to MLX: " + "; ".join(problems),
            fix="retrain as a plain LoRA on linear layers (no modules_to_save, no DoRA), "
            "or serve it with --engine hf",
        )
    converted = {}
    for name, tensor in tensors.items():
        match = _LORA_KEY.match(name.removeprefix(PEFT_PREFIX))
        suffix = "lora_a" if match["which"] == "A" else "lora_b"
        converted[f"{match['module']}.{suffix}"] = tensor.T.contiguous()
    keys, top = _layer_keys({name.rsplit(".", 1)[0] for name in converted})
    layers = num_layers or _base_num_layers(config) or top + 1
    mlx_config = {
        "fine_tune_type": "lora",
        "num_layers": layers,
        "lora_parameters": {
            "rank": config["r"],
            "scale": peft_scale(config),
            "dropout": 0.0,
            "keys": keys,
        },
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        # Provenance: which PEFT weights this was made from (also the conversion cache key).
        "converted_from_sha256": sha256_file(weights_path),
    }
    dst.mkdir(parents=True, exist_ok=True)
    save_file(converted, str(dst / MLX_WEIGHTS))
    (dst / PEFT_CONFIG).write_text(json.dumps(mlx_config, indent=2) + "\n")
    log.debug("converted %s -> %s (%d tensors)", src, dst, len(converted))
    return dst


def _base_num_layers(config: dict[str, Any]) -> int | None:
    """num_hidden_layers of the base model, when its config.json is a local file."""
    base = config.get("base_model_name_or_path")
    path = Path(base) / "config.json" if base else None
    if path is None or not path.is_file():
        return None
    try:
        base_config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    text_config = base_config.get("text_config", base_config)
    layers = text_config.get("num_hidden_layers")
    return layers if isinstance(layers, int) else None
