"""Interrupted deploys: the deployer killed (kill -9) at every phase, and the network cut
mid-transfer. The next run always converges, and never leaves a release serving unverified."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from adapter_deploy.common import failpoints
from adapter_deploy.common.failpoints import arm
from fixtures_fleet import Fleet, inflated_adapter, version

# The end-to-end tier (make test-e2e): kill matrices of the deployer, cut and stalled links.
pytestmark = pytest.mark.e2e


DEPLOY_EP1 = ("--models", "gemma_4b", "--endpoints", "ep1", "--json")


def _assert_complete(adapter_dir: Path) -> None:
    """active and previous (where present) resolve to complete releases."""
    for link in ("active", "previous"):
        path = adapter_dir / "gemma_4b" / link
        if os.path.islink(path):
            names = {p.name for p in path.resolve(strict=True).iterdir()}
            assert names >= {"adapter_config.json", "adapter_model.safetensors"}, (link, names)


def _assert_nothing_unverified(fleet: Fleet) -> None:
    """Every endpoint serves what its status.json records as verified, or nothing."""
    for adapter_dir in fleet.endpoints.values():
        if not adapter_dir.is_dir():
            continue
        verified = json.loads((adapter_dir / "status.json").read_text())["models"]
        for link in adapter_dir.glob("*/active"):
            model = link.parent.name
            assert verified[model]["verified"] == Path(os.readlink(link)).name, adapter_dir


def _deploy_after_lock(fleet: Fleet, *args: str) -> subprocess.CompletedProcess:
    """Deploy, retrying while the endpoint still holds the lock of a killed deployer (exit 7):
    its session lets go once it sees its ssh connection close."""
    deadline = time.monotonic() + 20
    while True:
        proc = fleet.deploy(*args)
        if proc.returncode != 7 or time.monotonic() > deadline:
            return proc
        time.sleep(0.5)


def test_deployer_killed_at_every_phase_is_reconciled(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each deployer failpoint (a real SIGKILL), then a plain rerun of the same deploy."""
    ep1 = fleet.endpoints["ep1"]
    assert fleet.deploy("--cycle", "1", *DEPLOY_EP1).returncode == 0
    old, new = 1, 2  # swapped after each point: every point starts from a verified release
    for point in failpoints.DEPLOYER_POINTS:
        if point.startswith("rollback."):
            arm(ep1, "verify", "fail")  # the automatic rollback runs only after a failed VERIFY
        with monkeypatch.context() as env:
            env.setenv(failpoints.DEPLOYER_ENV, point)
            killed = fleet.deploy("--cycle", str(new), *DEPLOY_EP1)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stdout + killed.stderr)
        assert f"deployer failpoint {point}:" in killed.stderr  # there, not somewhere else
        _assert_complete(ep1)
        serving = fleet.links("ep1")[0]
        assert serving in (fleet.versions[f"cycle{old}"], fleet.versions[f"cycle{new}"]), point
        again = _deploy_after_lock(fleet, "--cycle", str(new), *DEPLOY_EP1)
        assert again.returncode == 0, (point, again.stdout + again.stderr)
        assert fleet.links("ep1")[0] == fleet.versions[f"cycle{new}"], point
        status = json.loads((ep1 / "status.json").read_text())["models"]["gemma_4b"]
        assert status["verified"] == fleet.versions[f"cycle{new}"], point
        _assert_complete(ep1)
        _assert_nothing_unverified(fleet)
        old, new = new, old


def test_deployer_killed_during_a_manual_rollback_converges(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make rollback TO=<v1>` killed at each step, then run again: v1 serves, verified."""
    ep1 = fleet.endpoints["ep1"]
    v1, v2 = fleet.versions["cycle1"], fleet.versions["cycle2"]
    back = ("--rollback", "--to", v1, *DEPLOY_EP1)
    for point in failpoints.MANUAL_ROLLBACK_POINTS:
        for cycle in ("1", "2"):
            assert _deploy_after_lock(fleet, "--cycle", cycle, *DEPLOY_EP1).returncode == 0
        assert fleet.links("ep1")[0] == v2
        with monkeypatch.context() as env:
            env.setenv(failpoints.DEPLOYER_ENV, point)
            killed = fleet.deploy(*back)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stdout + killed.stderr)
        _assert_complete(ep1)
        assert fleet.links("ep1")[0] in (v1, v2), point
        again = _deploy_after_lock(fleet, *back)
        assert again.returncode == 0, (point, again.stdout + again.stderr)
        assert fleet.links("ep1")[0] == v1, point
        _assert_nothing_unverified(fleet)
        assert v2 in json.loads((ep1 / "gemma_4b" / "bad.json").read_text()), point


def test_failed_reload_after_a_cut_deploy_goes_back_to_the_verified_release(
    fleet: Fleet, kit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deploy killed after ACTIVATE leaves cycle 2 serving unverified; the next deploy's
    reload fails: the endpoint goes back to cycle 1 (verified), not to unverified cycle 2."""
    v1, v2 = fleet.versions["cycle1"], fleet.versions["cycle2"]
    v4 = version(fleet.store, fleet.params, kit.good, 4)
    assert fleet.deploy("--cycle", "1", *DEPLOY_EP1).returncode == 0
    with monkeypatch.context() as env:
        env.setenv(failpoints.DEPLOYER_ENV, "deploy.after_activate")
        killed = fleet.deploy("--cycle", "2", *DEPLOY_EP1)
    assert killed.returncode == -signal.SIGKILL
    assert fleet.links("ep1") == (v2, v1)
    pidfile = tmp_path / "service.pid"
    pidfile.write_text("999999\n")  # no such process: the reload fails
    fleet.set_endpoint("ep1", reload_method="sigusr1", pidfile=str(pidfile))
    failed = _deploy_after_lock(fleet, "--cycle", "4", *DEPLOY_EP1)
    assert failed.returncode == 5, failed.stdout + failed.stderr
    assert fleet.links("ep1")[0] == v1
    bad = json.loads((fleet.endpoints["ep1"] / "gemma_4b" / "bad.json").read_text())
    assert v4 in bad
    _assert_nothing_unverified(fleet)


class CuttingRelay:
    """A loopback TCP relay to sshd that drops every connection after `budget` bytes.

    `rate` (bytes/s per direction) makes it a slow link, as a real cut one is: unthrottled
    loopback lets the sender run megabytes ahead into ssh's window, and all of that is lost
    with the connection, so a cut would land before the endpoint had written anything.
    """

    def __init__(
        self, target_port: int, budget: int | None, stall: bool = False, rate: int | None = None
    ) -> None:
        self.target_port, self.budget, self.stall, self.rate = target_port, budget, stall, rate
        self.relayed = 0  # bytes passed on, both directions, every connection
        self._count = threading.Lock()
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
                with self._count:
                    self.relayed += len(data)
                if self.rate:
                    time.sleep(len(data) / self.rate)
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


def test_network_cut_mid_transfer_then_resume(fleet: Fleet, kit, sshd, tmp_path: Path) -> None:
    # The kit adapters are ~200 KB; a 4 MB one makes the bytes a resume saves stand out from
    # ssh's own handshake and the session's traffic.
    big = inflated_adapter(kit.good, tmp_path / "big-adapter", rank=176)
    v4 = version(fleet.store, fleet.params, big, 4)
    size = sum(p.stat().st_size for p in (fleet.store.adapters / "gemma_4b" / v4).iterdir())
    assert size > 4_000_000
    relay = CuttingRelay(sshd.port, budget=size // 2, rate=2_000_000)
    try:
        config = tmp_path / "ssh_config"
        config.write_text(
            sshd.ssh_config.read_text().replace(f"Port {sshd.port}", f"Port {relay.port}")
            + f"  HostKeyAlias [127.0.0.1]:{sshd.port}\n"
        )
        fleet.set_endpoint("ep1", ssh_config=str(config))
        args = ("--cycle", "4", "--models", "gemma_4b", "--endpoints", "ep1", "--json")
        cut = fleet.deploy(*args)
        assert cut.returncode == 3, cut.stdout + cut.stderr
        assert "ep1" in json.loads(cut.stdout)["endpoints"][0]["error"]
        assert fleet.links("ep1") == (None, None)  # nothing activated before verification
        landing = fleet.endpoints["ep1"] / "incoming" / "gemma_4b" / "releases" / v4
        partial = landing / ".rsync-partial"
        kept = sum(p.stat().st_size for p in partial.iterdir()) if partial.is_dir() else 0
        relay.budget, relay.relayed = None, 0
        time.sleep(1)  # the cut session notices its closed connection and frees the lock
        again = fleet.deploy(*args)
        resumed = relay.relayed
        assert again.returncode == 0, again.stdout + again.stderr
        assert fleet.links("ep1")[0] == v4
        model = json.loads(again.stdout)["endpoints"][0]["models"][0]
        assert model["status"] == "success"
        # Everything the rerun moved (ssh handshake, session, rsync) stays well under one
        # full copy: it sent only what the cut left missing.
        assert kept > 0.2 * size, f"rsync kept {kept} of {size} bytes across the cut"
        assert resumed < 0.8 * size, f"rerun moved {resumed} bytes for a {size}-byte release"
        assert model["bytes_sent"] < 0.8 * size
        assert not partial.exists()  # staged: no leftovers beside the release
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
        assert fleet.links("ep1") == (None, None)
        time.sleep(1)
        left = subprocess.run(["pgrep", "-f", str(config)], capture_output=True, text=True)
        assert left.stdout.strip() == "", "orphaned ssh/rsync processes"
    finally:
        relay.stall = False
        relay.close()
