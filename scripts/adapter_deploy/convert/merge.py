"""PEFT adapter -> merged transformers model (for NVIDIA endpoints that serve merged weights).

    merged        merge_and_unload into the base, saved as fp16 (or bf16) safetensors with the
                  base's tokenizer: a plain transformers model dir, nothing of the adapter, plus
                  the base's SentencePiece `tokenizer.model` where it has one (transformers 5
                  saves only tokenizer.json; llama.cpp's GGUF converter reads Gemma's .model)
    bitsandbytes  the same merged weights plus `quantization.json`, a load-time 4-bit nf4
                  BitsAndBytesConfig. It is NOT a `quantization_config` in config.json (that
                  tells transformers the weights are already quantized); HFEngine applies it
                  only where CUDA is present and loads the fp16 weights unquantized elsewhere
    gguf          adapter_deploy.convert.gguf (one .gguf file, written from the merged weights)

`merge_adapter()` refuses an adapter whose tensors do not all land in the base (the same check
HFEngine runs), so a wrongly keyed adapter never becomes a "merged" copy of the base model.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from adapter_deploy.common.errors import AdapterError
from adapter_deploy.engines.base import (
    PEFT_WEIGHTS,
    adapter_kind,
    base_model_of,
    safetensors_names,
)
from adapter_deploy.engines.quantization import BNB_4BIT_NF4, QUANTIZATION_FILE

log = logging.getLogger(__name__)

MERGED_DTYPES = ("float16", "bfloat16", "float32")
SENTENCEPIECE_MODEL = "tokenizer.model"


def merge_adapter(
    adapter_dir: str | Path,
    base_model: str | Path | None,
    out_dir: str | Path,
    dtype: str = "float16",
) -> Path:
    """Merge the PEFT adapter into its base and save a transformers model dir in `out_dir`.

    `base_model` defaults to the adapter's base_model_name_or_path. The merge runs in float32
    and the result is cast to `dtype`. Returns `out_dir`.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from adapter_deploy.engines.peft_swap import check_landed

    hf_logging.disable_progress_bar()  # progress bars would clutter the scripts' stderr

    if dtype not in MERGED_DTYPES:
        raise AdapterError(f"unknown dtype {dtype!r}", fix="use " + ", ".join(MERGED_DTYPES))
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if adapter_kind(adapter_dir) != "peft":
        raise AdapterError(f"{adapter_dir} is not a PEFT adapter dir", fix="merge the original")
    safetensors_names(adapter_dir / PEFT_WEIGHTS)
    base = base_model_of(adapter_dir, base_model)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name="merge")
    except Exception as err:  # transformers/PEFT raise OSError/ValueError/KeyError/...
        raise AdapterError(
            f"cannot load {adapter_dir} on {base} for merging ({err})",
            fix="check the base model (params.yaml models.<m>.base_model) matches the adapter",
        ) from err
    check_landed(model, adapter_dir, "merge")
    merged = model.merge_and_unload().to(getattr(torch, dtype)).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _copy_sentencepiece(base, out_dir)
    (out_dir / "README.md").unlink(missing_ok=True)
    log.debug("merged %s into %s -> %s (%s)", adapter_dir, base, out_dir, dtype)
    return out_dir


def _copy_sentencepiece(base: str, out_dir: Path) -> None:
    """The base's `tokenizer.model` beside the merged weights (a local dir, else the hub's)."""
    local = Path(base)
    if local.is_dir():
        if (local / SENTENCEPIECE_MODEL).is_file():
            shutil.copyfile(local / SENTENCEPIECE_MODEL, out_dir / SENTENCEPIECE_MODEL)
        return
    from huggingface_hub import hf_hub_download

    try:
        found = hf_hub_download(base, SENTENCEPIECE_MODEL)
    except Exception as err:  # not in the repo, offline, gated: huggingface_hub's many errors
        log.debug("%s: no %s (%s)", base, SENTENCEPIECE_MODEL, err)
        return
    shutil.copyfile(found, out_dir / SENTENCEPIECE_MODEL)


def write_bnb_quantization(out_dir: str | Path) -> Path:
    """Record the 4-bit nf4 load-time quantization beside merged weights."""
    path = Path(out_dir) / QUANTIZATION_FILE
    path.write_text(json.dumps(BNB_4BIT_NF4, indent=2, sort_keys=True) + "\n")
    return path
