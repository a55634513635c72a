"""Benchmark: the project's streamed sha256 vs `openssl dgst -sha256` on a 120 MB file.

Both are timed in this process (openssl through a subprocess, whose start-up
is measured separately on an empty file and subtracted) so interpreter start-up
is not counted. Goal: throughput ratio >= 0.75.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from adapter_deploy.common.fsutil import sha256_file

SIZE = 120 * 1024 * 1024
GOAL = 0.75


def _best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, empty = Path(tmp) / "weights.bin", Path(tmp) / "empty"
        path.write_bytes(os.urandom(SIZE))
        empty.write_bytes(b"")

        def openssl(p: Path) -> None:
            subprocess.run(["openssl", "dgst", "-sha256", str(p)], check=True, capture_output=True)

        startup = _best(lambda: openssl(empty))
        t_openssl = max(_best(lambda: openssl(path)) - startup, 1e-9)
        t_ours = _best(lambda: sha256_file(path))
    mb = SIZE / 1e6
    ratio = t_openssl / t_ours
    print(
        f"sha256 120 MB: ours {mb / t_ours:.0f} MB/s, openssl {mb / t_openssl:.0f} MB/s, "
        f"ratio {ratio:.2f} (goal >= {GOAL})"
    )
    print(f"BENCH hash_ratio {ratio:.3f} {GOAL} >=")


if __name__ == "__main__":
    main()
