"""What a deploy or rollback leaves behind on the training side (seed §7).

- adapters/deploy_log.jsonl: one JSON line per action per endpoint
- adapters/manifest.json: the deployments list
- adapters/status.json: endpoint -> model -> active/previous/last reload/health
- git tags `<model>#<endpoint>#<n>` (GTO stage assignments) on the version's commit,
  so `gto show` answers "which version runs where"
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

from adapter_deploy.common.clock import utc_now
from adapter_deploy.common.errors import AdapterDeployError
from adapter_deploy.common.fsutil import (
    append_jsonl,
    atomic_write_json,
    file_lock,
    read_jsonl,
    read_state,
)
from adapter_deploy.config import Params
from adapter_deploy.deploy.plan import EndpointOutcome, ModelOutcome
from adapter_deploy.store import registry
from adapter_deploy.store.manifest import updating_manifest

log = logging.getLogger(__name__)
DEPLOY_LOG = "deploy_log.jsonl"
STATUS = "status.json"


def _health_summary(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if not result:
        return None
    p50 = result.get("latency_p50")
    return {
        "all_passed": result.get("all_passed"),
        "latency_p50_ms": round(p50 * 1000) if p50 is not None else None,
        "failures": [
            {"input": r["input"], "output": r["output"], "reason": r["reason"]}
            for r in result.get("results", [])
            if not r["passed"]
        ],
        "error": result.get("error"),
    }


def _status_of(outcome: EndpointOutcome) -> str:
    statuses = {m.status for m in outcome.models}
    if outcome.error:
        return "failed"
    for worst in ("failed", "rolled_back", "aborted"):
        if worst in statuses:
            return worst
    return "success"


def log_entry(
    action: str, outcome: EndpointOutcome, run_id: str, cycle: int | None
) -> dict[str, Any]:
    return {
        "timestamp": utc_now(),
        "run_id": run_id,
        "action": action,
        "cycle": cycle,
        "models": [m.model for m in outcome.models],
        "versions": {m.model: m.version_id for m in outcome.models},
        "previous": {m.model: m.previous for m in outcome.models},
        "endpoint": outcome.endpoint,
        "phases_completed": sorted({p for m in outcome.models for p in m.phases}),
        "per_model": {m.model: {"status": m.status, "phases": m.phases} for m in outcome.models},
        "health_check_results": {
            m.model: {k: _health_summary(v) for k, v in m.health.items()} for m in outcome.models
        },
        "bytes_sent": sum(m.bytes_sent for m in outcome.models),
        "status": _status_of(outcome),
        "error": outcome.error or "; ".join(m.error for m in outcome.models if m.error) or None,
        "duration_s": outcome.duration_s,
    }


def record(
    params: Params,
    action: str,
    outcomes: list[EndpointOutcome],
    run_id: str,
    cycle: int | None = None,
) -> list[dict[str, Any]]:
    adapters = params.adapters_dir
    entries = [log_entry(action, o, run_id, cycle) for o in outcomes]
    for entry in entries:
        append_jsonl(adapters / DEPLOY_LOG, entry)
    with updating_manifest(adapters, f"{action} {run_id}") as manifest:
        for entry in entries:
            manifest["deployments"].append(
                {
                    k: entry[k]
                    for k in (
                        "timestamp",
                        "run_id",
                        "action",
                        "cycle",
                        "models",
                        "versions",
                        "endpoint",
                        "status",
                    )
                }
            )
    _update_status(adapters, outcomes)
    _assign_stages(params, outcomes)
    return entries


def _update_status(adapters: Path, outcomes: list[EndpointOutcome]) -> None:
    with file_lock(adapters / ".status.lock", "status update", str(adapters / STATUS)):
        path = adapters / STATUS
        status = read_status(adapters)
        for outcome in outcomes:
            per_endpoint = status.setdefault(outcome.endpoint, {})
            for m in outcome.models:
                if m.status in ("success", "rolled_back", "unchanged"):
                    per_endpoint[m.model] = _model_status(m, per_endpoint.get(m.model, {}))
        atomic_write_json(path, status)


def _model_status(m: ModelOutcome, old: dict[str, Any]) -> dict[str, Any]:
    if m.status == "rolled_back":
        return {**old, "health_status": "rolled back from " + str(m.version_id)}
    if m.status == "unchanged":
        return old or {"active_version": m.version_id, "previous_version": m.previous}
    return {
        "active_version": m.version_id,
        "previous_version": m.previous,
        "last_reload": utc_now(),
        "health_status": "healthy",
    }


def read_status(adapters: Path) -> dict[str, Any]:
    path = adapters / STATUS
    return read_state(path, f"remove {path}; the next deploy or `make status` rebuilds it")


def last_run(adapters: Path, action: str = "deploy") -> list[dict[str, Any]]:
    """The deploy-log entries of the most recent run of `action`."""
    entries = [e for e in read_jsonl(adapters / DEPLOY_LOG) if e.get("action") == action]
    if not entries:
        return []
    run_id = entries[-1].get("run_id")
    return [e for e in entries if e.get("run_id") == run_id]


def _assign_stages(params: Params, outcomes: list[EndpointOutcome]) -> None:
    try:
        repo = registry.repo_root(params.adapters_dir)
    except AdapterDeployError:
        log.warning("adapter store is not a git repo: no GTO stage tags recorded")
        return
    for outcome in outcomes:
        for m in outcome.models:
            if m.status == "success" and m.version_id:
                _assign(repo, params.adapters_dir, m.model, outcome.endpoint, m.version_id)


def _assign(repo: Path, adapters: Path, model: str, endpoint: str, version_id: str) -> None:
    dvc_file = (adapters / model / f"{version_id}.dvc").relative_to(repo)
    commit = subprocess.run(
        ["git", "log", "--format=%H", "-1", "--", str(dvc_file)],
        cwd=repo,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not commit:
        log.warning("no commit holds %s; GTO stage tag skipped", dvc_file)
        return
    n = len(registry.tags(repo, f"{model}#{endpoint}#*")) + 1
    registry.tag(repo, f"{model}#{endpoint}#{n}", f"{version_id} runs on {endpoint}", ref=commit)
