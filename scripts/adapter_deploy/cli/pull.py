"""On a pulling endpoint: fetch what `make promote` assigned it and deploy it here.

Usage:
    python scripts/pull.py [--endpoint church-box] [--force] [--json]
    python scripts/pull.py --endpoint church-box --trust signing.pem.pub
    make pull [ENDPOINT=church-box] [FORCE=1]

Reads the git remote's stage tags (read-only), fetches exactly the assigned release from the
DVC remote, and runs the push deploy's steps here: signature and sha256 checks, pre-check,
atomic activate, reload, verify, automatic rollback. A version that failed here is not retried
until a newer one is promoted (--force retries it). Leaves <adapter_dir>/deploy_log.jsonl,
status.json and a report that `make status` on the training machine reads. A second pull while
one runs exits 7. --trust installs the training machine's public signing key (once).
"""

import argparse
import json
import random
import time
from pathlib import Path

from adapter_deploy import api
from adapter_deploy.cli.render import render
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params

COLUMNS = ("model", "version", "result", "detail")


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    if args.trust:
        name, kid = api.trust_here(params, args.endpoint, Path(args.trust))
        print(f"{name} trusts signing key {kid}")
        return 0
    if args.jitter:  # a timer's random delay, so a fleet's pulls spread out
        time.sleep(random.uniform(0, args.jitter))
    result = api.pull(params, args.endpoint, args.force)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return result.exit_code
    rows = [[m.model, m.version_id, m.status, m.error or ""] for m in result.outcome.models]
    rows += [[model, "-", "skipped", why] for model, why in result.notes.items()]
    if rows:  # an endpoint-wide failure is the one error line already logged
        print(render(f"pull {result.endpoint} ({result.run_id})", COLUMNS, rows), end="")
    if result.report_at is None:
        print("the report could not be left on the remote (see the log above)")
    return result.exit_code


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--endpoint", help="this endpoint's name (default: the only pulling one)")
    parser.add_argument("--force", action="store_true", help="retry a version that failed here")
    parser.add_argument("--trust", metavar="PUB", help="trust this public signing key and exit")
    parser.add_argument("--jitter", type=float, default=0.0, help="first sleep up to this many s")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    return parser


def entry() -> None:
    run(main, cli())
