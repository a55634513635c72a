"""TRANSFER's rsync, started while the endpoint session is still starting.

An endpoint session starts with the ssh connection, then the agent's python start-up, then
the endpoint's lock. rsync needs only the connection, so it starts as soon as that is up,
through the same multiplexed connection, and the agent starts meanwhile. What keeps that
safe before the session holds the lock:
- files land in incoming/<model>/releases/<id>/, the release's own path under the landing
  root, and `--compare-dest=..` skips every file a kept release already has (same size and
  mtime): a release already on the endpoint costs no bytes;
- the endpoint checks first that its agent speaks this protocol and that the disk has the
  releases' size plus `min_free_bytes` free (`Connection.push`'s `room_for`: over ssh its
  shell, in the same command as rsync); else rsync does not start and the session decides
  as before (a mismatched endpoint is refused with nothing moved);
- staging moves the landing dir away before verifying it (agent/releases.py `_claim`), so
  the rsync of another deploy never adds or replaces a file in what is verified;
- the session still prepares, hashes every file and stages. If this rsync fails for any
  reason, the ordinary push after prepare runs (and resumes what landed).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from adapter_deploy.common.errors import AdapterDeployError
from adapter_deploy.deploy.plan import Release
from adapter_deploy.deploy.remote import Connection
from adapter_deploy.protocol import LANDING, landing_path


def landing_root(conn: Connection) -> str:
    return f"{conn.remote_path(conn.ep.adapter_dir).rstrip('/')}/{LANDING}"


def landing_files(releases: list[Release], farm: Path) -> list[str]:
    """The releases' files as `<farm>/./<model>/releases/<id>/<name>` for `rsync --relative`:
    symlinks (sent as their contents, --copy-links) that give each file its landing path."""
    files = []
    for release in releases:
        rel = landing_path(release.model, release.version_id)
        (farm / rel).mkdir(parents=True, exist_ok=True)
        for name in release.files:
            link = farm / rel / name
            if not link.is_symlink():
                link.symlink_to((release.local_dir / name).absolute())
            # a string: pathlib would drop the "/./" that marks where --relative starts
            files.append(f"{farm}/./{rel}/{name}")
    return files


class EarlyPush:
    """One rsync of store releases into the endpoint's landing root, in a thread."""

    def __init__(
        self,
        conn: Connection,
        releases: list[Release],
        farm: Path,
        reserve: int,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.conn = conn
        self.releases = releases
        self.sent: int | None = None
        self.error: AdapterDeployError | None = None
        self.size = sum(r.size for r in releases)
        files = landing_files(releases, farm)
        need = self.size + reserve
        self._thread = threading.Thread(
            target=self._run, args=(files, landing_root(conn), progress, need), daemon=True
        )
        self._thread.start()

    def _run(
        self, files: list[str], root: str, progress: Callable[[int], None] | None, need: int
    ) -> None:
        try:
            # the endpoint's rsync version is not known yet: no --protect-args (params paths
            # are checked against a safe alphabet), per-file progress (any rsync has it)
            self.sent = self.conn.push(
                files,
                root,
                progress,
                relative=True,
                protect_args=False,
                compare_dest="..",
                room_for=need,
            )
        except AdapterDeployError as err:
            self.error = err

    def finish(self) -> int | None:
        """Bytes sent, or None when it was refused or failed (the ordinary push resumes)."""
        self._thread.join()
        return self.sent

    def why_not(self) -> str:
        """Why it sent nothing, in one line."""
        return self.error.message if self.error else "cancelled"

    def cancel(self) -> None:
        """Stop it (what landed stays for a resume); the rsync may not have started yet."""
        while self._thread.is_alive():
            self.conn.cancel()
            self._thread.join(timeout=0.05)
