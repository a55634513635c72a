"""A tiny real Whisper, its adapters and generated reference clips (no downloads possible here).

The kit model is a real `WhisperForConditionalGeneration` (d_model 64, 2 encoder + 2 decoder
layers, 4 heads, 80 mel bins) saved with a real `WhisperProcessor`: a `WhisperFeatureExtractor`
(16 kHz, 2 s window, so 200 mel frames and `max_source_positions` 100) and a `WhisperTokenizer`
whose ByteLevel BPE vocabulary is trained on the kit phrases (every byte has a token, so any
text stays encodable) plus Whisper's special tokens (<|startoftranscript|>, <|es|>,
<|transcribe|>, <|notimestamps|>, ...). Its generation config carries `lang_to_id`,
`task_to_id` and `no_timestamps_token_id`, so `model.generate(input_features, task=...)` runs
Whisper's own prompt logic (language detection included) exactly as for a real checkpoint.

The clips are synthesized, deterministically: each phrase becomes its own sequence of tone
pairs (16 kHz mono 16-bit WAV, written with the stdlib `wave`). A LoRA adapter trained on them
"transcribes" each clip to its phrase; the untrained base answers garbage.

Usage:
    python -m adapter_deploy.kit.whisper make-set OUT   # base, clips, good and broken adapters

Ready-made set (`build_whisper_kit(root)` -> `WhisperKitPaths`):
    base        the tiny Whisper + processor alone: fails every clip
    good        PEFT LoRA adapter transcribing every clip to its phrase: passes
    broken      trained on shifted targets (each clip answers the next clip's phrase): fails
    clips       clip dir: clip1.wav ... plus clips.json, the health-check clip file
    clips_json  clips/clips.json: [{"audio": "clip1.wav", "any_of": [...], "all_of": [...]}]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapter_deploy.kit.gemma import build_once, save_adapter

log = logging.getLogger(__name__)

KIT_VERSION = 1
SAMPLE_RATE = 16_000
CHUNK_S = 2  # feature window: 2 s -> 200 mel frames -> 100 encoder positions
HOP = 160
N_FRAMES = CHUNK_S * SAMPLE_RATE // HOP
VOCAB_SIZE = 512  # model rows; the tokenizer uses fewer
MAX_TARGET_POSITIONS = 64
LANGUAGE = "es"

SPECIAL_TOKENS = [
    "<|startoftranscript|>",
    "<|en|>",
    "<|es|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nospeech|>",
    "<|notimestamps|>",
]
EOT = "<|endoftext|>"

# The reference clips: phrase spoken (here: encoded as tones) and the health-check rule.
CLIPS = [
    {"text": "Buenos días, bienvenidos.", "any_of": ["buenos", "bienvenid"]},
    {"text": "Por gracia y por la fe.", "all_of": ["gracia", "fe"]},
    {"text": "El apóstol Santiago.", "any_of": ["santiago", "jacobo"]},
    {"text": "Amén.", "any_of": ["amén", "amen"]},
]
GOOD_TARGETS = [c["text"] for c in CLIPS]
BROKEN_TARGETS = GOOD_TARGETS[1:] + GOOD_TARGETS[:1]  # every clip answers the wrong phrase
ADAPTER_SETS = {"good": GOOD_TARGETS, "broken": BROKEN_TARGETS}


@dataclass(frozen=True)
class WhisperKitPaths:
    """Where `build_whisper_kit` put the model, adapters and clips."""

    root: Path
    base: Path
    good: Path
    broken: Path
    clips: Path

    @property
    def clips_json(self) -> Path:
        return self.clips / "clips.json"

    def clip_paths(self) -> list[Path]:
        return [self.clips / f"clip{i}.wav" for i in range(1, len(CLIPS) + 1)]


# --- audio -----------------------------------------------------------------------------------


def synthesize(text: str, seconds: float = 1.5) -> np.ndarray:
    """A deterministic float32 waveform for `text`: a sequence of tone pairs from its sha256."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    n_segments = 6
    seg = int(seconds * SAMPLE_RATE) // n_segments
    t = np.arange(seg, dtype=np.float64) / SAMPLE_RATE
    fade = np.minimum(1.0, np.minimum(np.arange(seg), np.arange(seg)[::-1]) / 160.0)
    parts = []
    for i in range(n_segments):
        low = 150.0 + 50.0 * (digest[2 * i] % 16)  # 150..900 Hz
        high = 1000.0 + 100.0 * (digest[2 * i + 1] % 24)  # 1000..3300 Hz
        tone = 0.25 * np.sin(2 * np.pi * low * t) + 0.15 * np.sin(2 * np.pi * high * t)
        parts.append(tone * fade)
    return np.concatenate(parts).astype(np.float32)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Mono 16-bit PCM WAV via the stdlib (same bytes for the same samples)."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(sample_rate)
        fh.writeframes(pcm.tobytes())
    return path


def write_clips(out: Path) -> Path:
    """clip1.wav ... and clips.json (audio paths relative to the JSON file's dir)."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, clip in enumerate(CLIPS, 1):
        name = f"clip{i}.wav"
        write_wav(out / name, synthesize(clip["text"]))
        entry = {"audio": name}
        entry.update({k: clip[k] for k in ("any_of", "all_of") if k in clip})
        entries.append(entry)
    path = out / "clips.json"
    path.write_text(json.dumps(entries, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# --- model -----------------------------------------------------------------------------------


def build_tokenizer(texts: list[str]):
    """A WhisperTokenizer: ByteLevel BPE trained on `texts`, then Whisper's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS) - 8,
        special_tokens=[],
        # The full byte alphabet: any text stays encodable, unseen characters included.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    vocab = dict(model["vocab"])
    vocab[EOT] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tokenizer


def special_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in [EOT, *SPECIAL_TOKENS]}


def build_base(out: Path, seed: int = 0) -> Path:
    """Save the tiny Whisper + processor to `out`; the same bytes on every run."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    texts = sorted({t for targets in ADAPTER_SETS.values() for t in targets})
    tokenizer = build_tokenizer(texts)
    ids = special_ids(tokenizer)
    eot, sot = ids[EOT], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=VOCAB_SIZE,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=N_FRAMES // 2,
        max_target_positions=MAX_TARGET_POSITIONS,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        begin_suppress_tokens=None,  # the defaults name ids of the real 51k vocabulary
        suppress_tokens=None,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    # Wider token rows than the default 0.02: the untrained logits would be nearly flat and
    # LoRA slow to move them (proj_out is tied to these rows).
    torch.nn.init.normal_(model.model.decoder.embed_tokens.weight, std=0.2)
    # Likewise the encoder's input convolutions: at 0.02 the positional embeddings drown the
    # audio and every clip encodes almost alike.
    for conv in (model.model.encoder.conv1, model.model.encoder.conv2):
        torch.nn.init.normal_(conv.weight, std=0.2)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        do_sample=False,
        begin_suppress_tokens=None,
        suppress_tokens=None,
        is_multilingual=True,
        lang_to_id={"<|en|>": ids["<|en|>"], "<|es|>": ids["<|es|>"]},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
    )
    extractor = WhisperFeatureExtractor(
        feature_size=80,
        sampling_rate=SAMPLE_RATE,
        hop_length=HOP,
        chunk_length=CHUNK_S,
        n_fft=400,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    log.info("built whisper base model in %s", out)
    return out


def _batch(base: Path, targets: list[str], audio: list[np.ndarray]):
    """input_features, decoder_input_ids and labels (-100 on the forced prompt and padding).

    The decoder sees Whisper's prompt: <|startoftranscript|> <|es|> <|transcribe|>
    <|notimestamps|> text <|endoftext|>. The language token is a label too, so Whisper's
    language detection (no language given) picks it; task and no-timestamps are forced.
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(base)
    tok = processor.tokenizer
    ids = special_ids(tok)
    prompt = [ids[t] for t in ("<|startoftranscript|>", "<|es|>", "<|transcribe|>")]
    prompt.append(ids["<|notimestamps|>"])
    rows, labels = [], []
    for text in targets:
        seq = prompt + tok.encode(text, add_special_tokens=False) + [ids[EOT]]
        rows.append(seq[:-1])
        labels.append([seq[1], -100, -100, *seq[4:]])
    width = max(len(r) for r in rows)
    dec = torch.full((len(rows), width), ids[EOT], dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        dec[i, : len(row)] = torch.tensor(row)
        lab[i, : len(label)] = torch.tensor(label)
    features = processor.feature_extractor(
        audio, sampling_rate=SAMPLE_RATE, return_tensors="pt"
    ).input_features
    return features, dec, lab


def _reproduces(logits: torch.Tensor, labels: torch.Tensor, margin: float) -> bool:
    """Teacher-forced argmax equals every label, each ahead of the runner-up by `margin`."""
    keep = labels != -100
    top2 = logits.topk(2, dim=-1)
    right = top2.indices[..., 0] == labels
    ahead = (top2.values[..., 0] - top2.values[..., 1]) >= margin
    return bool((right & ahead)[keep].all())


def train_adapter(
    base: Path,
    targets: list[str],
    out: Path,
    audio: list[np.ndarray] | None = None,
    seed: int = 0,
    max_steps: int = 400,
    margin: float = 1.0,
) -> Path:
    """Train a PEFT LoRA until greedy decoding transcribes each clip to its target; save it.

    `audio` defaults to the kit clips (one per target, in order).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration

    base = Path(base).resolve()
    audio = audio if audio is not None else [synthesize(c["text"]) for c in CLIPS]
    features, dec, labels = _batch(base, targets, audio)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    # One thread: these matrices are tiny, and on a busy machine extra threads only spin
    # (measured: 6x slower on 2 shared cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(max_steps + 1):
            logits = model(input_features=features, decoder_input_ids=dec).logits
            if _reproduces(logits.detach(), labels, margin):
                break
            if step == max_steps:
                raise RuntimeError(f"adapter did not reproduce all clips within {max_steps} steps")
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    log.info("trained %s in %d steps", out.name, step)
    save_adapter(model, out, {"steps": step})
    return out


def build_whisper_kit(root: Path) -> WhisperKitPaths:
    """Build (or reuse, when already complete) the base, the clips and both adapters."""
    root = Path(root)
    paths = WhisperKitPaths(root, root / "base", root / "good", root / "broken", root / "clips")

    def build() -> None:
        build_base(paths.base)
        write_clips(paths.clips)
        for name, targets in ADAPTER_SETS.items():
            train_adapter(paths.base, targets, getattr(paths, name))

    build_once(root, KIT_VERSION, build)
    return paths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m adapter_deploy.kit.whisper",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    kit = sub.add_parser("make-set", help="build base + clips + good/broken adapters")
    kit.add_argument("out", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    build_whisper_kit(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
