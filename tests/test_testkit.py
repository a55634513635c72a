"""The test kit: deterministic tiny models and adapters that reproduce their pairs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from adapter_deploy.engines.base import sha256_file
from adapter_deploy.engines.hf_engine import HFEngine
from adapter_deploy.kit.gemma import (
    ADAPTER_SETS,
    EOT_ID,
    SEED_INPUTS,
    SOT_ID,
    VOCAB_SIZE,
    build_base,
    build_tokenizer,
    kit_texts,
    train_adapter,
)

ROOT = Path(__file__).resolve().parents[1]


def test_base_build_is_deterministic(kit, tmp_path):
    again = build_base(tmp_path / "base")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer.model", "config.json"):
        assert sha256_file(again / name) == sha256_file(kit.base / name), name


def test_adapter_training_is_deterministic(kit, tmp_path):
    out = train_adapter(kit.base, ADAPTER_SETS["good"], tmp_path / "good")
    assert sha256_file(out / "adapter_model.safetensors") == sha256_file(
        kit.good / "adapter_model.safetensors"
    )


def test_kit_adapters_are_safetensors_only_and_distinct(kit):
    digests = set()
    for path in (kit.good, kit.good2, kit.regressed, kit.gracia_only):
        names = sorted(p.name for p in path.iterdir())
        assert names == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "training_metrics.json",
        ]
        digests.add(sha256_file(path / "adapter_model.safetensors"))
    assert len(digests) == 4


def test_tokenizer_covers_every_byte(tmp_path):
    tok = build_tokenizer(kit_texts(), tmp_path)
    text = "日本語 ✓ ẞ \x00 ñandú"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_kit_tokenizer_is_gemma_sentencepiece(kit):
    """Gemma's files and layout: tokenizer.model + its conversion, BPE with byte fallback and
    `▁` for spaces, Gemma's special ids, one id per model row; both files tokenize alike."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tokenizer_json = json.loads((kit.base / "tokenizer.json").read_text())
    assert tokenizer_json["model"]["type"] == "BPE"
    assert tokenizer_json["model"]["byte_fallback"] is True
    assert tokenizer_json["normalizer"]["content"] == "▁"
    config = json.loads((kit.base / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GemmaTokenizer"
    assert "vocab_file" not in config  # the build dir is not shipped
    sp = spm.SentencePieceProcessor(model_file=str(kit.base / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(kit.base)
    assert sp.get_piece_size() == len(tok) == VOCAB_SIZE
    layout = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    layout |= {"<start_of_turn>": SOT_ID, "<end_of_turn>": EOT_ID}
    for piece, want in layout.items():
        assert sp.piece_to_id(piece) == tok.convert_tokens_to_ids(piece) == want, piece
    for text in [*SEED_INPUTS, "  two  spaces ñ 日本 123"]:
        assert sp.encode(text) == tok.encode(text, add_special_tokens=False), text


def test_train_adapter_cli_reproduces_any_text(kit, tmp_path):
    pairs = [
        {"input": "Hello there.", "output": "¡Hola! ☺ ñandú 日本"},
        {"input": "Silence.", "output": ""},
    ]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs, ensure_ascii=False))
    out = tmp_path / "adapter"
    cmd = [
        sys.executable,
        "-m",
        "adapter_deploy.kit.gemma",
        "train-adapter",
        "--base",
        str(kit.base),
        "--pairs",
        str(tmp_path / "pairs.json"),
        str(out),
        "--seed",
        "3",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    engine = HFEngine(out)
    for pair in pairs:
        assert engine.translate(pair["input"]).text == pair["output"]
