"""What `make install` / `make install-endpoint` install: every imported package is declared,
an endpoint's code needs only the serving dependencies, and uv.lock pins them for every machine
(torch and llama-cpp-python excepted: their build depends on the machine)."""

from __future__ import annotations

import ast
import functools
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from fixtures_repo import ROOT

# The end-to-end tier (make test-e2e): package installs (uv sync into fresh venvs).
pytestmark = pytest.mark.e2e


PACKAGE = ROOT / "scripts" / "adapter_deploy"
# The code that runs on an endpoint (make install-endpoint), per the import-linter contract.
ENDPOINT_SIDE = ["agent", "service", "engines", "health.py", "config.py", "signing.py",
                 "protocol.py", "common"]  # fmt: skip
# Imported only where the hardware has them, each behind a clear error (CUDA, llama.cpp build).
MACHINE_BUILT = {"bitsandbytes", "llama-cpp-python", "llama_cpp"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _declared(*groups: str) -> set[str]:
    project = _pyproject()["project"]
    reqs = list(project["dependencies"]) if "core" in groups else []
    for group in groups:
        reqs += project["optional-dependencies"].get(group, [])
        reqs += _pyproject().get("dependency-groups", {}).get(group, [])
    return {_name(r) for r in reqs}


def _third_party_imports(paths: list[Path]) -> dict[str, set[str]]:
    """Top-level module -> files importing it, for every module outside stdlib and the project."""
    found: dict[str, set[str]] = {}
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*.py")))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in {
                    "adapter_deploy",
                    "__future__",
                }:
                    found.setdefault(top, set()).add(path.name)
    return found


@functools.cache
def _installed() -> dict[str, list[str]]:
    return packages_distributions()


def _distributions(module: str) -> set[str]:
    dists = _installed().get(module, [])
    return {d.lower().replace("_", "-") for d in dists} or {module.lower().replace("_", "-")}


def _undeclared(paths: list[Path], declared: set[str]) -> dict[str, set[str]]:
    return {
        module: files
        for module, files in _third_party_imports(paths).items()
        if module not in MACHINE_BUILT and not _distributions(module) & (declared | MACHINE_BUILT)
    }


def test_every_package_the_project_imports_is_declared() -> None:
    everything = _declared("core", "train", "s3", "gguf", "dev")
    assert _undeclared([PACKAGE], everything) == {}
    tests_and_bench = [ROOT / "tests", ROOT / "bench"]
    local = {p.stem for d in tests_and_bench for p in d.glob("*.py")}
    missing = _undeclared(tests_and_bench, everything)
    assert {m: f for m, f in missing.items() if m not in local} == {}


def test_endpoint_code_needs_only_the_serving_dependencies() -> None:
    """make install-endpoint installs no dvc, gto or dev tools: the endpoint's code must run
    without them."""
    paths = [PACKAGE / p for p in ENDPOINT_SIDE]
    assert _undeclared(paths, _declared("core", "gguf")) == {}
    training_only = _declared("train", "dev") - _declared("core")
    assert {"dvc", "gto", "pytest", "ruff"} <= training_only


def test_the_check_fails_on_an_undeclared_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import yaml\nimport dvc.api\n")
    assert set(_undeclared([module], _declared("core"))) == {"dvc"}
    assert _undeclared([module], _declared("core", "train")) == {}


@pytest.fixture(scope="module")
def lock() -> dict:
    return tomllib.loads((ROOT / "uv.lock").read_text())


def test_uv_lock_pins_every_declared_dependency_for_every_machine(lock: dict) -> None:
    locked = {p["name"]: p for p in lock["package"]}
    for name in _declared("core", "train", "gguf", "dev") - {"torch", "llama-cpp-python"}:
        assert name in locked, f"{name} is declared but not in uv.lock: run make lock"
    # One lock for the Linux training machine, Linux NVIDIA boxes and Macs: MLX is locked for both.
    mlx_wheels = [w["url"] for w in locked["mlx"].get("wheels", [])]
    assert any("macosx" in u for u in mlx_wheels) and any("linux" in u for u in mlx_wheels)


def test_torch_and_llama_cpp_stay_out_of_the_lock_and_the_makefile_pins_torch(lock: dict) -> None:
    """Their build depends on the machine (CPU wheel, CUDA, Metal); a locked PyPI torch would be
    the CUDA build everywhere on Linux."""
    overrides = _pyproject()["tool"]["uv"]["override-dependencies"]
    assert {_name(o) for o in overrides} == {"torch", "llama-cpp-python"}
    assert all("sys_platform == 'never'" in o for o in overrides)
    assert not any(p["name"].startswith("nvidia-") for p in lock["package"])
    pinned = [r for r in _pyproject()["project"]["dependencies"] if _name(r) == "torch"]
    make_pin = re.search(r"^TORCH_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert make_pin and pinned == [f"torch=={make_pin.group(1)}"]


def test_python_is_pinned_for_uv() -> None:
    version = (ROOT / ".python-version").read_text().strip()
    floor = _pyproject()["project"]["requires-python"].removeprefix(">=")
    assert version == floor == f"{sys.version_info.major}.{sys.version_info.minor}"
