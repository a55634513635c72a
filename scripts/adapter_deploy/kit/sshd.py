"""A real OpenSSH sshd on 127.0.0.1 for every transfer test.

One sshd per test session on a free loopback port, with generated ed25519
host and client keys and a pinned known_hosts. Endpoints are separate
adapter_dirs reached through it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from adapter_deploy.kit.net import free_port

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SFTP_SERVER = "internal-sftp"  # built into sshd: no path to find


@dataclass
class SSHServer:
    port: int
    dir: Path
    ssh_config: Path
    known_hosts: Path
    identity: Path
    host_alias: str = "adapter-test"

    def endpoint(self, adapter_dir: Path, **extra: object) -> dict:
        """An endpoint entry for params.yaml that reaches this sshd."""
        return {
            "host": self.host_alias,
            "ssh_config": str(self.ssh_config),
            "adapter_dir": str(adapter_dir),
            "python": sys.executable,
            "platform": "cpu",
            "reload_method": "none",
            **extra,
        }


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("sshd did not start listening")


def _start(d: Path, port: int, options: str = "") -> tuple[int, subprocess.Popen, Path]:
    """Write the server and client config for `port` into `d` and start sshd on it."""
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_ed25519'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "UsePAM no\nStrictModes no\nPasswordAuthentication no\nPermitRootLogin yes\n"
        "KbdInteractiveAuthentication no\nMaxStartups 100:30:200\nMaxSessions 100\n"
        "AcceptEnv LANG\n"
        # DVC's ssh remote (dvc-ssh) talks SFTP.
        f"Subsystem sftp {SFTP_SERVER}\n{options}"
    )
    host_key = (d / "host_ed25519.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    (d / "ssh_config").write_text(
        "Host adapter-test\n  HostName 127.0.0.1\n"
        f"  Port {port}\n  User {pwd.getpwuid(os.getuid()).pw_name}\n"
        f"  IdentityFile {d / 'id_ed25519'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {d / 'known_hosts'}\n  LogLevel ERROR\n"
    )
    log = d / "sshd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=out, stderr=out
        )
    return port, proc, log


def _lost_the_port(proc: subprocess.Popen, log: Path) -> bool:
    """True when sshd exited because its port was taken (it says so at once)."""
    try:
        proc.wait(timeout=0.3)
    except subprocess.TimeoutExpired:
        return False
    return "Address already in use" in log.read_text(errors="replace")


@contextlib.contextmanager
def running_sshd(directory: Path, options: str = "") -> Iterator[SSHServer]:
    """Start a private sshd on a free 127.0.0.1 port with its keys and config in `directory`.

    Generates ed25519 host and client keys, a pinned known_hosts and an ssh_config with the
    alias `adapter-test`; yields once it listens and stops it (SIGTERM) on exit. `options`:
    more sshd_config lines (e.g. "LogLevel DEBUG1\n"; its log is `directory`/sshd.log). No
    pytest here, so benchmarks reuse it.
    """
    if not os.path.exists(SSHD):
        raise RuntimeError("sshd missing: apt-get install openssh-server (see .ci/run)")
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    _keygen(d / "host_ed25519")
    _keygen(d / "id_ed25519")
    shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    # free_port() releases the port before sshd binds it, so another process (a parallel
    # test worker) may take it in between: sshd then exits at once and a new port is tried.
    for attempt in range(5):
        port, proc, log = _start(d, free_port(), options)
        if not _lost_the_port(proc, log) or attempt == 4:
            break
    try:
        _wait_for_port(port, proc, log)
        yield SSHServer(port, d, d / "ssh_config", d / "known_hosts", d / "id_ed25519")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
