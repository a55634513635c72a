"""The shipped example params files load with the project's own loader, and the README's
first-adapter walk-through names what examples/one-mac.yaml defines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from adapter_deploy.config import load_params
from fixtures_repo import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
ONE_MAC = ROOT / "examples" / "one-mac.yaml"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads(path: Path) -> None:
    params = load_params(path)
    assert params.models and params.endpoints


def test_one_mac_is_one_mac_endpoint_and_one_model() -> None:
    params = load_params(ONE_MAC)
    assert list(params.endpoints) == ["mac"]
    assert list(params.models) == ["gemma_4b"]
    mac = params.endpoints["mac"]
    assert (mac.platform, mac.reload_method) == ("mlx", "sigusr1")
    assert mac.service_url and mac.pidfile and mac.project_dir and mac.python
    assert set(mac.models or []) <= set(params.models)
    assert set(mac.base_models) <= set(params.models)


def test_the_readme_walk_through_names_the_example() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Your first adapter on one Mac", 1)[1].split("\n## ", 1)[0]
    params = load_params(ONE_MAC)
    assert "examples/one-mac.yaml" in section
    endpoints = set(re.findall(r"ENDPOINT=([A-Za-z0-9_-]+)", section))
    models = set(re.findall(r"MODEL=([A-Za-z0-9_-]+)", section))
    assert endpoints == set(params.endpoints), endpoints
    assert models == set(params.models), models
