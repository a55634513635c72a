"""Start, stop or restart the inference service of an endpoint (no systemd needed).

Usage:
    python scripts/service.py start   --endpoint mac-dev [--log FILE]
    python scripts/service.py stop    --endpoint mac-dev
    python scripts/service.py restart --endpoint mac-dev [--log FILE]

Runs `python -m adapter_deploy.service --params P --endpoint E` detached (own session,
output to --log, default <adapter_dir>/service.log) and returns at once; the
deployer waits for readiness on service_url, not for this command. stop sends
SIGTERM to the pid in the endpoint's pidfile and waits for it to exit. As an
endpoint's `restart_command`, use:
    [<python>, <project_dir>/scripts/service.py, restart, --endpoint, <name>, --params, <file>]
On NVIDIA boxes with systemd, use systemd/adapter-serve.service instead.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from adapter_deploy.common import pidfile
from adapter_deploy.common.errors import ReloadFailed, UsageError
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params


def _pid(path: Path) -> int | None:
    """The running service's pid, or None: a stale pidfile's pid is never signalled."""
    try:
        return pidfile.live_pid(path)
    except ReloadFailed:
        return None


def stop(pidfile: Path, timeout: float = 30.0) -> bool:
    pid = _pid(pidfile)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    raise ReloadFailed(f"service pid {pid} did not stop in {timeout:.0f} s", "kill it by hand")


def start(params_file: Path, endpoint: str, log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "adapter_deploy.service",
                "--params",
                str(params_file),
                "--endpoint",
                endpoint,
            ],
            cwd=params_file.parent,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    return proc.pid


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    ep = params.endpoint(args.endpoint)
    if not ep.pidfile:
        raise UsageError(f"{args.endpoint} has no pidfile", "set pidfile: in params.yaml")
    pidfile = params.resolve(ep.pidfile)
    if args.action in ("stop", "restart"):
        stopped = stop(pidfile)
        print(f"{args.endpoint}: service {'stopped' if stopped else 'was not running'}")
    if args.action in ("start", "restart"):
        log = Path(args.log) if args.log else params.resolve(ep.adapter_dir) / "service.log"
        pid = start(params.source, args.endpoint, log)
        print(f"{args.endpoint}: service starting (pid {pid}, log {log})")
    return 0


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("action", choices=["start", "stop", "restart"])
    parser.add_argument("--endpoint", required=True, help="endpoint in params.yaml")
    parser.add_argument("--log", help="service output (default <adapter_dir>/service.log)")
    return parser


def entry() -> None:
    run(main, cli())
