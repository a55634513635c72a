"""pytest plugin: a versioned store for conversion tests.

Fixture `versioned` (module scope) -> `Versioned`: a real git + DVC store with kit.good
versioned as gemma_4b cycle 1 on the kit base; `convert(...)` runs scripts/convert.py on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import yaml
from fixtures_repo import Store, make_store, run_script


@dataclass
class Versioned:
    store: Store
    version_id: str

    def convert(self, *args: str):
        return run_script("convert.py", "--model", "gemma_4b", *args, params=self.store.params)

    def convert_json(self, *args: str) -> dict:
        proc = self.convert(*args, "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def conversions(self) -> list[dict]:
        return self.store.manifest()["conversions"]


@pytest.fixture(scope="module")
def versioned(kit, tmp_path_factory) -> Versioned:
    """A real git + DVC store with kit.good versioned as gemma_4b cycle 1 on the kit base."""
    store = make_store(tmp_path_factory.mktemp("convert"))
    models = {
        "gemma_4b": {"task": "translation", "base_model": str(kit.base)},
        "whisper": {"task": "transcription", "base_model": "kit/tiny-whisper"},
    }
    data = {"store": {"adapters_dir": str(store.adapters)}, "models": models}
    store.params.write_text(yaml.safe_dump(data, sort_keys=False))
    proc = run_script(
        "version.py",
        "--model",
        "gemma_4b",
        "--cycle",
        "1",
        "--src",
        str(kit.good),
        "--json",
        params=store.params,
    )
    assert proc.returncode == 0, proc.stderr
    return Versioned(store, json.loads(proc.stdout)["version_id"])
