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
from pathlib import Path

from adapter_deploy import api
from adapter_deploy.cli.progress import deploy_progress
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    source = Path(args.source) if args.source else None
    with deploy_progress() as progress:  # a spinner naming the step (copy, install)
        sent = api.bootstrap(
            params, args.endpoints or [], source, install=not args.no_install, progress=progress
        )
    for name, size in sent.items():
        ep = params.endpoint(name)
        done = "copied" if args.no_install else "copied and installed"
        print(f"[{name}] project code {done} in {ep.project_dir} ({size} bytes sent)")
    return 0


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--endpoints", nargs="+", help="endpoints from params.yaml")
    parser.add_argument("--no-install", action="store_true", help="copy code only")
    parser.add_argument(
        "--from", dest="source", help="checkout to copy (default: the params file's directory)"
    )
    return parser


def entry() -> None:
    run(main, cli())
