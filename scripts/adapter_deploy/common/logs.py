"""One logging setup for every script, the inference service and the endpoint agent.

Every line on stderr carries a UTC timestamp, the level and, when known, the endpoint
and model it concerns:

    2026-11-29T17:20:01.123Z INFO [ep1] [gemma_4b] pre-check: passed

The endpoint and model come from `log_context(endpoint=..., model=...)`, a contextvar, so a
message never has to repeat them. A worker thread starts with an empty context: set it
inside the worker (deploy/fleet.py does, per endpoint and per model) or run the worker in
`contextvars.copy_context()`. A process that serves one endpoint or model throughout (the
service, the agent, `--model X` scripts) names it once with `set_process_context`, which
also reaches threads it never started.

`--log-json` or `LOG_JSON=1` prints one JSON object per line instead, for log collectors:
{"ts", "level", "logger", "endpoint", "model", "msg"} (keys without a value left out).
stdout is never touched: tables and `--json` results stay there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextvars import ContextVar
from typing import IO, Any

from adapter_deploy.common.names import printable

ENV = "LOG_JSON"
_FIELDS = ("endpoint", "model")
_CONTEXT: dict[str, ContextVar[str | None]] = {
    field: ContextVar(f"adapter_deploy_log_{field}", default=None) for field in _FIELDS
}
_PROCESS: dict[str, str] = {}  # set_process_context: the fallback in every thread


@contextlib.contextmanager
def log_context(endpoint: str | None = None, model: str | None = None) -> Iterator[None]:
    """Records logged inside (in this thread or context) name this endpoint and/or model."""
    given = {"endpoint": endpoint, "model": model}
    tokens = [(_CONTEXT[k], _CONTEXT[k].set(v)) for k, v in given.items() if v is not None]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def set_process_context(endpoint: str | None = None, model: str | None = None) -> None:
    """Name the endpoint/model this whole process works for (a fallback under log_context)."""
    for key, value in (("endpoint", endpoint), ("model", model)):
        if value is not None:
            _PROCESS[key] = value


def current_context() -> dict[str, str]:
    """The endpoint and model a record logged here and now would carry."""
    found = {k: _CONTEXT[k].get() or _PROCESS.get(k) for k in _FIELDS}
    return {k: v for k, v in found.items() if v}


class ContextFilter(logging.Filter):
    """Adds `endpoint` and `model` to each record; an explicit `extra=` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = current_context()
        for field in _FIELDS:
            if getattr(record, field, None) is None:
                setattr(record, field, context.get(field))
        return True


def utc_timestamp(created: float | None = None) -> str:
    """ISO 8601 in UTC with milliseconds and `Z`: 2026-11-29T17:20:01.123Z."""
    created = time.time() if created is None else created
    millis = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


def _exception_text(record: logging.LogRecord) -> str | None:
    if record.exc_info:
        return "".join(traceback.format_exception(*record.exc_info)).rstrip()
    return record.exc_text or None


def safe_message(record: logging.LogRecord) -> str:
    """The record's message with what it quotes (endpoint answers, model output, paths)
    made printable: a value can neither colour the terminal nor start a forged log line;
    the message's own text (its format string) stays as written."""
    if not record.args:
        return printable(record.getMessage())

    def safe(value: Any) -> Any:
        return value if isinstance(value, int | float) else printable(value)

    args = record.args
    values = (
        {k: safe(v) for k, v in args.items()}
        if isinstance(args, dict)
        else tuple(safe(a) for a in args)
    )
    try:
        return str(record.msg) % values
    except (TypeError, ValueError, KeyError):  # as logging would show it, escaped
        return printable(record.getMessage())


class TextFormatter(logging.Formatter):
    """`<ts> <LEVEL> [endpoint] [model] message`; with `verbose`, the logger name too."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        parts = [utc_timestamp(record.created), record.levelname]
        if self.verbose:
            parts.append(record.name)
        parts += [f"[{v}]" for f in _FIELDS if (v := getattr(record, f, None))]
        parts.append(safe_message(record))
        line = " ".join(parts)
        exc = _exception_text(record)
        return f"{line}\n{exc}" if exc else line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, keys without a value left out."""

    def format(self, record: logging.LogRecord) -> str:
        return json_line(
            record.levelname,
            record.getMessage(),
            logger=record.name,
            ts=utc_timestamp(record.created),
            endpoint=getattr(record, "endpoint", None),
            model=getattr(record, "model", None),
            exc=_exception_text(record),
        )


def json_line(level: str, msg: str, ts: str | None = None, **fields: Any) -> str:
    """The JSON log line: ts, level (lower case), logger, endpoint, model, msg, extras."""
    head = {"ts": ts or utc_timestamp(), "level": level.lower()}
    logger = fields.pop("logger", None)
    context = {k: fields.pop(k, None) for k in _FIELDS}
    body = {"logger": logger, **context, "msg": msg, **fields}
    return json.dumps({**head, **{k: v for k, v in body.items() if v is not None}})


def json_wanted(flag: bool = False) -> bool:
    """`--log-json`, or LOG_JSON set to 1/true/yes/on in the environment."""
    return flag or os.environ.get(ENV, "").strip().lower() in {"1", "true", "yes", "on"}


class _Handler(logging.StreamHandler):
    """Ours, so that a second setup() replaces it instead of doubling every line."""


def setup(verbose: bool = False, as_json: bool = False, stream: IO[str] | None = None) -> None:
    """Route every logger through one stderr handler with this format (idempotent)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter(verbose))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
