"""PEFT adapter -> GGUF LoRA, applied by llama.cpp to a quantized GGUF base at load time.

Format `gguf-lora` ships the base once and the adapter every cycle:

    base release    the base model alone as one GGUF (adapter_deploy.convert.gguf: llama.cpp's
                    convert_hf_to_gguf.py, then its quantizer), written once per base content,
                    converter and gguf_type, plus `generate.json`, the check a base alone can
                    pass (it loads and answers; the adapter's sentences are not its job)
    adapter release `adapter.gguf`, the LoRA converted by llama.cpp's own convert_lora_to_gguf.py
                    (`--base <base dir> --outtype f16`: it reads only the base's config), and
                    `base.json`, which names the base release the LoRA was converted against

On an endpoint the base release lives beside the model's own releases, as releases of
`<model>-gguf-base` (never activated, so no service loads it as a model of its own):

    <adapter_dir>/<model>-gguf-base/releases/<base version>/model.gguf
    <adapter_dir>/<model>/releases/<version>/adapter.gguf + base.json

The base's version id is `cycle0_00000000_<key8>`: cycle 0 (no training cycle made it), no
date, the first 8 hex digits of its content key, so every deployer names the same base alike.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from adapter_deploy.convert.gguf import (
    check_supported,
    check_tools,
    convert_to_gguf,
    run_converter,
)
from adapter_deploy.engines.llamacpp_engine import BASE_INFO, BASE_MODEL_SUFFIX, LORA_FILE

log = logging.getLogger(__name__)

LORA_CONVERTER_SCRIPT = "convert_lora_to_gguf.py"
LORA_OUTTYPE = "f16"  # the LoRA is small; F16 keeps it as trained (llama.cpp applies it in F32)
GENERATE_CHECK = "generate.json"
# A base alone is checked for loading and answering, not for translating well: non-empty
# answers to plain inputs (health.py's sentence file format, without any_of / all_of).
GENERATE_INPUTS = ("Good morning.", "Thank you very much.")

__all__ = [
    "BASE_INFO",
    "BASE_MODEL_SUFFIX",
    "LORA_FILE",
    "base_model_name",
    "base_version_id",
    "convert_base",
    "convert_lora",
]


def base_model_name(model: str) -> str:
    """The name a model's GGUF base releases are kept under on an endpoint."""
    return f"{model}{BASE_MODEL_SUFFIX}"


def base_version_id(key: str) -> str:
    """The base release's version id, from its content key (see the module docstring)."""
    return f"cycle0_00000000_{key[:8]}"


def convert_base(base_dir: Path, out_dir: Path, gguf_type: str) -> Path:
    """The base model alone as `out_dir/model.gguf` plus its generation check file."""
    path = convert_to_gguf(base_dir, out_dir, gguf_type)
    check = [{"input": text} for text in GENERATE_INPUTS]
    (out_dir / GENERATE_CHECK).write_text(json.dumps(check, indent=2) + "\n")
    return path


def convert_lora(adapter_dir: Path, base_dir: Path, out_dir: Path, base: dict[str, Any]) -> Path:
    """`out_dir/adapter.gguf` (llama.cpp's LoRA converter) and `base.json` (= `base`)."""
    # Absolute before anything: the converter runs in a temporary working directory.
    adapter_dir, base_dir, out_dir = adapter_dir.resolve(), base_dir.resolve(), out_dir.resolve()
    check_tools("F16")
    check_supported(base_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / LORA_FILE
    _run_converter(adapter_dir, base_dir, target)
    (out_dir / BASE_INFO).write_text(json.dumps(base, indent=2, sort_keys=True) + "\n")
    return target


def _run_converter(adapter_dir: Path, base_dir: Path, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=".convert-lora-", dir=target.parent) as tmp:
        run_converter(
            LORA_CONVERTER_SCRIPT,
            ["--outtype", LORA_OUTTYPE, "--base", base_dir, "--outfile", target, adapter_dir],
            tool="llama.cpp's LoRA converter",
            source=adapter_dir,
            out_file=target,
            cwd=Path(tmp),
            fix="run `make gguf-tools` if its own imports failed, or use format gguf",
        )
