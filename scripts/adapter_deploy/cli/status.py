"""Which version runs where: endpoint x model, read live from each endpoint.

Usage:
    python scripts/status.py [--endpoints mac-dev ...] [--json]
    make status [ENDPOINT=mac-dev]

Columns: active and previous release, what the running service reports as
loaded (when the endpoint has a service_url), last reload, health. Exit 3 when
an endpoint cannot be reached (the others are still shown).
"""

import argparse
import json

from adapter_deploy.cli.table import render
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params
from adapter_deploy.deploy.fleet_status import COLUMNS, fleet_status, status_rows


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    endpoints = args.endpoints or sorted(params.endpoints)
    statuses = fleet_status(params, endpoints)
    code = max([0, *(s.get("exit_code", 0) for s in statuses)])
    if args.json:
        print(json.dumps({"exit_code": code, "endpoints": statuses}, indent=2))
    else:
        print(render("status", COLUMNS, status_rows(statuses)), end="")
    return code


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--endpoints", nargs="+", help="endpoints (default: all)")
    parser.add_argument("--json", action="store_true", help="print status as JSON")
    return parser


def entry() -> None:
    run(main, cli())


if __name__ == "__main__":
    entry()
