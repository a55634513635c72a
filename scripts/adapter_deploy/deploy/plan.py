"""What a deploy moves: releases, per-endpoint formats and settings, outcomes, the dry run.

Pure planning: nothing here touches an endpoint (deploy.py does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import UsageError
from adapter_deploy.config import EndpointParams, Params
from adapter_deploy.protocol import Reload
from adapter_deploy.store.manifest import load_manifest, pick_version

DEFAULT_LINKS = {
    "fine_tuned_whisper_mi": "whisper",
    "fine_tuned_gemma_mi_A": "gemma_4b",
    "fine_tuned_gemma_mi_B": "gemma_12b",
}


@dataclass
class Release:
    """One model version chosen for a deploy, with its local files."""

    model: str
    version_id: str
    cycle: int
    files: dict[str, dict[str, Any]]
    local_dir: Path
    signed: dict[str, Any] | None = None
    requested: dict[str, Any] | None = None  # the operator's --cycle or --version, as asked
    converted: bool = False  # a conversion of the adapter (merged, bitsandbytes, gguf)
    base: Release | None = None  # gguf-lora: the GGUF base release, deployed before this one

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files.values())


@dataclass
class ModelOutcome:
    model: str
    version_id: str | None
    status: str = "pending"  # success | unchanged | aborted | rolled_back | failed | dry_run
    phases: list[str] = field(default_factory=list)
    health: dict[str, Any] = field(default_factory=dict)
    bytes_sent: int = 0
    previous: str | None = None
    error: str | None = None
    exit_code: int = 0


@dataclass
class EndpointOutcome:
    endpoint: str
    models: list[ModelOutcome] = field(default_factory=list)
    error: str | None = None
    exit_code: int = 0
    duration_s: float = 0.0

    @property
    def worst(self) -> int:
        return max([self.exit_code, *(m.exit_code for m in self.models)])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exit_code": self.worst}


def choose_releases(
    params: Params, models: list[str], cycle: int | None, version: str | None = None
) -> list[Release]:
    """Resolve each model's version before anything moves (clear error otherwise)."""
    manifest = load_manifest(params.adapters_dir)
    chosen = []
    for model in models:
        params.model(model)
        entry = pick_version(manifest, model, cycle, version)
        local = params.adapters_dir / model / entry["version_id"]
        requested = {"version_id": version} if version else {"cycle": cycle}
        release = Release(
            model,
            entry["version_id"],
            entry["cycle"],
            entry["files"],
            local,
            entry.get("signed"),
            requested,
        )
        missing = [n for n in release.files if not (local / n).is_file()]
        if missing:
            raise UsageError(
                f"{model} {release.version_id} is not present locally (missing {missing})",
                "fetch it with `dvc pull` first",
            )
        chosen.append(release)
    return chosen


def release_format(ep: EndpointParams, model: str) -> str:
    """What this endpoint serves for `model`: the adapter itself or a conversion of it."""
    return ep.formats.get(model) or ep.format or "adapter"


def for_endpoint(params: Params, ep: EndpointParams, release: Release) -> Release:
    """The release as this endpoint takes it: converted (cached by content) where needed."""
    fmt = release_format(ep, release.model)
    if fmt == "adapter":
        return release
    from adapter_deploy.store.conversions import convert_release

    converted = convert_release(
        params, release.model, release.version_id, fmt, gguf_type=ep.gguf_type
    )
    base = None
    if converted.base is not None:
        from adapter_deploy.convert.gguf_lora import base_model_name

        found = converted.base
        name = base_model_name(release.model)
        # Asked for by its exact id: a trusting endpoint orders bases by nothing but that.
        asked = {"version_id": found.version_id}
        base = Release(name, found.version_id, 0, found.files, found.path, found.signed, asked)
        base.converted = True
    return Release(
        release.model,
        release.version_id,
        release.cycle,
        converted.files,
        Path(converted.path),
        converted.signed,
        release.requested,
        converted=True,
        base=base,
    )


def engine_kind(params: Params, ep: EndpointParams) -> str:
    return params.health_check.engine if params.health_check.engine != "auto" else ep.platform


def base_model_for(params: Params, ep: EndpointParams, model: str) -> str:
    return ep.base_models.get(model) or params.models[model].base_model


def reload_spec(ep: EndpointParams) -> Reload:
    return Reload(ep.reload_method, ep.pidfile, ep.restart_command)


def links_for(ep: EndpointParams) -> dict[str, str]:
    return ep.compat_links or DEFAULT_LINKS


def dry_run_plan(params: Params, endpoints: list[str], chosen: list[Release]) -> list[str]:
    """What a deploy would do, per endpoint and model; touches nothing."""
    lines = []
    for name in endpoints:
        ep = params.endpoint(name)
        where = "locally" if ep.transport == "local" else f"over ssh to {ep.host}"
        for r in chosen:
            fmt = release_format(ep, r.model)
            size = f"{r.size} bytes" if fmt == "adapter" else f"its {fmt} conversion"
            if fmt == "gguf-lora":
                size += " (after its GGUF base, once: sent, pre-checked by load and generate)"
            lines.append(
                f"[{name}] {r.model} {r.version_id}: transfer {size} {where} into "
                f"{ep.adapter_dir}/{r.model}/releases/, verify sha256, pre-check "
                f"({engine_kind(params, ep)} on {base_model_for(params, ep, r.model)}), "
                f"activate, reload ({ep.reload_method}), verify"
            )
    return lines
