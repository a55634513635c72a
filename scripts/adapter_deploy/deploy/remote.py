"""Every ssh and rsync call of the training side lives here.

argv lists only (never a shell on this side); the remote command is built with
shlex.join. ssh runs with BatchMode, strict host key checking, timeouts and one
multiplexed connection per endpoint per run (its own ControlPath).
"""

from __future__ import annotations

import ctypes
import getpass
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapter_deploy import protocol
from adapter_deploy.common import errors, wire
from adapter_deploy.common.errors import DiskFull, RemoteError
from adapter_deploy.common.names import printable
from adapter_deploy.common.prereqs import install_hint
from adapter_deploy.config import EndpointParams
from adapter_deploy.deploy.progress import RsyncOutput, progress_flags

log = logging.getLogger(__name__)
# what an endpoint's check before an early rsync prints when it does not start rsync
REFUSED = "adapter-deploy early rsync: "

# First match wins: a changed key also prints "Host key verification failed".
_SSH_FAILURES = [
    (
        "REMOTE HOST IDENTIFICATION HAS CHANGED",
        "host key of {host} has changed",
        "confirm the endpoint was reinstalled, then update known_hosts (ssh-keygen -R)",
    ),
    (
        "Host key verification failed",
        "host key of {host} is unknown or has changed",
        "verify the endpoint's key (ssh-keyscan) and add it to known_hosts",
    ),
    (
        "Permission denied",
        "ssh login to {host} was refused",
        "install your public key on the endpoint (ssh-copy-id) or set identity_file",
    ),
    (
        "Could not resolve hostname",
        "host {host} cannot be resolved",
        "check host: in params.yaml or your ssh config",
    ),
    (
        "Connection refused",
        "{host} refused the ssh connection",
        "start sshd on the endpoint or fix port:",
    ),
    ("timed out", "{host} is unreachable (timed out)", "check the network and that it is on"),
    ("No route to host", "{host} is unreachable", "check the network and that it is on"),
    (
        "No space left on device",
        "the disk of {host} is full; the partial transfer was removed",
        "free space on the endpoint (or lower release.keep), then deploy again",
        DiskFull,
    ),
    (
        "No module named 'adapter_deploy'",
        "this project is not installed for the endpoint's python on {host}",
        "run make bootstrap ENDPOINT={name} (or set python: in params.yaml)",
    ),
    (
        "No such file or directory",
        "the project is not installed on {host}",
        "run make bootstrap ENDPOINT={name} (or set project_dir/python in params.yaml)",
    ),
]


def _rsync_missing(code: int, stderr: str, rsync: str) -> bool:
    """The endpoint's shell could not start rsync. rsync itself reports that as code 127 only
    when it reaps the remote shell before noticing the closed pipe (code 12) — timing under
    load decides — so the shell's own complaint about the binary counts as well."""
    if code == 127 or "remote command not found" in stderr:
        return True
    # bash: "...: /opt/rsync: No such file or directory", "...: rsync: command not found";
    # dash: "sh: 1: rsync: not found"
    whys = ("not found", "command not found", "No such file or directory")
    return any(f"{rsync}: {why}" in stderr for why in whys)


def holder_text() -> str:
    return f"deploy by {getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"


class Connection(ABC):
    """How the deployer reaches one endpoint: the few things the deploy steps ask of it.

    Three implementations, so that no step asks how the endpoint is reached: `SshConnection`
    (another machine, over one multiplexed ssh connection), `LocalConnection` (this machine,
    `transport: local`) and `PullConnection` (a pulling endpoint reaching itself). `connect()`
    picks the first two from params; deploy/pull.py builds the third. What they share (the
    rsync flags, the agent's command line, reading ssh's complaints) lives here.
    """

    # Whether the endpoint needs an rsync of its own: over ssh, rsync runs at both ends.
    needs_endpoint_rsync: bool

    def __init__(self, name: str, ep: EndpointParams) -> None:
        self.name = name
        self.ep = ep
        self._running: list[subprocess.Popen] = []  # the rsync under way, for cancel()

    @abstractmethod
    def remote_path(self, path: str) -> str:
        """A params path as the endpoint takes it (a leading `~` is the endpoint's home)."""

    @abstractmethod
    def endpoint_python(self) -> str:
        """The endpoint's interpreter: `python`, else where the project is installed there."""

    @abstractmethod
    def argv(self, command: list[str]) -> list[str]:
        """`command` as this machine starts it so that it runs on the endpoint."""

    @abstractmethod
    def project_file(self, relative: str, here: Path) -> str:
        """A file of the project checkout as the endpoint reads it; `here` is the same file
        in this machine's checkout (resolved against the params file's directory)."""

    @abstractmethod
    def make_dir(self, path: str) -> None:
        """Create `path` (and its parents) on the endpoint."""

    @abstractmethod
    def wait_connected(self, session: subprocess.Popen, timeout: float) -> bool:
        """Wait until what carries `session` (just started) is up; False if the session
        ended first or it took longer than `timeout`."""

    @abstractmethod
    def log_in(self) -> str:
        """Reach the endpoint without a prompt (doctor's first row); what that showed."""

    @abstractmethod
    def close(self) -> None:
        """End what this connection keeps open between calls."""

    @abstractmethod
    def _rsync_shell(self) -> list[str]:
        """rsync's flags for how it reaches the endpoint."""

    @abstractmethod
    def _rsync_target(self, dest_dir: str) -> str:
        """dest_dir as rsync's destination argument."""

    @abstractmethod
    def _check_first(self, dest_dir: str, need: int) -> str | None:
        """push's `room_for` check: a shell line the endpoint runs before rsync starts
        (rsync starts only if it succeeds), or None when it was done here already."""

    def cancel(self) -> None:
        """Stop a push under way (its rsync keeps what landed for a resume)."""
        for proc in list(self._running):
            proc.terminate()

    def endpoint_command(self, *args: str) -> list[str]:
        """The endpoint agent, run from the package installed on the endpoint."""
        return [self.endpoint_python(), "-m", "adapter_deploy.agent", *args]

    def explain(self, stderr: str) -> RemoteError:
        for needle, message, fix, *kind in _SSH_FAILURES:
            if needle in stderr:
                error = kind[0] if kind else RemoteError
                return error(
                    f"{self.name}: " + message.format(host=self.ep.host), fix.format(name=self.name)
                )
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
        return RemoteError(
            f"{self.name}: endpoint command failed: {printable(last)}", "rerun with -v"
        )

    def push(
        self,
        files: list[Path] | list[str],
        dest_dir: str,
        progress: Callable[[int], None] | None = None,
        relative: bool = False,
        protect_args: bool = True,
        endpoint_rsync: tuple[int, ...] = (0,),
        compare_dest: str | None = None,
        room_for: int | None = None,
    ) -> int:
        """rsync the files into dest_dir on the endpoint; returns bytes sent.

        `progress` gets the running byte count as rsync reports it (parsed, never relayed
        raw). With `relative`, each file is given as `<root>/./<path>` and lands at
        dest_dir/<path>: several releases travel in one rsync (one start-up, one channel).
        `compare_dest`: a file already there (same size and mtime) is not sent. `room_for`
        (the early rsync's guard, deploy/early.py): first the endpoint's agent must speak
        this protocol and dest_dir (made private) have that many bytes free; else nothing
        is sent and the RemoteError says which (its message carries REFUSED).
        """
        if shutil.which("rsync") is None:
            raise RemoteError("rsync is missing on this machine", install_hint("rsync"))
        # --copy-links: a symlinked store (DVC cache.type symlink) sends the files' contents.
        # --no-perms: staging makes every file read-only, and a kept release's read-only copy
        # must still count as the same file for --compare-dest.
        argv = ["rsync", "-a", "--no-perms", "--copy-links", "--partial-dir=.rsync-partial"]
        argv += ["--stats"]
        # --protect-args: the destination is not read by the endpoint's shell (rsync >= 3).
        argv += ["--protect-args"] if protect_args else []
        argv += ["--relative"] if relative else []
        argv += [f"--compare-dest={compare_dest}"] if compare_dest else []
        flags, per_file = progress_flags(endpoint_rsync) if progress else ([], False)
        argv += flags
        check = None if room_for is None else self._check_first(dest_dir, room_for)
        rsync_path = self.ep.rsync_path or ("rsync" if check else None)
        if check:
            # the endpoint's shell runs rsync-path; rsync appends its server arguments
            rsync_path = f"{check} && exec {rsync_path}"
        argv += [f"--rsync-path={rsync_path}"] if rsync_path else []
        argv += self._rsync_shell()
        argv += [str(f) for f in files] + [self._rsync_target(dest_dir)]
        code, stdout, stderr = _run_rsync(argv, progress, per_file, self._running)
        refused = [line for line in stderr.splitlines() if check and REFUSED in line]
        if code != 0 and refused:
            raise RemoteError(f"{self.name}: {refused[0].strip()}", "")
        if code != 0:
            if _rsync_missing(code, stderr, self.ep.rsync_path or "rsync"):
                raise RemoteError(
                    f"{self.name}: rsync is missing on the endpoint",
                    f"on the endpoint: {install_hint('rsync')}",
                )
            raise self.explain(stderr)
        return _bytes_sent(stdout)

    def sync_tree(self, paths: list[Path], dest_dir: str, exclude: list[str] = ()) -> int:
        """Mirror code paths into dest_dir (bootstrap): caches and weights stay behind."""
        argv = ["rsync", "-a", "--delete", "--stats", "--exclude=__pycache__", "--exclude=*.pyc"]
        argv += [f"--exclude={pattern}" for pattern in exclude]
        # mkdir first: --mkpath needs rsync >= 3.2.3 on the endpoint, older than macOS ships.
        dest_dir = self.remote_path(dest_dir)
        self.make_dir(dest_dir)
        argv += self._rsync_shell()
        code, stdout, stderr = _run_rsync([*argv, *map(str, paths), self._rsync_target(dest_dir)])
        if code != 0:
            raise self.explain(stderr)
        return _bytes_sent(stdout)

    def run(self, command: list[str]) -> str:
        """Run one command on the endpoint; its output, or a RemoteError."""
        proc = subprocess.run(self.argv(command), capture_output=True, text=True)
        if proc.returncode != 0:
            raise self.explain(proc.stderr or proc.stdout)
        return proc.stdout


class SshConnection(Connection):
    """Another machine, over ssh: one multiplexed connection per endpoint per run (its own
    ControlPath), and an rsync at each end."""

    needs_endpoint_rsync = True

    def __init__(self, name: str, ep: EndpointParams, control_dir: Path) -> None:
        super().__init__(name, ep)
        self.control_path = control_dir / f"{name}.sock"

    def ssh_argv(self) -> list[str]:
        """The ssh command without host; absent optional keys add no flag at all."""
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
        argv += ["-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5"]
        argv += ["-o", "ServerAliveCountMax=3", "-o", "ControlMaster=auto"]
        argv += ["-o", f"ControlPath={self.control_path}", "-o", "ControlPersist=30"]
        if self.ep.ssh_config:
            argv += ["-F", os.path.expanduser(self.ep.ssh_config)]
        if self.ep.port is not None:
            argv += ["-p", str(self.ep.port)]
        if self.ep.identity_file:
            argv += ["-i", os.path.expanduser(self.ep.identity_file)]
        if self.ep.user:
            argv += ["-l", self.ep.user]
        return argv

    def remote_path(self, path: str) -> str:
        # Remote commands are quoted, so a leading `~` would be a literal directory; ssh
        # starts in the home directory, so the path becomes a relative one.
        if path == "~":
            return "."
        return path[2:] or "." if path.startswith("~/") else path

    def endpoint_python(self) -> str:
        if self.ep.python:
            return self.remote_path(self.ep.python)
        if self.ep.project_dir:  # the venv `make bootstrap` made there
            return self.remote_path(f"{self.ep.project_dir.rstrip('/')}/.venv/bin/python")
        return "python3"

    def argv(self, command: list[str]) -> list[str]:
        return [*self.ssh_argv(), self.ep.host, "--", shlex.join(command)]

    def project_file(self, relative: str, here: Path) -> str:
        # the endpoint's own checkout, where it has one (`project_dir`)
        if self.ep.project_dir:
            return self.remote_path(f"{self.ep.project_dir.rstrip('/')}/{relative}")
        return str(here)

    def make_dir(self, path: str) -> None:
        self.run(["mkdir", "-p", "--", path])

    def wait_connected(self, session: subprocess.Popen, timeout: float) -> bool:
        # up once its multiplexing socket exists, while the agent is still starting
        deadline = time.monotonic() + timeout
        while not self.control_path.exists():
            if session.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def log_in(self) -> str:
        self.run(["true"])
        return f"logged in to {self.ep.host} without a prompt; host key known"

    def close(self) -> None:
        if self.control_path.exists():
            subprocess.run(
                [*self.ssh_argv(), "-O", "exit", self.ep.host], capture_output=True, timeout=10
            )

    def _rsync_shell(self) -> list[str]:
        return ["-e", shlex.join(self.ssh_argv())]

    def _rsync_target(self, dest_dir: str) -> str:
        return f"{self.ep.host}:{self.remote_path(dest_dir).rstrip('/')}/"

    def _check_first(self, dest_dir: str, need: int) -> str:
        # In the endpoint's shell, in the same ssh command as rsync: nothing lands unless
        # it passes (an endpoint of another protocol is refused with nothing moved).
        python = shlex.quote(self.endpoint_python())
        ask = shlex.quote(f"from {wire.__name__} import PROTOCOL_VERSION as v; print(v)")
        protocol = f'test "$({python} -c {ask} 2>/dev/null)" = {wire.PROTOCOL_VERSION}'
        q = shlex.quote(self.remote_path(dest_dir))
        free = f"$(df -Pk -- {q} | awk 'NR==2 {{print $4}}')"
        room = f'mkdir -p -m 700 -- {q} && test "{free}" -ge {-(-need // 1024)}'
        return (
            f"{{ {protocol} || {_refuse('no agent of this protocol here')}; }} && "
            f"{{ {room} || {_refuse(f'less than {need} bytes free')}; }}"
        )


def _refuse(why: str) -> str:
    return f"{{ echo {shlex.quote(REFUSED + why)} >&2; exit 1; }}"


class LocalConnection(Connection):
    """This machine (`transport: local`, the demo's): the agent and rsync are local
    processes, and the endpoint reads this machine's files."""

    needs_endpoint_rsync = False  # this machine's rsync copies on its own

    def remote_path(self, path: str) -> str:
        # remote commands are quoted, never read by a shell: `~` is expanded here
        return os.path.expanduser(path)

    def endpoint_python(self) -> str:
        return self.remote_path(self.ep.python) if self.ep.python else sys.executable

    def argv(self, command: list[str]) -> list[str]:
        return command

    def project_file(self, relative: str, here: Path) -> str:
        return str(here)  # the endpoint shares this checkout

    def make_dir(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)

    def wait_connected(self, session: subprocess.Popen, timeout: float) -> bool:
        return True  # no connection to wait for

    def log_in(self) -> str:
        return "transport local: no ssh"

    def close(self) -> None:
        pass  # nothing held between calls

    def _rsync_shell(self) -> list[str]:
        return []

    def _rsync_target(self, dest_dir: str) -> str:
        return self.remote_path(dest_dir).rstrip("/") + "/"

    def _check_first(self, dest_dir: str, need: int) -> None:
        # Checked here, before rsync starts: the agent is this very package, so only the room.
        root = Path(self.remote_path(dest_dir))
        try:
            root.mkdir(parents=True, exist_ok=True)
            root.chmod(0o700)
            free = shutil.disk_usage(root).free
        except OSError as err:
            raise RemoteError(f"{self.name}: {REFUSED}{err}", "") from err
        if free < need:
            raise RemoteError(f"{self.name}: {REFUSED}less than {need} bytes free", "")


class PullConnection(LocalConnection):
    """A pulling endpoint reaching itself (deploy/pull.py): local processes whatever its
    `transport:` says (that is how the training machine reaches it, for bootstrap and
    service-install); its pushes copy the release from the pull's fetch cache."""


def connect(name: str, ep: EndpointParams, control_dir: Path) -> Connection:
    """The connection the training side uses for `ep`; `control_dir` holds ssh's sockets.
    The one place that asks how an endpoint is reached."""
    if ep.transport == "local":
        return LocalConnection(name, ep)
    return SshConnection(name, ep, control_dir)


def die_with_this_process() -> Callable[[], None] | None:
    """For Popen's preexec_fn on Linux: the child gets SIGTERM when the thread that started
    it ends, so an rsync never keeps writing into an endpoint after its deployer was killed
    (even by kill -9, which no handler sees). Elsewhere (macOS) None: rsync there ends when
    it next reports to the closed pipe."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the deployer died before the line above took effect
            os._exit(1)

    return preexec


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _run_rsync(
    argv: list[str],
    progress: Callable[[int], None] | None = None,
    per_file: bool = False,
    running: list[subprocess.Popen] | None = None,
) -> tuple[int, str, str]:
    """Run rsync; with `progress`, parse its output as it comes and report byte counts.
    While it runs, the process is in `running` (so another thread can stop it)."""
    output = RsyncOutput(per_file)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=err, preexec_fn=die_with_this_process()
        )
        if running is not None:
            running.append(proc)
        try:
            assert proc.stdout is not None
            while chunk := os.read(proc.stdout.fileno(), 65536):
                moved = output.feed(chunk)
                if moved is not None and progress:
                    progress(moved)
            proc.wait()
        finally:
            if running is not None:
                running.remove(proc)
        err.seek(0)
        return proc.returncode, output.text.decode(errors="replace"), err.read().decode()


def _bytes_sent(stats: str) -> int:
    match = re.search(r"Literal data: ([\d,]+)", stats)
    return int(match.group(1).replace(",", "")) if match else 0


class Session:
    """One endpoint agent session; `call()` sends a typed request and returns its result."""

    def __init__(
        self, conn: Connection, adapter_dir: str, read_only: bool = False, wait: bool = True
    ) -> None:
        self.conn = conn
        args = ["session", "--adapter-dir", adapter_dir, "--holder", holder_text()]
        args += ["--endpoint", conn.name]
        args += ["--read-only"] if read_only else []
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            conn.argv(conn.endpoint_command(*args)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.agent_version: str | None = None
        self.rsync_version: tuple[int, ...] = (0,)
        if wait:
            self.ready()

    def connected(self, timeout: float = 30.0) -> bool:
        """Wait until the connection is up, while the agent is still starting; False if the
        session ended first or it took too long."""
        return self.conn.wait_connected(self.proc, timeout)

    def ready(self) -> None:
        """Wait for the agent's ready line (it holds the endpoint's lock from then on)."""
        ready = self._receive()  # the ready line, or the reason there is none (e.g. locked)
        try:
            protocol.check_ready(self.conn.name, ready)
        except errors.ProtocolMismatch:
            self.close()  # releases the endpoint's lock before anything is sent
            raise
        self.agent_version = ready.get("version")
        # rsync before 3.0 (Apple's 2.6.9) has no --protect-args; params paths are checked
        # against a safe alphabet when loaded, so the destination is safe either way.
        self.rsync_version = tuple(ready.get("rsync_version") or (0,))

    def _receive(self) -> Any:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.proc.wait()
            self._stderr.seek(0)
            raise self.conn.explain(self._stderr.read())
        reply = json.loads(line)
        if not reply["ok"]:
            err = reply["error"]
            cls = getattr(errors, str(err["type"]), None)
            if not (isinstance(cls, type) and issubclass(cls, errors.AdapterDeployError)):
                cls = RemoteError
            fix = err.get("fix")
            # the endpoint's words reach a terminal, logs and git: never its escape codes
            message = f"{self.conn.name}: {printable(err['message'])}"
            raise cls(message, printable(fix) if fix is not None else None)
        return protocol.check_reply(self.conn.name, reply["result"])

    def call(self, request: protocol.Request) -> Any:
        """Send one typed request; its result, or the endpoint's error raised here."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(protocol.encode(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # _receive explains why the endpoint went away
        return self._receive()

    def endpoint_log(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._stderr.close()
