"""MLX engine: a base model loaded once with mlx-lm, LoRA adapters swapped in place.

`MLXGemmaEngine(base_model, adapter_path=...)` takes either the trainer's PEFT adapter dir
(converted on the fly into a private cache dir) or an already converted MLX adapter dir.
Applying an adapter mirrors `mlx_lm.tuner.utils.load_adapters` (wrap linears in LoRA layers,
load the weights) and then checks that every adapter tensor landed in the model and that the
output changed: older mlx-lm loads a wrongly keyed adapter without a word.

`reload()` removes the LoRA layers and applies the new adapter to the same base weights; when
that fails the previous adapter is applied again and ReloadFailed is raised.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import AdapterError, ReloadFailed
from adapter_deploy.engines.base import (
    MLX_WEIGHTS,
    PEFT_CONFIG,
    LoadedRelease,
    Translation,
    describe_release,
    prompt_text,
    read_json,
    token_budget,
)
from adapter_deploy.engines.convert_mlx import convert_peft_to_mlx

log = logging.getLogger(__name__)

PROBE_TEXT = "Good morning, welcome to the service."


@dataclass
class _Adapter:
    """An MLX adapter held in memory, so a failed reload can re-apply it without disk."""

    release: LoadedRelease
    config: dict[str, Any]
    weights: dict[str, Any]  # name -> mx.array


class MLXGemmaEngine:
    """Translate with mlx-lm; hot-swap LoRA adapters without reloading the base."""

    def __init__(self, base_model: str | Path, adapter_path: str | Path | None = None) -> None:
        from mlx_lm import load

        self.base_model = str(base_model)
        try:
            self.model, self.tokenizer = load(self.base_model)
        except Exception as err:  # mlx-lm raises many types for a bad/missing model dir
            raise AdapterError(
                f"mlx-lm cannot load base model {base_model} ({err})",
                fix="pass --base-model with a local model dir",
            ) from err
        self._lock = threading.RLock()
        self._cache = tempfile.TemporaryDirectory(prefix="mlx-adapters-")
        self._base_probe = self._probe_logits()
        self._active: _Adapter | None = None
        if adapter_path is not None:
            self._swap(self._read_adapter(describe_release(adapter_path)))

    @property
    def loaded(self) -> LoadedRelease | None:
        return self._active.release if self._active else None

    def translate(self, text: str, max_new_tokens: int | None = None) -> Translation:
        from mlx_lm import stream_generate

        with self._lock:
            start = time.perf_counter()
            prompt = self.tokenizer.encode(
                prompt_text(self.tokenizer, text), add_special_tokens=False
            )
            n_text = len(self.tokenizer.encode(text, add_special_tokens=False))
            budget = token_budget(n_text, max_new_tokens)
            pieces, ended = [], "stop"
            # mlx_lm.generate() is this loop; its last response says why decoding ended.
            for response in stream_generate(
                self.model, self.tokenizer, prompt=prompt, max_tokens=budget
            ):
                pieces.append(response.text)
                ended = "length" if response.finish_reason == "length" else "stop"
            return Translation("".join(pieces).strip(), time.perf_counter() - start, ended)

    def reload(self, adapter_path: str | Path) -> bool:
        """Swap in the adapter at `adapter_path`; False when that release is already loaded."""
        with self._lock:
            try:
                release = describe_release(adapter_path)
                if self.loaded and (release.path, release.sha256) == (
                    self.loaded.path,
                    self.loaded.sha256,
                ):
                    return False
                adapter = self._read_adapter(release)
            except AdapterError as err:
                raise ReloadFailed(
                    f"reload of {adapter_path} failed: {err.one_line()}",
                    fix="the previous adapter is still serving",
                ) from err
            previous = self._active
            try:
                self._swap(adapter)
            except AdapterError as err:
                self._swap(previous)
                raise ReloadFailed(
                    f"reload of {adapter_path} failed: {err.one_line()}",
                    fix="the previous adapter is still serving",
                ) from err
            log.info("reloaded %s (%s)", adapter.release.version_id, adapter.release.sha256[:8])
            return True

    def _read_adapter(self, release: LoadedRelease) -> _Adapter:
        """Read (converting a PEFT dir first) an adapter into memory."""
        import mlx.core as mx

        source = Path(release.path)
        if release.kind == "merged":
            raise AdapterError(
                f"{source} is a merged model, not an adapter",
                fix="serve merged models with --engine hf",
            )
        if release.kind == "peft":
            source = convert_peft_to_mlx(
                source, Path(self._cache.name) / release.sha256, self.model
            )
        config = read_json(source / PEFT_CONFIG)
        if config.get("fine_tune_type", "lora") != "lora" or "lora_parameters" not in config:
            raise AdapterError(
                f"{source} is not an MLX LoRA adapter (fine_tune_type "
                f"{config.get('fine_tune_type')!r})",
                fix="convert a LoRA adapter",
            )
        try:
            weights = mx.load(str(source / MLX_WEIGHTS))
        except Exception as err:  # mlx raises RuntimeError/ValueError for damaged files
            raise AdapterError(
                f"{source / MLX_WEIGHTS} is not readable ({err})",
                fix="copy the adapter again; the file is damaged",
            ) from err
        return _Adapter(release, config, weights)

    def _swap(self, adapter: _Adapter | None) -> None:
        """Apply `adapter` (None = base only) to the base weights and verify it landed."""
        from mlx_lm.tuner.utils import linear_to_lora_layers, remove_lora_layers

        remove_lora_layers(self.model)
        self._active = None
        if adapter is None:
            return
        try:
            params = adapter.config["lora_parameters"]
            linear_to_lora_layers(self.model, int(adapter.config["num_layers"]), params)
        except (KeyError, TypeError, ValueError) as err:
            remove_lora_layers(self.model)
            raise AdapterError(
                f"adapter config is unusable ({err})",
                fix="re-convert it (adapter_deploy.engines.convert_mlx)",
            ) from err
        try:
            self._load_verified(adapter)
        except AdapterError:
            remove_lora_layers(self.model)
            raise
        self._active = adapter

    def _load_verified(self, adapter: _Adapter) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        lora_layers = {
            name: value
            for name, value in tree_flatten(self.model.parameters())
            if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
        }
        problems = _key_problems(adapter.weights, lora_layers)
        if problems:
            raise AdapterError(
                f"adapter {adapter.release.path} does not fit the model: " + "; ".join(problems),
                fix="convert the adapter for this base model (adapter_deploy.engines.convert_mlx)",
            )
        self.model.load_weights(list(adapter.weights.items()), strict=False)
        self.model.eval()
        loaded = dict(tree_flatten(self.model.parameters()))
        mx.eval(loaded)
        stray = [n for n, w in adapter.weights.items() if not mx.array_equal(loaded[n], w)]
        if stray:
            raise AdapterError(
                f"adapter tensors did not land: {', '.join(stray[:5])}",
                fix="check the adapter's key names against the model",
            )
        any_update = any(
            bool(mx.any(w != 0)) for n, w in adapter.weights.items() if n.endswith("lora_b")
        )
        if any_update and bool(mx.allclose(self._probe_logits(), self._base_probe)):
            raise AdapterError(
                "the adapter loaded but did not change the model's output",
                fix="check the adapter's key names against the model",
            )

    def _probe_logits(self):
        import mlx.core as mx

        ids = self.tokenizer.encode(
            prompt_text(self.tokenizer, PROBE_TEXT), add_special_tokens=False
        )
        logits = self.model(mx.array([ids]))[0, -1]
        mx.eval(logits)
        return logits

    def logits(self, ids: list[int]):
        """Full-sequence logits for `ids` (used to compare against the PEFT engine)."""
        import mlx.core as mx

        with self._lock:
            return self.model(mx.array([ids]))[0]


def _key_problems(weights: dict[str, Any], lora_layers: dict[str, Any]) -> list[str]:
    """Every way the adapter tensors fail to match the model's LoRA layers, listed at once."""
    problems = []
    for name, w in sorted(weights.items()):
        if name not in lora_layers:
            problems.append(f"{name} has no LoRA layer in the model")
        elif tuple(w.shape) != tuple(lora_layers[name].shape):
            problems.append(
                f"{name} shape {tuple(w.shape)} != model {tuple(lora_layers[name].shape)}"
            )
    # lora_b without lora_a would multiply trained B by mlx-lm's random A init.
    for name in weights:
        if name.endswith(".lora_b") and name[: -len("lora_b")] + "lora_a" not in weights:
            problems.append(f"{name} has no matching lora_a")
    if not weights:
        problems.append("the adapter holds no tensors")
    return problems
