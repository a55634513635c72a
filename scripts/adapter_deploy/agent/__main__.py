"""Endpoint side of a deploy (run by the deployer over ssh, or locally).

Usage:
    python -m adapter_deploy.agent session --adapter-dir DIR [--holder TEXT] [--read-only]

Reads one JSON request per line on stdin and answers one JSON line each on
stdout; holds the endpoint's deploy lock until stdin closes. Operators do not
run this by hand: `make deploy`, `make rollback` and `make status` do.
"""

import argparse
import sys
from pathlib import Path

from adapter_deploy.agent.session import read_only_session, serve_session
from adapter_deploy.common.runner import make_parser, run


def main(args: argparse.Namespace) -> int:
    adapter_dir = Path(args.adapter_dir).expanduser()
    if args.read_only:
        return read_only_session(adapter_dir, sys.stdin, sys.stdout)
    return serve_session(adapter_dir, args.holder, sys.stdin, sys.stdout, args.endpoint)


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.prog = "python -m adapter_deploy.agent"
    parser.add_argument("command", choices=["session"], help="what to run")
    parser.add_argument("--adapter-dir", required=True, help="the endpoint's adapter_dir")
    parser.add_argument("--holder", default="a deploy", help="who holds the lock (for errors)")
    parser.add_argument("--read-only", action="store_true", help="status queries only, no lock")
    parser.add_argument("--endpoint", help="this endpoint's name in the deployer's params")
    return parser


run(main, cli())
