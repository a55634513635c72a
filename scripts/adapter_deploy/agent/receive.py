"""Hash each file of a transfer while the rest is still arriving.

rsync writes every file to a temp name and renames it into place once complete, so a
manifest name that appears in the incoming dir with the manifest's size is whole. A
`Receiver` polls the incoming dir from `prepare` until `stage`, hashes each such file once,
and remembers the hash with the file's identity (device, inode, size, mtime, ctime). At
staging a remembered hash counts only when the file still has exactly that identity: a
file replaced (rsync's rename makes a new inode) or written to after it was hashed is
hashed again, so hashing early never lets a changed file through.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

POLL_S = 0.05
# A file's timestamps tick coarsely on some filesystems (a jiffy): one changed within the
# same tick as its last change could keep its ctime. Hash only files whose last change is
# older than this, so any later change moves ctime.
SETTLED_S = 0.05
_CHUNK = 1 << 20

Identity = tuple[int, int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Receiver:
    """Hashes the files of one incoming dir as they land (one daemon thread)."""

    def __init__(self, incoming: Path, files: dict[str, dict[str, Any]]) -> None:
        self.incoming = incoming
        self.waiting = {name: info["size"] for name, info in files.items()}
        self.hashed: dict[str, tuple[Identity, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while self.waiting and not self._stop.wait(POLL_S):
            for name, size in list(self.waiting.items()):
                if self._stop.is_set():
                    return
                found = _hash_if_whole(self.incoming / name, size)
                if found is not None:
                    self.hashed[name] = found
                    del self.waiting[name]

    def finish(self) -> dict[str, tuple[Identity, str]]:
        """Stop watching; the hashes taken so far, by file name."""
        self._stop.set()
        self._thread.join()
        return self.hashed


def _hash_if_whole(path: Path, size: int) -> tuple[Identity, str] | None:
    """(identity, sha256) of a regular file of `size` bytes not changed while hashed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None  # not there yet (or a symlink: staging refuses it)
    try:
        before = os.fstat(fd)
        settled = time.time_ns() - before.st_ctime_ns > SETTLED_S * 1e9
        if not stat.S_ISREG(before.st_mode) or before.st_size != size or not settled:
            return None
        digest = hashlib.sha256()
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := os.readv(fd, [buf]):
            digest.update(view[:n])
        if identity(os.fstat(fd)) != identity(before):
            return None  # written to while hashed: try again
        return identity(before), digest.hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


def known_hash(
    hashed: dict[str, tuple[Identity, str]], name: str, st: os.stat_result
) -> str | None:
    """The hash taken while receiving, when the file is still exactly the one hashed."""
    found = hashed.get(name)
    return found[1] if found is not None and found[0] == identity(st) else None
