"""PEFT adapter -> merged transformers model (for NVIDIA endpoints that serve merged weights).

    merged        merge_and_unload into the base, saved as fp16 (or bf16) safetensors with the
                  base's tokenizer: a plain transformers model dir, nothing of the adapter
    bitsandbytes  the same merged weights plus `quantization.json`, a load-time 4-bit nf4
                  BitsAndBytesConfig. It is NOT a `quantization_config` in config.json (that
                  tells transformers the weights are already quantized); HFEngine applies it
                  only where CUDA is present and loads the fp16 weights unquantized elsewhere
    gguf          engines/convert_gguf.py (one .gguf file, written from the merged weights)

`merge_adapter()` refuses an adapter whose tensors do not all land in the base (the same check
HFEngine runs), so a wrongly keyed adapter never becomes a "merged" copy of the base model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import AdapterError
from adapter_deploy.engines.base import (
    PEFT_WEIGHTS,
    adapter_kind,
    base_model_of,
    read_json,
    safetensors_names,
)

log = logging.getLogger(__name__)

MERGED_DTYPES = ("float16", "bfloat16", "float32")
QUANTIZATION_FILE = "quantization.json"
# The load-time quantization a bitsandbytes release asks for (keys of BitsAndBytesConfig).
BNB_4BIT_NF4: dict[str, Any] = {
    "method": "bitsandbytes",
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_compute_dtype": "float16",
    "bnb_4bit_use_double_quant": True,
}


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
    (out_dir / "README.md").unlink(missing_ok=True)
    log.debug("merged %s into %s -> %s (%s)", adapter_dir, base, out_dir, dtype)
    return out_dir


def write_bnb_quantization(out_dir: str | Path) -> Path:
    """Record the 4-bit nf4 load-time quantization beside merged weights."""
    path = Path(out_dir) / QUANTIZATION_FILE
    path.write_text(json.dumps(BNB_4BIT_NF4, indent=2, sort_keys=True) + "\n")
    return path


def read_quantization(model_dir: str | Path) -> dict[str, Any] | None:
    """The load-time quantization a release asks for, or None when it has none."""
    path = Path(model_dir) / QUANTIZATION_FILE
    if not path.is_file():
        return None
    spec = read_json(path)
    if spec.get("method") != "bitsandbytes":
        raise AdapterError(
            f"{path} names quantization method {spec.get('method')!r}",
            fix="only bitsandbytes load-time quantization is supported; reconvert the release",
        )
    return spec


def bnb_config(spec: dict[str, Any]):
    """A transformers BitsAndBytesConfig from a quantization.json spec (CUDA only)."""
    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise AdapterError(
            "this release loads 4-bit with bitsandbytes, which is not installed",
            fix="pip install bitsandbytes on the CUDA endpoint",
        )
    kwargs = {k: v for k, v in spec.items() if k != "method"}
    if isinstance(kwargs.get("bnb_4bit_compute_dtype"), str):
        kwargs["bnb_4bit_compute_dtype"] = getattr(torch, kwargs["bnb_4bit_compute_dtype"])
    return BitsAndBytesConfig(**kwargs)
