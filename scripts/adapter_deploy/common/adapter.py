"""What a versionable adapter directory is, checked without loading any weights.

Only safetensors are ever read; a pickle-format file is refused by its name
and never opened. Every problem is collected and reported at once.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import AdapterError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MLX_WEIGHTS = "adapters.safetensors"  # an adapter converted for mlx-lm
METRICS = "training_metrics.json"
ADAPTER_FILES = (PEFT_CONFIG, PEFT_WEIGHTS, METRICS)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
METRIC_FIELDS = ("final_loss", "eval_wer", "epochs", "data_hours")

_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024


def safetensors_problems(path: Path) -> list[str]:
    """Structural problems of a safetensors file: header, dtypes, offsets, size."""
    size = path.stat().st_size
    if size < 8:
        return [f"{path.name}: too short to be safetensors ({size} bytes)"]
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > min(size - 8, _MAX_HEADER):
            return [f"{path.name}: header length {header_len} exceeds the file (truncated?)"]
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return [f"{path.name}: header is not valid JSON (corrupt or not safetensors)"]
    if not isinstance(header, dict):
        return [f"{path.name}: header is not a JSON object"]
    return _tensor_problems(path.name, header, size - 8 - header_len)


def _tensor_problems(name: str, header: dict, data_len: int) -> list[str]:
    problems: list[str] = []
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            expected = math.prod(shape) * _DTYPE_SIZES[dtype]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name}: tensor {key!r} has a malformed entry")
            continue
        if end - begin != expected:
            problems.append(f"{name}: tensor {key!r} spans {end - begin} bytes, needs {expected}")
        spans.append((begin, end, key))
    if not spans and not problems:
        problems.append(f"{name}: holds no tensors")
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            problems.append(f"{name}: tensor {key!r} does not start where the previous ends")
        position = max(position, end)
    if spans and position != data_len:
        problems.append(
            f"{name}: tensors cover {position} bytes but the file holds {data_len} (truncated?)"
        )
    return problems


def _config_problems(path: Path) -> list[str]:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"{PEFT_CONFIG}: does not parse as JSON ({exc.__class__.__name__})"]
    if not isinstance(config, dict):
        return [f"{PEFT_CONFIG}: is not a JSON object"]
    problems = []
    if str(config.get("peft_type", "")).upper() != "LORA":
        problems.append(f"{PEFT_CONFIG}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    rank = config.get("r")
    if not isinstance(rank, int) or rank <= 0:
        problems.append(f"{PEFT_CONFIG}: r (LoRA rank) is {rank!r}, expected a positive integer")
    return problems


def _metrics_problems(path: Path) -> list[str]:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return [f"{path.name}: does not parse as JSON"]
    return [] if isinstance(metrics, dict) else [f"{path.name}: is not a JSON object"]


def adapter_problems(src: Path) -> list[str]:
    """Every reason `src` is not a versionable PEFT LoRA adapter (empty when fine)."""
    if not src.is_dir():
        return [f"{src} is not a directory"]
    problems = [
        f"{p.name}: pickle-format file refused (it is never loaded); save with safetensors"
        for p in sorted(src.iterdir())
        if p.suffix.lower() in PICKLE_SUFFIXES
    ]
    config, weights = src / PEFT_CONFIG, src / PEFT_WEIGHTS
    problems += _config_problems(config) if config.is_file() else [f"{PEFT_CONFIG}: missing"]
    problems += safetensors_problems(weights) if weights.is_file() else [f"{PEFT_WEIGHTS}: missing"]
    if (src / METRICS).is_file():
        problems += _metrics_problems(src / METRICS)
    return problems


def check_adapter(src: Path) -> None:
    problems = adapter_problems(src)
    if problems:
        raise AdapterError(
            f"{src} is not a usable adapter: " + "; ".join(problems),
            "point SRC at a PEFT output dir with adapter_config.json + adapter_model.safetensors",
        )


PLAN_METRICS = ("final_loss", "eval_wer", "epochs", "data_hours")  # the operator's plan


def read_metrics(path: Path | None) -> tuple[dict[str, Any] | None, list[str]]:
    """Training metrics (the operator's plan) and the plan's fields they lack. None when there is no
    file (recorded as absent, never as {}); the plan's fields, where present, must be
    non-negative numbers (all problems listed at once); unknown fields are kept."""
    if path is None or not path.is_file():
        return None, list(PLAN_METRICS)
    problems = _metrics_problems(path)
    if problems:
        raise AdapterError(problems[0], 'pass a JSON object such as {"final_loss": 0.42}')
    metrics = json.loads(path.read_text())
    bad = [
        f"{name}={metrics[name]!r}"
        for name in PLAN_METRICS
        if name in metrics
        and (isinstance(metrics[name], bool) or not isinstance(metrics[name], (int, float))
             or metrics[name] < 0)
    ]  # fmt: skip
    if bad:
        raise AdapterError(
            f"{path.name}: {', '.join(bad)} must be non-negative numbers",
            "fix the trainer's metrics output (or leave the field out)",
        )
    return metrics, [name for name in PLAN_METRICS if name not in metrics]
