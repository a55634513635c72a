"""Endpoint kept: immutable verified releases, atomic active/previous links.

    <adapter_dir>/<model>/releases/<version_id>/   read-only, verified files
    <adapter_dir>/<model>/active   -> releases/<id>
    <adapter_dir>/<model>/previous -> releases/<id>
    <adapter_dir>/<model>/bad.json                 versions that failed or were rolled back from
    <adapter_dir>/incoming/<model>/releases/<version_id>/
                                                   private landing dir for transfers: it
                                                   mirrors the release's own path, so rsync
                                                   can skip what a kept release already has
    <adapter_dir>/quarantine/                      transfers that failed verification

A link is replaced by creating a temp link and renaming it over the old one,
so there is never a moment without `active` (unlike the plan's two renames).
Every dir of a landing path (incoming, <model>, releases, <version_id>) and a release dir
itself must be a real directory, checked with lstat: a symlink planted there is refused
before anything is claimed, moved, chmodded or removed through it.
This module is pure filesystem: no model libraries are imported here.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import (
    ChecksumMismatch,
    NothingToRollBack,
    RemoteError,
    UsageError,
)
from adapter_deploy.common.fsutil import atomic_write_json, fsync_dir, read_state, sha256_file
from adapter_deploy.protocol import LANDING, landing_path

RSYNC_PARTIAL = ".rsync-partial"


class ModelReleases:
    """One model's releases and links under an endpoint's adapter_dir."""

    def __init__(self, adapter_dir: Path, model: str) -> None:
        self.adapter_dir = adapter_dir
        self.model = model
        self.root = adapter_dir / model
        self.releases = self.root / "releases"
        self.active = self.root / "active"
        self.previous = self.root / "previous"
        self.bad_file = self.root / "bad.json"
        self.files_file = self.root / "files.json"  # version_id -> the verified file list

    def release(self, version_id: str) -> Path:
        return self.releases / version_id

    def incoming(self, version_id: str) -> Path:
        return self.adapter_dir / LANDING / landing_path(self.model, version_id)

    def _target(self, link: Path) -> str | None:
        try:
            return Path(os.readlink(link)).name
        except (FileNotFoundError, OSError):
            return None

    def active_id(self) -> str | None:
        return self._target(self.active)

    def previous_id(self) -> str | None:
        return self._target(self.previous)

    def release_ids(self) -> list[str]:
        if not self.releases.is_dir():
            return []
        entries = [p for p in self.releases.iterdir() if _is_real_dir(p)]  # never a link
        return [p.name for p in sorted(entries, key=lambda p: p.stat().st_mtime)]

    def bad(self) -> dict[str, str]:
        return read_state(
            self.bad_file,
            f"restore {self.bad_file} on the endpoint; until then no release of {self.model} "
            "is activated or rolled back to",
        )

    def mark_bad(self, version_id: str, reason: str) -> None:
        bad = self.bad()
        bad[version_id] = reason
        atomic_write_json(self.bad_file, bad)

    def clear_bad(self, version_id: str) -> None:
        bad = self.bad()
        if bad.pop(version_id, None) is not None:
            atomic_write_json(self.bad_file, bad)

    def recorded_files(self) -> dict[str, dict[str, Any]]:
        return read_state(
            self.files_file,
            f"remove {self.files_file} on the endpoint and deploy the kept versions again "
            "(make deploy VERSION=...) to re-verify them",
        )

    def record_files(self, version_id: str, files: dict[str, Any] | None) -> None:
        """Remember a staged release's verified files (None: forget them), so a later rollback
        can tell whether the release is still intact."""
        recorded = self.recorded_files()
        if files is None:
            if recorded.pop(version_id, None) is None:
                return
        elif recorded.get(version_id) == files:
            return
        else:
            recorded[version_id] = files
        atomic_write_json(self.files_file, recorded)

    def describe(self) -> dict[str, Any]:
        return {
            "active": self.active_id(),
            "previous": self.previous_id(),
            "releases": self.release_ids(),
            "bad": self.bad(),
        }


# A sha256 already taken of this exact file (agent/receive.py), else None.
KnownHash = Callable[[str, os.stat_result], str | None]


def file_problems(
    directory: Path, files: dict[str, dict[str, Any]], known: KnownHash | None = None
) -> list[str]:
    """Every way `directory` differs from the manifest's file list."""
    problems = []
    present = {p.name for p in directory.iterdir()}  # staging removed rsync's partial dir
    for extra in sorted(present - set(files)):
        problems.append(f"{extra}: not in the manifest")
    for name, info in files.items():
        path = directory / name
        try:
            st = path.lstat()  # never follow a link: it could point anywhere on the endpoint
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if stat.S_ISLNK(st.st_mode):
            problems.append(f"{name}: a symlink, not the file's contents")
        elif not stat.S_ISREG(st.st_mode):
            problems.append(f"{name}: not a regular file")
        elif st.st_nlink > 1:
            problems.append(f"{name}: hard-linked elsewhere ({st.st_nlink} links)")
        elif st.st_size != info["size"]:
            problems.append(f"{name}: size {st.st_size}, manifest says {info['size']}")
        elif ((known and known(name, st)) or sha256_file(path)) != info["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems


def _make_read_only(directory: Path) -> None:
    for p in directory.iterdir():
        if not p.is_symlink():  # chmod follows links: never change a file outside the release
            p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    directory.chmod(0o555)


def _quarantine(kept: ModelReleases, source: Path, version_id: str) -> Path:
    dest = kept.adapter_dir / "quarantine" / f"{kept.model}-{version_id}-{int(time.time())}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    source.rename(dest)
    return dest


def _is_real_dir(path: Path) -> bool:
    """A directory itself, not a symlink to one (lstat: never follows the last component)."""
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def _not_a_dir(path: Path) -> RemoteError:
    kind = "a symlink" if path.is_symlink() else "not a directory"
    return RemoteError(
        f"{path} is {kind}: every dir of a transfer's landing path and every release must be "
        "a real directory on the endpoint; refused, nothing was claimed, moved or changed",
        f"remove {path} on the endpoint (find out who planted it: only the deploying user "
        "should write there), then deploy again",
    )


def landing_problem(kept: ModelReleases, version_id: str) -> Path | None:
    """The first dir of the landing path (incoming/<model>/releases/<id>) that exists and is
    not a real directory, else None. Checked from adapter_dir down, one lstat each, so no
    check ever passes through a link."""
    path = kept.adapter_dir
    for part in (LANDING, *landing_path(kept.model, version_id).split("/")):
        path = path / part
        try:
            if not stat.S_ISDIR(path.lstat().st_mode):
                return path
        except FileNotFoundError:
            return None  # nothing further down exists either
    return None


def check_landing(kept: ModelReleases, version_id: str) -> Path:
    """The landing dir, once each dir on its path that exists is a real directory."""
    bad = landing_problem(kept, version_id)
    if bad is not None:
        raise _not_a_dir(bad)
    return kept.incoming(version_id)


def _remove(path: Path) -> None:
    """Remove `path` whatever it is, never following a link (rmtree refuses links)."""
    if _is_real_dir(path):
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def discard_incoming(kept: ModelReleases, version_id: str) -> None:
    """A refused transfer goes to quarantine, never into releases/."""
    incoming = check_landing(kept, version_id)
    if _is_real_dir(incoming):
        _quarantine(kept, incoming, version_id)


def prepare_incoming(kept: ModelReleases, version_id: str) -> Path:
    """Create the private landing dir for a transfer (kept across runs, so rsync resumes)."""
    check_landing(kept, version_id)  # mkdir and chmod below would follow a planted link
    incoming = kept.incoming(version_id)
    incoming.mkdir(parents=True, exist_ok=True)
    check_landing(kept, version_id)
    os.chmod(kept.adapter_dir / LANDING, 0o700)
    return incoming


def _claim(kept: ModelReleases, version_id: str) -> Path:
    """Move a transfer out of the landing path before it is verified. A deployer's rsync
    starts before its session holds the endpoint's lock, and rsync names every file by its
    path under the landing root: once the dir has moved, no rsync can add or replace a file
    in what is being verified and staged. A landing path that is not real directories all
    the way down is refused before the rename (rename moves a link itself, not its target)."""
    incoming = check_landing(kept, version_id)
    claimed = incoming.with_name(f".{version_id}.staging-{os.getpid()}")
    _remove(claimed)  # left by a session that died here
    try:
        incoming.rename(claimed)
    except FileNotFoundError:
        raise UsageError(
            f"{kept.model} {version_id} was not transferred to this endpoint",
            "run the transfer phase first (make transfer / deploy)",
        ) from None
    if not _is_real_dir(claimed):  # swapped for a link between the check and the rename
        claimed.unlink()
        raise _not_a_dir(incoming)
    return claimed


def drop_empty_incoming(kept: ModelReleases, version_id: str) -> None:
    """An rsync that found everything in a kept release leaves empty dirs behind."""
    if landing_problem(kept, version_id) is not None:
        return  # never remove anything through a planted link
    incoming = kept.incoming(version_id)
    for empty in (incoming / RSYNC_PARTIAL, incoming, incoming.parent, incoming.parent.parent):
        try:
            empty.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return  # not empty: a transfer of another release is there


def stage(
    kept: ModelReleases,
    version_id: str,
    files: dict[str, dict[str, Any]],
    intact: bool = False,
    known: KnownHash | None = None,
) -> str:
    """Turn a verified transfer into releases/<id>. Returns 'present' or 'staged'.

    `intact`: this session already found the release whole against exactly `files` (prepare),
    so it is not hashed a second time; `known` gives hashes taken while receiving."""
    release = kept.release(version_id)
    if os.path.lexists(release) and not _is_real_dir(release):
        raise _not_a_dir(release)  # chmod and quarantine below would follow a link
    if release.is_dir() and (intact or not file_problems(release, files)):
        kept.record_files(version_id, files)
        drop_empty_incoming(kept, version_id)
        return "present"
    if release.is_dir():
        release.chmod(0o755)
        _quarantine(kept, release, version_id)
    incoming = _claim(kept, version_id)
    _remove(incoming / RSYNC_PARTIAL)  # rsync's partial dir, or anything planted in its name
    problems = file_problems(incoming, files, known)
    if problems:
        where = _quarantine(kept, incoming, version_id)
        raise ChecksumMismatch(
            f"{kept.model} {version_id} failed verification on the endpoint: "
            + "; ".join(problems)
            + f" (quarantined in {where})",
            "run the deploy again to resend it; if it repeats, check the endpoint's disk",
        )
    kept.releases.mkdir(parents=True, exist_ok=True)
    _make_read_only(incoming)
    incoming.rename(release)
    fsync_dir(kept.releases)
    kept.record_files(version_id, files)
    drop_empty_incoming(kept, version_id)
    return "staged"


def point(link: Path, target: Path) -> None:
    """Atomically make `link` a symlink to `target` (relative), never absent meanwhile."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    try:
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)  # e.g. `link` is a real directory: leave nothing behind
        raise
    fsync_dir(link.parent)


def activate(kept: ModelReleases, version_id: str) -> tuple[str | None, str]:
    """active -> releases/<id>, previous -> what was active. Returns (old, new)."""
    release = kept.release(version_id)
    if not _is_real_dir(release):  # a symlink in releases/ is never a release
        raise UsageError(
            f"{kept.model} {version_id} is not a verified release on this endpoint",
            "transfer it first",
        )
    old = kept.active_id()
    if old == version_id:
        return old, version_id
    if old is not None and kept.release(old).is_dir():
        point(kept.previous, kept.release(old))
    point(kept.active, release)
    return old, version_id


def rollback_target(kept: ModelReleases, to: str | None) -> str:
    """The release a rollback goes to: `to`, or previous; never a release marked bad."""
    current = kept.active_id()
    if to is not None:
        if not _is_real_dir(kept.release(to)):
            kept = ", ".join(kept.release_ids()) or "none"
            raise NothingToRollBack(
                f"{kept.model} has no kept release {to!r} (kept: {kept})",
                "pick one of the kept releases",
            )
        return _intact(kept, to)
    bad = kept.bad()
    candidates = [kept.previous_id()] + list(reversed(kept.release_ids()))
    for candidate in candidates:
        if candidate and candidate != current and candidate not in bad:
            if _is_real_dir(kept.release(candidate)):
                return _intact(kept, candidate)
    raise NothingToRollBack(
        f"{kept.model} has no release to roll back to (active: {current})",
        "deploy a known-good version instead",
    )


def _intact(kept: ModelReleases, version_id: str) -> str:
    """`version_id` when its files are still the ones verified at staging, else refuse: a
    rollback must never put a damaged release in service."""
    files = kept.recorded_files().get(version_id)
    problems = file_problems(kept.release(version_id), files) if files else []
    if problems:
        raise ChecksumMismatch(
            f"{kept.model} {version_id} is damaged on the endpoint ({'; '.join(problems)}); "
            "nothing was changed",
            f"deploy it again (make deploy VERSION={version_id}) to resend and re-verify it, "
            "or roll back to another release with TO=<version_id>",
        )
    return version_id


def set_links(kept: ModelReleases, active: str | None, previous: str | None) -> None:
    """Put both links back exactly (used by rollback and automatic rollback).

    No earlier release means no adapter at all: the service serves its base model.
    """
    if active is None:
        kept.active.unlink(missing_ok=True)
        fsync_dir(kept.root)
        return
    point(kept.active, kept.release(active))
    if previous and kept.release(previous).is_dir():
        point(kept.previous, kept.release(previous))


def prune(kept: ModelReleases, keep: int) -> list[str]:
    """Delete the oldest releases beyond `keep`; never active or previous."""
    protected = {kept.active_id(), kept.previous_id()}
    ids = kept.release_ids()
    removable = [r for r in ids if r not in protected]
    excess = max(0, len(ids) - keep)
    removed = []
    for version_id in removable[:excess]:
        path = kept.release(version_id)
        path.chmod(0o755)
        for p in path.iterdir():
            if not p.is_symlink():
                p.chmod(0o644)
        shutil.rmtree(path)
        kept.record_files(version_id, None)
        removed.append(version_id)
    landing = kept.incoming("-").parent
    for leftover in sorted(landing.iterdir()) if landing.is_dir() else []:
        drop_empty_incoming(kept, leftover.name)
    return removed


def landed_bytes(directory: Path) -> int:
    """Bytes a transfer has already written under `directory` (partials included)."""
    total = 0
    for root, _dirs, names in os.walk(directory):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue  # rsync renamed it meanwhile
    return total


def compat_link_path(adapter_dir: Path, link: str) -> Path:
    """A relative `link` lives beside adapter_dir, where the app's old folders were."""
    return Path(link) if Path(link).is_absolute() else adapter_dir.parent / link


def check_compat_links(adapter_dir: Path, links: list[str]) -> None:
    """Before any flip: each compatibility link's name is free or already a symlink."""
    for link in links:
        path = compat_link_path(adapter_dir, link)
        if path.exists() and not path.is_symlink():
            raise UsageError(
                f"compatibility link {path} is taken by a real "
                f"{'directory' if path.is_dir() else 'file'}; nothing was changed",
                "move it away (it may be an app's old adapter folder) or set compat_links in "
                "params.yaml for this endpoint",
            )


def compat_link(adapter_dir: Path, link: str, model: str) -> Path:
    """fine_tuned_* -> adapters/<model>/active (the operator's plan)."""
    path = compat_link_path(adapter_dir, link)
    path.parent.mkdir(parents=True, exist_ok=True)
    point(path, adapter_dir / model / "active")
    return path
