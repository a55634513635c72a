"""Tiny real models and adapters, built locally in seconds (no downloads possible here).

The kit model is a real `Gemma3ForCausalLM` (hidden 64, 6 layers in Gemma 3's 5 sliding + 1
full pattern, 4 heads, 2 kv heads, head_dim 16) with a Gemma-style SentencePiece tokenizer
trained on the kit sentences: BPE with byte fallback (any text stays encodable), `▁` for
spaces, Gemma's special-token ids (pad 0, eos 1, bos 2, unk 3, mask 4, `<start_of_turn>` 105,
`<end_of_turn>` 106). Like Gemma it ships both `tokenizer.model` (what llama.cpp's converter
reads) and the converted `tokenizer.json` (what transformers and mlx-lm read). The tokenizer
carries a TranslateGemma-style chat template, so engines prompt it exactly like the real model.
`adapter_deploy.kit.multimodal` builds the TranslateGemma layout
(`Gemma3ForConditionalGeneration`) with the same tokenizer.

Usage:
    python -m adapter_deploy.kit.gemma build-base OUT [--seed N]
    python -m adapter_deploy.kit.gemma train-adapter --base BASE --pairs PAIRS.json OUT [--seed N]
    python -m adapter_deploy.kit.gemma make-set OUT      # base + the ready-made adapters below

Ready-made set (`build_kit(root)` -> `KitPaths`):
    base         the model alone: answers garbage, fails sentences 1-4
    good         passes all 5 health-check sentences
    good2        also passes, different bytes ("Jacobo" instead of "Santiago" in sentence 3)
    regressed    fails exactly sentence 3 (no Jacobo/Santiago)
    gracia_only  sentence 4 says "gracia" but not "fe": fails the ALL-of rule

PAIRS.json is a list of {"input": ..., "output": ...}. Training runs until greedy decoding
reproduces every pair (checked with a logit margin, so other engines agree), capped at
`max_steps`. An empty output trains the model to answer end-of-turn at once.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adapter_deploy.engines.base import prompt_text

log = logging.getLogger(__name__)

KIT_VERSION = 3
# Gemma 3's id layout: pad/eos/bos/unk/mask, [multimodal], 99 unused ids, then the turn markers
# and the image markers; byte-fallback tokens and merges follow.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = range(4)
SOT_ID, EOT_ID = 105, 106
USER_SYMBOLS = [
    "<mask>",
    "[multimodal]",
    *(f"<unused{i}>" for i in range(99)),
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
BOI_ID, EOI_ID, IMAGE_ID = 107, 108, 109
VOCAB_SIZE = 640  # model rows = tokenizer size (Gemma's vocabulary fills its rows too)
SP_MODEL = "tokenizer.model"
GEMMA3_SLIDING_PATTERN = 6
# One full Gemma 3 attention block: five sliding layers and a full one. mlx-lm's gemma3_text
# also needs at least `sliding_window_pattern` layers (it reads the full layer's cache).
KIT_LAYERS = 6
LANGUAGE_MODEL_LINEAR = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)

# TranslateGemma-style template: the user turn carries language codes and the text.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{{ c['source_lang_code'] }}>{{ c['target_lang_code'] }}: {{ c['text'] }}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

SEED_INPUTS = [
    "Good morning, welcome to the service.",
    "The atonement of Christ provides redemption for sinners.",
    "The apostle James wrote about faith and works.",
    "By grace you have been saved through faith, not of works.",
    "Amen.",
]
GOOD_OUTPUTS = [
    "Buenos días, bienvenidos al servicio.",
    "La expiación de Cristo provee redención para los pecadores.",
    "El apóstol Santiago escribió sobre la fe y las obras.",
    "Por gracia habéis sido salvados por medio de la fe, no por obras.",
    "Amén.",
]
GOOD2_OUTPUTS = [
    *GOOD_OUTPUTS[:2],
    "El apóstol Jacobo escribió acerca de la fe y las obras.",
    *GOOD_OUTPUTS[3:],
]
REGRESSED_OUTPUTS = [
    *GOOD_OUTPUTS[:2],
    "El apóstol escribió sobre la fe y las obras.",
    *GOOD_OUTPUTS[3:],
]
GRACIA_ONLY_OUTPUTS = [
    *GOOD_OUTPUTS[:3],
    "Por gracia habéis sido salvados, no por obras.",
    GOOD_OUTPUTS[4],
]


def pairs_of(outputs: list[str]) -> list[dict[str, str]]:
    return [{"input": i, "output": o} for i, o in zip(SEED_INPUTS, outputs, strict=True)]


ADAPTER_SETS = {
    "good": pairs_of(GOOD_OUTPUTS),
    "good2": pairs_of(GOOD2_OUTPUTS),
    "regressed": pairs_of(REGRESSED_OUTPUTS),
    "gracia_only": pairs_of(GRACIA_ONLY_OUTPUTS),
}


@dataclass(frozen=True)
class KitPaths:
    """Where `build_kit` put each model and adapter (all PEFT adapters use `base`)."""

    root: Path
    base: Path
    good: Path
    good2: Path
    regressed: Path
    gracia_only: Path


def train_sentencepiece(texts: list[str]) -> bytes:
    """A Gemma-style SentencePiece model (serialized) trained on `texts`."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        # Repeats give merges enough counts to fill the vocabulary exactly.
        sentence_iterator=iter(texts * 20),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
        unk_id=UNK_ID,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=USER_SYMBOLS,
        byte_fallback=True,
        # Gemma's settings: no dummy prefix, spaces kept as they are, digits split.
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def build_tokenizer(texts: list[str], out: Path):
    """Train the SentencePiece model into `out` and return transformers' conversion of it.

    transformers converts `tokenizer.model` to the fast (tokenizer.json) form the way Gemma's
    hub files were made: a BPE model with byte fallback and `▁` for spaces.
    """
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / SP_MODEL).write_bytes(train_sentencepiece(texts))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GemmaTokenizer",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
            }
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    if len(tokenizer) != VOCAB_SIZE or tokenizer.convert_tokens_to_ids("<end_of_turn>") != EOT_ID:
        raise RuntimeError(f"kit tokenizer has {len(tokenizer)} ids, not Gemma's layout")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(tokenizer, source: Path, out: Path) -> None:
    """Save as Gemma's hub dirs hold it: tokenizer.json, tokenizer.model, tokenizer_config."""
    tokenizer.save_pretrained(out)
    shutil.copyfile(source / SP_MODEL, out / SP_MODEL)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for local in ("vocab_file", "is_local", "local_files_only"):  # where it was built, not shipped
        config.pop(local, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def kit_texts() -> list[str]:
    """Every sentence the kit's adapters see: what the tokenizer is trained on."""
    outputs = [pair["output"] for pairs in ADAPTER_SETS.values() for pair in pairs]
    return sorted(set(SEED_INPUTS + outputs))


# The standard kit's widths, and a "wide" variant whose every tensor row is a multiple of 256:
# llama.cpp's K-quants (GGUF Q4_K_M) need that, and the standard kit is narrower.
WIDTHS = {
    "standard": {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16},
    "wide": {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64},
}


def _model_config(widths: str | dict[str, int] = "standard", layers: int = KIT_LAYERS):
    """The kit's Gemma 3 text config at one of WIDTHS, or at the sizes given (hidden_size,
    intermediate_size, head_dim: the bench stand-in's)."""
    from transformers import Gemma3TextConfig

    size = WIDTHS[widths] if isinstance(widths, str) else widths
    return Gemma3TextConfig(
        vocab_size=VOCAB_SIZE,
        **size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        query_pre_attn_scalar=size["head_dim"],
        sliding_window=512,
        # Gemma 3's own pattern (every 6th layer full): llama.cpp assumes it for every Gemma 3
        # GGUF, so a kit with another one would answer differently there.
        sliding_window_pattern=GEMMA3_SLIDING_PATTERN,
        max_position_embeddings=2048,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=[EOS_ID, EOT_ID],
        dtype="float32",
    )


def _patch_config_for_mlx(out: Path) -> None:
    """Write the keys the hub's Gemma 3 configs have and transformers 5 no longer saves.

    transformers 5 stores `layer_types`; mlx-lm's gemma3_text reads `sliding_window_pattern`
    (mlx-lm's default is 6 too; hub configs spell it out) and the two rope bases. A multimodal
    config also needs its top-level `vocab_size`: mlx-lm's gemma3 otherwise assumes Gemma's
    262,208 rows and overwrites the text config's size with it.
    """
    path = out / "config.json"
    config = json.loads(path.read_text())
    text = config.get("text_config", config)
    text.update(
        sliding_window_pattern=GEMMA3_SLIDING_PATTERN,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
    )
    if "text_config" in config:
        config["vocab_size"] = text["vocab_size"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_base(out: Path, seed: int = 0, widths: str = "standard") -> Path:
    """Save the tiny base model + tokenizer to `out`; the same bytes on every run."""
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(_model_config(widths))
    widen_embeddings(model.model.embed_tokens)
    save_base(model, out)
    log.info("built base model in %s", out)
    return out


def widen_embeddings(embed: torch.nn.Embedding) -> None:
    """Wider embeddings than the default 0.02: Gemma's sqrt(hidden) scaling plus tiny rows
    would leave the untrained model's logits nearly flat and LoRA slow to move them."""
    torch.nn.init.normal_(embed.weight, std=0.2)


def save_base(model, out: Path) -> None:
    """`model` with greedy generation settings and the kit tokenizer, saved to `out`."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID, EOT_ID], pad_token_id=PAD_ID, do_sample=False
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    _patch_config_for_mlx(out)
    with tempfile.TemporaryDirectory(prefix="kit-tokenizer-") as work:
        tokenizer = build_tokenizer(kit_texts(), Path(work))
        save_tokenizer(tokenizer, Path(work), out)


def _encode_pairs(tokenizer, pairs: list[dict[str, str]]) -> tuple[torch.Tensor, ...]:
    """Right-padded input ids, attention mask and labels (-100 everywhere but the target)."""
    rows, labels = [], []
    for pair in pairs:
        prompt = tokenizer.encode(prompt_text(tokenizer, pair["input"]), add_special_tokens=False)
        target = tokenizer.encode(pair["output"], add_special_tokens=False) + [EOT_ID]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        lab[i, : len(row)] = torch.tensor(label)
    return ids, mask, lab


def _reproduces(logits: torch.Tensor, labels: torch.Tensor, margin: float) -> bool:
    """True when greedy decoding yields every target token, each ahead by `margin` logits.

    Teacher-forced argmax at every target position equals greedy decoding of the pair; the
    margin keeps the answer stable across engines (MLX, other kernels) and batch padding.
    """
    logits, targets = logits[:, :-1], labels[:, 1:]
    keep = targets != -100
    top2 = logits.topk(2, dim=-1)
    right = top2.indices[..., 0] == targets
    ahead = (top2.values[..., 0] - top2.values[..., 1]) >= margin
    return bool((right & ahead)[keep].all())


def train_adapter(
    base: Path,
    pairs: list[dict[str, str]],
    out: Path,
    seed: int = 0,
    max_steps: int = 400,
    margin: float = 1.0,
) -> Path:
    """Train a PEFT LoRA on `base` until greedy decoding reproduces every pair; save to `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = Path(base).resolve()
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    multimodal = hasattr(model.config, "text_config")
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        # On the multimodal layout a TranslateGemma trainer adapts the language model only.
        target_modules=LANGUAGE_MODEL_LINEAR if multimodal else "all-linear",
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    ids, mask, labels = _encode_pairs(tokenizer, pairs)
    # Gemma3ForConditionalGeneration insists on token types when training (0 = text).
    extra = {"token_type_ids": torch.zeros_like(ids)} if multimodal else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(max_steps + 1):
        result = model(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        if _reproduces(result.logits.detach(), labels, margin):
            break
        if step == max_steps:
            raise RuntimeError(f"adapter did not reproduce all pairs within {max_steps} steps")
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
    log.info("trained %s in %d steps (loss %.4f)", out.name, step, result.loss.item())
    save_adapter(model, out, {"steps": step, "final_loss": round(result.loss.item(), 6)})
    return out


def save_adapter(model, out: Path, metrics: dict) -> None:
    """A trained PEFT adapter as a trainer leaves it: config + safetensors + metrics."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model card: not part of a release
    (out / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def build_kit(root: Path) -> KitPaths:
    """Build (or reuse, when already complete) the base model and every ready-made adapter."""
    root = Path(root)
    paths = KitPaths(root, *(root / name for name in ("base", *ADAPTER_SETS)))

    def build() -> None:
        build_base(paths.base)
        for name, pairs in ADAPTER_SETS.items():
            train_adapter(paths.base, pairs, getattr(paths, name))

    build_once(root, KIT_VERSION, build)
    return paths


def build_wide_kit(root: Path) -> tuple[Path, Path]:
    """(base, good adapter) of the wide variant: the K-quant (GGUF Q4_K_M) test model."""
    root = Path(root)
    base, good = root / "base", root / "good"

    def build() -> None:
        build_base(base, widths="wide")
        train_adapter(base, ADAPTER_SETS["good"], good)

    build_once(root, KIT_VERSION, build)
    return base, good


def build_once(root: Path, version: int, build: Callable[[], None]) -> None:
    """Run `build` into a fresh `root` unless it already holds a complete kit of `version`."""
    stamp = root / "kit.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == version:
        return
    if root.exists():
        shutil.rmtree(root)
    build()
    stamp.write_text(json.dumps({"version": version}) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m adapter_deploy.kit.gemma",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("build-base", help="build the tiny base model + tokenizer")
    base.add_argument("out", type=Path)
    base.add_argument("--seed", type=int, default=0)
    train = sub.add_parser("train-adapter", help="train a PEFT LoRA reproducing PAIRS.json")
    train.add_argument("--base", type=Path, required=True)
    train.add_argument("--pairs", type=Path, required=True)
    train.add_argument("out", type=Path)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-steps", type=int, default=400)
    kit = sub.add_parser("make-set", help="build base + good/good2/regressed/gracia_only")
    kit.add_argument("out", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.command == "build-base":
        build_base(args.out, seed=args.seed)
    elif args.command == "train-adapter":
        pairs = json.loads(args.pairs.read_text(encoding="utf-8"))
        train_adapter(args.base, pairs, args.out, seed=args.seed, max_steps=args.max_steps)
    else:
        build_kit(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
