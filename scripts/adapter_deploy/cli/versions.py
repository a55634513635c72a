"""List the versions in the adapter store, per model.

Usage:
    python scripts/versions.py [--model gemma_4b] [--json]
    make versions [MODEL=gemma_4b]
"""

import argparse

from adapter_deploy import api
from adapter_deploy.cli.render import print_per_model
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params

COLUMNS = ("version id", "cycle", "date", "sha8", "final_loss", "eval_wer")


def rows_for(versions: list[dict]) -> list[list[object]]:
    return [
        [
            v["version_id"],
            v["cycle"],
            v["created"][:10],
            v["sha256"][:8],
            (v.get("training_metrics") or {}).get("final_loss"),
            (v.get("training_metrics") or {}).get("eval_wer"),
        ]
        for v in versions
    ]


def main(args: argparse.Namespace) -> int:
    listing = api.versions(load_params(args.params), args.model)
    return print_per_model(listing, COLUMNS, rows_for, args.json)


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--model", help="only this model")
    parser.add_argument("--json", action="store_true", help="print versions as JSON")
    return parser


def entry() -> None:
    run(main, cli())
