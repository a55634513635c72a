"""Desired state for pulling endpoints: GTO stage assignment tags on the version's commit.

`<model>#<endpoint>#<n>` (GTO's own tag format: the stage is the endpoint's name) says
"this endpoint should run the version whose commit the tag points at"; the highest `n`
wins, and `<model>#<endpoint>!#<n>` (GTO's unassignment) withdraws it. Stock `gto show`
reads them. The same format records what runs on a pushed endpoint (deploy/records.py); a
pulling endpoint is never pushed to, so its tags only ever say what it should run.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from adapter_deploy.common.errors import RemoteError, UsageError
from adapter_deploy.common.names import printable
from adapter_deploy.store import registry

_COUNTER = re.compile(r"#(\d+)$")


@dataclass(frozen=True)
class Assignment:
    tag: str
    number: int
    withdrawn: bool  # GTO's unassignment (`!`)


def assignments(names: list[str], model: str, stage: str) -> list[Assignment]:
    """The stage's assignment and unassignment tags among `names`, oldest first."""
    found = []
    for name in names:
        for prefix, withdrawn in ((f"{model}#{stage}#", False), (f"{model}#{stage}!#", True)):
            if name.startswith(prefix) and (m := _COUNTER.search(name)) and name == prefix + m[1]:
                found.append(Assignment(name, int(m[1]), withdrawn))
    return sorted(found, key=lambda a: a.number)


def current(names: list[str], model: str, stage: str) -> Assignment | None:
    """The assignment in force (None: never assigned, or withdrawn last)."""
    found = assignments(names, model, stage)
    return None if not found or found[-1].withdrawn else found[-1]


def version_commit(repo: Path, adapters: Path, model: str, version_id: str) -> str:
    """The commit that made the version (the one its `<model>@v…` tag names)."""
    dvc_file = (adapters / model / f"{version_id}.dvc").relative_to(repo)
    commit = registry.git(repo, "log", "--format=%H", "-1", "--", str(dvc_file)).strip()
    if not commit:
        raise UsageError(
            f"no commit holds {dvc_file}", "version it first with make version, then promote"
        )
    return commit


def assign(repo: Path, model: str, stage: str, commit: str, version_id: str) -> str | None:
    """Tag `commit` as `stage`'s version of `model`; None when it already is (idempotent)."""
    names = registry.tags(repo, f"{model}#{stage}*")
    now = current(names, model, stage)
    if now is not None and registry.git(repo, "rev-list", "-n", "1", now.tag).strip() == commit:
        return None
    number = max((a.number for a in assignments(names, model, stage)), default=0) + 1
    name = f"{model}#{stage}#{number}"
    registry.tag(repo, name, f"{version_id} should run on {stage}", ref=commit)
    return name


def version_tags(repo: Path, model: str, commit: str) -> list[str]:
    """The `<model>@v…` tags on `commit` (GTO needs them beside a stage tag)."""
    listed = registry.git(repo, "tag", "--points-at", commit, "--list", f"{model}@v*")
    return listed.split()


def push_tags(repo: Path, remote: str, names: list[str]) -> None:
    """Push exactly these tags (and the commits they need); nothing else, no branch. Over
    ssh never a prompt, and an unknown or changed host key refuses the push."""
    if not names:
        return
    refs = [f"refs/tags/{n}:refs/tags/{n}" for n in names]
    strict = "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10"
    env = {**os.environ, "GIT_SSH_COMMAND": os.environ.get("GIT_SSH_COMMAND") or strict}
    done = subprocess.run(
        ["git", "push", "--quiet", remote, *refs], cwd=repo, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit {done.returncode}"]
        raise RemoteError(
            f"pushing the stage tags to {remote} failed: {printable(lines[-1])}",
            "check store.git_remote (reachable, writable, its host key known), then rerun "
            "make promote; the tags stay here and the rerun pushes them",
        )
