"""Phase 1, VERSION (the operator's plan): validate, hash, copy, record, DVC-track, commit, tag.

Nothing is written until the adapter has passed every check; a failure after
the copy removes what this run created.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from adapter_deploy import signing
from adapter_deploy.common.adapter import (
    METRICS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    check_adapter,
    read_metrics,
)
from adapter_deploy.common.clock import utc_text
from adapter_deploy.common.errors import UsageError
from adapter_deploy.common.fsutil import sha256_file
from adapter_deploy.config import Params, check_name
from adapter_deploy.store import registry
from adapter_deploy.store.manifest import load_manifest, updating_manifest, versions_of

log = logging.getLogger(__name__)


@dataclass
class VersionResult:
    model: str
    version_id: str
    path: Path
    created: bool
    tags: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # the plan's metrics not given
    pushed_to: str | None = None  # the DVC remote that holds it; None: only this machine

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version_id": self.version_id,
            "path": str(self.path),
            "created": self.created,
            "metrics_missing": self.missing,
            "tags": self.tags,
            "pushed_to": self.pushed_to,
        }


def make_version_id(cycle: int, sha256: str, when: datetime) -> str:
    return f"cycle{cycle}_{when.strftime('%Y%m%d')}_{sha256[:8]}"


def _existing(manifest: dict, model: str, cycle: int, files: dict) -> dict | None:
    for entry in versions_of(manifest, model):
        same = all(entry["files"].get(n, {}).get("sha256") == f["sha256"] for n, f in files.items())
        if entry["cycle"] == cycle and same:
            return entry
    return None


def _stage_copy(src: Path, dest: Path, metrics: dict | None) -> dict[str, dict[str, Any]]:
    """Copy the adapter into a hidden dir beside `dest`, then rename it into place."""
    staging = dest.with_name(f".incoming-{dest.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copyfile(src / PEFT_CONFIG, staging / PEFT_CONFIG)
    shutil.copyfile(src / PEFT_WEIGHTS, staging / PEFT_WEIGHTS)
    if metrics is not None:
        (staging / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    files = {
        p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(staging.iterdir())
    }
    staging.rename(dest)
    return files


def _source_files(src: Path, metrics: dict | None) -> dict[str, dict[str, str]]:
    """The content identity of what would be versioned (for idempotency)."""
    identity = {
        PEFT_CONFIG: {"sha256": sha256_file(src / PEFT_CONFIG)},
        PEFT_WEIGHTS: {"sha256": sha256_file(src / PEFT_WEIGHTS)},
    }
    if metrics is not None:
        metrics_bytes = (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode()
        identity[METRICS] = {"sha256": hashlib.sha256(metrics_bytes).hexdigest()}
    return identity


def _cycle_tag(repo: Path, cycle: int, message: str, retag: bool) -> str:
    name = f"cycle{cycle}"
    if not registry.tags(repo, name) or retag:
        registry.tag(repo, name, message, move=retag)
        return name
    k = 1
    while registry.tags(repo, f"{name}.{k}"):
        k += 1
    registry.tag(repo, f"{name}.{k}", message)
    log.warning("tag %s exists and is not moved; this version is tagged %s.%d", name, name, k)
    return f"{name}.{k}"


def _gto_tag(repo: Path, model: str, cycle: int, version_id: str) -> str:
    minor = len(registry.tags(repo, f"{model}@v{cycle}.*"))
    name = f"{model}@v{cycle}.{minor}.0"
    registry.tag(repo, name, f"Registering artifact {model} version {version_id}")
    return name


def version_adapter(
    params: Params,
    model: str,
    cycle: int,
    src: Path,
    metrics_file: Path | None = None,
    retag: bool = False,
    now: datetime | None = None,
) -> VersionResult:
    model_params = params.model(check_name("model", model))
    if cycle < 1:
        raise UsageError(f"cycle must be a positive integer, got {cycle}", "pass CYCLE=1 or higher")
    if metrics_file is not None and not metrics_file.is_file():
        raise UsageError(f"metrics file {metrics_file} not found", "pass an existing METRICS file")
    check_adapter(src)
    metrics, missing = read_metrics(metrics_file or src / METRICS)
    if metrics is None:
        log.warning("no training metrics (no %s beside the adapter, no METRICS=)", METRICS)
    elif missing:
        log.warning("training metrics lack %s", ", ".join(missing))
    adapters_dir = params.adapters_dir
    repo = registry.repo_root(adapters_dir)
    identity = _source_files(src, metrics)
    existing = _existing(load_manifest(adapters_dir), model, cycle, identity)
    if existing:
        vid = existing["version_id"]
        log.info("%s %s already holds these bytes; nothing changed", model, vid)
        return VersionResult(
            model,
            vid,
            adapters_dir / model / vid,
            created=False,
            missing=missing,
            pushed_to=registry.default_remote_url(repo),  # pushed when it was made
        )

    when = now or datetime.now(UTC)
    sha = identity[PEFT_WEIGHTS]["sha256"]
    version_id = make_version_id(cycle, sha, when)
    dest = adapters_dir / model / version_id
    if dest.exists():
        raise UsageError(
            f"{dest} exists but is not in the manifest",
            "remove that stray directory (or restore manifest.json from git) and rerun",
        )
    base = json.loads((src / PEFT_CONFIG).read_text()).get("base_model_name_or_path")
    if base and base != model_params.base_model:
        log.warning(
            "adapter was trained on %s; params.yaml names %s for %s (fine if the same model)",
            base,
            model_params.base_model,
            model,
        )
    files = _stage_copy(src, dest, metrics)
    extra_paths = [declare_artifact(repo, adapters_dir, model, model_params)]
    if params.store.remote:
        extra_paths.append(
            registry.use_remote(repo, params.store.remote, params.store.remote_config)
        )
    try:
        git_paths, pushed_to = registry.track(repo, dest)
    except Exception:
        shutil.rmtree(dest, ignore_errors=True)
        dest.with_name(dest.name + ".dvc").unlink(missing_ok=True)
        raise
    entry = {
        "version_id": version_id,
        "created": utc_text(when),
        "cycle": cycle,
        "sha256": sha,
        "base_model": base,
        **({"training_metrics": metrics} if metrics is not None else {}),
        "files": files,
    }
    entry["signed"] = _signature(params, model, entry)
    with updating_manifest(adapters_dir, f"version {model} {version_id}") as manifest:
        manifest["versions"].setdefault(model, []).append(entry)
        manifest["endpoints"] = _endpoint_summary(params)
    registry.commit(
        repo,
        [adapters_dir / "manifest.json", adapters_dir / ".gitignore", *git_paths, *extra_paths],
        f"version {model} {version_id}",
    )
    message = f"cycle {cycle}: {model} {version_id}"
    tags = [_cycle_tag(repo, cycle, message, retag), _gto_tag(repo, model, cycle, version_id)]
    if pushed_to is None:
        log.warning(
            "no DVC remote: %s %s exists only on this machine (set store.remote in params.yaml)",
            model,
            version_id,
        )
    return VersionResult(
        model, version_id, dest, created=True, tags=tags, missing=missing, pushed_to=pushed_to
    )


def declare_artifact(repo: Path, adapters_dir: Path, model: str, model_params: Any) -> Path:
    """The model as an `artifacts:` entry of the store's dvc.yaml (DVC's model registry:
    `dvc.api.artifacts_show`, Studio and `gto` list it, and read its versions from the
    `<model>@vN.k.0` tags); the dvc.yaml file, for the version's commit."""
    path = repo / "dvc.yaml"
    data = (yaml.safe_load(path.read_text()) if path.exists() else None) or {}
    entry = {
        "path": str((adapters_dir / model).relative_to(repo)),
        "type": "model",
        "desc": f"{model_params.task} LoRA adapters for {model_params.base_model}",
        "labels": [model_params.task, "lora", "peft"],
    }
    if data.get("artifacts", {}).get(model) != entry:
        data.setdefault("artifacts", {})[model] = entry
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _signature(params: Params, model: str, entry: dict[str, Any]) -> dict[str, Any] | None:
    """Signed metadata for the version, or None (unsigned, with a warning) without a key."""
    key = signing_key(params, entry["version_id"])
    if key is None:
        return None
    return signing.sign(
        key, signing.version_metadata(entry, model, params.store.signature_expiry_days)
    )


def signing_key(params: Params, what: str):
    """The training machine's Ed25519 key, or None (with a warning that `what` is unsigned)."""
    if not params.store.signing_key:
        log.warning("no signing key (store.signing_key): %s is unsigned", what)
        return None
    path = params.resolve(params.store.signing_key)
    registry.refuse_unignored_secret(path)
    if not path.is_file():
        raise UsageError(
            f"signing key {path} not found", "create it with make keygen, or unset signing_key"
        )
    return signing.load_private(path)


def _endpoint_summary(params: Params) -> dict[str, dict[str, Any]]:
    keys = ("host", "user", "adapter_dir", "reload_method", "platform")
    return {
        name: {k: getattr(ep, k) for k in keys if getattr(ep, k) is not None}
        for name, ep in params.endpoints.items()
    }
