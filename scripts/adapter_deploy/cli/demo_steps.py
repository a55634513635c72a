"""The steps of `make demo` as an operator runs them, and what a failed step leaves behind.

Each command is echoed with its output (and appended to <dir>/demo.log) under the step it
belongs to. When any step fails, the inference service the demo started is stopped again
(its process group: it leads its own session) and the failure becomes one line
(StepFailed): the step, the command's exit code or the service's trouble, the log to read.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapter_deploy.common.errors import EXIT_CODES, AdapterDeployError, StepFailed

SERVICE_CODE = 5  # the service did not start or answer: "reload failed"
STOP_TIMEOUT_S = 15.0


def shown_path(path: Path | str) -> str:
    """`path` as the operator typed it: relative to the current directory when inside it."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def alive(pid: int) -> bool:
    """The process runs (a zombie, exited and not yet reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state letter after the command name
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _ended(code: int, expect: int) -> str:
    if code < 0:
        return f"was killed by signal {-code}"
    what = f"exited {code}" + (f" ({EXIT_CODES[code]})" if code in EXIT_CODES and code else "")
    return what + (f", expected {expect}" if expect else "")


class DemoSteps:
    def __init__(self, root: Path, env: dict[str, str], project_root: Path) -> None:
        self.root, self.env, self.project_root = root, env, project_root
        self.log = root / "demo.log"
        self.service_log = root / "endpoint" / "service.log"
        self.title = "setup"
        self.service_pid: int | None = None

    def step(self, title: str) -> None:
        self.title = title
        print(f"\n=== {title} ===", flush=True)
        self._append(f"\n=== {title} ===\n")

    def _append(self, text: str) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a", encoding="utf-8") as out:
            out.write(text)

    def _shown(self, argv: tuple[str, ...]) -> str:
        words = ["python" if argv[0] == sys.executable else argv[0]]
        root = str(self.project_root)
        words += [os.path.relpath(a, root) if a.startswith(root) else a for a in argv[1:]]
        return " ".join(a if " " not in a else repr(a) for a in words)

    def failed(self, what: str, code: int, log: Path) -> StepFailed:
        return StepFailed(
            f'demo step "{self.title}" failed: {what}; log: {shown_path(log)}', None, code
        )

    def sh(self, *argv: str, expect: int = 0, cwd: Path | None = None, quiet: bool = False) -> str:
        """Run one command, echo it and its output (`quiet`: into demo.log only); its stdout,
        or StepFailed when it does not exit `expect`."""
        shown = self._shown(argv)
        proc = subprocess.run(
            list(argv), cwd=cwd or self.project_root, env=self.env, capture_output=True, text=True
        )
        self._append(f"$ {shown}\n{proc.stdout}{proc.stderr}(exit {proc.returncode})\n")
        if not quiet:
            print(f"$ {shown}", flush=True)
            if proc.stdout.strip():
                print(proc.stdout.rstrip())
            if proc.stderr.strip():
                print("\n".join("  | " + line for line in proc.stderr.rstrip().splitlines()))
            print(f"(exit {proc.returncode})", flush=True)
        if proc.returncode != expect:
            raise self.failed(
                f"`{shown}` {_ended(proc.returncode, expect)}", proc.returncode, self.log
            )
        return proc.stdout

    def start_service(self, *argv: str, url: str, timeout: float = 120.0) -> None:
        """`scripts/service.py start ...` (argv), then wait until the service answers."""
        out = self.sh(*argv, "--log", str(self.service_log))
        found = re.search(r"\(pid (\d+)", out)
        if found is None:
            raise self.failed("service.py start did not name the pid it started", 1, self.log)
        self.service_pid = int(found.group(1))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive(self.service_pid):
                self.service_pid = None
                raise self.failed(
                    "the service exited while starting", SERVICE_CODE, self.service_log
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        what = f"the service did not answer {url}/health in {timeout:.0f} s"
        raise self.failed(what, SERVICE_CODE, self.service_log)

    def ask(self, url: str, model: str, text: str) -> str:
        """The service's translation of `text`, and which release served it."""
        body = json.dumps({"model": model, "text": text}).encode()
        req = urllib.request.Request(f"{url}/translate", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                answer = json.loads(resp.read())
            return f"{answer['text']!r}  (served by {answer['version_id']})"
        except urllib.error.HTTPError as err:
            said = err.read(300).decode(errors="replace").strip()
            detail = f"answered {err.code} {err.reason}" + (f" ({said})" if said else "")
        except (OSError, ValueError, KeyError, TypeError) as err:
            detail = f"gave no translation ({err})"
        raise self.failed(f"the service at {url} {detail}", SERVICE_CODE, self.service_log)

    def stop_service(self) -> bool:
        """Stop the service this demo started (SIGTERM, then SIGKILL); True once it is gone."""
        pid, self.service_pid = self.service_pid, None
        if pid is None or not alive(pid):
            return False
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:  # service.py starts it in a session of its own: stop its whole group
                if os.getpgid(pid) == pid:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
            except ProcessLookupError:
                return True
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while time.monotonic() < deadline:
                if not alive(pid):
                    return True
                time.sleep(0.05)
        return not alive(pid)

    @contextmanager
    def stopping_service_on_failure(self) -> Iterator[None]:
        """Whatever ends the steps early (a failed step, a bug, Ctrl-C) stops the service."""
        try:
            yield
        except BaseException as err:
            pid = self.service_pid
            stopped = self.stop_service()
            left = f"the demo service (pid {pid}) was stopped" if stopped else "no service left"
            again = (
                f"read the log, then make demo (make demo-clean removes {shown_path(self.root)})"
            )
            if isinstance(err, StepFailed):
                err.fix = f"{left}; {again}"
                raise
            if isinstance(err, AdapterDeployError):
                what = f'demo step "{self.title}" failed: {err.message}'
                raise StepFailed(what, f"{left}; {err.fix or again}", err.exit_code) from err
            print(f'demo stopped in step "{self.title}": {left}', file=sys.stderr)
            raise
