"""The one runner every script exits through.

It adds the common flags, sets up logging to stderr, calls the script's
`main(args)` and turns the project's errors into one red line and the
documented exit code (see `adapter_deploy.common.errors`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from adapter_deploy.common.errors import EXIT_CODES, AdapterDeployError

_EPILOG = "exit codes: " + ", ".join(f"{code} {what}" for code, what in EXIT_CODES.items())


def make_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser with the flags every script shares (-v, --traceback, --params)."""
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
    return parser


def _red(text: str) -> str:
    if sys.stderr.isatty() and not os.environ.get("NO_COLOR"):
        return f"\033[31m{text}\033[0m"
    return text


def run(
    main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser
) -> NoReturn:
    """Parse arguments, run `main`, exit with its code or the error's code."""
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(message)s"
        if not getattr(args, "verbose", False)
        else "%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code = main(args)
    except AdapterDeployError as err:
        if getattr(args, "traceback", False):
            raise
        print(_red(f"error: {err.one_line()}"), file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print(_red("error: interrupted"), file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
