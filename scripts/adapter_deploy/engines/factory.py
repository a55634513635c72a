"""An engine by platform or kind, with the adapter path forwarded (the operator's plan).

    platform (params.yaml endpoints.*.platform)   engine kind
    mlx                                           mlx  (MLXGemmaEngine)
    cuda, cpu                                     hf   (transformers + PEFT)
    auto                                          mlx on macOS, hf elsewhere
    whisper                                       whisper (transformers + PEFT Whisper)
    (any but mlx) a GGUF release                  llamacpp (LlamaCppEngine, llama-cpp-python)
    (any but mlx) a GGUF LoRA release (gguf-lora) llamacpp: its GGUF base + the LoRA, swappable

A transcription model (params.yaml `task: transcription`) always gets the Whisper engine
(`make_engine(..., task="transcription")`): there is no MLX Whisper engine, so the platform
does not change it.

`EngineSettings` holds what a service needs to find its adapters: the endpoint's adapter_dir
and, per model, the path it serves (default `<adapter_dir>/<model>/active`, the release
pointer the deployer flips).
"""

from __future__ import annotations

import platform as _platform
from dataclasses import dataclass, field
from pathlib import Path

from adapter_deploy.common.errors import UsageError
from adapter_deploy.engines.base import Engine, adapter_kind, base_model_of

ENGINE_KINDS = ("hf", "mlx", "whisper")
TASKS = ("translation", "transcription")
_PLATFORM_KINDS = {"mlx": "mlx", "cuda": "hf", "cpu": "hf", "hf": "hf", "whisper": "whisper"}
# By class name, so asking what an engine is never imports another engine's libraries.
_CLASS_KINDS = {
    "HFEngine": "hf",
    "MLXGemmaEngine": "mlx",
    "LlamaCppEngine": "llamacpp",
    "WhisperEngine": "whisper",
}


def engine_kind_for(platform_or_kind: str) -> str:
    """Map a platform name (or an engine kind, or "auto") to an engine kind."""
    if platform_or_kind == "auto":
        return "mlx" if _platform.system() == "Darwin" else "hf"
    try:
        return _PLATFORM_KINDS[platform_or_kind]
    except KeyError:
        raise UsageError(
            f"unknown engine/platform {platform_or_kind!r}",
            fix="use auto, hf, mlx or whisper (platforms: mlx, cuda, cpu)",
        ) from None


def kind_of(engine: object) -> str:
    """The kind of a built engine: hf, mlx, llamacpp or whisper (else its class name)."""
    name = type(engine).__name__
    return _CLASS_KINDS.get(name, name)


def make_engine(
    kind: str = "auto",
    adapter_path: str | Path | None = None,
    base_model: str | Path | None = None,
    device: str | None = None,
    task: str = "translation",
) -> Engine:
    """Build an engine serving `adapter_path` (or the base model alone when it is None).

    `base_model` defaults to the adapter's adapter_config.json base_model_name_or_path.
    `task="transcription"` (or kind "whisper") gives the Whisper engine whatever the platform.
    Raises AdapterError when the adapter or base cannot be loaded.
    """
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}", fix="use translation or transcription")
    kind = engine_kind_for(kind)
    if task == "transcription" or kind == "whisper":
        from adapter_deploy.engines.whisper_engine import WhisperEngine

        return WhisperEngine(adapter_path, base_model=base_model, device=device)
    if kind == "mlx":
        from adapter_deploy.engines.mlx_engine import MLXGemmaEngine

        if base_model is None:
            if adapter_path is None:
                raise UsageError("no adapter and no base model given", fix="pass one of them")
            base_model = base_model_of(Path(adapter_path), None)
        return MLXGemmaEngine(base_model, adapter_path=adapter_path)
    if adapter_path is not None and adapter_kind(Path(adapter_path)) == "gguf":
        from adapter_deploy.engines.llamacpp_engine import LlamaCppEngine

        return LlamaCppEngine(adapter_path)
    from adapter_deploy.engines.hf_engine import HFEngine

    return HFEngine(adapter_path, base_model=base_model, device=device)


@dataclass
class EngineSettings:
    """Where a service finds its adapters (the plan's `settings.py`: adapter_dir + per model)."""

    adapter_dir: Path
    platform: str = "auto"
    adapter_paths: dict[str, Path] = field(default_factory=dict)  # model -> explicit path

    def adapter_path(self, model: str) -> Path:
        """The path a model's adapter is served from; `active` is the deployer's pointer."""
        return self.adapter_paths.get(model, Path(self.adapter_dir) / model / "active")

    def engine_for(
        self, model: str, base_model: str | Path | None = None, task: str = "translation"
    ) -> Engine:
        """An engine for `model`, serving its active adapter, or the base when none exists."""
        path = self.adapter_path(model)
        if not path.exists():
            # Seed §6.4: with no adapter deployed the base model is the fallback.
            return make_engine(self.platform, adapter_path=None, base_model=base_model, task=task)
        return make_engine(self.platform, adapter_path=path, base_model=base_model, task=task)
