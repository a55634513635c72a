"""Copy this project's code to an endpoint's project_dir and install it there.

Usage:
    python scripts/bootstrap.py --endpoints mac-dev [--no-install]
    make bootstrap ENDPOINT=mac-dev

Sends Makefile, pyproject.toml, params.yaml, README.md, scripts/, engines/ and
systemd/ from the checkout that holds the params file, with rsync over the same
ssh settings as a deploy (never adapters, tests, the test kits, .git or .venv),
then runs `make install` in project_dir unless --no-install.
"""

import argparse
import tempfile
from pathlib import Path

from adapter_deploy.common.errors import UsageError
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params
from adapter_deploy.deploy.remote import Connection

CODE = ["Makefile", "pyproject.toml", "params.yaml", "README.md", "scripts", "engines", "systemd"]
# Test kits build models for tests and the demo; an endpoint never needs them.
LEFT_BEHIND = ["/scripts/adapter_deploy/kit/"]


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
                code = [params.project_dir / c for c in CODE]
                sent = conn.sync_tree(code, ep.project_dir, exclude=LEFT_BEHIND)
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


def entry() -> None:
    run(main, cli())


if __name__ == "__main__":
    entry()
