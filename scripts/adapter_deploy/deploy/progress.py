"""How the core tells the operator what a deploy is doing, without printing.

The CLI passes a `Progress` down (cli/progress.py draws it: one bar per endpoint on a
terminal, timestamped lines when piped); the core calls it from each endpoint's thread.
`RsyncOutput` turns rsync's progress output into byte counts, so raw rsync output from
parallel endpoints never reaches the operator interleaved.
"""

from __future__ import annotations

import functools
import re
from typing import Protocol

from adapter_deploy.agent.doctor import rsync_version

# rsync >= 3.1 prints one transfer-wide line (`--info=progress2`); older ones (Apple's
# 2.6.9) only per-file lines (`--progress`).
PROGRESS2_SINCE = (3, 1)
_LINE = re.compile(rb"^\s*([\d,.]+)\s+\d+%")
_XFR = re.compile(rb"\(xfr#(\d+)")


class Progress(Protocol):
    """What a deploy reports, per endpoint. Called from several threads at once."""

    def start(self, endpoint: str, total_bytes: int) -> None:
        """A transfer of `total_bytes` to `endpoint` begins."""

    def advance(self, endpoint: str, bytes_done: int) -> None:
        """`bytes_done` of that transfer have arrived (a running total, not an increment)."""

    def step(self, endpoint: str, name: str) -> None:
        """`endpoint` begins the named step (e.g. "gemma_4b pre-check")."""

    def done(self, endpoint: str) -> None:
        """`endpoint` has finished (whatever its outcome)."""


class NoProgress:
    """The default: report nothing."""

    def start(self, endpoint: str, total_bytes: int) -> None:
        pass

    def advance(self, endpoint: str, bytes_done: int) -> None:
        pass

    def step(self, endpoint: str, name: str) -> None:
        pass

    def done(self, endpoint: str) -> None:
        pass


NO_PROGRESS = NoProgress()


class RsyncOutput:
    """Parses rsync's stdout as it arrives into the bytes done so far.

    progress2 lines carry the transfer's running total; `--progress` lines carry the current
    file's bytes, and a line naming `xfr#` ends that file."""

    def __init__(self, per_file: bool) -> None:
        self.per_file = per_file
        self.finished_files = 0  # bytes of the files --progress has finished
        self.files_seen = 0
        self.bytes_done = 0
        self._pending = b""
        self.text = bytearray()  # everything, for --stats and errors

    def feed(self, chunk: bytes) -> int | None:
        """Take the next chunk of output; the new running total when it moved."""
        self.text += chunk
        *lines, self._pending = re.split(rb"[\r\n]", self._pending + chunk)
        before = self.bytes_done
        for line in lines:
            self._line(line)
        return self.bytes_done if self.bytes_done != before else None

    def _line(self, line: bytes) -> None:
        match = _LINE.match(line)
        if match is None:
            return
        count = int(match.group(1).replace(b",", b"").replace(b".", b""))
        if not self.per_file:
            self.bytes_done = max(self.bytes_done, count)
            return
        self.bytes_done = self.finished_files + count
        xfr = _XFR.search(line)
        if xfr and int(xfr.group(1)) > self.files_seen:  # a file's last line, counted once
            self.files_seen = int(xfr.group(1))
            self.finished_files += count


def progress_flags(endpoint_rsync: tuple[int, ...]) -> tuple[list[str], bool]:
    """rsync's progress flags for this endpoint, and whether they report per file."""
    if min(local_rsync_version(), endpoint_rsync) >= PROGRESS2_SINCE:
        return ["--info=progress2"], False
    return ["--progress"], True


@functools.cache
def local_rsync_version() -> tuple[int, ...]:
    return tuple(rsync_version() or (0,))
