"""pytest plugin: the tiny real model kit, built once per test session.

Fixture `kit` -> `adapter_deploy.kit.gemma.KitPaths` with paths:
    kit.base         tiny Gemma3 base model + tokenizer (fails sentences 1-4)
    kit.good         PEFT adapter passing all 5 health-check sentences
    kit.good2        passes too, different bytes ("Jacobo" in sentence 3)
    kit.regressed    fails exactly sentence 3
    kit.gracia_only  sentence 4 has "gracia" but no "fe" (fails the ALL-of rule)
Set KIT_DIR to reuse a kit across sessions (it is rebuilt only when incomplete).

Fixture `multimodal_kit` -> `adapter_deploy.kit.multimodal.MultimodalKitPaths`: the
TranslateGemma layout (a real Gemma3ForConditionalGeneration, the kit's "wide" widths so GGUF
K-quants apply) with PEFT adapters trained on it:
    multimodal_kit.base, .good (passes all 5 sentences), .regressed (fails sentence 3)
Set MULTIMODAL_KIT_DIR to reuse it across sessions.

Fixture `whisper_kit` -> `adapter_deploy.kit.whisper.WhisperKitPaths`:
    whisper_kit.base        tiny Whisper + processor (fails every clip)
    whisper_kit.good        PEFT adapter transcribing every generated clip: passes
    whisper_kit.broken      trained on the wrong phrases: fails every clip
    whisper_kit.clips_json  the clip file (clips/clips.json beside clip1.wav ...)
Set WHISPER_KIT_DIR to reuse it across sessions.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from adapter_deploy.kit.gemma import KitPaths, build_kit, build_wide_kit
from adapter_deploy.kit.multimodal import MultimodalKitPaths, build_multimodal_kit
from adapter_deploy.kit.whisper import WhisperKitPaths, build_whisper_kit


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> KitPaths:
    root = os.environ.get("KIT_DIR")
    return build_kit(Path(root) if root else tmp_path_factory.mktemp("kit"))


@pytest.fixture(scope="session")
def multimodal_kit(tmp_path_factory: pytest.TempPathFactory) -> MultimodalKitPaths:
    root = os.environ.get("MULTIMODAL_KIT_DIR")
    return build_multimodal_kit(Path(root) if root else tmp_path_factory.mktemp("mm_kit"))


@pytest.fixture(scope="session")
def whisper_kit(tmp_path_factory: pytest.TempPathFactory) -> WhisperKitPaths:
    root = os.environ.get("WHISPER_KIT_DIR")
    return build_whisper_kit(Path(root) if root else tmp_path_factory.mktemp("whisper_kit"))


@pytest.fixture(scope="session")
def wide_kit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base, good adapter) of the kit variant whose tensor rows are multiples of 256."""
    return build_wide_kit(tmp_path_factory.mktemp("wide_kit"))
