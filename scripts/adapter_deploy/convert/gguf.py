"""Merged transformers model dir -> one GGUF file for llama.cpp endpoints.

Two steps, both with llama.cpp's own published tools (nothing of llama.cpp is copied here):
    F16     written by this module with the `gguf` package's writer and its tensor-name map
            (llama.cpp's HF->GGUF converter script is not shipped in any wheel); Gemma 3,
            the architecture we serve: text-only, or the multimodal TranslateGemma layout
            whose language model is written and whose vision tower is left out
    Q8_0, Q4_K_M
            the F16 file requantized by llama.cpp's `llama_model_quantize` (llama-cpp-python)

Only safetensors are read. K-quants (Q4_K_M) need tensor rows in multiples of 256; llama.cpp
falls back to a legacy quant type for narrower tensors, so tiny models still convert.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import AdapterError
from adapter_deploy.engines.base import read_json
from adapter_deploy.engines.llamacpp_engine import TOOLS_HINT

log = logging.getLogger(__name__)

GGUF_TYPES = ("Q4_K_M", "Q8_0", "F16")
DEFAULT_GGUF_TYPE = "Q4_K_M"
GGUF_FILE = "model.gguf"
# transformers model_type -> GGUF architecture. "gemma3" is the multimodal checkpoint
# (Gemma3ForConditionalGeneration, e.g. TranslateGemma): its language model is written and
# the vision tower left out; llama.cpp keeps vision in a separate mmproj file, and
# translation needs none.
_ARCHITECTURES = {"gemma3_text": "gemma3", "gemma3": "gemma3"}
# Where the language model's tensors live in a multimodal checkpoint, as saved by
# transformers 4 and 5, and the text-only name each prefix stands for.
_TEXT_PREFIXES = {
    "language_model.model.": "model.",
    "model.language_model.": "model.",
    "language_model.lm_head.": "lm_head.",
}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.")
_VISION_PREFIXES += ("model.multi_modal_projector.",)
# Gemma's RMSNorm multiplies by (1 + weight); llama.cpp multiplies by the stored weight.
_NORM_SHIFT = {"gemma3": 1.0}


def tools_available(gguf_type: str = DEFAULT_GGUF_TYPE) -> bool:
    """The `gguf` writer is always needed; llama-cpp-python only to requantize."""
    needed = ("gguf",) if gguf_type == "F16" else ("gguf", "llama_cpp")
    return all(importlib.util.find_spec(m) is not None for m in needed)


@functools.cache  # what is installed does not change under a running process
def tool_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("gguf", "llama-cpp-python"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def convert_to_gguf(
    merged_dir: str | Path, out_dir: str | Path, gguf_type: str = DEFAULT_GGUF_TYPE
) -> Path:
    """Write `out_dir/model.gguf` of type `gguf_type` from a merged model dir; return its path."""
    if gguf_type not in GGUF_TYPES:
        raise AdapterError(f"unknown GGUF type {gguf_type!r}", fix="use " + ", ".join(GGUF_TYPES))
    if not tools_available(gguf_type):
        raise AdapterError(TOOLS_HINT, fix="run `make gguf-tools`, or use format merged")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / GGUF_FILE
    if gguf_type == "F16":
        return write_f16(Path(merged_dir), target)
    f16 = out_dir / ".model-f16.gguf"
    try:
        write_f16(Path(merged_dir), f16)
        quantize(f16, target, gguf_type)
    finally:
        f16.unlink(missing_ok=True)
    return target


def write_f16(model_dir: Path, out_file: Path) -> Path:
    """The merged model as an F16 GGUF file (1-D tensors stay F32, as llama.cpp expects)."""
    import gguf
    import numpy as np

    config = read_json(model_dir / "config.json")
    arch = _architecture(config, model_dir)
    tied = config.get("tie_word_embeddings", True)
    config = _text_config(config)
    writer = gguf.GGUFWriter(str(out_file), arch)
    _write_hparams(writer, config, model_dir.name)
    n_vocab = int(config["vocab_size"])
    _write_tokenizer(writer, model_dir, n_vocab)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, int(config["num_hidden_layers"]))
    shift = _NORM_SHIFT.get(arch, 0.0)
    for name, tensor in _tensors(model_dir):
        name = _text_name(name)
        if name is None or (name == "lm_head.weight" and tied):
            continue  # vision, or tied to the token embedding (llama.cpp reuses it as output)
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise AdapterError(
                f"{model_dir}: tensor {name} has no GGUF name for {arch}",
                fix="gguf conversion supports Gemma 3 models; use format merged",
            )
        data = tensor.float().numpy()
        if name.endswith("norm.weight"):
            data = data + shift
        data = data.astype(np.float16 if data.ndim > 1 else np.float32)
        writer.add_tensor(mapped, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """A multimodal config's language-model part (a text-only config as it is)."""
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


def _text_name(name: str) -> str | None:
    """The text-only name of a checkpoint tensor; None for the vision tower and projector."""
    if name.startswith(_VISION_PREFIXES):
        return None
    for prefix, text in _TEXT_PREFIXES.items():
        if name.startswith(prefix):
            return text + name[len(prefix) :]
    return name


def _architecture(config: dict[str, Any], model_dir: Path) -> str:
    model_type = config.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise AdapterError(
            f"{model_dir}: gguf conversion does not support model_type {model_type!r}",
            fix="gguf conversion supports Gemma 3 models (gemma3, gemma3_text); use format merged",
        )
    return _ARCHITECTURES[model_type]


def _rope_theta(config: dict[str, Any], layer_type: str, default: float) -> float:
    rope = (config.get("rope_parameters") or {}).get(layer_type) or {}
    return float(rope.get("rope_theta", default))


def _write_hparams(writer: Any, config: dict[str, Any], name: str) -> None:
    import gguf

    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    layers = config.get("layer_types") or []
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config["num_key_value_heads"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config, "full_attention", config.get("rope_theta", 1e6)))
    if config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
        if layers:  # per layer, so llama.cpp does not assume Gemma 3's default 5:1 pattern
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layers])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)


def _write_tokenizer(writer: Any, model_dir: Path, n_vocab: int) -> None:
    """A byte-level BPE tokenizer (tokenizer.json) as GGUF's "gpt2" tokenizer model."""
    import gguf

    data = read_json(model_dir / "tokenizer.json")
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise AdapterError(
            f"{model_dir}/tokenizer.json is a {model.get('type')} tokenizer",
            fix="gguf conversion here supports byte-level BPE tokenizers; use format merged",
        )
    by_id = {i: t for t, i in model["vocab"].items()}
    special = {t["id"]: t for t in data.get("added_tokens", [])}
    by_id.update({i: t["content"] for i, t in special.items()})
    tokens, types = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            kind = special.get(i)
            types.append(
                gguf.TokenType.NORMAL
                if kind is None
                else (gguf.TokenType.CONTROL if kind["special"] else gguf.TokenType.USER_DEFINED)
            )
        else:  # embedding rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = _special_ids(model_dir, model["vocab"] | {t["content"]: i for i, t in special.items()})
    for key, token_id in ids.items():
        getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(False)  # the chat template writes <bos> itself
    template = _chat_template(model_dir)
    if template:
        writer.add_chat_template(template)


def _special_ids(model_dir: Path, vocab: dict[str, int]) -> dict[str, int]:
    config = read_json(model_dir / "tokenizer_config.json")
    ids = {}
    for key in ("bos", "eos", "pad", "unk"):
        token = config.get(f"{key}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if token in vocab:
            ids[key] = vocab[token]
    if "<end_of_turn>" in vocab:  # Gemma ends a turn with it; llama.cpp stops there
        ids["eot"] = vocab["<end_of_turn>"]
    return ids


def _chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = read_json(model_dir / "tokenizer_config.json").get("chat_template")
    return template if isinstance(template, str) else None


def _tensors(model_dir: Path):
    """(name, tensor) of every safetensors shard, in file order."""
    from safetensors import safe_open

    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise AdapterError(f"{model_dir} holds no safetensors weights", fix="merge it again")
    for shard in shards:
        with safe_open(str(shard), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)


def quantize(src: Path, dst: Path, gguf_type: str) -> Path:
    """Requantize an F16 GGUF file with llama.cpp's own quantizer."""
    import llama_cpp

    quiet_llama_cpp()
    ftypes = {
        "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    }
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[gguf_type]
    params.nthread = max(1, (os.cpu_count() or 1))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise AdapterError(
            f"llama.cpp could not quantize {src.name} to {gguf_type} (code {rc})",
            fix="try --gguf-type F16 or Q8_0; see the log for llama.cpp's reason",
        )
    log.debug("quantized %s -> %s (%s)", src, dst, gguf_type)
    return dst


def quiet_llama_cpp() -> None:
    """llama.cpp logs every tensor it quantizes; keep its errors only, unless debugging."""
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


def gguf_metadata(path: Path) -> dict[str, Any]:
    """Architecture, file type and tensor count of a GGUF file (read with the gguf package)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field else None
    types = sorted({t.tensor_type.name for t in reader.tensors})
    return {"architecture": arch, "tensors": len(reader.tensors), "tensor_types": types}
