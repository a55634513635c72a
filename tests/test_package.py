"""The project is one installed package: a plain (non-editable) install works, nothing depends
on where the package's files lie, and the layer rule holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures_repo import ROOT

# The end-to-end tier (make test-e2e): the built package installed and run.
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install .` (no deps: they are this venv's) into a folder of its own."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--target", str(target), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return target


def _run(installed: Path, cwd: Path, code: str, *argv: str, stdin: str = ""):
    """Python with the plain install first on its path (before the editable one)."""
    env = {**os.environ, "PYTHONPATH": str(installed)}
    env.pop("PARAMS", None)
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
    )


def test_plain_install_holds_every_layer_and_no_test_kit_is_needed(installed: Path) -> None:
    package = installed / "adapter_deploy"
    for layer in ("common", "engines", "agent", "service", "store", "deploy", "cli", "kit"):
        assert (package / layer / "__init__.py").is_file(), layer
    assert (package / "api.py").is_file() and (package / "protocol.py").is_file()
    assert not (installed / "deploycore").exists() and not (installed / "engines").exists()
    proc = _run(installed, installed, "import adapter_deploy; print(adapter_deploy.__file__)")
    assert proc.stdout.strip() == str(package / "__init__.py"), proc.stderr


def test_installed_agent_answers_a_session(installed: Path, tmp_path: Path) -> None:
    request = json.dumps({"op": "status", "service_url": None}) + "\n"
    proc = _run(
        installed,
        tmp_path,
        "import runpy; runpy.run_module('adapter_deploy.agent', run_name='__main__')",
        "session",
        "--adapter-dir",
        str(tmp_path / "ep"),
        "--read-only",
        stdin=request,
    )
    assert proc.returncode == 0, proc.stderr
    ready, reply = (json.loads(line) for line in proc.stdout.splitlines())
    assert ready["result"]["protocol"] >= 2 and reply == {"ok": True, "result": {"models": {}}}


def test_installed_cli_finds_params_from_the_working_directory(installed, tmp_path) -> None:
    """Relative paths belong to the params file, never to where the package lies."""
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"store": {"adapters_dir": "store"}, "models": {"m1": {"base_model": "b"}}})
    )
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "manifest.json").write_text(json.dumps({"versions": {"m1": []}}))
    (tmp_path / "sub").mkdir()
    versions = "from adapter_deploy.cli.versions import entry; entry()"
    proc = _run(installed, tmp_path / "sub", versions, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"m1": []}
    proc = _run(installed, Path("/"), versions)
    assert proc.returncode == 2 and "params file /params.yaml not found" in proc.stderr


def test_no_sys_path_edits_anywhere() -> None:
    offenders = []
    for path in ROOT.rglob("*.py"):
        if {".venv", ".git", "build"} & set(path.relative_to(ROOT).parts):
            continue
        text = path.read_text()
        if "sys.path." in text.replace("no sys.path", "") or "sys.path[" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == [str(Path(__file__).relative_to(ROOT))]  # only this test's own needles


def test_the_layer_rule_holds() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert "2 kept, 0 broken" in proc.stdout
