"""Copy this project's code to an endpoint's project_dir and install it there.

Usage:
    python scripts/bootstrap.py --endpoints mac-dev [--no-install]
    make bootstrap ENDPOINT=mac-dev

Sends Makefile, pyproject.toml, params.yaml, scripts/ and engines/ with rsync
over the same ssh settings as a deploy (never adapters, .git or .venv), then
runs `make install` in project_dir unless --no-install.
"""

import argparse
import tempfile
from pathlib import Path

import _bootstrap  # noqa: F401
from deploycore import PROJECT_ROOT
from deploycore.config import load_params
from deploycore.errors import UsageError
from deploycore.remote import Connection
from deploycore.runner import make_parser, run

CODE = ["Makefile", "pyproject.toml", "params.yaml", "README.md", "scripts", "engines"]


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    if not args.endpoints:
        raise UsageError("no endpoint given", "pass ENDPOINT=<name>")
    with tempfile.TemporaryDirectory() as control:
        for name in args.endpoints:
            ep = params.endpoint(name)
            if not ep.project_dir:
                raise UsageError(f"{name} has no project_dir", "set project_dir in params.yaml")
            conn = Connection(name, ep, Path(control))
            try:
                sent = conn.sync_tree([PROJECT_ROOT / c for c in CODE], ep.project_dir)
                print(f"[{name}] project code in {ep.project_dir} ({sent} bytes sent)")
                if not args.no_install:
                    conn.run(["make", "-C", ep.project_dir, "install"])
                    print(f"[{name}] installed")
            finally:
                conn.close()
    return 0


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--endpoints", nargs="+", help="endpoints from params.yaml")
    parser.add_argument("--no-install", action="store_true", help="copy code only")
    return parser


if __name__ == "__main__":
    run(main, cli())
