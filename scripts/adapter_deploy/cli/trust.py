"""Install the training machine's public signing key on endpoints (make trust).

Usage:
    python scripts/trust.py --endpoints mac-dev [church-rtx2070-1 ...]
    make trust ENDPOINT=mac-dev

From then on the endpoint accepts only releases signed by a trusted key: a
foreign signature, tampered files or metadata, files outside the signed list,
expired metadata and (unless the operator asked) older versions are refused.
"""

import argparse
import tempfile
from pathlib import Path

from adapter_deploy.common.errors import UsageError
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params
from adapter_deploy.deploy.remote import Connection, Session


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    if not params.store.signing_key:
        raise UsageError("no signing key configured", "set store.signing_key and run make keygen")
    pub = params.resolve(params.store.signing_key + ".pub")
    if not pub.is_file():
        raise UsageError(f"public key {pub} not found", "run make keygen first")
    if not args.endpoints:
        raise UsageError("no endpoint given", "pass ENDPOINT=<name>")
    with tempfile.TemporaryDirectory() as control:
        for name in args.endpoints:
            ep = params.endpoint(name)
            session = Session(Connection(name, ep, Path(control)), ep.adapter_dir)
            try:
                kid = session.request("trust", public_pem=pub.read_text())["key_id"]
            finally:
                session.close()
            print(f"[{name}] trusts signing key {kid}")
    return 0


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--endpoints", nargs="+", help="endpoints from params.yaml")
    return parser


def entry() -> None:
    run(main, cli())


if __name__ == "__main__":
    entry()
