"""MLX engine: a base model loaded once with mlx-lm, LoRA adapters swapped in place.

`MLXGemmaEngine(base_model, adapter_path=...)` takes either the trainer's PEFT adapter dir
(converted on the fly into a private cache dir) or an already converted MLX adapter dir.
Applying an adapter mirrors `mlx_lm.tuner.utils.load_adapters` (wrap linears in LoRA layers,
load the weights) and then checks that every adapter tensor landed in the model and that the
output changed: older mlx-lm loads a wrongly keyed adapter without a word.

`reload()` removes the LoRA layers and applies the new adapter to the same base weights; when
that fails the previous adapter is applied again and ReloadFailed is raised.

The service reloads in two steps so that live requests never wait for a load: `prepare(path)`
hashes, converts and reads the new adapter into host memory (numpy, on any thread: nothing
there is an MLX computation, and MLX must be driven from one thread only); `switch()`, on the
serving thread between two requests, turns those arrays into MLX ones and applies them. When
the new adapter has the serving one's shape (the same LoRA layers and tensor names, as every
cycle of one model has), its weights replace the serving ones in the layers already there.

A staged release is checked beside the serving one the same way (the service's in-service
pre-check): `load_candidate(path)` reads it into host memory off the serving thread;
`candidate()` puts its weights into the LoRA layers for the calls made inside and the serving
adapter's back after them (MLX's load_weights only re-points the layers at arrays already in
memory); `drop_candidate()` forgets it. A candidate needs the serving adapter's LoRA layers.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import AdapterError, ReloadFailed
from adapter_deploy.engines.base import (
    MLX_WEIGHTS,
    PEFT_CONFIG,
    LoadedRelease,
    NotBeside,
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
    weights: dict[str, Any]  # name -> mx.array (numpy until switch(): see host_weights)

    def same_layers(self, other: _Adapter | None) -> bool:
        """Whether `other` occupies exactly the LoRA layers this one needs."""
        return (
            other is not None
            and other.config.get("num_layers") == self.config.get("num_layers")
            and other.config.get("lora_parameters") == self.config.get("lora_parameters")
            and set(other.weights) == set(self.weights)
        )


def host_weights(path: Path) -> dict[str, Any]:
    """An MLX adapter file's tensors as numpy arrays (bfloat16 kept bit for bit as uint16:
    numpy has no bfloat16), read without MLX so that it can run off the serving thread."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for name, tensor in load_file(str(path)).items():
        if tensor.dtype == torch.bfloat16:
            out[name] = ("bfloat16", tensor.view(torch.uint16).numpy())
        else:
            out[name] = (None, tensor.numpy())
    return out


def mx_array() -> type:
    import mlx.core as mx

    return mx.array


def to_mlx(weights: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx

    out = {}
    for name, (dtype, array) in weights.items():
        value = mx.array(array)
        out[name] = value.view(mx.bfloat16) if dtype == "bfloat16" else value
    return out


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
        self._staging = threading.Lock()  # one prepare() or candidate load at a time
        self._prepared: _Adapter | None = None
        self._candidate: _Adapter | None = None  # read, checked beside the serving adapter
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
            if self.prepare(adapter_path) == "noop":
                return False
            self.switch()
            return True

    def prepare(self, adapter_path: str | Path, release: LoadedRelease | None = None) -> str:
        """Hash, convert and read the release into host memory, off the serving thread.

        "noop": it is already serving; "prepared": `switch()` applies it. A release that
        cannot be read or converted raises ReloadFailed; nothing serving changed."""
        with self._staging:
            self._prepared = None
            try:
                release = release or describe_release(adapter_path)
                if self.loaded and (release.path, release.sha256) == (
                    self.loaded.path,
                    self.loaded.sha256,
                ):
                    return "noop"
                self._prepared = self._read_adapter(release, on_host=True)
            except AdapterError as err:
                raise ReloadFailed(
                    f"reload of {adapter_path} failed: {err.one_line()}",
                    fix="the previous adapter is still serving",
                ) from err
            return "prepared"

    def switch(self) -> LoadedRelease:
        """Apply the prepared adapter (on the serving thread, between two requests); on
        failure the previous one is applied again and ReloadFailed raised."""
        with self._lock:
            adapter, self._prepared = self._prepared, None
            if adapter is None:
                raise AdapterError("no release is prepared", fix="prepare() it first")
            adapter.weights = to_mlx(adapter.weights)
            previous = self._active
            try:
                if adapter.same_layers(previous):
                    self._refill(adapter)
                else:
                    self._swap(adapter)
            except AdapterError as err:
                self._swap(previous)
                raise ReloadFailed(
                    f"reload of {adapter.release.path} failed: {err.one_line()}",
                    fix="the previous adapter is still serving",
                ) from err
            log.info("reloaded %s (%s)", adapter.release.version_id, adapter.release.sha256[:8])
            return adapter.release

    # --- a candidate beside the serving adapter (the in-service pre-check) ---------------
    def candidate_refusal(self, adapter_path: str | Path) -> str | None:
        """Why the release cannot be checked beside the serving one (None: it can). Reads
        it (off the serving thread) and keeps what it read as the candidate."""
        with self._staging:
            self._candidate = None
            release = describe_release(adapter_path)
            if release.kind not in ("peft", "mlx"):
                return f"a {release.kind} release needs its own model, not an adapter on this base"
            if self._active is None:
                return "this engine serves no adapter to check a candidate beside"
            candidate = self._read_adapter(release, on_host=True)
            if not candidate.same_layers(self._active):
                return "its LoRA layers (rank, modules, layers) differ from the serving adapter's"
            self._candidate = candidate
            return None

    def load_candidate(self, adapter_path: str | Path) -> LoadedRelease:
        """Read the release beside the serving adapter; it serves nothing yet."""
        why = self.candidate_refusal(adapter_path)
        if why or self._candidate is None:
            raise NotBeside(f"cannot check {Path(adapter_path).name} in place: {why}")
        return self._candidate.release

    @contextmanager
    def candidate(self) -> Iterator[LoadedRelease]:
        """Serve with the candidate's weights for the calls inside; the serving adapter's
        weights are put back after them."""
        with self._lock:
            candidate, active = self._candidate, self._active
            if candidate is None or active is None:
                raise AdapterError("no candidate is loaded", fix="load_candidate() first")
            if not isinstance(next(iter(candidate.weights.values())), mx_array()):
                # once, on the serving thread; kept only when every tensor fits
                on_device = _Adapter(candidate.release, candidate.config, to_mlx(candidate.weights))
                self._check_fits(on_device)
                candidate.weights = on_device.weights
            self.model.load_weights(list(candidate.weights.items()), strict=False)
            try:
                yield candidate.release
            finally:
                self.model.load_weights(list(active.weights.items()), strict=False)

    def drop_candidate(self) -> None:
        with self._staging:
            self._candidate = None

    def _refill(self, adapter: _Adapter) -> None:
        """New weights into the LoRA layers the serving adapter already built. The serving
        adapter passed the output-change probe on these very layers, and every one of them is
        overwritten (same tensor names), so only the landing is checked again."""
        self._active = None
        self._load_verified(adapter, probe=False)
        self._active = adapter

    def _read_adapter(self, release: LoadedRelease, on_host: bool = False) -> _Adapter:
        """Read (converting a PEFT dir first) an adapter into memory: MLX arrays, or numpy
        ones (`on_host`) that `to_mlx` turns into MLX arrays on the serving thread."""
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
            if on_host:
                weights = host_weights(source / MLX_WEIGHTS)
            else:
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

    def _check_fits(self, adapter: _Adapter) -> None:
        """Every tensor has a LoRA layer of its shape in the model (raises AdapterError)."""
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

    def _load_verified(self, adapter: _Adapter, probe: bool = True) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        self._check_fits(adapter)
        self.model.load_weights(list(adapter.weights.items()), strict=False)
        self.model.eval()
        mx.eval(list(adapter.weights.values()))  # a damaged file fails here, not mid-request
        # load_weights stores the very arrays it is given: landed = the model holds them
        loaded = dict(tree_flatten(self.model.parameters()))
        stray = [n for n, w in adapter.weights.items() if loaded.get(n) is not w]
        if stray:
            raise AdapterError(
                f"adapter tensors did not land: {', '.join(stray[:5])}",
                fix="check the adapter's key names against the model",
            )
        any_update = probe and any(
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
