"""Install the inference service on endpoints as their service manager runs it, and start it.

Usage:
    python scripts/service_install.py --endpoints church-rtx2070-1 [--no-start] [--dry-run]
    make service-install ENDPOINT=mac-dev

Linux/NVIDIA endpoints get a systemd user unit (~/.config/systemd/user/adapter-serve.service;
the ssh user restarts it without root: restart_command [systemctl, --user, restart,
adapter-serve]; `systemctl --user reload adapter-serve` sends SIGUSR1; lingering makes it
start at boot). Macs (platform mlx) get a launchd agent
(~/Library/LaunchAgents/org.adapter-deploy.serve.plist: RunAtLoad, KeepAlive, output in
<project_dir>/logs/adapter-serve.log). Run `make bootstrap ENDPOINT=...` first: the service
runs from the project it installs. The endpoint key `service_dir` puts the file elsewhere.
"""

import argparse
import json
from dataclasses import asdict

from adapter_deploy import api
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params


def main(args: argparse.Namespace) -> int:
    results = api.service_install(
        load_params(args.params), args.endpoints or [], not args.no_start, args.dry_run
    )
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return 0
    for r in results:
        if args.dry_run:
            print(f"[{r.endpoint}] would write {r.path} ({r.kind}):\n{r.text}")
            if r.start:
                print(f"[{r.endpoint}] then run: {r.start}")
            continue
        done = "installed and started" if r.started else "installed (not started)"
        print(f"[{r.endpoint}] {r.kind} service {done}: {r.path}")
        if not r.started and r.start:
            print(f"[{r.endpoint}] start it with: {r.start}")
        if r.warning:
            print(f"[{r.endpoint}] warning: {r.warning}")
    return 0


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--endpoints", nargs="+", help="endpoints from params.yaml")
    parser.add_argument("--no-start", action="store_true", help="write the file, start nothing")
    parser.add_argument("--dry-run", action="store_true", help="print the file; change nothing")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def entry() -> None:
    run(main, cli())
