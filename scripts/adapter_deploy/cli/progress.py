"""What an operator watches while a deploy runs, on stderr.

On a terminal: one rich progress bar per endpoint (bytes, rate, ETA during transfers; a
spinner and the step's name otherwise), log lines printed above the bars. Piped or
redirected: no bars and no control codes, one timestamped line per step and a byte
count line per endpoint every few seconds. The core reports through
`adapter_deploy.deploy.progress.Progress`; both classes here implement it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichProgress

from adapter_deploy.common.logs import JsonFormatter, log_context
from adapter_deploy.deploy.progress import Progress

BYTE_LINE_EVERY_S = 5.0
log = logging.getLogger("adapter_deploy.progress")


def _logging_json() -> bool:
    """--log-json / LOG_JSON=1: stderr is for a log collector, so no bars even on a terminal."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


class PlainProgress:
    """Lines for a log file or a CI job: never a carriage return or a color code. They are log
    records (timestamp, endpoint), so `--log-json` makes them JSON lines like the rest."""

    def __init__(self, every_s: float = BYTE_LINE_EVERY_S) -> None:
        self.every_s = every_s
        self._lock = threading.Lock()
        # endpoint -> [total, bytes done, bytes last printed, when last printed]
        self._transfers: dict[str, list[float]] = {}

    def _print(self, endpoint: str, text: str) -> None:
        with log_context(endpoint=endpoint):
            log.info("%s", text)

    def _bytes_line(self, endpoint: str, force: bool = False) -> None:
        found = self._transfers.get(endpoint)
        if found is None:
            return
        total, done, printed, when = found
        due = time.monotonic() - when >= self.every_s
        if done != printed and (force or due):
            self._print(endpoint, f"sent {_size(int(done))} of {_size(int(total))}")
            found[2:] = [done, time.monotonic()]

    def start(self, endpoint: str, total_bytes: int) -> None:
        with self._lock:
            self._transfers[endpoint] = [total_bytes, 0, 0, time.monotonic()]
            self._print(endpoint, f"sending {_size(total_bytes)}")

    def advance(self, endpoint: str, bytes_done: int) -> None:
        with self._lock:
            if endpoint in self._transfers:
                self._transfers[endpoint][1] = bytes_done
                self._bytes_line(endpoint)

    def step(self, endpoint: str, name: str) -> None:
        with self._lock:
            self._bytes_line(endpoint, force=True)
            self._print(endpoint, name)

    def done(self, endpoint: str) -> None:
        with self._lock:
            self._bytes_line(endpoint, force=True)
            self._transfers.pop(endpoint, None)
            self._print(endpoint, "done")


class BarProgress:
    """One rich task per endpoint; created on the endpoint's first report."""

    def __init__(self, bars: RichProgress) -> None:
        self.bars = bars
        self._lock = threading.Lock()
        self._tasks: dict[str, TaskID] = {}
        self._totals: dict[str, int] = {}

    def _task(self, endpoint: str) -> TaskID:
        with self._lock:
            if endpoint not in self._tasks:
                self._tasks[endpoint] = self.bars.add_task(f"[{endpoint}]", total=None)
            return self._tasks[endpoint]

    def start(self, endpoint: str, total_bytes: int) -> None:
        self._totals[endpoint] = max(total_bytes, 1)
        self.bars.reset(self._task(endpoint), total=self._totals[endpoint], completed=0)

    def advance(self, endpoint: str, bytes_done: int) -> None:
        self.bars.update(self._task(endpoint), completed=bytes_done)

    def step(self, endpoint: str, name: str) -> None:
        self.bars.update(self._task(endpoint), description=f"[{endpoint}] {name}")

    def done(self, endpoint: str) -> None:
        total = self._totals.get(endpoint, 1)  # finished: the spinner becomes a check mark
        self.bars.update(
            self._task(endpoint), description=f"[{endpoint}] done", total=total, completed=total
        )


def _bars(console: Console) -> RichProgress:
    return RichProgress(
        SpinnerColumn(finished_text="[green]✓"),
        TextColumn("{task.description}", markup=False),  # "[ep1]" is a name, not a style
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class _AboveBars:
    """A stream for the log handler that prints through the live display, above the bars."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def write(self, text: str) -> None:
        self.console.print(text, end="", markup=False, highlight=False, soft_wrap=True)

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def _logs_above(bars: RichProgress, terminal: IO[str]) -> Iterator[None]:
    """Log lines go above the bars, not across them; the handlers get the terminal back."""
    handlers = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and h.stream in (terminal, sys.__stderr__)
    ]
    above = _AboveBars(bars.console)
    streams = [h.setStream(above) for h in handlers]  # type: ignore[arg-type]
    try:
        yield
    finally:
        for handler, stream in zip(handlers, streams, strict=True):
            handler.setStream(stream)


@contextlib.contextmanager
def deploy_progress(stream: IO[str] | None = None) -> Iterator[Progress]:
    """The Progress for this run's stderr: bars on a terminal, plain lines otherwise."""
    stream = stream or sys.stderr
    if not stream.isatty() or _logging_json():
        yield PlainProgress()
        return
    console = Console(file=stream)
    with _bars(console) as bars, _logs_above(bars, stream):
        yield BarProgress(bars)


@contextlib.contextmanager
def spinner(text: str, stream: IO[str] | None = None) -> Iterator[None]:
    """A spinner naming a long step (a conversion, an install); one line when piped."""
    stream = stream or sys.stderr
    if not stream.isatty() or _logging_json():
        log.info("%s", text)
        yield
        return
    with Console(file=stream).status(text):
        yield
