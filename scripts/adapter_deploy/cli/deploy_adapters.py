"""Deploy adapter versions to endpoints, or roll back (the operator's plan).

Usage:
    python scripts/deploy_adapters.py --cycle 1 --all-adapters --endpoints mac-dev church-rtx2070-1
    python scripts/deploy_adapters.py --cycle 1 --models whisper gemma_4b --endpoints mac-dev
    python scripts/deploy_adapters.py --rollback --endpoints mac-dev [--models gemma_4b] [--to ID]
    python scripts/deploy_adapters.py --cycle 1 --all-adapters --endpoints mac-dev --dry-run
    make deploy CYCLE=1 ENDPOINT=mac-dev [MODELS="whisper gemma_4b"] [DRY_RUN=1]

Per endpoint and model: TRANSFER (rsync, sha256-verified into releases/<id>),
PRE-CHECK (health check on the staged release; fail -> abort, nothing changed),
ACTIVATE (atomic link flip + reload), VERIFY (health check of what now runs;
fail -> automatic rollback). `--cycle N` takes each model's newest version of
cycle N. Endpoints run in parallel; the exit code is the worst outcome.
"""

import argparse

from adapter_deploy import api
from adapter_deploy.cli.progress import deploy_progress
from adapter_deploy.cli.render import print_run
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    if args.rollback:
        result = api.rollback(
            params, args.endpoints, args.models, args.to, args.force, args.dry_run
        )
        return print_run(result, args.json)
    models = None if args.all_adapters else (args.models or [])
    with deploy_progress() as progress:  # bars on a terminal, byte lines when piped
        result = api.deploy(
            params,
            args.endpoints or [],
            models,
            args.cycle,
            args.version,
            force=args.force,
            dry_run=args.dry_run,
            progress=progress,
        )
    return print_run(result, args.json)


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--cycle", type=int, help="deploy each model's newest version of cycle N")
    parser.add_argument("--version", help="deploy this exact version id (one model)")
    parser.add_argument(
        "--all-adapters", action="store_true", help="every model with a version in the cycle"
    )
    parser.add_argument("--models", nargs="+", help="models to deploy or roll back")
    parser.add_argument("--endpoints", nargs="+", help="endpoints from params.yaml")
    parser.add_argument("--rollback", action="store_true", help="roll back instead of deploying")
    parser.add_argument("--to", help="with --rollback: a kept version id instead of previous")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    parser.add_argument("--force", action="store_true", help="restart even in quiet hours")
    return parser


def entry() -> None:
    run(main, cli())
