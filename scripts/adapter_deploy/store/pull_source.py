"""A pulling endpoint's read-only view of the store: the git remote's tags and the DVC remote.

The endpoint keeps a bare mirror of the git remote's tags (`git fetch`, never a push), reads
what its stage tag points at from git objects alone (dvc.yaml's artifact path, the manifest's
entry with the signed file list, the version's .dvc file) and copies exactly that release's
objects out of the DVC remote's content-addressed layout (`files/md5/<2>/<30>`, the directory
listing in `<md5>.dir`). No DVC install is needed on the endpoint, and nothing there is
trusted: every file is checked against its md5 here and its signed sha256 by the agent.

The DVC remote and the reports location may be `s3://bucket/prefix` (AWS S3 or an
S3-compatible server such as MinIO), reached with botocore, the client dvc-s3 runs on, and
its standard credentials and settings: AWS_PROFILE, AWS_ACCESS_KEY_ID..., ~/.aws/, and
AWS_ENDPOINT_URL (or `endpoint_url` in ~/.aws/config) for a server other than AWS.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from adapter_deploy.common.errors import (
    AdapterDeployError,
    HostKeyRefused,
    RemoteError,
    UsageError,
)
from adapter_deploy.common.fsutil import atomic_write_bytes, fsync_dir
from adapter_deploy.common.names import check_file_names, check_version_id, printable
from adapter_deploy.store import registry, stages


@dataclass
class Desired:
    """What the endpoint's stage tag asks for."""

    model: str
    tag: str
    commit: str
    version_id: str
    cycle: int
    files: dict[str, dict[str, Any]]
    signed: dict[str, Any] | None
    dir_md5: str  # the DVC directory object of the version
    tagged_at: float = 0.0  # when `make promote` made the tag, by the training machine's clock


MD5_RE = re.compile(r"[0-9a-f]{32}")
SSH_OPTIONS = (
    "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10",
    "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
)  # fmt: skip


BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's bucket naming rules


@dataclass(frozen=True)
class Place:
    """A remote file or folder as this machine reaches it: a local path (a disk, an NFS
    mount), a path on an ssh host reached with OpenSSH (never a prompt; the host key
    checked against known_hosts, an unknown or changed one refused before anything moves),
    or an S3 object or prefix (`path` is then the whole `s3://bucket/key` URL)."""

    path: str
    host: str | None = None  # [user@]host, for ssh://
    port: int | None = None
    options: tuple[str, ...] = ()  # more ssh flags (-F config, -i key)
    endpoint_url: str | None = None  # s3:// on a server other than AWS's (None: botocore's own)

    @classmethod
    def parse(
        cls, url: str, what: str, options: tuple[str, ...] = (), endpoint_url: str | None = None
    ) -> Place:
        parts = urlsplit(url)
        if parts.scheme == "s3":
            if not BUCKET_RE.fullmatch(parts.netloc):
                raise UsageError(
                    f"{what} {url}: {parts.netloc or 'no bucket'} is not an S3 bucket name",
                    "write it as s3://<bucket>/<prefix>",
                )
            key = parts.path.strip("/")
            return cls(f"s3://{parts.netloc}/{key}".rstrip("/"), endpoint_url=endpoint_url)
        if parts.scheme in ("", "file"):
            return cls(os.path.expanduser(parts.path if parts.scheme else url))
        if parts.scheme == "ssh" and parts.hostname:
            if parts.hostname.startswith("-") or (parts.username or "").startswith("-"):
                # ssh and rsync would read it as an option (-oProxyCommand=...)
                raise UsageError(
                    f"{what} {url}: a host or user may not start with -", "name a plain host"
                )
            host = f"{parts.username}@{parts.hostname}" if parts.username else parts.hostname
            return cls(parts.path or "/", host, parts.port, options)
        raise UsageError(
            f"{what} {url}: pulling over {parts.scheme}:// is not supported yet",
            "name a path (a local disk or an NFS mount), an ssh:// or an s3:// URL",
        )

    def child(self, *names: str) -> Place:
        path = "/".join([self.path.rstrip("/"), *names])
        return Place(path, self.host, self.port, self.options, self.endpoint_url)

    @property
    def s3(self) -> bool:
        return self.path.startswith("s3://")

    @property
    def where(self) -> str:
        """The place as a reader names it: a path, host:path or s3://bucket/key."""
        return f"{self.host}:{self.path}" if self.host else self.path

    @property
    def local(self) -> Path:
        return Path(self.path)

    def ssh_argv(self) -> list[str]:
        port = ["-p", str(self.port)] if self.port else []
        return ["ssh", *SSH_OPTIONS, *self.options, *port]

    def _ssh(self, *command: str) -> subprocess.CompletedProcess:
        assert self.host
        argv = [*self.ssh_argv(), self.host, "--", shlex.join(command)]
        return subprocess.run(argv, capture_output=True, timeout=600)

    def _failed(self, stderr: bytes) -> RemoteError:
        text = stderr.decode(errors="replace").strip()
        if "Host key verification failed" in text or "IDENTIFICATION HAS CHANGED" in text:
            return HostKeyRefused(
                f"the host key of {self.host} is unknown or has changed; nothing was fetched",
                "check the host's fingerprint, then add its key to this endpoint's known_hosts",
            )
        last = printable(text.splitlines()[-1]) if text else "no output"
        return RemoteError(f"cannot reach {self.host}: {last}", "check the network and ssh")

    def read_text(self) -> str:
        """The file's text; FileNotFoundError when it is not there."""
        if self.s3:
            return _s3_get(self, lambda body: body.read()).decode()
        if self.host is None:
            return self.local.read_text()
        done = self._ssh("cat", "--", self.path)
        if done.returncode == 0:
            return done.stdout.decode()
        if b"No such file" in done.stderr:
            raise FileNotFoundError(self.path)
        raise self._failed(done.stderr)

    def copy_to(self, dest: Path) -> None:
        """Copy the file to `dest`; FileNotFoundError when it is not there."""
        if self.s3:
            _s3_get(self, lambda body: _stream(body, dest))
            return
        if self.host is None:
            shutil.copyfile(self.local, dest)
            return
        argv = ["rsync", "-e", shlex.join(self.ssh_argv()), f"{self.host}:{self.path}", str(dest)]
        done = subprocess.run(argv, capture_output=True, timeout=3600)
        if done.returncode == 0:
            return
        if b"No such file" in done.stderr:
            raise FileNotFoundError(self.path)
        raise self._failed(done.stderr)

    def write_atomic(self, data: bytes) -> None:
        """Replace the file whole (a reader never sees half of it)."""
        if self.s3:  # one PutObject: S3 replaces an object whole, never half of one
            bucket, key = _bucket_key(self)
            with _s3_errors(self, "write"):
                _s3_client(self.endpoint_url).put_object(Bucket=bucket, Key=key, Body=data)
            return
        if self.host is None:
            self.local.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.local, data)
            return
        folder = self.path.rsplit("/", 1)[0] or "/"
        made = self._ssh("mkdir", "-p", "--", folder)
        if made.returncode != 0:
            raise self._failed(made.stderr)
        with tempfile.NamedTemporaryFile() as tmp:
            tmp.write(data)
            tmp.flush()
            # rsync writes a hidden temp file there and renames it into place
            argv = [
                "rsync",
                "-e",
                shlex.join(self.ssh_argv()),
                tmp.name,
                f"{self.host}:{self.path}",
            ]
            done = subprocess.run(argv, capture_output=True, timeout=600)
        if done.returncode != 0:
            raise self._failed(done.stderr)

    def git_env(self) -> dict[str, str]:
        """The environment git reaches this place with (git adds host and port itself)."""
        return {**os.environ, "GIT_SSH_COMMAND": shlex.join(["ssh", *SSH_OPTIONS, *self.options])}

    def git_url(self, url: str) -> str:
        return url if self.host else self.path


_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()
# The S3 error codes that mean: these credentials may not do that.
DENIED = {
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "403", "Forbidden",
}  # fmt: skip


def _s3_client(endpoint_url: str | None) -> Any:
    """One botocore S3 client per endpoint and AWS_* environment (the settings it read)."""
    key = (endpoint_url, *sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            import botocore.config  # here: make status and the agent never need it
            import botocore.session

            config = botocore.config.Config(
                connect_timeout=10,
                read_timeout=60,
                retries={"mode": "standard", "max_attempts": 3},
            )
            session = botocore.session.get_session()
            try:
                client = session.create_client("s3", endpoint_url=endpoint_url, config=config)
            except ValueError as err:  # botocore's word for a malformed endpoint URL
                raise UsageError(
                    f"the S3 endpoint URL is not usable: {printable(str(err))}",
                    "fix AWS_ENDPOINT_URL (or endpoint_url in ~/.aws/config, or DVC's "
                    "endpointurl): http(s)://host[:port]",
                ) from None
            _CLIENTS[key] = client
        return _CLIENTS[key]


def _bucket_key(place: Place) -> tuple[str, str]:
    bucket, _, key = place.path.removeprefix("s3://").partition("/")
    return bucket, key


def _s3_get(place: Place, use: Any) -> Any:
    """GetObject, its body handed to `use`; FileNotFoundError when the object is missing."""
    bucket, key = _bucket_key(place)
    with _s3_errors(place, "read"):
        body = _s3_client(place.endpoint_url).get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return use(body)
        finally:
            body.close()


def _stream(body: Any, dest: Path) -> None:
    with dest.open("wb") as f:
        for chunk in body.iter_chunks(1 << 20):
            f.write(chunk)


@contextmanager
def _s3_errors(place: Place, doing: str) -> Iterator[None]:
    """botocore's exceptions as this project's one-line errors (exit 3); a missing object as
    FileNotFoundError, as a path or an ssh host reports one."""
    from botocore import exceptions as bx

    try:
        yield
    except bx.ClientError as err:
        raise _client_error(place, doing, err) from None
    except (bx.NoCredentialsError, bx.PartialCredentialsError):
        raise RemoteError(
            f"no AWS credentials to {doing} {place.path}",
            "set AWS_PROFILE (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            "~/.aws/credentials) for this machine's user",
        ) from None
    except bx.BotoCoreError as err:  # unreachable, timed out, cut off mid-object
        where = _s3_client(place.endpoint_url).meta.endpoint_url  # made by now: cached
        raise RemoteError(
            f"cannot {doing} {place.path} at {where}: {printable(str(err))}",
            "check the network and the S3 endpoint (AWS_ENDPOINT_URL, or endpoint_url in "
            "~/.aws/config, for a server other than AWS); an endpoint keeps serving its "
            "release meanwhile",
        ) from None


def _client_error(place: Place, doing: str, err: Any) -> Exception:
    error = err.response.get("Error", {})
    code = str(error.get("Code", ""))
    if code in ("NoSuchKey", "404", "NotFound"):
        return FileNotFoundError(place.path)
    if code == "NoSuchBucket":
        return RemoteError(
            f"the S3 bucket of {place.path} does not exist",
            "create it, or fix the s3:// URL (store.remote, or the endpoint's pull: settings) "
            "or the S3 endpoint it is on (AWS_ENDPOINT_URL)",
        )
    if code in DENIED:
        action = "s3:PutObject" if doing == "write" else "s3:GetObject and s3:ListBucket"
        return RemoteError(
            f"access denied to {doing} {place.path} ({code})",
            f"give this machine's AWS credentials {action} there (docs/pull.md has a "
            "policy), or set AWS_PROFILE to a profile that has",
        )
    message = printable(str(error.get("Message") or code or err))
    return RemoteError(
        f"S3 refused to {doing} {place.path}: {message}",
        "check the bucket, the credentials and the S3 endpoint (AWS_ENDPOINT_URL)",
    )


def local_path(url: str, what: str) -> Path:
    """A remote reached as a path; ssh://, s3:// and the rest refused (for callers that need
    one)."""
    place = Place.parse(url, what)
    if place.host is not None or place.s3:
        raise UsageError(f"{what} {url} must be a path here", "name a local or mounted path")
    return place.local


def sync_tags(mirror: Path, remote: str, options: tuple[str, ...] = ()) -> None:
    """Fetch the git remote's tags into the endpoint's bare mirror (read-only to the remote).
    Tags the remote no longer has are dropped here too, so a withdrawn tag stops counting."""
    place = Place.parse(remote, "git remote", options)
    if place.s3:
        raise UsageError(
            f"the git remote {remote}: git cannot fetch tags from S3",
            "name a path or an ssh:// URL for the git remote (store.git_remote, or the "
            "endpoint's pull.git_remote); the DVC remote and the reports may be on S3",
        )
    if not (mirror / "HEAD").is_file():
        mirror.mkdir(parents=True, exist_ok=True)
        registry.git(mirror, "init", "--quiet", "--bare")
    argv = ["git", "fetch", "--quiet", "--prune", "--force", "--no-write-fetch-head"]
    argv += [place.git_url(remote), "+refs/tags/*:refs/tags/*"]
    done = subprocess.run(argv, cwd=mirror, env=place.git_env(), capture_output=True, timeout=600)
    if done.returncode != 0:
        if place.host is not None:
            failed = place._failed(done.stderr)
            if isinstance(failed, HostKeyRefused):
                raise failed
        lines = done.stderr.decode(errors="replace").strip().splitlines() or ["no output"]
        raise RemoteError(
            f"cannot fetch the desired state from the git remote {remote}: {printable(lines[-1])}",
            "check that the remote is reachable from this endpoint; the endpoint keeps "
            "serving its release meanwhile",
        )


def desired(mirror: Path, model: str, stage: str) -> Desired | None:
    """The version `stage` should run of `model`, read from git objects; None: none asked."""
    found = stages.current(registry.tags(mirror, f"{model}#{stage}*"), model, stage)
    if found is None:
        return None
    commit = registry.git(mirror, "rev-list", "-n", "1", found.tag).strip()
    try:
        artifacts = yaml.safe_load(_show(mirror, commit, "dvc.yaml")).get("artifacts") or {}
        path = artifacts[model]["path"]
        manifest = json.loads(_show(mirror, commit, f"{Path(path).parent}/manifest.json"))
        entry = manifest["versions"][model][-1]  # the version this commit made
        version_id = check_version_id(entry["version_id"])
        outs = yaml.safe_load(_show(mirror, commit, f"{path}/{version_id}.dvc"))["outs"]
        dir_md5 = str(outs[0]["md5"])
    except (AdapterDeployError, KeyError, IndexError, TypeError, ValueError) as err:
        raise UsageError(
            f"stage tag {found.tag} does not point at a version commit ({err})",
            f"promote a version again from the training machine (make promote ENDPOINT={stage})",
        ) from None
    if not dir_md5.endswith(".dir"):
        raise UsageError(f"{version_id}.dvc does not track a directory", "version it again")
    return Desired(
        model,
        found.tag,
        commit,
        version_id,
        int(entry["cycle"]),
        check_file_names(entry["files"]),
        entry.get("signed"),
        dir_md5.removesuffix(".dir"),
        _tagged_at(mirror, found.tag),
    )


def _tagged_at(mirror: Path, tag: str) -> float:
    """The stage tag's tagger date (unix seconds); 0 for a lightweight tag, which has none."""
    when = registry.git(mirror, "for-each-ref", "--format=%(taggerdate:unix)", f"refs/tags/{tag}")
    return float(when.strip() or 0)


def _show(mirror: Path, commit: str, path: str) -> str:
    return registry.git(mirror, "show", f"{commit}:{path}")


def _object(remote: Place, md5: str) -> Place:
    # The digests come from the remote and git, neither trusted: never a path of their own.
    if not MD5_RE.fullmatch(md5.removesuffix(".dir")):
        raise RemoteError(f"the DVC remote names an object {md5!r}", "dvc push the version again")
    return remote.child("files", "md5", md5[:2], md5[2:])


def fetch(dvc_remote: str, want: Desired, dest: Path, options: tuple[str, ...] = ()) -> None:
    """Copy exactly the release's files from the DVC remote into `dest` (created whole: a
    hidden partial dir renamed into place once every file matched its md5 and size)."""
    remote = Place.parse(dvc_remote, "DVC remote", options)
    if remote.host is None and not remote.s3 and not remote.local.is_dir():
        raise RemoteError(
            f"the DVC remote {dvc_remote} is not reachable from this endpoint",
            "mount it (or fix endpoints.<name>.pull.dvc_remote); the endpoint keeps serving "
            "its release meanwhile",
        )
    lacks = RemoteError(
        f"the DVC remote {dvc_remote} lacks {want.model} {want.version_id}",
        "push it from the training machine (dvc push in the store), then the next pull takes it",
    )
    listing = _object(remote, want.dir_md5 + ".dir")
    try:
        entries = {e["relpath"]: str(e["md5"]) for e in json.loads(listing.read_text())}
    except FileNotFoundError:
        raise lacks from None
    except (ValueError, TypeError, KeyError):
        raise RemoteError(
            f"{listing.path} is not a DVC directory listing", "dvc push it again"
        ) from None
    partial = dest.with_name(f".partial-{dest.name}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, meta in want.files.items():
        md5 = entries.get(name)
        if md5 is None:
            raise lacks
        target = partial / name
        try:
            _object(remote, md5).copy_to(target)
        except FileNotFoundError:
            raise lacks from None
        if target.stat().st_size != meta["size"] or _md5(target) != md5:
            raise RemoteError(
                f"{want.model} {want.version_id}: {name} from the DVC remote is damaged "
                "(size or md5 differs)",
                "push the version again from the training machine (dvc push)",
            )
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(partial, dest)
    fsync_dir(dest.parent)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
