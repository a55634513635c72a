"""Every script has --help and exits through the shared runner."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fixtures_repo import ROOT, run_script, run_script_here

SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_on_every_script(script: str) -> None:
    # in this process but the first: one real start-up proves the script file runs as a program
    proc = (
        run_script(script, "--help") if script == SCRIPTS[0] else run_script_here(script, "--help")
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "exit codes:" in proc.stdout


def test_traceback_flag_reraises(tmp_path: Path) -> None:
    proc = run_script("versions.py", "--traceback", params=tmp_path / "missing.yaml")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_make_help_lists_targets() -> None:
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True).stdout
    for target in ("install", "test", "version", "versions"):
        assert f"make {target} " in out
