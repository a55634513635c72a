"""The system tools each role needs, and the command that installs each one.

Usage:
    python3 -I scripts/adapter_deploy/common/prereqs.py --role install --role demo [--uv PATH]
    make prereqs [PREREQS_ROLE=demo]   # make demo, test, test-e2e, deploy, bootstrap,
                                       # gguf-tools run it first, before anything is installed

Roles (what needs which tool; make checks "install" with every role):
    install   make install: uv, or a python3 that can make the venv uv goes into (python3 -m
              venv: Debian's python3-venv); Python 3.11 unless uv may download it
    train     the training machine: git, rsync, ssh (make deploy, make bootstrap)
    demo      make demo: git, rsync (its endpoint is local: no ssh)
    gguf      make gguf-tools builds llama-cpp-python: cmake, a C++ compiler
    test      make test / test-e2e: train + gguf, and sshd and ssh-keygen (the tests'
              endpoints are a real sshd on 127.0.0.1)
    endpoint  make install-endpoint (make bootstrap runs it there): python3, rsync

Prints one line per missing tool, naming what needs it and how to install it on
Debian/Ubuntu (apt-get) and on macOS (Homebrew, or the Xcode command-line tools), and
exits 2; prints nothing and exits 0 when every tool is here. Nothing is installed or
started. `make doctor` words the endpoint's missing tools from the same table.

This file runs before `make install`, on the machine's own python3 (the 3.9 of a Mac
will do; uv brings the Python of .python-version): standard library only, run by path
with `-I`, which keeps the checkout off the import path.

Exit codes: 0 every tool found, 2 a tool is missing (or a bad flag).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass

# The oldest Python the project runs on (.python-version, pyproject's requires-python).
MIN_PYTHON = (3, 11)
XCODE = "xcode-select --install"


@dataclass(frozen=True)
class Tool:
    name: str  # as the operator knows it
    needed_for: str  # what needs it, in a few words
    apt: str  # the Debian/Ubuntu package(s)
    mac: str  # the macOS install command
    commands: tuple[str, ...] = ()  # found when any is on PATH (default: name)
    paths: tuple[str, ...] = ()  # ... or any of these files is executable
    modules: tuple[str, ...] = ()  # ... or any of these modules imports here


TOOLS = {
    t.name: t
    for t in (
        Tool("git", "the version store (git tags, DVC)", "git", XCODE),
        Tool("rsync", "sends releases to endpoints", "rsync", "brew install rsync"),
        Tool("ssh", "reaches endpoints", "openssh-client", "brew install openssh"),
        Tool("ssh-keygen", "the tests' ssh keys", "openssh-client", "brew install openssh"),
        Tool(
            "sshd",
            "the tests' endpoints (a real sshd on 127.0.0.1)",
            "openssh-server",
            "brew install openssh",
            paths=("/usr/sbin/sshd",),
        ),
        Tool("cmake", "building llama-cpp-python (make gguf-tools)", "cmake", "brew install cmake"),
        Tool(
            "c++",
            "building llama-cpp-python (a C++ compiler)",
            "g++",
            XCODE,
            commands=("c++", "g++", "clang++"),
        ),
        Tool("python3", "the agent and the service", "python3", "brew install python@3.11"),
        Tool(
            "python3-venv",
            "make install (uv is not installed: it goes into a venv of its own)",
            "python3-venv",
            "brew install uv",
            commands=("uv",),
            modules=("ensurepip",),
        ),
        Tool(
            "python3.11",
            "make install (uv builds .venv with it, and its downloads are off: "
            "UV_PYTHON_DOWNLOADS / UV_OFFLINE)",
            "python3.11",
            "brew install python@3.11",
        ),
    )
}
# What each role's own work runs; the Makefile adds "install" (uv, or the venv it goes in).
ROLES = {
    "install": ("python3-venv", "python3.11"),
    "train": ("git", "rsync", "ssh"),
    "demo": ("git", "rsync"),
    "gguf": ("cmake", "c++"),
    "test": ("git", "rsync", "ssh", "ssh-keygen", "sshd", "cmake", "c++"),
    "endpoint": ("python3", "rsync"),
}


def install_hint(name: str) -> str:
    """How to install tool `name`, on Debian/Ubuntu and on macOS, in one phrase."""
    tool = TOOLS[name]
    return f"sudo apt-get install -y {tool.apt} (Debian/Ubuntu) or {tool.mac} (macOS)"


def missing_line(name: str) -> str:
    """The one line that reports tool `name` missing here."""
    return f"missing {name}: {TOOLS[name].needed_for}. Install: {install_hint(name)}"


def found(tool: Tool, extra_paths: tuple[str, ...] = ()) -> bool:
    """Whether `tool` is here: a command on PATH, an executable file, a module."""
    if tool.name == "python3.11":
        return _python_for_uv()
    if any(shutil.which(c) for c in tool.commands or (tool.name,)):
        return True
    if any(os.access(p, os.X_OK) for p in (*tool.paths, *extra_paths) if os.path.isfile(p)):
        return True
    return any(importlib.util.find_spec(m) is not None for m in tool.modules)


def _python_for_uv() -> bool:
    """uv makes .venv with Python 3.11: this python3, a python3.11 on PATH, or the one uv
    downloads (unless its downloads are switched off)."""
    if sys.version_info[:2] == MIN_PYTHON or shutil.which("python3.11"):
        return True
    never = ("never", "manual", "0", "false")
    off = os.environ.get("UV_PYTHON_DOWNLOADS", "").lower() in never
    return not (off or os.environ.get("UV_OFFLINE", "").lower() in ("1", "true"))


def missing(roles: list[str] | tuple[str, ...], uv: str | None = None) -> list[str]:
    """The tools `roles` need that are not here, each once, in table order. `uv`: where
    the Makefile installs uv when none is on PATH (it counts as found there)."""
    needed = {name for role in roles for name in ROLES[role]}
    return [
        name
        for name, tool in TOOLS.items()
        if name in needed and not found(tool, (uv,) if uv and name == "python3-venv" else ())
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--role", action="append", choices=sorted(ROLES), required=True)
    parser.add_argument("--uv", help="where make installs uv when none is on PATH")
    args = parser.parse_args(argv)
    absent = missing(args.role, args.uv)
    for name in absent:
        print(missing_line(name), file=sys.stderr)
    return 2 if absent else 0


if __name__ == "__main__":
    sys.exit(main())
