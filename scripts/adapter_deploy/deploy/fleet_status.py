"""`make status`: endpoint x model, read live from each endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapter_deploy import protocol as p
from adapter_deploy.common.errors import AdapterDeployError
from adapter_deploy.config import Params
from adapter_deploy.deploy.fleet import run_parallel
from adapter_deploy.deploy.remote import Connection, Session

COLUMNS = (
    "endpoint", "model", "active", "previous", "loaded", "last reload", "health", "rollout",
    "last pre-check",
)  # fmt: skip


def endpoint_status(params: Params, name: str, control_dir: Path) -> dict[str, Any]:
    ep = params.endpoint(name)
    conn = Connection(name, ep, control_dir)
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


def status_rows(statuses: list[dict[str, Any]]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for st in statuses:
        if "error" in st:
            rows.append(
                [st["endpoint"], "-", "-", "-", "-", "-", st["error"], st.get("rollout"), ""]
            )
            continue
        models = st.get("models", {})
        if not models:
            rows.append(
                [st["endpoint"], "-", "nothing deployed", "", "", "", "", st.get("rollout"), ""]
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
