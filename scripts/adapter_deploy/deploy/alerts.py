"""Alert hooks: "ROLLED BACK with alert" (the operator's plan).

On an aborted deploy, an automatic rollback or a failed verify, every configured
hook gets a JSON summary: `alert_command` (argv; the JSON on stdin) and/or an
HTTP POST to `alert_url`. A failing hook is logged and never changes the
deploy's outcome.

Both carry `text`, one readable line. The HTTP body repeats it as `content` and
`message` (+ `title`) and merges `alert_fields`, so chat and push services take it
as it is: Slack and Mattermost incoming webhooks read `text`, Discord reads
`content`, and ntfy, posted to its root URL with `alert_fields: {topic: ...}`,
reads `topic`, `message` and `title` (it ignores the other keys).
"""

from __future__ import annotations

import json
import logging
import subprocess
import urllib.parse
import urllib.request
from typing import Any

from adapter_deploy.common.logs import log_context
from adapter_deploy.common.names import printable
from adapter_deploy.config import Params
from adapter_deploy.deploy.plan import EndpointOutcome

log = logging.getLogger(__name__)
ALERTING = {"aborted", "rolled_back", "failed"}
PHASE = {"aborted": "pre-check", "rolled_back": "verify", "failed": "deploy"}
TITLE = "Adapter Deploy"
USER_AGENT = "adapter-deploy-alerts/1"
MAX_ERROR = 300  # characters of an error in the one-line text (Discord takes 2000 at most)


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


def one_line(alert: dict[str, Any]) -> str:
    """The alert as one readable line, for chat and push messages."""
    endpoint, model = alert["endpoint"], alert.get("model")
    what = " ".join(x for x in (model, alert.get("version")) if x)
    serving = alert.get("serving") or "the base model"
    error = " ".join(str(alert.get("error") or "").split()).removeprefix(f"{endpoint}: ")
    error = error if len(error) <= MAX_ERROR else error[: MAX_ERROR - 1] + "…"
    if alert["status"] == "halted":
        held = ", ".join(alert["held"]) or "none"
        line = f"rollout halted at wave {alert['wave']} — {', '.join(alert['failed'])} failed; "
        line += f"held on their current release: {held}"
    elif alert["status"] == "rolled_back":
        line = f"rollback on {endpoint} — {what} failed verify, back on {serving}"
    elif alert["status"] == "aborted":
        line = f"{alert['action']} aborted on {endpoint} — {what} failed the pre-check, "
        line += "nothing changed"  # active untouched (the operator's plan)
    elif model:
        line = f"{alert['action']} failed on {endpoint} — {what}: {error}"
    else:
        line = f"{alert['action']} failed on {endpoint} ({alert['phase']}): {error}"
    return f"{TITLE}: {chat_safe(line)}"


ZWSP = "\u200b"  # zero-width space: shown as nothing, but breaks the chat syntax it sits in


def chat_safe(text: str) -> str:
    """Text quoted from endpoints (errors, model output) as inert chat text: no control
    characters, no mentions (`@here`, `@everyone`, `<!channel>`, `<@U123>`), no link
    syntax (`<url|label>`, `[label](url)`) and no bare link a chat would unfurl."""
    text = printable(text)
    for mark in ("@", "<", "](", "://"):
        text = text.replace(mark, mark[0] + ZWSP + mark[1:])
    return text


def http_body(alert: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """What alert_url gets: the summary, the line under each name a webhook reads, extras."""
    text = one_line(alert)
    return {**alert, "text": text, "content": text, "message": text, "title": TITLE, **fields}


def _run_command(argv: list[str], payload: bytes) -> None:
    try:
        proc = subprocess.run(argv, input=payload, capture_output=True, timeout=30)
        if proc.returncode != 0:
            log.warning("alert_command exited %d: %s", proc.returncode, proc.stderr[-200:])
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("alert_command failed: %s", err)


def _post(url: str, payload: bytes) -> None:
    # some webhook hosts' CDNs refuse Python-urllib's default User-Agent
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    req = urllib.request.Request(url, payload, headers)
    try:
        with urllib.request.urlopen(req, timeout=10):
            pass
    except OSError as err:
        log.warning("alert_url %s failed: %s", _site(url), err)


def _site(url: str) -> str:
    """Scheme and host only: a webhook URL's path is its secret (Slack, Discord, ntfy topic)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/…"


def send_alerts(params: Params, action: str, outcomes: list[EndpointOutcome]) -> int:
    """Run the hooks for every alerting outcome; returns how many alerts were raised."""
    return raise_alerts(params, summaries(action, outcomes))


def halt_alert(wave: str, failed: list[str], held: list[str]) -> dict[str, Any]:
    """A staged rollout stopped: which endpoint failed in which wave, and who was held."""
    return {
        "action": "deploy",
        "endpoint": failed[0],
        "status": "halted",
        "phase": "rollout",
        "wave": wave,
        "failed": failed,
        "held": held,
    }


def raise_alerts(params: Params, alerts: list[dict[str, Any]]) -> int:
    for alert in alerts:
        with log_context(endpoint=alert["endpoint"], model=alert.get("model")):
            log.warning("ALERT %s", one_line(alert).removeprefix(f"{TITLE}: "))
            if params.alert_command:
                payload = {**alert, "text": one_line(alert)}
                _run_command(params.alert_command, json.dumps(payload).encode())
            if params.alert_url:
                body = http_body(alert, params.alert_fields)
                _post(params.alert_url, json.dumps(body).encode())
    return len(alerts)
