"""PEFT -> MLX adapter conversion (trainers write PEFT; mlx-lm cannot load it).

    PEFT  base_model.model.<module>.lora_A.weight  [r, in]
          base_model.model.<module>.lora_B.weight  [out, r]
    MLX   <path>.lora_a = A^T  [in, r]      <path>: the same linear in the tree mlx-lm
          <path>.lora_b = B^T  [r, out]     builds for the base (see plan_conversion)
    file  adapters.safetensors + adapter_config.json
          {"fine_tune_type": "lora", "num_layers": N,
           "lora_parameters": {"rank": r, "scale": alpha/r (alpha/sqrt(r) for rsLoRA),
                               "dropout": 0.0, "keys": [module paths inside a layer]}}

Anything MLX's LoRA layers cannot express (modules_to_save, full lm_head/embedding weights,
LoRA on embeddings, DoRA, per-module ranks, LoRA biases) is refused with an AdapterError that
names the problem and the fix; every problem is listed at once, and so is every PEFT module
that has no place in the MLX model.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
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


def peft_scale(config: dict[str, Any]) -> float:
    """PEFT's LoRA scaling: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def convert_peft_to_mlx(src: Path, dst: Path, model: Any) -> Path:
    """Convert the PEFT adapter in `src` to an MLX adapter for `model`; return `dst`.

    `model` is the mlx-lm model the adapter will be applied to (the loaded base, or
    `mlx_skeleton(base_dir)`): every PEFT module is matched to a linear module of its tree.
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
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    plan = plan_conversion(lora_modules(shapes), model)
    converted = {}
    for name, tensor in tensors.items():
        match = _LORA_KEY.match(name.removeprefix(PEFT_PREFIX))
        suffix = "lora_a" if match["which"] == "A" else "lora_b"
        converted[f"{plan.paths[match['module']]}.{suffix}"] = tensor.T.contiguous()
    mlx_config = {
        "fine_tune_type": "lora",
        "num_layers": plan.num_layers,
        "lora_parameters": {
            "rank": config["r"],
            "scale": peft_scale(config),
            "dropout": 0.0,
            "keys": plan.keys,
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


@dataclass(frozen=True)
class LoraModule:
    """One PEFT LoRA module: its path (PEFT's prefix removed) and the linear's in/out sizes."""

    path: str
    in_features: int
    out_features: int


def lora_modules(shapes: dict[str, tuple[int, ...]]) -> list[LoraModule]:
    """The LoRA modules of a PEFT weights file, from its tensor names and shapes.

    lora_A is [r, in] and lora_B is [out, r]; a module missing either half is kept with
    size 0 on that side, so the plan reports it instead of mapping half an adapter.
    """
    sizes: dict[str, dict[str, int]] = {}
    for name, shape in shapes.items():
        match = _LORA_KEY.match(name.removeprefix(PEFT_PREFIX))
        if match is None or len(shape) != 2:
            continue
        side = sizes.setdefault(match["module"], {"in": 0, "out": 0})
        if match["which"] == "A":
            side["in"] = shape[1]
        else:
            side["out"] = shape[0]
    return [LoraModule(m, s["in"], s["out"]) for m, s in sorted(sizes.items())]


@dataclass(frozen=True)
class ConversionPlan:
    """Where each PEFT module lands in the MLX model, and the MLX adapter settings."""

    paths: dict[str, str]  # PEFT module path -> MLX module path
    keys: list[str]  # module paths inside a layer (mlx-lm's lora_parameters.keys)
    num_layers: int  # how many of the last layers carry LoRA (mlx-lm counts from the end)


@dataclass(frozen=True)
class _Linear:
    path: str
    segments: tuple[str, ...]
    in_features: int
    out_features: int
    layer: int | None  # index in model.layers, None outside the decoder layers
    key: str  # path inside its layer


def plan_conversion(modules: list[LoraModule], model: Any) -> ConversionPlan:
    """Match every PEFT module to a linear module of `model`'s tree, or refuse with the list.

    The match is the longest common tail of module paths (`layers.0.mlp.down_proj`), taken
    from the tree mlx-lm builds for this base, so text-only Gemma 3 (`model.layers.N`),
    TranslateGemma as transformers 5 names it (`model.language_model.layers.N`) and as older
    transformers did (`language_model.model.layers.N`) all land on the same modules. The
    path before that tail must name nothing the MLX model lacks (a vision tower's layers
    never land on the language model's) and the sizes must agree.
    """
    linears = mlx_linears(model)
    paths: dict[str, str] = {}
    unmatched = []
    for module in modules:
        target = _match(module, linears)
        if isinstance(target, str):
            unmatched.append(f"{module.path} ({target})")
        else:
            paths[module.path] = target.path
    if unmatched:
        raise AdapterError(
            f"{len(unmatched)} of {len(modules)} LoRA modules have no place in the MLX model: "
            + "; ".join(unmatched[:8])
            + (f"; and {len(unmatched) - 8} more" if len(unmatched) > 8 else ""),
            fix="deploy the adapter with the base model it was trained on",
        )
    if not paths:
        raise AdapterError("the adapter holds no LoRA modules", fix="retrain the adapter")
    by_path = {linear.path: linear for linear in linears}
    targets = [by_path[p] for p in paths.values()]
    outside = [t.path for t in targets if t.layer is None]
    if outside:
        raise AdapterError(
            f"LoRA on modules outside the decoder layers: {', '.join(outside[:5])}",
            fix="train LoRA only on the decoder layers' linear modules",
        )
    first = min(t.layer for t in targets if t.layer is not None)
    return ConversionPlan(
        paths=paths,
        keys=sorted({t.key for t in targets}),
        num_layers=len(model.layers) - first,
    )


def _match(module: LoraModule, linears: list[_Linear]) -> _Linear | str:
    """The one linear `module` lands on, or why there is none."""
    segments = tuple(module.path.split("."))
    best, best_tail = [], 0
    for linear in linears:
        tail = _common_tail(segments, linear.segments)
        if tail == 0 or not _prefix_fits(segments[:-tail], linear.segments[:-tail]):
            continue
        if tail > best_tail:
            best, best_tail = [linear], tail
        elif tail == best_tail:
            best.append(linear)
    if not best:
        return "no such module"
    if len(best) > 1:
        return "matches " + ", ".join(b.path for b in best[:3])
    found = best[0]
    if (module.in_features, module.out_features) != (found.in_features, found.out_features):
        return (
            f"LoRA is {module.in_features}->{module.out_features}, {found.path} is "
            f"{found.in_features}->{found.out_features}"
        )
    return found


def _common_tail(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _prefix_fits(peft_prefix: tuple[str, ...], mlx_prefix: tuple[str, ...]) -> bool:
    """True when the PEFT path's leading names are wrappers the MLX path also has.

    "model" is every transformers wrapper's name and carries no meaning of its own.
    """
    return set(peft_prefix) - {"model"} <= set(mlx_prefix)


def mlx_linears(model: Any) -> list[_Linear]:
    """Every linear module of an mlx-lm model, with its layer and path inside the layer.

    A linear already wrapped by a LoRA layer (a reload on a live model) counts at the
    wrapper's path, which is where the next adapter's weights go.
    """
    import mlx.nn as nn

    layer_paths = {}
    modules = dict(model.named_modules())
    layer_ids = {id(layer): i for i, layer in enumerate(model.layers)}
    for path, module in modules.items():
        if id(module) in layer_ids:
            layer_paths[path] = layer_ids[id(module)]
    found = []
    for path, module in modules.items():
        if not isinstance(module, nn.Linear | nn.QuantizedLinear):
            continue
        parent = path.rpartition(".")[0]
        if path.endswith(".linear") and hasattr(modules.get(parent), "lora_a"):
            path = parent
        found.append(_linear(path, module, layer_paths))
    return found


def _linear(path: str, module: Any, layer_paths: dict[str, int]) -> _Linear:
    import mlx.nn as nn

    out_features, width = module.weight.shape
    in_features = width * 32 // module.bits if isinstance(module, nn.QuantizedLinear) else width
    layer, key = None, path
    for layer_path, index in layer_paths.items():
        if path.startswith(layer_path + "."):
            layer, key = index, path[len(layer_path) + 1 :]
            break
    return _Linear(path, tuple(path.split(".")), in_features, out_features, layer, key)


def mlx_skeleton(base_model: Path | dict[str, Any]) -> Any:
    """The mlx-lm model for a base model dir's config.json (or that config), without weights.

    mlx arrays are lazy, so this costs nothing at real size: it is the module tree mlx-lm
    would build, to plan a conversion where the weights are not at hand.
    """
    from mlx_lm.utils import _get_classes, load_config

    config = base_model if isinstance(base_model, dict) else load_config(Path(base_model))
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))
