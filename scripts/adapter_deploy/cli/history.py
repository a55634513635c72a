"""Versions and deployments per model, with training metrics per cycle.

Usage:
    python scripts/history.py [--model gemma_4b] [--json]
    make history [MODEL=gemma_4b]

One row per version: cycle, date, final loss and eval WER with the change
against the previous version (a regression is marked "!"), and where it was
deployed, rolled back or refused according to the deploy log, and how far each staged
rollout of it went (waves done, halted where and why).
"""

import argparse

from adapter_deploy import api
from adapter_deploy.cli.render import print_per_model
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params

COLUMNS = ("version id", "cycle", "date", "final_loss", "eval_wer", "deployments", "rollout")


def _trend(value: object, before: object) -> str:
    if not isinstance(value, (int, float)):
        return ""
    if not isinstance(before, (int, float)):
        return f"{value:g}"
    mark = " !" if value > before else ""  # higher loss or WER than the cycle before
    return f"{value:g} ({value - before:+.3g}){mark}"


def rows_for(versions: list[dict]) -> list[list[object]]:
    rows, before = [], {}
    for v in versions:
        metrics = v.get("training_metrics") or {}
        rows.append(
            [
                v["version_id"],
                v["cycle"],
                v["created"][:10],
                _trend(metrics.get("final_loss"), before.get("final_loss")),
                _trend(metrics.get("eval_wer"), before.get("eval_wer")),
                ", ".join(v["deployments"]) or "-",
                "; ".join(v.get("rollouts") or []) or "-",
            ]
        )
        before = metrics
    return rows


def main(args: argparse.Namespace) -> int:
    data = api.history(load_params(args.params), args.model)
    return print_per_model(data, COLUMNS, rows_for, args.json)


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--model", help="only this model")
    parser.add_argument("--json", action="store_true", help="print the history as JSON")
    return parser


def entry() -> None:
    run(main, cli())
