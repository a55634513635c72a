"""Install the training machine's public signing key on endpoints (make trust).

Usage:
    python scripts/trust.py --endpoints mac-dev [church-rtx2070-1 ...]
    make trust ENDPOINT=mac-dev

From then on the endpoint accepts only releases signed by a trusted key: a
foreign signature, tampered files or metadata, files outside the signed list,
expired metadata and (unless the operator asked) older versions are refused.
"""

import argparse

from adapter_deploy import api
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params


def main(args: argparse.Namespace) -> int:
    trusted = api.trust(load_params(args.params), args.endpoints or [])
    for name, key_id in trusted.items():
        print(f"[{name}] trusts signing key {key_id}")
    return 0


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--endpoints", nargs="+", help="endpoints from params.yaml")
    return parser


def entry() -> None:
    run(main, cli())
