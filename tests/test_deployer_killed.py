"""A deployer killed with -9 takes its rsync with it: nothing keeps writing into an endpoint
after the process that owns the deploy is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DEPLOYER = """
import sys, threading
from adapter_deploy.deploy import remote

def push():  # from a worker thread, as run_parallel starts each endpoint's transfer
    remote._run_rsync(["rsync", "--bwlimit=64", sys.argv[1], sys.argv[2]])

worker = threading.Thread(target=push)
worker.start()
worker.join()
"""


def _rsync_children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid), "rsync"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped writing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_rsync_dies_with_a_deployer_killed_by_sigkill(tmp_path) -> None:
    big = tmp_path / "adapter_model.safetensors"
    big.write_bytes(os.urandom(4 << 20))  # 4 MB at 64 kB/s: a minute, unless it is stopped
    deployer = subprocess.Popen([sys.executable, "-c", DEPLOYER, str(big), str(tmp_path / "ep")])
    children: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not (children := _rsync_children(deployer.pid)):
            assert time.monotonic() < deadline and deployer.poll() is None, "rsync never started"
            time.sleep(0.05)
        deployer.send_signal(signal.SIGKILL)
        deployer.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in children), "rsync outlived its deployer"
    finally:
        deployer.kill()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
