"""The TranslateGemma layout: a real `Gemma3ForConditionalGeneration`, built in seconds.

`build_multimodal_base(out)` saves a tiny multimodal checkpoint as transformers writes one (the
language model under `language_model.model.*`, a SigLIP vision tower, the projector), with the
kit's SentencePiece tokenizer and a config shaped like the hub's (plus the top-level
`vocab_size` mlx-lm needs for a vocabulary that is not Gemma's 262,208 rows). Its widths are the
kit's "wide" ones (every row a multiple of 256) so GGUF's K-quants apply to it.

`build_multimodal_kit(root)` also trains PEFT adapters on that model itself, as a TranslateGemma
trainer does (LoRA on the language model's linear modules), so the adapter keys are exactly what
PEFT writes for this architecture: `base_model.model.model.language_model.layers.N...`.

Usage:
    python -m adapter_deploy.kit.multimodal make-set OUT     # base + good + regressed
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from adapter_deploy.kit.gemma import (
    ADAPTER_SETS,
    BOI_ID,
    EOI_ID,
    IMAGE_ID,
    KIT_VERSION,
    LANGUAGE_MODEL_LINEAR,
    _model_config,
    build_once,
    save_base,
    train_adapter,
    widen_embeddings,
)


@dataclass(frozen=True)
class MultimodalKitPaths:
    """Where `build_multimodal_kit` put the base and its adapters."""

    root: Path
    base: Path
    good: Path
    regressed: Path


def _config(widths: str):
    from transformers import Gemma3Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
        vision_use_head=False,  # as TranslateGemma's vision_config has it
    )
    return Gemma3Config(
        text_config=_model_config(widths).to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        boi_token_id=BOI_ID,
        eoi_token_id=EOI_ID,
        image_token_id=IMAGE_ID,
    )


def build_multimodal_base(out: Path, seed: int = 0, widths: str = "wide") -> Path:
    """Save the tiny multimodal base + tokenizer to `out`; the same bytes on every run."""
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(_config(widths))
    widen_embeddings(model.model.language_model.embed_tokens)
    save_base(model, out)
    return out


def build_multimodal_kit(root: Path) -> MultimodalKitPaths:
    """Build (or reuse, when complete) the multimodal base and its good/regressed adapters."""
    root = Path(root)
    paths = MultimodalKitPaths(root, root / "base", root / "good", root / "regressed")

    def build() -> None:
        build_multimodal_base(paths.base)
        for name in ("good", "regressed"):
            train_adapter(paths.base, ADAPTER_SETS[name], getattr(paths, name))

    build_once(root, KIT_VERSION, build)
    return paths


# TranslateGemma's SigLIP tower, the same in every size.
_SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27)
# TranslateGemma's published shapes (config.json of google/translategemma-{4b,12b}-it): what a
# real-size check builds, on the meta device, without downloading a byte.
TRANSLATEGEMMA = {
    "4b": {
        "text": dict(
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=34,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
        ),
        "vision": _SIGLIP,
    },
    "12b": {
        "text": dict(
            hidden_size=3840,
            intermediate_size=15360,
            num_hidden_layers=48,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
        ),
        "vision": _SIGLIP,
    },
}
GEMMA_VOCAB = 262_208


def translategemma_config(size: str) -> dict:
    """config.json of TranslateGemma `size` as the hub has it (shapes only, no weights)."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    shape = TRANSLATEGEMMA[size]
    text = Gemma3TextConfig(
        vocab_size=GEMMA_VOCAB,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        **shape["text"],
    ).to_dict()
    text.update(sliding_window_pattern=6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)
    vision = SiglipVisionConfig(
        num_attention_heads=16,
        image_size=896,
        patch_size=14,
        vision_use_head=False,
        **shape["vision"],
    ).to_dict()
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256)
    return config.to_dict() | {"vocab_size": GEMMA_VOCAB}


def real_size_lora_shapes(size: str, rank: int = 16) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the PEFT adapter a TranslateGemma trainer saves for `size`
    (LoRA rank `rank` on every linear module of the language model), built on the meta
    device: PEFT's own key layout at real size, in a second and no memory."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(Gemma3Config(**translategemma_config(size)))
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LANGUAGE_MODEL_LINEAR)
        peft_model = get_peft_model(model, lora)
    return {name: tuple(t.shape) for name, t in get_peft_model_state_dict(peft_model).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adapter_deploy.kit.multimodal",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    kit = sub.add_parser("make-set", help="build the multimodal base + good/regressed adapters")
    kit.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    build_multimodal_kit(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
