"""Phase 1, VERSION: put a trained PEFT adapter into the versioned store.

Usage:
    python scripts/version.py --model gemma_4b --cycle 1 --src out/adapter [--metrics m.json]
    make version MODEL=gemma_4b CYCLE=1 SRC=out/adapter [METRICS=m.json]

Validates the adapter (safetensors only; every problem at once), hashes it,
copies it to adapters/<model>/cycle{N}_{YYYYMMDD}_{sha8}/, records it in
adapters/manifest.json, tracks it with DVC (pushing when a remote is set),
commits, and tags the cycle (`cycle{N}`; when that tag already exists it is
never moved: the version gets `cycle{N}.{k}`, or pass --retag to move it) and
the model (`<model>@v{N}.{k}.0`, read by `gto show`).
The same bytes for the same model and cycle change nothing.
"""

import argparse
import json
from pathlib import Path

from adapter_deploy import api
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    result = api.version(
        params,
        args.model,
        args.cycle,
        Path(args.src),
        Path(args.metrics) if args.metrics else None,
        retag=args.retag,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        if result.created:
            tags = ", ".join(result.tags)
            print(f"{result.model}: versioned {result.version_id} (tags: {tags})")
            if result.pushed_to:
                print(f"  pushed to the DVC remote {result.pushed_to}")
        else:
            print(f"{result.model}: unchanged, already {result.version_id}")
        if len(result.missing) == 4:
            print("  training metrics: none (no training_metrics.json beside the adapter)")
        elif result.missing:
            print(f"  training metrics lack: {', '.join(result.missing)}")
    return 0


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--model", required=True, help="model name from params.yaml")
    parser.add_argument("--cycle", required=True, type=int, help="fine-tuning cycle number (>= 1)")
    parser.add_argument("--src", required=True, help="PEFT output dir of the trainer")
    parser.add_argument("--metrics", help="training metrics JSON (default: SRC's own)")
    parser.add_argument("--retag", action="store_true", help="move an existing cycle tag")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def entry() -> None:
    run(main, cli())
