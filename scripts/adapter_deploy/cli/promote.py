"""Record which version each pulling endpoint should run (desired state in git).

Usage:
    python scripts/promote.py --cycle 2 --endpoints church-box [--models gemma_4b] [--json]
    make promote CYCLE=2 ENDPOINT="church-box" [MODELS="gemma_4b"]

For endpoints with `mode: pull`: one GTO stage tag `<model>#<endpoint>#<n>` per endpoint and
model on the version's commit (stock `gto show` reads them), pushed to store.git_remote with
the version's own `<model>@v…` tag. Nothing is sent to the endpoint: it fetches the tags and
the release itself (`make pull` there). ENDPOINT may name rollout groups.
"""

import argparse
import json

from adapter_deploy import api
from adapter_deploy.cli.render import render
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params

COLUMNS = ("endpoint", "model", "version", "stage tag")


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    models = args.models or None
    result = api.promote(params, args.endpoints or [], models, args.cycle, args.version)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    rows = [
        [a["endpoint"], a["model"], a["version_id"], a["tag"] or "already assigned"]
        for a in result.assignments
    ]
    print(render(f"promoted (tags pushed to {result.git_remote})", COLUMNS, rows), end="")
    if result.not_in_cycle:
        print(f"not in this cycle (left as they are): {', '.join(result.not_in_cycle)}")
    return 0


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--cycle", type=int, help="each model's newest version of cycle N")
    parser.add_argument("--version", help="this exact version id (one model)")
    parser.add_argument("--models", nargs="+", help="models (default: every model in the cycle)")
    parser.add_argument("--endpoints", nargs="+", help="pulling endpoints or rollout groups")
    parser.add_argument("--json", action="store_true", help="print the assignments as JSON")
    return parser


def entry() -> None:
    run(main, cli())
