"""What every engine shares: the Engine protocol, its result types and adapter-dir helpers.

An engine serves one base model plus at most one adapter ("release") at a time. `reload()`
swaps the adapter in place; it is a no-op when the same release (same resolved path and same
weights sha256) is already loaded, and a failed reload leaves the old release serving.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from adapter_deploy.common.adapter import (
    MLX_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    PICKLE_SUFFIXES,
)
from adapter_deploy.common.errors import AdapterError, ReloadFailed
from adapter_deploy.common.fsutil import sha256_file

# The language pair the health check asks for (TranslateGemma language codes).
SOURCE_LANG = "en"
TARGET_LANG = "es"


class NotBeside(AdapterError):
    """The release cannot be checked beside the serving one in this engine (another base, a
    whole model, other LoRA layers): the agent checks it in a process of its own."""


@dataclass(frozen=True)
class Translation:
    """One answer of an engine, how long it took and why decoding ended: "stop" (the model
    ended its answer) or "length" (the new-token budget ran out first)."""

    text: str
    latency_s: float
    finish_reason: str = "stop"


@dataclass(frozen=True)
class LoadedRelease:
    """What an engine is serving: the service reports this so a deploy can verify it."""

    version_id: str
    sha256: str
    path: str
    kind: str  # "peft", "mlx", "merged" or "gguf"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@runtime_checkable
class Engine(Protocol):
    """The interface the service, the health check and the deployer program against."""

    @property
    def loaded(self) -> LoadedRelease | None: ...

    def translate(self, text: str, max_new_tokens: int | None = None) -> Translation:
        """Translate `text`, decoding at most `token_budget(n, max_new_tokens)` new tokens."""
        ...

    def reload(self, adapter_path: str | Path) -> bool:
        """Load and swap in the release at `adapter_path`; return False when it was a no-op."""
        ...


def safetensors_names(path: Path) -> list[str]:
    """Tensor names in a safetensors file; an unreadable header is an AdapterError.

    Checked before handing the file to a loader so a damaged copy is reported as damaged,
    not as whatever error the loader happens to raise.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except FileNotFoundError as err:
        raise AdapterError(f"{path} is missing", fix="copy the complete adapter dir") from err
    except Exception as err:  # safetensors raises several types for a damaged header
        raise AdapterError(
            f"{path} is not a readable safetensors file ({err})",
            fix="copy the adapter again; the file is damaged",
        ) from err


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object file, turning every way it can be broken into an AdapterError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise AdapterError(f"{path} is missing", fix="copy the complete adapter dir") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{path} is not valid JSON ({err})", fix="re-export it") from err
    if not isinstance(data, dict):
        raise AdapterError(f"{path} does not hold a JSON object", fix="re-export it")
    return data


def adapter_kind(path: Path) -> str:
    """Classify a dir as "peft", "mlx" (converted adapter), "merged" (full model) or "gguf"."""
    if not path.is_dir():
        raise AdapterError(f"adapter dir {path} does not exist", fix="check --adapter-dir")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(
            f"{path} holds pickle weights ({', '.join(pickles)}), which are never loaded",
            fix="re-save the adapter with safetensors (save_pretrained(safe_serialization=True))",
        )
    if (path / PEFT_CONFIG).exists():
        return "mlx" if (path / MLX_WEIGHTS).exists() else "peft"
    if (path / "config.json").exists():
        return "merged"
    if any(path.glob("*.gguf")):
        return "gguf"
    raise AdapterError(
        f"{path} holds neither {PEFT_CONFIG}, config.json nor a .gguf file",
        fix="point at a PEFT adapter dir, a converted MLX adapter dir, a merged model dir "
        "or a GGUF release",
    )


def weights_file(path: Path, kind: str) -> Path:
    """The file whose sha256 identifies a release (for merged models: the first shard)."""
    if kind == "peft":
        candidates = [path / PEFT_WEIGHTS]
    elif kind == "mlx":
        candidates = [path / MLX_WEIGHTS]
    elif kind == "gguf":
        candidates = sorted(path.glob("*.gguf"))
    else:
        candidates = sorted(path.glob("*.safetensors"))
    for candidate in candidates:
        if candidate.is_file() and candidate.stat().st_size > 0:
            return candidate
    raise AdapterError(
        f"{path} has no (non-empty) weights file for a {kind} release",
        fix="copy the complete adapter dir (adapter_model.safetensors is required)",
    )


def describe_release(adapter_path: str | Path) -> LoadedRelease:
    """Identify a release: version id = name of the resolved dir, sha256 of its weights.

    The path is resolved first so `.../active` (a symlink to `releases/<id>`) reports `<id>`.
    """
    path = Path(adapter_path).resolve()
    kind = adapter_kind(path)
    weights = weights_file(path, kind)
    return LoadedRelease(
        version_id=path.name, sha256=sha256_file(weights), path=str(path), kind=kind
    )


def base_model_of(adapter_path: Path, base_model: str | Path | None) -> str:
    """The base model for an adapter: the explicit one, else adapter_config's."""
    if base_model:
        return str(base_model)
    config = read_json(adapter_path / PEFT_CONFIG)
    name = config.get("base_model_name_or_path")
    if not name:
        raise AdapterError(
            f"{adapter_path / PEFT_CONFIG} names no base_model_name_or_path",
            fix="pass --base-model",
        )
    return str(name)


def chat_messages(text: str) -> list[dict[str, Any]]:
    """A TranslateGemma request: one user turn whose content names both languages."""
    item = {
        "type": "text",
        "source_lang_code": SOURCE_LANG,
        "target_lang_code": TARGET_LANG,
        "text": text,
    }
    return [{"role": "user", "content": [item]}]


def prompt_text(tokenizer: Any, text: str) -> str:
    """Render the prompt through the tokenizer's own chat template (as for a real model)."""
    return tokenizer.apply_chat_template(
        chat_messages(text), tokenize=False, add_generation_prompt=True
    )


def generation_budget(n_input_tokens: int) -> int:
    """New-token budget that grows with the input.

    Spanish runs longer than English and small tokenizers split words finely; three tokens per
    input token plus a floor keeps an answer from being cut before its expected words.
    """
    return min(16 + 3 * n_input_tokens, 2048)


def token_budget(n_input_tokens: int, max_new_tokens: int | None = None) -> int:
    """The new tokens an engine decodes at most: its own budget, lowered (never raised) by a
    caller's cap (OpenAI's max_tokens), so a request cannot make it decode for longer."""
    budget = generation_budget(n_input_tokens)
    return budget if max_new_tokens is None else max(1, min(max_new_tokens, budget))


def finish_reason(new_ids: list[int], budget: int, stop_ids: set[int]) -> str:
    """Why decoding ended: `length` when it used the whole budget without ending on a stop
    token, else `stop`."""
    ended = bool(new_ids) and new_ids[-1] in stop_ids
    return "length" if len(new_ids) >= budget and not ended else "stop"


class SwappingEngine:
    """Reload for transformers engines: a no-op for the loaded release, else `_load` it.

    Subclasses set `self._lock` and `self._loaded` and implement `_load(release)`, which must
    replace what is serving only once the new release has loaded.
    """

    _lock: threading.RLock
    _loaded: LoadedRelease | None

    def _load(self, release: LoadedRelease) -> None:
        raise NotImplementedError

    def reload(self, adapter_path: str | Path) -> bool:
        """Swap in the release at `adapter_path`; False when it is already loaded."""
        with self._lock:
            try:
                release = describe_release(adapter_path)
                if self._loaded and (release.path, release.sha256) == (
                    self._loaded.path,
                    self._loaded.sha256,
                ):
                    return False
                self._load(release)
            except AdapterError as err:
                raise ReloadFailed(
                    f"reload of {adapter_path} failed: {err.one_line()}",
                    fix="the previous release is still serving",
                ) from err
            logging.getLogger(type(self).__module__).info(
                "reloaded %s (%s)", release.version_id, release.sha256[:8]
            )
            return True
