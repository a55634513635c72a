"""Phase 2, CONVERT (merged formats): merge + requantize a version, cached by content.

A conversion is keyed by what decides its bytes:

    key = sha256(canonical JSON of {
        adapter: sha256 of adapter_config.json and adapter_model.safetensors (from the manifest,
                 checked against the files on disk),
        base:    a local base dir: "sha256:" + sha256 over (name, sha256) of every top-level file
                 (config.json, *.safetensors, tokenizer files, ...); a hub id: "hub:<id>",
        format (gguf: with its type, e.g. "gguf-Q4_K_M"), dtype,
        tools:   transformers, peft, torch and safetensors versions (gguf: also gguf and
                 llama-cpp-python) + RECIPE (this code's version)})

and lives in a local, content-addressed cache beside the version store (git-ignored, not DVC:
every entry can be rebuilt from DVC-tracked inputs):

    <adapters_dir>/.conversions/<key>/        the release dir: config.json, model*.safetensors,
                                              tokenizer files, conversion.json (provenance),
                                              quantization.json (bitsandbytes only);
                                              a gguf release: model.gguf + conversion.json
    <adapters_dir>/.conversions/<key>.json    sidecar: files {name: {sha256, size}}; written last,
                                              so a dir without it is an unfinished build
    <adapters_dir>/.conversions/base-identities.json   base hashes memoised by file size+mtime

Converting the same inputs again finds the key and recomputes nothing (`cache_hit`). A
bitsandbytes release hard-links the merged release's weights (building that first when needed)
and adds quantization.json; a gguf release is written from the merged release (F16 by the
`gguf` writer, then requantized by llama.cpp for Q8_0 / Q4_K_M). Every conversion is recorded
once in the manifest's "conversions" list (model, version_id, format, key, sha256, size, files,
created, signed), so the endpoint verifies it like an adapter, signature included.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deploycore.adapter import CONFIG, WEIGHTS
from deploycore.config import Params, check_name, check_version_id
from deploycore.errors import AdapterError, UsageError
from deploycore.fsutil import atomic_write_json, file_lock, sha256_file
from deploycore.manifest import find_version, load_manifest, updating_manifest

log = logging.getLogger(__name__)

FORMATS = ("merged", "bitsandbytes", "gguf")
CACHE_DIR = ".conversions"
PROVENANCE = "conversion.json"
RECIPE = 2  # bump when this code changes what a conversion writes
_BASE_IDS = "base-identities.json"


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
    gguf_type: str | None = None  # Q4_K_M / Q8_0 / F16 for format gguf
    signed: dict[str, Any] | None = None  # signed metadata, as for versions (None: no key)

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
        }


def tool_versions() -> dict[str, Any]:
    """What produced the bytes: part of the cache key, so an upgrade reconverts."""
    from importlib.metadata import version

    tools = {name: version(name) for name in ("transformers", "peft", "torch", "safetensors")}
    return {**tools, "recipe": RECIPE}


def local_base_dir(params: Params, base_model: str) -> Path | None:
    """The base model as a local dir (relative paths against the project root), else None."""
    path = params.resolve(base_model)
    return path if (path / "config.json").is_file() else None


def base_identity(base_model: str, local: Path | None, cache: Path | None = None) -> str:
    """A hub id names itself; a local dir is hashed (memoised in `cache` by size and mtime)."""
    if local is None:
        return f"hub:{base_model}"
    files = sorted(p for p in local.iterdir() if p.is_file())
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo_path = cache / _BASE_IDS if cache else None
    memo = _read_json(memo_path) if memo_path else {}
    known = memo.get(str(local.resolve()))
    if known and known.get("stamp") == stamp:
        return known["identity"]
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.name}\0{sha256_file(p)}\n".encode())
    identity = "sha256:" + digest.hexdigest()
    if memo_path:
        memo[str(local.resolve())] = {"stamp": stamp, "identity": identity}
        atomic_write_json(memo_path, memo)
    return identity


def conversion_key(
    adapter: dict[str, str], base_id: str, fmt: str, dtype: str, tools: dict[str, Any]
) -> str:
    """The content key of a conversion (see the module docstring)."""
    inputs = {"adapter": adapter, "base": base_id, "format": fmt, "dtype": dtype, "tools": tools}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


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
    or F16) applies to format gguf only.
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
    if fmt == "gguf":
        from engines import convert_gguf

        if gguf_type not in convert_gguf.GGUF_TYPES:
            raise UsageError(
                f"unknown GGUF type {gguf_type!r}", fix="use " + ", ".join(convert_gguf.GGUF_TYPES)
            )
        if not convert_gguf.tools_available(gguf_type):
            raise AdapterError(
                convert_gguf.TOOLS_HINT, fix="run `make gguf-tools`, or use format merged"
            )
    adapters_dir = params.adapters_dir
    entry = find_version(load_manifest(adapters_dir), model, version_id)
    src = _checked_source(adapters_dir, model, entry)
    base = base_model or model_params.base_model
    local = local_base_dir(params, base)
    cache = adapters_dir / CACHE_DIR
    _ignore_cache_dir(adapters_dir)
    job = _Job(
        cache=cache,
        src=src,
        base=str(local or base),
        adapter={name: entry["files"][name]["sha256"] for name in (CONFIG, WEIGHTS)},
        base_id=base_identity(base, local, cache),
        dtype=dtype,
        tools=tool_versions(),
        gguf_type=gguf_type,
    )
    key, files, hit = job.ensure(fmt)
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
        gguf_type if fmt == "gguf" else None,
    )
    result.signed = _record(params, entry, result, base)
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


def _checked_source(adapters_dir: Path, model: str, entry: dict[str, Any]) -> Path:
    """The version dir, with its adapter files matching the manifest."""
    src = adapters_dir / model / entry["version_id"]
    if not src.is_dir():
        raise UsageError(
            f"{src} is not in the working tree",
            fix=f"fetch it with `dvc pull {src}.dvc`",
        )
    bad = [
        name
        for name in (CONFIG, WEIGHTS)
        if not (src / name).is_file() or sha256_file(src / name) != entry["files"][name]["sha256"]
    ]
    if bad:
        raise AdapterError(
            f"{src}: {', '.join(bad)} missing or not what the manifest records",
            fix=f"restore it with `dvc checkout {src}.dvc`",
        )
    return src


@dataclass
class _Job:
    """One conversion request: builds (or finds) a format's release in the cache."""

    cache: Path
    src: Path
    base: str
    adapter: dict[str, str]
    base_id: str
    dtype: str
    tools: dict[str, Any]
    gguf_type: str = "Q4_K_M"

    def key(self, fmt: str) -> str:
        variant = f"gguf-{self.gguf_type}" if fmt == "gguf" else fmt
        return conversion_key(self.adapter, self.base_id, variant, self.dtype, self.tools_for(fmt))

    def tools_for(self, fmt: str) -> dict[str, Any]:
        """The gguf tools are part of a gguf key only: installing them reconverts nothing else."""
        if fmt != "gguf":
            return self.tools
        from engines.convert_gguf import tool_versions as gguf_tools

        return {**self.tools, **gguf_tools()}

    def ensure(self, fmt: str) -> tuple[str, dict[str, dict[str, Any]], bool]:
        """(key, files, cache_hit) for `fmt`, building it under a per-key lock when missing."""
        key = self.key(fmt)
        files = _cached(self.cache, key)
        if files is not None:
            return key, files, True
        with file_lock(
            self.cache / f".{key}.lock", f"convert pid {os.getpid()}", f"conversion {key[:12]}"
        ):
            files = _cached(self.cache, key)  # another run may have built it meanwhile
            if files is not None:
                return key, files, True
            incoming = self.cache / f".incoming-{key}"
            shutil.rmtree(incoming, ignore_errors=True)
            shutil.rmtree(self.cache / key, ignore_errors=True)  # an unfinished build
            try:
                known = self._build(fmt, incoming)
                (incoming / PROVENANCE).write_text(self._provenance(fmt, key))
                files = _describe(incoming, known)
                incoming.rename(self.cache / key)
            finally:
                shutil.rmtree(incoming, ignore_errors=True)
            atomic_write_json(self.cache / f"{key}.json", {"format": fmt, "files": files})
        return key, files, False

    def _build(self, fmt: str, out: Path) -> dict[str, dict[str, Any]]:
        """Write `fmt`'s release into `out`; return the hashes already known of its files."""
        from engines import convert_merge

        if fmt == "merged":
            convert_merge.merge_adapter(self.src, self.base, out, dtype=self.dtype)
            return {}
        merged_key, merged_files, _ = self.ensure("merged")
        if fmt == "gguf":
            from engines.convert_gguf import convert_to_gguf

            convert_to_gguf(self.cache / merged_key, out, self.gguf_type)
            return {}
        out.mkdir(parents=True)
        for name in merged_files:
            if name != PROVENANCE:
                _link_or_copy(self.cache / merged_key / name, out / name)
        convert_merge.write_bnb_quantization(out)
        return {n: f for n, f in merged_files.items() if n != PROVENANCE}

    def _provenance(self, fmt: str, key: str) -> str:
        data = {
            "format": fmt,
            "gguf_type": self.gguf_type if fmt == "gguf" else None,
            "key": key,
            "adapter": self.adapter,
            "base_model": self.base,
            "base_identity": self.base_id,
            "dtype": self.dtype,
            "tools": self.tools_for(fmt),
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _cached(cache: Path, key: str) -> dict[str, dict[str, Any]] | None:
    """The files of a finished cache entry (present, with the recorded sizes), else None."""
    files = _read_json(cache / f"{key}.json").get("files")
    if not files or not (cache / key).is_dir():
        return None
    for name, info in files.items():
        path = cache / key / name
        if not path.is_file() or path.stat().st_size != info["size"]:
            log.warning("conversion cache entry %s is damaged (%s); rebuilding it", key, name)
            return None
    return files


def _describe(release: Path, known: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(p for p in release.iterdir() if p.is_file()):
        info = known.get(path.name) or {"sha256": sha256_file(path)}
        files[path.name] = {"sha256": info["sha256"], "size": path.stat().st_size}
    return files


def _link_or_copy(src: Path, dst: Path) -> None:
    """Cache entries are immutable, so formats sharing weights share their bytes on disk."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _ignore_cache_dir(adapters_dir: Path) -> None:
    """The conversion cache is rebuildable machine state, never something to commit."""
    ignore = adapters_dir / ".gitignore"
    lines = ignore.read_text().splitlines() if ignore.exists() else []
    if f"/{CACHE_DIR}/" not in lines:
        ignore.write_text("\n".join([*lines, f"/{CACHE_DIR}/"]) + "\n")


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
                "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
        entry = data["conversions"][-1]
        entry["signed"] = _signature(params, version, entry)
        return entry["signed"]


def _signature(
    params: Params, version: dict[str, Any], conversion: dict[str, Any]
) -> dict[str, Any] | None:
    from deploycore import signing
    from deploycore.versioning import signing_key

    what = f"{conversion['model']} {conversion['version_id']} ({conversion['format']})"
    key = signing_key(params, what)
    if key is None:
        return None
    days = params.store.signature_expiry_days
    return signing.sign(
        key, signing.conversion_metadata(version, conversion, conversion["model"], days)
    )
