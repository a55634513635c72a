"""The one runner every script exits through.

It adds the common flags, sets up logging to stderr (`adapter_deploy.common.logs`),
calls the script's `main(args)` and turns the project's errors into one red line and
the documented exit code (see `adapter_deploy.common.errors`); with `--log-json` or
LOG_JSON=1 that line is a JSON object like every other log line.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from collections.abc import Callable
from traceback import format_exc
from typing import NoReturn

from adapter_deploy.common import logs
from adapter_deploy.common.errors import EXIT_CODES, AdapterDeployError
from adapter_deploy.common.names import printable

_EPILOG = "exit codes: " + ", ".join(f"{code} {what}" for code, what in EXIT_CODES.items())


def make_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser with the flags every script shares (-v, --traceback, --params, --log-json)."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    parser.add_argument(
        "--traceback", action="store_true", help="re-raise errors with a full traceback"
    )
    parser.add_argument(
        "--params",
        default=os.environ.get("PARAMS") or None,
        help="params file (default: $PARAMS or params.yaml in the project root)",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        help="log one JSON object per line on stderr (also: LOG_JSON=1)",
    )
    return parser


def _red(text: str) -> str:
    if sys.stderr.isatty() and not os.environ.get("NO_COLOR"):
        return f"\033[31m{text}\033[0m"
    return text


def _setup_logging(args: argparse.Namespace) -> bool:
    """Configure stderr logging from the common flags; True when it is JSON."""
    as_json = logs.json_wanted(getattr(args, "log_json", False))
    logs.setup(verbose=getattr(args, "verbose", False), as_json=as_json)
    # A process that works for one endpoint or model (the service, the agent,
    # `--model X`) names it on every line, in every thread.
    logs.set_process_context(
        endpoint=_one(getattr(args, "endpoint", None)), model=_one(getattr(args, "model", None))
    )
    return as_json


def _one(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _exit_with(as_json: bool, err: AdapterDeployError, **extra: str) -> NoReturn:
    """The one error line at exit: red text, or a JSON log line for collectors."""
    if as_json:
        fields = {
            "logger": __name__,
            **logs.current_context(),
            "exit_code": err.exit_code,
            "fix": err.fix,
            **extra,
        }
        print(logs.json_line("error", err.message, **fields), file=sys.stderr)
    else:
        print(_red(f"error: {printable(err.one_line())}"), file=sys.stderr)
    sys.exit(err.exit_code)


def release_thread_streams() -> None:
    """Clear the MLX streams the calling thread made (nothing when MLX was never imported).

    MLX 0.32 leaves each thread's streams to the program: a thread that ran MLX and ends with
    them, the main thread included, can abort the process at exit ("terminate called without
    an active exception", exit -6) after its work succeeded. Call it last on such a thread:
    MLX on that thread fails afterwards. The main thread's run at exit (below).
    """
    mx = sys.modules.get("mlx.core")
    if mx is not None and hasattr(mx, "clear_streams"):
        mx.clear_streams()


# At exit, not at the end of run(): a process may call run() and go on using MLX (tests do).
atexit.register(release_thread_streams)


def run(
    main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser
) -> NoReturn:
    """Parse arguments, run `main`, exit with its code or the error's code."""
    args = parser.parse_args()
    as_json = _setup_logging(args)
    try:
        code = main(args)
    except AdapterDeployError as err:
        if getattr(args, "traceback", False):
            raise
        _exit_with(as_json, err)
    except KeyboardInterrupt:
        interrupted = AdapterDeployError("interrupted")
        interrupted.exit_code = 130
        _exit_with(as_json, interrupted)
    except Exception as err:
        if getattr(args, "traceback", False) or not as_json:
            raise  # a bug: Python's own traceback, exit 1
        # a log collector still gets one JSON line, with the traceback inside it
        _exit_with(
            as_json, AdapterDeployError(f"unexpected error: {err!r}"), traceback=format_exc()
        )
    sys.exit(code or 0)
