"""Interrupted deploys: the deployer killed mid-deploy, and the network cut mid-transfer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fixtures_fleet import Fleet
from fixtures_repo import ROOT


def test_deployer_killed_after_activation_is_reconciled(fleet: Fleet) -> None:
    v1, v2 = fleet.versions["cycle1"], fleet.versions["cycle2"]
    args = ("--models", "gemma_4b", "--endpoints", "ep1")
    assert fleet.deploy("--cycle", "1", *args).returncode == 0
    deployer = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "deploy_adapters.py"), "--cycle", "2", *args],
        env={**os.environ, "PARAMS": str(fleet.params)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while fleet.slots("ep1")[0] != v2:  # wait for ACTIVATE, then kill before VERIFY ends
        assert time.monotonic() < deadline and deployer.poll() is None, "never activated"
        time.sleep(0.02)
    deployer.send_signal(signal.SIGKILL)
    deployer.wait()
    assert fleet.slots("ep1") == (v2, v1)  # activated but never verified
    deadline = time.monotonic() + 20
    while True:  # the endpoint side sees its ssh connection close and lets go of the lock
        proc = fleet.deploy("--cycle", "2", *args, "--json")
        if proc.returncode != 7 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"status": "success"' in proc.stdout  # verified now, not "unchanged"
    assert fleet.slots("ep1")[0] == v2


class CuttingRelay:
    """A loopback TCP relay to sshd that drops every connection after `budget` bytes."""

    def __init__(self, target_port: int, budget: int | None, stall: bool = False) -> None:
        self.target_port, self.budget, self.stall = target_port, budget, stall
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            moved = [0]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b, moved), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, moved: list[int]) -> None:
        try:
            while data := src.recv(4096):
                if self.budget is not None and moved[0] + len(data) > self.budget:
                    dst.sendall(data[: max(0, self.budget - moved[0])])  # up to the cut
                    while self.stall:  # a stalled link: open, silent
                        time.sleep(0.1)
                    break
                moved[0] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.server.close()


def test_network_cut_mid_transfer_then_resume(fleet: Fleet, sshd, tmp_path: Path) -> None:
    v1 = fleet.versions["cycle1"]
    size = sum(p.stat().st_size for p in (fleet.store.adapters / "gemma_4b" / v1).iterdir())
    relay = CuttingRelay(sshd.port, budget=size // 2)
    try:
        config = tmp_path / "ssh_config"
        config.write_text(
            sshd.ssh_config.read_text().replace(f"Port {sshd.port}", f"Port {relay.port}")
            + f"  HostKeyAlias [127.0.0.1]:{sshd.port}\n"
        )
        fleet.set_endpoint("ep1", ssh_config=str(config))
        args = ("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1", "--json")
        cut = fleet.deploy(*args)
        assert cut.returncode == 3, cut.stdout + cut.stderr
        assert fleet.slots("ep1") == (None, None)  # nothing activated before verification
        relay.budget = None
        time.sleep(1)  # the cut session notices its closed connection and frees the lock
        again = fleet.deploy(*args)
        assert again.returncode == 0, again.stdout + again.stderr
        assert fleet.slots("ep1")[0] == v1
        assert json.loads(again.stdout)["endpoints"][0]["models"][0]["status"] == "success"
    finally:
        relay.close()


def test_stalled_link_gives_up_within_timeouts_and_leaves_no_processes(
    fleet: Fleet, sshd, tmp_path: Path
) -> None:
    v1 = fleet.versions["cycle1"]
    size = sum(p.stat().st_size for p in (fleet.store.adapters / "gemma_4b" / v1).iterdir())
    relay = CuttingRelay(sshd.port, budget=size // 2, stall=True)
    config = tmp_path / "stalled_ssh_config"
    config.write_text(
        sshd.ssh_config.read_text().replace(f"Port {sshd.port}", f"Port {relay.port}")
        + f"  HostKeyAlias [127.0.0.1]:{sshd.port}\n"
    )
    fleet.set_endpoint("ep1", ssh_config=str(config))
    try:
        started = time.monotonic()
        proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
        elapsed = time.monotonic() - started
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert elapsed < 60  # ServerAliveInterval 5 s x 3 (+ start-up), not forever
        assert fleet.slots("ep1") == (None, None)
        time.sleep(1)
        left = subprocess.run(["pgrep", "-f", str(config)], capture_output=True, text=True)
        assert left.stdout.strip() == "", "orphaned ssh/rsync processes"
    finally:
        relay.stall = False
        relay.close()
