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

from adapter_deploy import api
from adapter_deploy.cli.render import render
from adapter_deploy.common.names import printable
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params
from adapter_deploy.deploy.fleet_status import columns_for, status_rows


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    result = api.status(params, args.endpoints)
    if args.json:
        print(json.dumps({"exit_code": result.exit_code, "endpoints": result.endpoints}, indent=2))
    else:
        print(
            render("status", columns_for(result.endpoints), status_rows(result.endpoints)), end=""
        )
        for failed in (st for st in result.endpoints if "error" in st):
            print(printable(failed["error"]))  # whole, where a table cell would fold it
    return result.exit_code


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--endpoints", nargs="+", help="endpoints (default: all)")
    parser.add_argument("--json", action="store_true", help="print status as JSON")
    return parser


def entry() -> None:
    run(main, cli())
