"""The system-tool check make runs before anything is installed (common/prereqs.py).

A machine without rsync: the check names rsync with its apt-get and Homebrew commands and
exits 2, run by path on the machine's own python3 and through a real `make demo`, which then
installs nothing and starts nothing.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from adapter_deploy.common import prereqs
from fixtures_repo import ROOT

PREREQS = ROOT / "scripts" / "adapter_deploy" / "common" / "prereqs.py"
# the interpreter itself, not the venv's link to it: the check runs before any venv exists
SYSTEM_PYTHON = Path(sys.executable).resolve()
RSYNC_LINE = (
    "missing rsync: sends releases to endpoints. Install: sudo apt-get install -y rsync "
    "(Debian/Ubuntu) or brew install rsync (macOS)"
)


def bin_without_rsync(tmp_path: Path) -> Path:
    """A PATH directory holding python3 and git only (so: no rsync, no uv)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(SYSTEM_PYTHON)
    git = shutil.which("git")
    assert git, "the tests need git"
    (bin_dir / "git").symlink_to(git)
    return bin_dir


def bare_env(tmp_path: Path, bin_dir: Path) -> dict[str, str]:
    """No uv on PATH or in the cache; uv's own settings as on a fresh machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV"))}
    return {**env, "PATH": str(bin_dir), "HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": ""}


def test_the_table_names_both_install_commands_for_every_tool() -> None:
    for role, names in prereqs.ROLES.items():
        assert set(names) <= set(prereqs.TOOLS), role
    for name in prereqs.TOOLS:
        line = prereqs.missing_line(name)
        assert line.startswith(f"missing {name}: ") and "\n" not in line
        assert "sudo apt-get install -y " in line and "(Debian/Ubuntu)" in line
        assert any(mac in line for mac in ("brew install ", "xcode-select --install"))
    assert prereqs.install_hint("sshd").startswith("sudo apt-get install -y openssh-server ")
    assert {"sshd", "ssh-keygen", "cmake", "c++", "rsync", "git"} <= set(prereqs.ROLES["test"])


def test_it_runs_on_the_python_of_a_fresh_mac() -> None:
    """Xcode's python3 is 3.9: no syntax newer than that (uv brings 3.11 later)."""
    ast.parse(PREREQS.read_text(), feature_version=(3, 9))


def test_a_machine_without_rsync_gets_one_line_and_exit_2(tmp_path: Path) -> None:
    env = bare_env(tmp_path, bin_without_rsync(tmp_path))
    argv = [str(SYSTEM_PYTHON), "-I", str(PREREQS), "--role", "install", "--role", "demo"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [RSYNC_LINE] and proc.stdout == ""
    assert "Traceback" not in proc.stderr

    (tmp_path / "bin" / "rsync").symlink_to(shutil.which("rsync") or "/usr/bin/rsync")
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (0, "")


def _make_checkout(tmp_path: Path) -> Path:
    """The Makefile and the check, beside the files `make install` depends on: a real make
    run that must stop at the check (nothing else of the project is there to run)."""
    checkout = tmp_path / "checkout"
    (checkout / PREREQS.relative_to(ROOT)).parent.mkdir(parents=True)
    shutil.copy(PREREQS, checkout / PREREQS.relative_to(ROOT))
    for name in ("Makefile", "pyproject.toml", "uv.lock", ".python-version"):
        shutil.copy(ROOT / name, checkout / name)
    return checkout


@pytest.mark.parametrize(
    ("target", "missing"),
    [
        ("demo", ["rsync"]),
        ("deploy", ["rsync", "ssh"]),
        ("test", ["rsync", "ssh", "ssh-keygen", "cmake", "c++"]),
    ],
)
def test_make_stops_before_installing_anything(
    tmp_path: Path, target: str, missing: list[str]
) -> None:
    make = shutil.which("make")
    assert make, "the tests need make"
    checkout = _make_checkout(tmp_path)
    env = bare_env(tmp_path, bin_without_rsync(tmp_path))
    proc = subprocess.run([make, target], cwd=checkout, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("missing ")]
    named = [line.split(":")[0].removeprefix("missing ") for line in lines]
    assert [n for n in named if n != "sshd"] == missing, proc.stderr  # sshd: /usr/sbin/sshd
    if target == "demo":
        assert lines == [RSYNC_LINE]
    assert "Traceback" not in proc.stderr and "uv is missing" not in proc.stdout
    assert not (checkout / ".venv").exists(), "nothing installed"
    assert not (tmp_path / "home").exists(), "no uv fetched into the cache"
    assert not (checkout / "demo").exists(), "the demo did not start"


def test_make_prereqs_passes_here() -> None:
    """The target as the Makefile runs it (the machine's python3, uv's place in the cache):
    this machine runs the tests, so it has what a training machine needs."""
    make = shutil.which("make")
    assert make
    argv = [make, "-s", "prereqs", "PREREQS_ROLE=train"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
