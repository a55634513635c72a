"""The training-side version store: git commits and tags, DVC content store.

Every git/dvc call goes through `_run`, which turns a failure into the
project's own error with the tool's message. The one call that reaches the DVC
remote, `dvc push`, runs through `ssh_remote` (an ssh:// remote's host key checked
against the user's known_hosts, no ssh-agent forwarded).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from adapter_deploy.common.errors import AdapterDeployError, ConfigError, RemoteError, UsageError
from adapter_deploy.store import ssh_remote

log = logging.getLogger(__name__)


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise _failure(proc, what)
    return proc.stdout


def _failure(proc: subprocess.CompletedProcess, what: str) -> AdapterDeployError:
    detail = (proc.stderr or proc.stdout).strip().splitlines()
    errors = [line for line in detail if line.startswith("ERROR:")]  # not dvc's support footer
    last = (errors or detail or [f"exit {proc.returncode}"])[-1]
    if what == "dvc push":  # the remote is away or full: a remote failure, not bad usage
        return RemoteError(
            f"{what} failed: {last}", "check the DVC remote (dvc remote list), then rerun"
        )
    return UsageError(f"{what} failed: {last}", "fix the repository state named above and rerun")


def git(repo: Path, *args: str) -> str:
    return _run(["git", *args], repo, "git " + args[0])


def dvc(repo: Path, *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], repo, "dvc " + args[0])


def repo_root(adapters_dir: Path) -> Path:
    """The git+DVC repository that holds the adapter store."""
    adapters_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=adapters_dir, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise ConfigError(
            f"{adapters_dir} is not inside a git repository",
            "run `git init && dvc init` in the project, or set store.adapters_dir in params.yaml",
        )
    root = Path(proc.stdout.strip())
    if not (root / ".dvc").is_dir():
        raise ConfigError(f"{root} has no .dvc directory", "run `dvc init` there")
    return root


STORE_REMOTE = "adapter-store"  # the DVC remote params.yaml's store.remote names


def use_remote(repo: Path, url: str, options: dict[str, str]) -> Path:
    """Make `url` (with `dvc remote modify` `options`) the store's default DVC remote; the
    .dvc/config file that now says so, for the next commit."""
    dvc(repo, "remote", "add", "--force", "--default", STORE_REMOTE, url)
    for key, value in sorted(options.items()):
        dvc(repo, "remote", "modify", STORE_REMOTE, key, value)
    return repo / ".dvc" / "config"


def push(repo: Path, target: Path, url: str, port: str | None = None) -> None:
    """`dvc push` `target` (a .dvc file) to the default remote `url` (`port`: its port
    setting): over ssh only to a host whose key the user's known_hosts holds (HostKeyRefused
    before anything is sent), and never with the ssh-agent forwarded."""
    ssh = ssh_remote.ssh_target(url, port)
    if ssh:
        ssh_remote.check_known_host(*ssh)
    # Not --quiet: that hides dvc's ERROR line, the only place its reason is.
    cmd = [sys.executable, "-m", ssh_remote.__name__, "push", str(target)]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        if ssh and ssh_remote.refused_host_key(proc.stderr + proc.stdout):
            raise ssh_remote.host_key_error(*ssh)
        raise _failure(proc, "dvc push")


def dvc_settings(repo: Path) -> dict[str, str]:
    """The repository's DVC settings ("core.remote", "remote.<name>.url" ...), every config
    level merged as dvc merges them: `dvc config --list` prints the levels in order."""
    settings = {}
    for line in dvc(repo, "config", "--list").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            settings[key.strip()] = value.strip()
    return settings


def _default_remote(settings: dict[str, str]) -> tuple[str | None, str | None]:
    """(URL, port setting) of the default remote in `settings`; (None, None) without one."""
    name = settings.get("core.remote")
    if not name:
        return None, None
    return settings.get(f"remote.{name}.url") or None, settings.get(f"remote.{name}.port")


def default_remote_url(repo: Path) -> str | None:
    """The URL of the store's default DVC remote, None without one."""
    # `dvc config`, not `dvc remote list`: the list wraps long URLs at the terminal width.
    return _default_remote(dvc_settings(repo))[0]


def track(repo: Path, version_dir: Path) -> tuple[list[Path], str | None]:
    """`dvc add` a version dir and push it when there is a default remote: (files for git,
    the remote's URL or None when the version exists only on this machine)."""
    dvc(repo, "add", "--quiet", str(version_dir.relative_to(repo)))
    remote, port = _default_remote(dvc_settings(repo))
    if remote:
        log.info("pushing %s to the DVC remote %s", version_dir.name, remote)
        push(repo, version_dir.relative_to(repo).with_name(version_dir.name + ".dvc"), remote, port)
    git_paths = [
        version_dir.with_name(version_dir.name + ".dvc"),
        version_dir.parent / ".gitignore",
    ]
    return git_paths, remote


def commit(repo: Path, paths: list[Path], message: str) -> str:
    rel = [str(p.relative_to(repo)) for p in paths if p.exists()]
    git(repo, "add", "--", *rel)
    git(repo, "commit", "--quiet", "--no-verify", "-m", message, "--", *rel)
    return git(repo, "rev-parse", "HEAD").strip()


def commit_records(adapters_dir: Path, names: list[str], message: str) -> str | None:
    """Commit the store's record files `names` (those that changed) in a commit of their own,
    so the tree is clean after every deploy, rollback and conversion and the next version's
    commit holds only that version. None when nothing changed or the store is not in git."""
    try:
        repo = repo_root(adapters_dir)
    except AdapterDeployError:
        log.warning("adapter store is not a git repo: deploy records are not committed")
        return None
    paths = [adapters_dir / name for name in names if (adapters_dir / name).exists()]
    rel = [str(p.relative_to(repo)) for p in paths]
    if not rel or not git(repo, "status", "--porcelain", "--", *rel).strip():
        return None
    return commit(repo, paths, message)


def tags(repo: Path, pattern: str) -> list[str]:
    return git(repo, "tag", "--list", pattern).split()


def tag(repo: Path, name: str, message: str, ref: str = "HEAD", move: bool = False) -> None:
    args = ["tag", "-a", name, "-m", message, ref]
    git(repo, *(args[:1] + ["-f"] + args[1:] if move else args))


def tag_message(repo: Path, name: str) -> str:
    return git(repo, "tag", "-l", "--format=%(contents)", name).strip()


def refuse_unignored_secret(path: Path) -> None:
    """A private key inside a git work tree must be gitignored: `git add -A` or a bootstrap
    would otherwise carry it off the training machine."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    proc = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True
    )
    if proc.returncode != 0:
        return  # not in a repository
    top = Path(proc.stdout.strip())
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", str(path)], cwd=top, capture_output=True
    )
    if ignored.returncode != 0:
        raise ConfigError(
            f"the private signing key {path} lies inside the git repository {top} "
            "and is not ignored",
            "set store.signing_key outside the repository (e.g. ~/.adapter-deploy/signing.pem) "
            "or under keys/ (ignored)",
        )
