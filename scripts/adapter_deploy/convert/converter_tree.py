"""llama.cpp's converter scripts run only as the bytes this repository pins.

The converter (convert_hf_to_gguf.py, convert_lora_to_gguf.py, their conversion/ and gguf-py/
packages) is Python that this project runs; it lives in a user-writable cache tree, so the
trust comes from two pins kept here, in git:
    SDIST_SHA256   the llama-cpp-python sdist `make gguf-tools` downloads (pip fetches it
                   without a hash): checked before it is built or extracted; a mismatch
                   deletes that download and nothing else
    FILES_SHA256   the sha256 of the converter's file list (every extracted file with its
                   sha256, sorted, one `<sha256>  <path>` line each), the list `install`
                   records in the tree's converter.json: a converter.json planted in the tree
                   cannot list other hashes without its list's sha256 leaving this pin
Before every run, `verified_copy` reads each listed file once, checks its sha256 and writes
those same bytes into a private temporary directory the converter then runs from: a file the
list does not name (a planted module that would shadow an import, a stale __pycache__) is not
there, and the cache tree cannot change between the check and the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from adapter_deploy.common.errors import TamperedTool
from adapter_deploy.common.fsutil import sha256_file

log = logging.getLogger(__name__)

# The llama-cpp-python release whose vendored llama.cpp converts and quantizes (the Makefile's
# LLAMA_CPP_VERSION; a test keeps the two equal). A new version needs both pins below anew:
# `python -m adapter_deploy.cli.gguf_tools pins SDIST` prints them for a checked download.
LLAMA_CPP_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
FILES_SHA256 = "135609f3cf2d33f14257bf3ae0dfb0fcac936b45cc2eb4a0037eac9ba3a05fbf"
CONVERTER_INFO = "converter.json"  # written last by `install`: version, commit, file list
# What `make gguf-tools` extracts from the sdist's vendor/llama.cpp (files, or dirs whole).
MEMBERS = (
    "convert_hf_to_gguf.py",
    "convert_lora_to_gguf.py",
    "conversion",
    "gguf-py",
    "models/templates",
    "LICENSE",
)
_REINSTALL = "run `make gguf-tools` to extract the pinned converter again"


def files_digest(files: dict[str, str]) -> str:
    """The sha256 of a file list {relative path: sha256}: what FILES_SHA256 pins."""
    text = "".join(f"{files[path]}  {path}\n" for path in sorted(files))
    return hashlib.sha256(text.encode()).hexdigest()


def check_sdist(sdist: Path) -> None:
    """Refuse (and delete) a downloaded sdist whose sha256 is not the pinned one."""
    got, pinned = sha256_file(sdist), SDIST_SHA256
    if got != pinned:
        sdist.unlink()
        raise TamperedTool(
            f"{sdist} has sha256 {got}, not the pinned {pinned} of llama-cpp-python "
            f"{LLAMA_CPP_VERSION}; that download was deleted, nothing else",
            fix="run `make gguf-tools` again to download it afresh; if the sha256 differs "
            "again, the package index or the network serves other bytes: stop and find out why",
        )


def _member_path(name: str, top: str) -> str | None:
    """The path under the tree a sdist member extracts to, None when it is not extracted."""
    prefix = f"{top}/vendor/llama.cpp/"
    if not name.startswith(prefix):
        return None
    rel = name[len(prefix) :]
    parts = PurePosixPath(rel).parts
    if not parts or any(p in ("", ".", "..") for p in parts) or PurePosixPath(rel).is_absolute():
        return None
    if any(rel == m or rel.startswith(m + "/") for m in MEMBERS):
        return rel
    return None


def install(sdist: Path, dest: Path) -> dict[str, Any]:
    """Extract the converter from the checked sdist into `dest` with its converter.json (the
    version, llama.cpp's commit and every file's sha256); the record written."""
    check_sdist(sdist)
    top = f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    incoming = dest.with_name(f"{dest.name}.incoming-{os.getpid()}")
    shutil.rmtree(incoming, ignore_errors=True)
    incoming.mkdir(parents=True)
    files: dict[str, str] = {}
    commit = "unknown"
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                if member.name == f"{top}/.git/modules/vendor/llama.cpp/HEAD" and member.isfile():
                    commit = tar.extractfile(member).read().decode().strip() or commit
                    continue
                rel = _member_path(member.name, top)
                if rel is None or not member.isfile():  # dirs come with their files
                    continue
                data = tar.extractfile(member).read()
                target = incoming / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                files[rel] = hashlib.sha256(data).hexdigest()
        got = files_digest(files)
        if got != FILES_SHA256:
            raise TamperedTool(
                f"the pinned sdist {sdist.name} holds a converter whose file list has sha256 "
                f"{got}, not the pinned {FILES_SHA256}",
                fix="the two pins in adapter_deploy/convert/converter_tree.py disagree: set "
                "both from one checked sdist",
            )
        record = {"llama-cpp-python": LLAMA_CPP_VERSION, "llama.cpp": commit, "files": files}
        (incoming / CONVERTER_INFO).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        incoming.rename(dest)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    log.debug("llama.cpp's converter (%d files, checked) is in %s", len(files), dest)
    return record


def read_record(tree: Path) -> dict[str, Any]:
    """The tree's converter.json once its file list is the pinned one (the files themselves
    are checked by `verified_copy`, which reads them)."""
    where = tree / CONVERTER_INFO
    try:
        record = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TamperedTool(f"{where} is unreadable ({err})", fix=_REINSTALL) from err
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise TamperedTool(
            f"{where} records no file hashes (written before converters were checked, or "
            "not by `make gguf-tools`); nothing was run",
            fix=_REINSTALL,
        )
    got = files_digest(files)
    if got != FILES_SHA256:
        raise TamperedTool(
            f"{where} lists other converter files than llama-cpp-python {LLAMA_CPP_VERSION}'s "
            f"(list sha256 {got[:16]}..., pinned {FILES_SHA256[:16]}...): the tree was changed "
            "or planted; nothing was run",
            fix=_REINSTALL,
        )
    return record


def _checked_bytes(tree: Path, rel: str, expected: str) -> bytes:
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or any(p in ("", ".", "..") for p in parts):
        raise TamperedTool(f"{tree / CONVERTER_INFO} names the path {rel!r}", fix=_REINSTALL)
    try:
        data = (tree / rel).read_bytes()
    except OSError as err:
        raise TamperedTool(
            f"{tree / rel}, a file of the pinned converter, is unreadable ({err.strerror}); "
            "nothing was run",
            fix=_REINSTALL,
        ) from err
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise TamperedTool(
            f"{tree / rel} is not the pinned converter's file (sha256 {got[:16]}..., pinned "
            f"{expected[:16]}...): the tree was changed; nothing was run",
            fix=_REINSTALL,
        )
    return data


def verify(tree: Path) -> dict[str, Any]:
    """Check every file of the tree against the pinned list; its converter.json record."""
    record = read_record(tree)
    for rel, expected in record["files"].items():
        _checked_bytes(tree, rel, expected)
    return record


@contextlib.contextmanager
def verified_copy(tree: Path) -> Iterator[Path]:
    """A private copy of the pinned converter, made from bytes checked as they were read; it
    holds the listed files only and is removed after."""
    record = read_record(tree)
    with tempfile.TemporaryDirectory(prefix="adapter-deploy-llama.cpp-") as tmp:
        copy = Path(tmp)
        for rel, expected in sorted(record["files"].items()):
            data = _checked_bytes(tree, rel, expected)
            target = copy / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        yield copy
