"""Versions and deployments per model, with training metrics per cycle.

Usage:
    python scripts/history.py [--model gemma_4b] [--json]
    make history [MODEL=gemma_4b]

One row per version: cycle, date, final loss and eval WER with the change
against the previous version (a regression is marked "!"), and where it was
deployed, rolled back or refused according to the deploy log.
"""

import argparse
import json

from adapter_deploy.cli.table import render
from adapter_deploy.common.fsutil import read_jsonl
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params
from adapter_deploy.deploy.records import DEPLOY_LOG
from adapter_deploy.store.manifest import load_manifest, versions_of

COLUMNS = ("version id", "cycle", "date", "final_loss", "eval_wer", "deployments")


def _trend(value: object, before: object) -> str:
    if not isinstance(value, (int, float)):
        return ""
    if not isinstance(before, (int, float)):
        return f"{value:g}"
    mark = " !" if value > before else ""  # higher loss or WER than the cycle before
    return f"{value:g} ({value - before:+.3g}){mark}"


def deployments_of(log: list[dict], model: str, version_id: str) -> list[str]:
    seen = []
    for e in log:
        per_model = e.get("per_model", {}).get(model)
        if e.get("versions", {}).get(model) == version_id and per_model:
            seen.append(f"{e['action']}@{e['endpoint']}:{per_model['status']}")
    return seen


def history(params, models: list[str]) -> dict[str, list[dict]]:
    manifest = load_manifest(params.adapters_dir)
    log = read_jsonl(params.adapters_dir / DEPLOY_LOG)
    result = {}
    for model in models:
        rows = []
        for v in versions_of(manifest, model):
            rows.append({**v, "deployments": deployments_of(log, model, v["version_id"])})
        result[model] = rows
    return result


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    models = [args.model] if args.model else sorted(params.models)
    for m in models:
        params.model(m)
    data = history(params, models)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for model, versions in data.items():
        rows, before = [], {}
        for v in versions:
            metrics = v.get("training_metrics", {})
            rows.append(
                [
                    v["version_id"],
                    v["cycle"],
                    v["created"][:10],
                    _trend(metrics.get("final_loss"), before.get("final_loss")),
                    _trend(metrics.get("eval_wer"), before.get("eval_wer")),
                    ", ".join(v["deployments"]) or "-",
                ]
            )
            before = metrics
        if rows:
            print(render(model, COLUMNS, rows), end="")
        else:
            print(f"{model}: no versions yet")
    return 0


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--model", help="only this model")
    parser.add_argument("--json", action="store_true", help="print the history as JSON")
    return parser


def entry() -> None:
    run(main, cli())


if __name__ == "__main__":
    entry()
