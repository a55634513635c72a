"""`make status`: endpoint x model, read live from each endpoint."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapter_deploy import protocol as p
from adapter_deploy.common.errors import AdapterDeployError, CorruptState
from adapter_deploy.config import Params
from adapter_deploy.deploy.fleet import run_parallel
from adapter_deploy.deploy.remote import Session, connect
from adapter_deploy.store.pull_source import Place

COLUMNS = (
    "endpoint", "model", "active", "previous", "loaded", "last reload", "health", "rollout",
    "last pre-check", "reported",
)  # fmt: skip


def endpoint_status(params: Params, name: str, control_dir: Path) -> dict[str, Any]:
    ep = params.endpoint(name)
    if ep.mode == "pull":  # never reached: its last report, wherever it left it
        return pulled_status(params, name)
    conn = connect(name, ep, control_dir)
    try:
        session = Session(conn, ep.adapter_dir, read_only=True)
        try:
            return {"endpoint": name, **session.call(p.Status(service_url=ep.service_url))}
        finally:
            session.close()
    except AdapterDeployError as err:
        return {"endpoint": name, "error": err.one_line(), "exit_code": err.exit_code}
    finally:
        conn.close()


def report_place(params: Params, name: str) -> Place:
    """Where this machine reads a pulling endpoint's report: `pull.reports`, else the
    store's DVC remote's `reports/` (the place the endpoint writes by default)."""
    ep = params.endpoint(name)
    reports = ep.pull.reports if ep.pull else None
    if not reports:
        remote = params.store.remote
        reports = f"{remote.rstrip('/')}/reports" if remote else params.pull_remotes(name)[2]
    keyfile = params.store.remote_config.get("keyfile")
    options = ("-i", os.path.expanduser(keyfile)) if keyfile else ()
    # s3://: the S3-compatible server `dvc push` uses (`dvc remote modify ... endpointurl`);
    # without one, botocore's own (AWS_ENDPOINT_URL, ~/.aws/config, else AWS)
    endpoint_url = params.store.remote_config.get("endpointurl")
    place = Place.parse(reports, "reports location", options, endpoint_url=endpoint_url)
    return place.child(f"{name}.json")


def pulled_status(params: Params, name: str, now: datetime | None = None) -> dict[str, Any]:
    """A pulling endpoint's status from its report: what runs, the last pull's result and
    how long ago it reported."""
    try:
        place = report_place(params, name)
        report = json.loads(place.read_text())
        if not isinstance(report, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return {"endpoint": name, "models": {}, "pull": None, "reported": "never (pull mode)"}
    except AdapterDeployError as err:
        return {"endpoint": name, "error": err.one_line(), "exit_code": err.exit_code}
    except (OSError, ValueError) as err:
        error = CorruptState(
            f"{name}'s report {place.where} is unreadable ({err})",
            "remove it; the endpoint's next pull writes it again",
        )
        return {"endpoint": name, "error": error.one_line(), "exit_code": error.exit_code}
    when, behind = report.get("reported_at"), report.get("clock_behind_s")
    try:
        at = datetime.fromisoformat(str(when).replace("Z", "+00:00"))
        seconds = ((now or datetime.now(UTC)) - at).total_seconds()
        if isinstance(behind, int | float) and behind > 0:  # its own clock's reading, put right
            age = f"{_age(seconds - behind)} (its clock >= {_span(behind)} behind)"
        else:
            age = _age(seconds)
    except ValueError:
        age = f"at {when}"
    result = report.get("result")
    return {
        "endpoint": name,
        "models": report.get("models") or {},
        "pull": report,
        "reported": f"{age}: {result}" + (f" ({report['error']})" if report.get("error") else ""),
    }


def _age(seconds: float) -> str:
    if seconds < 0:
        return "in the future (clock skew)"
    return f"{_span(seconds)} ago"


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{round(seconds)} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def fleet_status(params: Params, endpoints: list[str]) -> list[dict[str, Any]]:
    return run_parallel(params, endpoints, lambda n, ctl: endpoint_status(params, n, ctl))


def _loaded(status: dict[str, Any], model: str) -> str:
    service = status.get("service")
    if not service:
        return "-"
    if "error" in service:
        return "service unreachable"
    info = service.get("models", {}).get(model) or {}
    return info.get("version_id") or "not served"


def columns_for(statuses: list[dict[str, Any]]) -> tuple[str, ...]:
    """The table's columns: `reported` only where a pulling endpoint is shown."""
    return COLUMNS if any("reported" in st for st in statuses) else COLUMNS[:-1]


def status_rows(statuses: list[dict[str, Any]]) -> list[list[Any]]:
    width = len(columns_for(statuses))
    return [row[:width] for row in _rows(statuses)]


def _rows(statuses: list[dict[str, Any]]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for st in statuses:
        if "error" in st:
            rows.append(
                [st["endpoint"], "-", "-", "-", "-", "-", st["error"], st.get("rollout"), "", ""]
            )
            continue
        models = st.get("models", {})
        if not models:
            rows.append(
                [
                    st["endpoint"],
                    "-",
                    "nothing deployed",
                    "",
                    "",
                    "",
                    "",
                    st.get("rollout"),
                    "",
                    st.get("reported") or "live",
                ]  # fmt: skip
            )
        for model, info in sorted(models.items()):
            reload = info.get("last_reload") or {}
            health = info.get("health_status") or (
                "bad: " + ",".join(info["bad"]) if info.get("bad") else ""
            )
            rows.append(
                [
                    st["endpoint"],
                    model,
                    info.get("active_version"),
                    info.get("previous_version"),
                    _loaded(st, model),
                    reload.get("at") if isinstance(reload, dict) else reload,
                    health,
                    st.get("rollout") or "",
                    _precheck(info.get("last_precheck")),
                    st.get("reported") or "live",
                ]
            )
    return rows


def _precheck(last: dict[str, Any] | None) -> str:
    """`cycle2_… passed (service), shadow 2/20 changed`: the endpoint's last pre-check."""
    if not last:
        return ""
    verdict = "passed" if last.get("all_passed") else "failed"
    text = f"{last.get('version_id')} {verdict} ({last.get('via')})"
    shadow = last.get("shadow")
    if shadow:
        text += f", shadow {shadow.get('changed')}/{shadow.get('compared')} changed"
    return text
