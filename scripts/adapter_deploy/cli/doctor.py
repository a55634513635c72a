"""Would a deploy work? A live preflight of each endpoint, one row per check (make doctor).

Usage:
    python scripts/doctor.py [--endpoints mac-dev ...] [--json]
    make doctor [ENDPOINT=mac-dev] [JSON=1]

Checks per endpoint: ssh login without a prompt and a known host key; the endpoint's code
speaks this deployer's protocol; Python and rsync on both sides; each model's base model
present and readable there; free disk at adapter_dir for the largest release plus
min_free_bytes; the reload path (sigusr1: the service answers at service_url and holds
the pidfile; restart: the command runs without a password); the signing key trusted there;
clock skew. Each row is ok, warn or FAIL with a one-line fix (skip: not checked because an
earlier check failed). Nothing is changed on the endpoint and no lock is taken.

Exit 0 only when a deploy would work on every endpoint named; otherwise the code the deploy
would stop with, the worst endpoint deciding: 3 ssh, rsync, disk or base model; 2 protocol
mismatch, signing or params; 5 the service could not be reloaded.
"""

import argparse
import json

from adapter_deploy import api
from adapter_deploy.cli.render import render
from adapter_deploy.common.names import printable
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params
from adapter_deploy.deploy.doctor import COLUMNS


def main(args: argparse.Namespace) -> int:
    result = api.doctor(load_params(args.params), args.endpoints)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return result.exit_code
    rows = [
        [e["endpoint"], c["check"], c["status"], c["detail"], c["fix"] or ""]
        for e in result.endpoints
        for c in e["checks"]
    ]
    print(render("doctor", COLUMNS, rows), end="")
    for e in result.endpoints:
        failed = [c["check"] for c in e["checks"] if c["status"] == "FAIL"]
        verdict = "a deploy would work" if not failed else "FAIL: " + ", ".join(failed)
        print(f"[{e['endpoint']}] {printable(verdict)}")
    return result.exit_code


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--endpoints", nargs="+", help="endpoints (default: all)")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    return parser


def entry() -> None:
    run(main, cli())
