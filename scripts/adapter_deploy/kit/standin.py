"""A stand-in base model big enough that its weights dominate a process, and two adapters.

The benchmarks that measure memory and reload pauses need a base whose weights, not torch's
own libraries, set a process's size, and an adapter of a real user's size (a gemma-3-4b rank-16
LoRA in bf16 is 60-130 MB). The kit's base (kit.gemma) is a few MB; this one is the same real
`Gemma3ForCausalLM` with the kit's tokenizer, vocabulary and Gemma 3 layer pattern, only wide:
hidden 1024, intermediate 4096, head_dim 256, 6 layers = about 380 MB of fp32 weights. It is
saved exactly like the kit's base, so transformers and mlx-lm both load it.

The two adapters are what PEFT itself saves (`all-linear`, CAUSAL_LM, safetensors) with the rank
chosen so `adapter_model.safetensors` is about `adapter_mb` MB. They are not trained (that would
take too long on a CPU): lora_B holds small random values, a different seed for each, so each
adapter changes the model's output (MLX's loader checks that) and the two differ. Their
translations are gibberish; the benchmarks time work, not answers.

    paths = build_standin(Path("/tmp/standin"), adapter_mb=60)
    paths.base, paths.adapters[0], paths.adapters[1]

Built once per root (kit.gemma.build_once); the default root is
`~/.cache/adapter-deploy/bench/standin-<adapter_mb>` so a second bench run reuses it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from adapter_deploy.kit.gemma import (
    KIT_LAYERS,
    _model_config,
    build_once,
    save_adapter,
    save_base,
    widen_embeddings,
)

log = logging.getLogger(__name__)

STANDIN_VERSION = 1
HIDDEN_SIZE = 1024
HEADS = 4  # the kit's 4 query heads over 2 kv heads: head_dim = hidden / 4
LORA_B_STD = 0.02  # big enough to move the logits, small enough to keep them finite
SPEC = "standin.json"  # the shape a root was built with: another shape rebuilds it


@dataclass(frozen=True)
class StandinPaths:
    """Where `build_standin` put the base and its two adapters."""

    root: Path
    base: Path
    adapters: tuple[Path, Path]


def default_root(adapter_mb: float) -> Path:
    home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(home) / "adapter-deploy" / "bench" / f"standin-{adapter_mb:g}"


def build_standin(
    root: Path | None = None,
    adapter_mb: float = 60,
    layers: int = KIT_LAYERS,
    seed: int = 0,
    hidden_size: int = HIDDEN_SIZE,
) -> StandinPaths:
    """Build (or reuse, when already complete with the same shape) the stand-in under `root`.

    `layers` below 6 load in transformers but not in mlx-lm, whose Gemma 3 reads the full
    attention layer of each block of six; `hidden_size` shrinks the base for tests."""
    root = Path(root) if root is not None else default_root(adapter_mb)
    paths = StandinPaths(root, root / "base", (root / "adapter1", root / "adapter2"))
    spec = {"adapter_mb": adapter_mb, "layers": layers, "seed": seed, "hidden_size": hidden_size}
    spec_path = root / SPEC
    if spec_path.exists() and json.loads(spec_path.read_text()) != spec:
        (root / "kit.json").unlink(missing_ok=True)  # build_once then starts afresh

    def build() -> None:
        _build_base(paths.base, layers, seed, hidden_size)
        _build_adapters(paths.base, paths.adapters, adapter_mb, seed)
        spec_path.write_text(json.dumps(spec) + "\n")

    build_once(root, STANDIN_VERSION, build)
    return paths


def _config(layers: int, hidden_size: int):
    size = {"hidden_size": hidden_size, "intermediate_size": 4 * hidden_size}
    return _model_config({**size, "head_dim": hidden_size // HEADS}, layers)


def _build_base(out: Path, layers: int, seed: int, hidden_size: int) -> None:
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(_config(layers, hidden_size))
    widen_embeddings(model.model.embed_tokens)
    save_base(model, out)
    log.info("built stand-in base in %s", out)


def lora_bytes_per_rank(model: torch.nn.Module) -> int:
    """Bytes one unit of LoRA rank adds to an fp32 all-linear adapter of `model`: A is
    r x in and B out x r for every linear layer but the output head (PEFT's all-linear)."""
    return sum(
        4 * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    )


def _build_adapters(base: Path, outs: tuple[Path, Path], adapter_mb: float, seed: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # Loaded from disk, so adapter_config.json names the base as a trained adapter's would.
    model = AutoModelForCausalLM.from_pretrained(base.resolve(), dtype=torch.float32)
    rank = max(1, round(adapter_mb * 1e6 / lora_bytes_per_rank(model)))
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules="all-linear",
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    for i, out in enumerate(outs):
        generator = torch.Generator().manual_seed(seed * 1000 + i + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * LORA_B_STD)
                elif ".lora_A." in name:
                    bound = param.shape[1] ** -0.5  # PEFT's kaiming-uniform scale, reseeded
                    param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
        if out.exists():
            shutil.rmtree(out)
        save_adapter(model, out, {"steps": 0, "note": "untrained stand-in: random LoRA"})
        log.info("built stand-in adapter %s (rank %d)", out, rank)
