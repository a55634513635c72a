"""Run one deploy phase on its own: transfer, precheck, activate or verify.

Usage:
    python scripts/phase.py transfer --cycle 1 --endpoints mac-dev [--models gemma_4b]
    python scripts/phase.py precheck --cycle 1 --endpoints mac-dev
    python scripts/phase.py activate --cycle 1 --endpoints mac-dev
    python scripts/phase.py verify   --cycle 1 --endpoints mac-dev
    make transfer|precheck|activate|verify CYCLE=1 ENDPOINT=mac-dev [MODELS=...]

Each is safe to re-run: a verified release is not sent again, activating the
active release changes nothing, checks only read. verify reports; it does not
roll back (use make rollback).
"""

import argparse

from adapter_deploy import api
from adapter_deploy.cli.progress import deploy_progress
from adapter_deploy.cli.render import print_run
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params
from adapter_deploy.deploy.phases import PHASES


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    with deploy_progress() as progress:
        result = api.phase(
            params,
            args.phase,
            args.endpoints or [],
            args.models,
            args.cycle,
            args.version,
            progress=progress,
        )
    return print_run(result, args.json)


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("phase", choices=PHASES, help="which phase to run")
    parser.add_argument("--cycle", type=int, help="each model's newest version of cycle N")
    parser.add_argument("--version", help="this exact version id")
    parser.add_argument(
        "--models", nargs="+", help="models (default: those with a version in the cycle)"
    )
    parser.add_argument("--endpoints", nargs="+", help="endpoints from params.yaml")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    return parser


def entry() -> None:
    run(main, cli())
