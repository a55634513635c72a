"""Phase 2, CONVERT (merged formats): merge + requantize a version, cached by content.

`convert_release()` finds the version, builds (or finds) its conversion in the cache
(store/conversion_cache.py: the content key and the cache layout) and records it once in
the manifest's "conversions" list (model, version_id, format, key, sha256, size, files,
created, signed), so the endpoint verifies it like an adapter, signature included. Converting
the same inputs again finds the key and recomputes nothing (`cache_hit`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter_deploy.common.adapter import PEFT_CONFIG, PEFT_WEIGHTS
from adapter_deploy.common.clock import utc_now
from adapter_deploy.common.errors import AdapterError, UsageError
from adapter_deploy.common.fsutil import sha256_file
from adapter_deploy.config import Params, check_name, check_version_id
from adapter_deploy.store import registry
from adapter_deploy.store.conversion_cache import (
    GGUF_BASE,
    GGUF_FORMATS,
    CacheJob,
    base_identity,
    tool_versions,
)
from adapter_deploy.store.manifest import (
    find_version,
    ignore_in_store,
    load_manifest,
    updating_manifest,
)

log = logging.getLogger(__name__)

FORMATS = ("merged", "bitsandbytes", "gguf", "gguf-lora")
CACHE_DIR = ".conversions"


@dataclass
class BaseRelease:
    """gguf-lora's base alone, as a release of its own (deployed once, before the LoRA)."""

    version_id: str
    path: Path
    files: dict[str, dict[str, Any]]
    key: str
    cache_hit: bool
    signed: dict[str, Any] | None = None  # signed metadata (None: no signing key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version_id": self.version_id,
            "path": str(self.path),
            "files": self.files,
            "size": sum(f["size"] for f in self.files.values()),
            "key": self.key,
        }


@dataclass
class ConversionResult:
    model: str
    version_id: str
    format: str
    path: Path  # the release dir to transfer (a transformers model dir)
    files: dict[str, dict[str, Any]]  # name -> {sha256, size}
    cache_hit: bool
    key: str = ""
    seconds: float = 0.0
    base_identity: str = ""
    tools: dict[str, Any] = field(default_factory=dict)
    gguf_type: str | None = None  # Q4_K_M / Q8_0 / F16 for format gguf (gguf-lora: its base)
    signed: dict[str, Any] | None = None  # signed metadata, as for versions (None: no key)
    base: BaseRelease | None = None  # gguf-lora: the GGUF base release the LoRA applies to

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version_id": self.version_id,
            "format": self.format,
            "gguf_type": self.gguf_type,
            "path": str(self.path),
            "files": self.files,
            "size": self.size,
            "cache_hit": self.cache_hit,
            "key": self.key,
            "seconds": round(self.seconds, 3),
            **({"base": self.base.to_dict()} if self.base else {}),
        }


def local_base_dir(params: Params, base_model: str) -> Path | None:
    """The base model as a local dir (relative paths against the project root), else None."""
    path = params.resolve(base_model)
    return path if (path / "config.json").is_file() else None


def convert_release(
    params: Params,
    model: str,
    version_id: str,
    fmt: str,
    base_model: str | None = None,
    dtype: str = "float16",
    gguf_type: str = "Q4_K_M",
) -> ConversionResult:
    """Convert a versioned adapter to `fmt` (or find it cached) and record it in the manifest.

    `base_model` overrides params.yaml's models.<model>.base_model; `gguf_type` (Q4_K_M, Q8_0
    or F16) applies to format gguf, and to gguf-lora's base (its LoRA is F16).
    """
    start = time.perf_counter()
    model_params = params.model(check_name("model", model))
    check_version_id(version_id)
    if fmt not in FORMATS:
        raise UsageError(f"unknown conversion format {fmt!r}", fix="use " + ", ".join(FORMATS))
    if model_params.task != "translation":
        raise UsageError(
            f"{model} is a {model_params.task} model; merged formats are built for translation "
            "(causal LM) models only",
            fix="serve it with format: adapter",
        )
    if fmt in GGUF_FORMATS:
        from adapter_deploy.convert import gguf as convert_gguf

        if gguf_type not in convert_gguf.GGUF_TYPES:
            raise UsageError(
                f"unknown GGUF type {gguf_type!r}", fix="use " + ", ".join(convert_gguf.GGUF_TYPES)
            )
        convert_gguf.check_tools(gguf_type)
    adapters_dir = params.adapters_dir
    entry = _trusted_version(
        params, model, find_version(load_manifest(adapters_dir), model, version_id)
    )
    src = _checked_source(adapters_dir, model, entry)
    base = base_model or model_params.base_model
    local = local_base_dir(params, base)
    if fmt == "gguf-lora" and local is None:
        raise AdapterError(
            f"format gguf-lora converts the base model {base!r} itself, which needs it as a "
            "local dir (config.json, safetensors, tokenizer.model)",
            fix=f"download it and set models.{model}.base_model to its directory, "
            "or use format gguf",
        )
    cache = adapters_dir / CACHE_DIR
    ignore_in_store(adapters_dir, f"/{CACHE_DIR}/")  # rebuildable machine state
    job = CacheJob(
        cache=cache,
        src=src,
        base=str(local or base),
        adapter={name: entry["files"][name]["sha256"] for name in (PEFT_CONFIG, PEFT_WEIGHTS)},
        base_id=base_identity(base, local, cache),
        dtype=dtype,
        tools=tool_versions(),
        gguf_type=gguf_type,
    )
    key, files, hit = job.ensure(fmt)
    gguf = fmt in GGUF_FORMATS
    result = ConversionResult(
        model,
        version_id,
        fmt,
        cache / key,
        files,
        hit,
        key,
        0.0,
        job.base_id,
        job.tools_for(fmt),
        gguf_type if gguf else None,
    )
    if fmt == "gguf-lora":
        result.base = _base_release(params, model, job, base)
    result.signed = _record(params, entry, result, base)
    registry.commit_records(
        adapters_dir, ["manifest.json", ".gitignore"], f"convert {model} {version_id} to {fmt}"
    )
    result.seconds = time.perf_counter() - start
    log.info(
        "%s %s -> %s: %s (%s)",
        model,
        version_id,
        fmt,
        "cache hit" if hit else "converted",
        result.path,
    )
    return result


def _base_release(params: Params, model: str, job: CacheJob, base_model: str) -> BaseRelease:
    """The cached base a gguf-lora conversion names (built with it, so a cache hit here),
    signed as cycle 0 of `<model>-gguf-base` where there is a signing key: a trusting endpoint
    stages only signed releases."""
    from adapter_deploy import signing
    from adapter_deploy.convert.gguf_lora import base_model_name, base_version_id
    from adapter_deploy.store.versioning import signing_key

    key, files, hit = job.ensure(GGUF_BASE)
    found = BaseRelease(base_version_id(key), job.cache / key, files, key, hit)
    name = base_model_name(model)
    private = signing_key(params, f"{name} {found.version_id}")
    if private is not None:
        entry = {"version_id": found.version_id, "cycle": 0, "created": utc_now()}
        entry.update(files=files, base_model=base_model)
        days = params.store.signature_expiry_days
        found.signed = signing.sign(private, signing.version_metadata(entry, name, days))
    return found


def _trusted_version(params: Params, model: str, entry: dict[str, Any]) -> dict[str, Any]:
    """What a conversion may trust about its source. A signed version: its verified signed
    metadata (files, cycle, created), never the manifest's unsigned copy, so a conversion
    is never signed over weights the version's signature does not cover."""
    signed = entry.get("signed")
    if not signed:
        return entry
    from adapter_deploy import signing
    from adapter_deploy.store.versioning import signing_key

    key = signing_key(params, f"{model} {entry['version_id']}")
    if key is None:  # nothing will be signed: a trusting endpoint refuses the result anyway
        return entry
    public = signing.public_pem(key)
    metadata = signing.verify(signed, {signing.key_id(public): public}, model, entry["version_id"])
    return {**entry, **metadata, "signed": signed}


def _checked_source(adapters_dir: Path, model: str, entry: dict[str, Any]) -> Path:
    """The version dir, with its adapter files matching the (signed) record."""
    src = adapters_dir / model / entry["version_id"]
    if not src.is_dir():
        raise UsageError(
            f"{src} is not in the working tree",
            fix=f"fetch it with `dvc pull {src}.dvc`",
        )
    bad = [
        name
        for name in (PEFT_CONFIG, PEFT_WEIGHTS)
        if not (src / name).is_file() or sha256_file(src / name) != entry["files"][name]["sha256"]
    ]
    if bad:
        raise AdapterError(
            f"{src}: {', '.join(bad)} missing or not what the "
            + ("signed metadata" if entry.get("signed") else "manifest")
            + " records; nothing was converted or signed",
            fix=f"restore it with `dvc checkout {src}.dvc`",
        )
    return src


def _record(
    params: Params, version: dict[str, Any], result: ConversionResult, base_model: str
) -> dict[str, Any] | None:
    """Add the conversion to the manifest once per (model, version, format, key), signed when
    there is a signing key (an unsigned entry gets signed once a key exists); its signature."""
    ident = (result.model, result.version_id, result.format, result.key)
    adapters_dir = params.adapters_dir
    with updating_manifest(adapters_dir, f"convert {result.model} {result.version_id}") as data:
        for e in data["conversions"]:
            if (e.get("model"), e.get("version_id"), e.get("format"), e.get("key")) == ident:
                if e.get("signed") is None:
                    e["signed"] = _signature(params, version, e)
                return e["signed"]
        weights = sorted(n for n in result.files if n.endswith((".safetensors", ".gguf")))
        data["conversions"].append(
            {
                "model": result.model,
                "version_id": result.version_id,
                "format": result.format,
                **({"gguf_type": result.gguf_type} if result.gguf_type else {}),
                "key": result.key,
                "sha256": result.files[weights[0]]["sha256"] if weights else None,
                "size": result.size,
                "files": result.files,
                "base_model": base_model,
                "base_identity": result.base_identity,
                "tools": result.tools,
                "created": utc_now(),
            }
        )
        entry = data["conversions"][-1]
        entry["signed"] = _signature(params, version, entry)
        return entry["signed"]


def _signature(
    params: Params, version: dict[str, Any], conversion: dict[str, Any]
) -> dict[str, Any] | None:
    from adapter_deploy import signing
    from adapter_deploy.store.versioning import signing_key

    what = f"{conversion['model']} {conversion['version_id']} ({conversion['format']})"
    key = signing_key(params, what)
    if key is None:
        return None
    days = params.store.signature_expiry_days
    return signing.sign(
        key, signing.conversion_metadata(version, conversion, conversion["model"], days)
    )
