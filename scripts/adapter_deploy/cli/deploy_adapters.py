"""Deploy adapter versions to endpoints, or roll back (seed §3).

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
import sys
from datetime import UTC, datetime

from adapter_deploy.cli.summary import print_outcomes
from adapter_deploy.common import failpoints
from adapter_deploy.common.errors import NothingToRollBack, UsageError
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import check_version_id, load_params
from adapter_deploy.deploy import quiet
from adapter_deploy.deploy.alerts import send_alerts
from adapter_deploy.deploy.fleet import deploy, new_run_id, run_parallel
from adapter_deploy.deploy.plan import choose_releases, dry_run_plan
from adapter_deploy.deploy.records import last_run, record
from adapter_deploy.deploy.rollback import rollback_endpoint


def _models(args: argparse.Namespace, params) -> list[str]:
    if args.all_adapters or not args.models:
        return sorted(params.models) if args.all_adapters else []
    return args.models


def check_quiet_hours(params, endpoints: list[str], force: bool) -> None:
    """Refuse a restart outage inside an endpoint's service hours, before anything moves."""
    now = datetime.now(UTC)
    for name in endpoints:
        ep = params.endpoint(name)
        window = quiet.quiet_window(ep, now) if quiet.causes_outage(ep) else None
        if window and not force:
            allowed = quiet.next_allowed(ep, now).strftime("%a %Y-%m-%d %H:%M %Z")
            raise UsageError(
                f"{name} is in its quiet hours ({','.join(window.days)} "
                f"{window.start}-{window.end}) and a restart would interrupt the service",
                f"deploy after {allowed}, or pass --force (FORCE=1)",
            )


def do_deploy(args: argparse.Namespace, params) -> int:
    if args.cycle is None and args.version is None:
        raise UsageError("nothing to deploy", "pass --cycle N (make deploy CYCLE=N)")
    if not args.endpoints:
        raise UsageError("no endpoint given", "pass --endpoints NAME (make deploy ENDPOINT=NAME)")
    models = _models(args, params)
    if not models:
        raise UsageError("no models chosen", "pass --all-adapters or --models NAME [NAME ...]")
    chosen = choose_releases(params, models, args.cycle, args.version)
    for name in args.endpoints:
        params.endpoint(name)
    check_quiet_hours(params, args.endpoints, args.force)
    if args.dry_run:
        print("dry run: nothing will be changed")
        print("\n".join(dry_run_plan(params, args.endpoints, chosen)))
        return 0
    run_id = new_run_id()
    outcomes = deploy(params, args.endpoints, chosen, progress=sys.stderr.isatty())
    failpoints.deployer("deploy.before_log")
    record(params, "deploy", outcomes, run_id, args.cycle)
    send_alerts(params, "deploy", outcomes)
    return print_outcomes(f"deploy {run_id}", outcomes, args.json)


def do_rollback(args: argparse.Namespace, params) -> int:
    endpoints, models = args.endpoints, args.models
    if args.to:
        check_version_id(args.to)
    if not endpoints:
        last = [e for e in last_run(params.adapters_dir) if e["status"] == "success"]
        if not last:
            raise NothingToRollBack("the deploy log has no successful deploy", "name ENDPOINT=")
        endpoints = sorted({e["endpoint"] for e in last})
        models = models or sorted({m for e in last for m in e["models"]})
        print(f"undoing deploy {last[0]['run_id']}: {', '.join(models)} on {', '.join(endpoints)}")
    check_quiet_hours(params, endpoints, args.force)
    if args.dry_run:
        for name in endpoints:
            print(
                f"[{name}] roll back {', '.join(models or ['every model'])} to "
                f"{args.to or 'previous'}"
            )
        return 0
    outcomes = run_parallel(
        params,
        endpoints,
        lambda name, control: rollback_endpoint(params, name, models, args.to, control),
    )
    record(params, "rollback", outcomes, new_run_id())
    send_alerts(params, "rollback", outcomes)
    return print_outcomes("rollback", outcomes, args.json)


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    return do_rollback(args, params) if args.rollback else do_deploy(args, params)


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--cycle", type=int, help="deploy each model's newest version of cycle N")
    parser.add_argument("--version", help="deploy this exact version id (one model)")
    parser.add_argument("--all-adapters", action="store_true", help="every model in params.yaml")
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


if __name__ == "__main__":
    entry()
