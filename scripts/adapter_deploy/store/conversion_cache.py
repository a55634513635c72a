"""The conversion cache: content keys, the cache layout, and building one entry.

A conversion is keyed by what decides its bytes:

    key = sha256(canonical JSON of {
        adapter: sha256 of adapter_config.json and adapter_model.safetensors (from the manifest,
                 checked against the files on disk),
        base:    a local base dir: "sha256:" + sha256 over (name, sha256) of every top-level file
                 (config.json, *.safetensors, tokenizer files, ...); a hub id: "hub:<id>",
        format (gguf: with its type, e.g. "gguf-Q4_K_M"), dtype,
        tools:   transformers, peft, torch and safetensors versions (gguf: also the installed
                 llama-cpp-python, the quantizer, and `gguf_converter`: the llama-cpp-python
                 release, llama.cpp commit and gguf-py version of the converter's source tree)
                 + RECIPE (this code's version)})

and lives in a local, content-addressed cache beside the version store (git-ignored, not DVC:
every entry can be rebuilt from DVC-tracked inputs):

    <adapters_dir>/.conversions/<key>/        the release dir: config.json, model*.safetensors,
                                              tokenizer files, conversion.json (provenance),
                                              quantization.json (bitsandbytes only);
                                              a gguf release: model.gguf + conversion.json
    <adapters_dir>/.conversions/<key>.json    sidecar: files {name: {sha256, size}}; written last,
                                              so a dir without it is an unfinished build
    <adapters_dir>/.conversions/base-identities.json   base hashes memoised by file size+mtime

A bitsandbytes release hard-links the merged release's weights (building that first when
needed) and adds quantization.json; a gguf release is written from the merged release (F16 by
llama.cpp's own converter, convert_hf_to_gguf.py, then requantized by llama.cpp for Q8_0 /
Q4_K_M). A gguf-lora release (adapter.gguf + base.json, convert/gguf_lora.py) names a
`gguf-base` entry: the base model alone converted the same way, keyed by the base's content,
the gguf tools and gguf_type only, so every adapter on that base shares one entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter_deploy.common.fsutil import atomic_write_json, file_lock, sha256_file

log = logging.getLogger("adapter_deploy.store.conversions")

PROVENANCE = "conversion.json"
RECIPE = 3  # bump when this code changes what a conversion writes
GGUF_FORMATS = ("gguf", "gguf-lora")  # keyed with their gguf_type and llama.cpp's tools
GGUF_BASE = "gguf-base"  # gguf-lora's base alone, keyed by base content, tools and gguf_type
_BASE_IDS = "base-identities.json"


@functools.cache  # what is installed does not change under a running process
def tool_versions() -> dict[str, Any]:
    """What produced the bytes: part of the cache key, so an upgrade reconverts."""
    from importlib.metadata import version

    tools = {name: version(name) for name in ("transformers", "peft", "torch", "safetensors")}
    return {**tools, "recipe": RECIPE}


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


@dataclass
class CacheJob:
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
        if fmt == GGUF_BASE:  # the base alone: no adapter, no merge dtype, no torch stack
            variant = f"{GGUF_BASE}-{self.gguf_type}"
            return conversion_key({}, self.base_id, variant, "", self.tools_for(fmt))
        variant = f"{fmt}-{self.gguf_type}" if fmt in GGUF_FORMATS else fmt
        return conversion_key(self.adapter, self.base_id, variant, self.dtype, self.tools_for(fmt))

    def tools_for(self, fmt: str) -> dict[str, Any]:
        """The gguf tools are part of a gguf key only: installing them reconverts nothing else."""
        if fmt not in (*GGUF_FORMATS, GGUF_BASE):
            return self.tools
        from adapter_deploy.convert.gguf import tool_versions as gguf_tools

        if fmt == GGUF_BASE:
            return {"recipe": RECIPE, **gguf_tools()}
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
        from adapter_deploy.convert import merge as convert_merge

        if fmt == "merged":
            convert_merge.merge_adapter(self.src, self.base, out, dtype=self.dtype)
            return {}
        if fmt in (GGUF_BASE, "gguf-lora"):
            return self._build_gguf_lora(fmt, out)
        merged_key, merged_files, _ = self.ensure("merged")
        if fmt == "gguf":
            from adapter_deploy.convert.gguf import convert_to_gguf

            convert_to_gguf(self.cache / merged_key, out, self.gguf_type)
            return {}
        out.mkdir(parents=True)
        for name in merged_files:
            if name != PROVENANCE:
                _link_or_copy(self.cache / merged_key / name, out / name)
        convert_merge.write_bnb_quantization(out)
        return {n: f for n, f in merged_files.items() if n != PROVENANCE}

    def _build_gguf_lora(self, fmt: str, out: Path) -> dict[str, dict[str, Any]]:
        """The base alone (converted from the base dir, no merge), or the LoRA naming it."""
        from adapter_deploy.convert import gguf_lora

        if fmt == GGUF_BASE:
            gguf_lora.convert_base(Path(self.base), out, self.gguf_type)
            return {}
        base_key, base_files, _ = self.ensure(GGUF_BASE)
        base = {
            "key": base_key,
            "version_id": gguf_lora.base_version_id(base_key),
            "gguf_type": self.gguf_type,
            "sha256": base_files["model.gguf"]["sha256"],
            "size": base_files["model.gguf"]["size"],
        }
        gguf_lora.convert_lora(self.src, Path(self.base), out, base)
        return {}

    def _provenance(self, fmt: str, key: str) -> str:
        data = {
            "format": fmt,
            "gguf_type": self.gguf_type if fmt in (*GGUF_FORMATS, GGUF_BASE) else None,
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
