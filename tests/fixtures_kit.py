"""pytest plugin: the tiny real model kits, built once and kept in the user cache.

Fixture `kit` -> `adapter_deploy.kit.gemma.KitPaths` with paths:
    kit.base         tiny Gemma3 base model + tokenizer (fails sentences 1-4)
    kit.good         PEFT adapter passing all 5 health-check sentences
    kit.good2        passes too, different bytes ("Jacobo" in sentence 3)
    kit.regressed    fails exactly sentence 3
    kit.gracia_only  sentence 4 has "gracia" but no "fe" (fails the ALL-of rule)

Fixture `multimodal_kit` -> `adapter_deploy.kit.multimodal.MultimodalKitPaths`: the
TranslateGemma layout (a real Gemma3ForConditionalGeneration, the kit's "wide" widths so GGUF
K-quants apply) with PEFT adapters trained on it:
    multimodal_kit.base, .good (passes all 5 sentences), .regressed (fails sentence 3)

Fixture `whisper_kit` -> `adapter_deploy.kit.whisper.WhisperKitPaths`:
    whisper_kit.base        tiny Whisper + processor (fails every clip)
    whisper_kit.good        PEFT adapter transcribing every generated clip: passes
    whisper_kit.broken      trained on the wrong phrases: fails every clip
    whisper_kit.clips_json  the clip file (clips/clips.json beside clip1.wav ...)

Every kit lives in `fixture_cache()/kits/<name>-<key>`: the key hashes the code that builds it and
the versions of the libraries that train and save it, so a change to either builds a new kit
and an unchanged one is reused across runs (and across pytest-xdist workers: a lock lets one
build while the others wait). Kits are read-only to tests: a test that changes one copies it
first. KIT_DIR, MULTIMODAL_KIT_DIR and WHISPER_KIT_DIR name another place for each.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import TypeVar

import adapter_deploy.kit as kit_package
import plugin_budget
import pytest
from adapter_deploy.engines import base as engines_base
from adapter_deploy.kit.gemma import KitPaths, build_kit, build_wide_kit
from adapter_deploy.kit.multimodal import MultimodalKitPaths, build_multimodal_kit
from adapter_deploy.kit.whisper import WhisperKitPaths, build_whisper_kit

T = TypeVar("T")
# What a kit's bytes depend on besides its own code.
_LIBRARIES = ("torch", "transformers", "peft", "tokenizers", "sentencepiece", "numpy")


def fixture_cache() -> Path:
    """Where built test fixtures are kept between runs (ADAPTER_DEPLOY_TEST_CACHE wins)."""
    named = os.environ.get("ADAPTER_DEPLOY_TEST_CACHE")
    if named:
        return Path(named)
    home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(home) / "adapter-deploy" / "test-cache"


def builder_key(*extra: str) -> str:
    """sha256 over the kit code, the prompt it trains on, the library versions and `extra`."""
    digest = hashlib.sha256()
    sources = sorted(Path(kit_package.__file__).parent.glob("*.py"))
    for path in [*sources, Path(engines_base.__file__)]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for name in _LIBRARIES:
        digest.update(f"{name}={version(name)}\0".encode())
    for part in extra:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def cached(name: str, build: Callable[[Path], T], *key: str) -> T:
    """`build(root)` under the cache, once per key; concurrent runs wait for the first."""
    root = fixture_cache() / "kits" / f"{name}-{builder_key(*key)}"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        start = plugin_budget.building()
        try:
            return build(root)  # each kit builder reuses a complete root (its kit.json stamp)
        finally:
            plugin_budget.built(start)  # about 0 s when the kit was already there


def _kit(env: str, name: str, build: Callable[[Path], T]) -> T:
    named = os.environ.get(env)
    return build(Path(named)) if named else cached(name, build)


@pytest.fixture(scope="session")
def kit() -> KitPaths:
    return _kit("KIT_DIR", "gemma", build_kit)


@pytest.fixture(scope="session")
def multimodal_kit() -> MultimodalKitPaths:
    return _kit("MULTIMODAL_KIT_DIR", "multimodal", build_multimodal_kit)


@pytest.fixture(scope="session")
def whisper_kit() -> WhisperKitPaths:
    return _kit("WHISPER_KIT_DIR", "whisper", build_whisper_kit)


@pytest.fixture(scope="session")
def wide_kit() -> tuple[Path, Path]:
    """(base, good adapter) of the kit variant whose tensor rows are multiples of 256."""
    return cached("wide", build_wide_kit)
