"""Alert hooks: "ROLLED BACK with alert" (seed §3.2).

On an aborted deploy, an automatic rollback or a failed verify, every configured
hook gets a JSON summary: `alert_command` (argv; the JSON on stdin) and/or an
HTTP POST to `alert_url`. A failing hook is logged and never changes the
deploy's outcome.
"""

from __future__ import annotations

import json
import logging
import subprocess
import urllib.request
from typing import Any

from adapter_deploy.config import Params
from adapter_deploy.deploy.plan import EndpointOutcome

log = logging.getLogger(__name__)
ALERTING = {"aborted", "rolled_back", "failed"}
PHASE = {"aborted": "pre-check", "rolled_back": "verify", "failed": "deploy"}


def summaries(action: str, outcomes: list[EndpointOutcome]) -> list[dict[str, Any]]:
    alerts = []
    for outcome in outcomes:
        for m in outcome.models:
            if m.status not in ALERTING:
                continue
            failing = [
                {"input": r["input"], "output": r["output"], "reason": r["reason"]}
                for result in m.health.values()
                for r in result.get("results", [])
                if not r["passed"]
            ]
            alerts.append(
                {
                    "action": action,
                    "endpoint": outcome.endpoint,
                    "model": m.model,
                    "status": m.status,
                    "phase": PHASE[m.status],
                    "version": m.version_id,
                    "serving": m.previous if m.status != "failed" else None,
                    "error": m.error,
                    "failing_sentences": failing,
                }
            )
        if outcome.error and not outcome.models:
            alerts.append(
                {
                    "action": action,
                    "endpoint": outcome.endpoint,
                    "status": "failed",
                    "phase": "connect",
                    "error": outcome.error,
                }
            )
    return alerts


def _run_command(argv: list[str], payload: bytes) -> None:
    try:
        proc = subprocess.run(argv, input=payload, capture_output=True, timeout=30)
        if proc.returncode != 0:
            log.warning("alert_command exited %d: %s", proc.returncode, proc.stderr[-200:])
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("alert_command failed: %s", err)


def _post(url: str, payload: bytes) -> None:
    req = urllib.request.Request(url, payload, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10):
            pass
    except OSError as err:
        log.warning("alert_url %s failed: %s", url, err)


def send_alerts(params: Params, action: str, outcomes: list[EndpointOutcome]) -> int:
    """Run the hooks for every alerting outcome; returns how many alerts were raised."""
    alerts = summaries(action, outcomes)
    for alert in alerts:
        payload = json.dumps(alert).encode()
        log.warning("ALERT %s %s: %s", alert["endpoint"], alert.get("model", ""), alert["status"])
        if params.alert_command:
            _run_command(params.alert_command, payload)
        if params.alert_url:
            _post(params.alert_url, payload)
    return len(alerts)
