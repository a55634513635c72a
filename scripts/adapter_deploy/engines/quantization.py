"""Load-time quantization of a merged release: `quantization.json` beside the weights.

The training side writes it (adapter_deploy.convert.merge); the engines read it here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import AdapterError
from adapter_deploy.engines.base import read_json

QUANTIZATION_FILE = "quantization.json"
# The load-time quantization a bitsandbytes release asks for (keys of BitsAndBytesConfig).
BNB_4BIT_NF4: dict[str, Any] = {
    "method": "bitsandbytes",
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_compute_dtype": "float16",
    "bnb_4bit_use_double_quant": True,
}


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
