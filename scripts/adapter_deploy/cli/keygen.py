"""Create the ed25519 signing key on the training machine (make keygen).

Usage:
    python scripts/keygen.py [--out PATH]
    make keygen

Writes the private key (mode 0600) to store.signing_key from params.yaml (or
--out) and the public key beside it as <path>.pub. Never overwrites a key and
never writes inside the repository by default: keep the private key out of git.
Then `make trust ENDPOINT=<name>` installs the public key on each endpoint.
"""

import argparse
from pathlib import Path

from adapter_deploy import api
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    pub, kid = api.keygen(params, Path(args.out) if args.out else None)
    print(f"signing key {kid} created; public key {pub}")
    print("next: make trust ENDPOINT=<name> for each endpoint")
    return 0


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--out", help="private key path (default: store.signing_key)")
    return parser


def entry() -> None:
    run(main, cli())
