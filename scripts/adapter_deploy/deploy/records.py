"""What a deploy or rollback leaves behind on the training side (the operator's plan).

- adapters/deploy_log.jsonl: one JSON line per action per endpoint
- adapters/manifest.json: the deployments list
- adapters/status.json: endpoint -> model -> active/previous/last reload/health
- git tags `<model>#<endpoint>#<n>` (GTO stage assignments) on the version's commit,
  so `gto show` answers "which version runs where"

The record files are committed in a commit of their own ("deploy <run_id>: ..."), so the store's
tree is clean after every action and a version's commit never carries deploy records.
"""

from __future__ import annotations

import logging
import statistics
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
from adapter_deploy.common.names import printable
from adapter_deploy.config import Params
from adapter_deploy.deploy.plan import EndpointOutcome, ModelOutcome
from adapter_deploy.store import registry
from adapter_deploy.store.manifest import MANIFEST, ignore_in_store, updating_manifest

log = logging.getLogger(__name__)
DEPLOY_LOG = "deploy_log.jsonl"
STATUS = "status.json"


def _health_detail(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """One model's check, with what failed (kept beside the plan's aggregate)."""
    if not result:
        return None
    return {
        **_summary([result]),
        "failures": [
            {"input": r["input"], "output": r["output"], "reason": r["reason"]}
            for r in result.get("results", [])
            if not r["passed"]
        ],
        "error": result.get("error"),
        # PRE-CHECK only: "service" (inside the running service) or "process", and why not
        # the service; the shadow replay of live inputs through the candidate (service only)
        **{key: result[key] for key in ("via", "via_reason", "shadow") if key in result},
    }


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The plan's shape: `all_passed` over every check, `latency_p50_ms` over every sentence
    of every model (the checks' own p50 where a check has no sentences, e.g. did not load)."""
    latencies = [r["latency_s"] for res in results for r in res.get("results", [])]
    if not latencies:
        latencies = [res["latency_p50"] for res in results if res.get("latency_p50") is not None]
    p50 = statistics.median_low(latencies) if latencies else None
    return {
        "all_passed": all(bool(res.get("all_passed")) for res in results),
        "latency_p50_ms": round(p50 * 1000) if p50 is not None else None,
    }


def health_results(models: list[ModelOutcome]) -> dict[str, Any]:
    """the operator's plan: {"pre_activation": {...}, "post_activation": {...}} over all models."""
    phases = ("pre_activation", "post_activation")
    return {
        phase: _summary([m.health[phase] for m in models if m.health.get(phase)])
        for phase in phases
        if any(m.health.get(phase) for m in models)
    }


def _status_of(outcome: EndpointOutcome) -> str:
    statuses = {m.status for m in outcome.models}
    if outcome.error:
        return "failed"
    for worst in ("failed", "rolled_back", "aborted", "held"):
        if worst in statuses:
            return worst
    return "success"


def _phases(action: str, models: list[ModelOutcome]) -> list[str]:
    """In the order they ran; a deploy starts from a version (made or reused)."""
    ran = ["version"] if action == "deploy" and models else []
    for m in models:
        ran += [phase for phase in m.phases if phase not in ran]
    return ran


def log_entry(
    action: str, outcome: EndpointOutcome, run_id: str, cycle: int | None
) -> dict[str, Any]:
    models = outcome.models
    return {
        "timestamp": utc_now(),
        "run_id": run_id,
        "action": action,
        "cycle": cycle,
        "models": [m.model for m in models],
        "versions": {m.model: m.version_id for m in models},
        "previous": {m.model: m.previous for m in models},
        "endpoint": outcome.endpoint,
        "phases_completed": _phases(action, models),
        "per_model": {m.model: {"status": m.status, "phases": m.phases} for m in models},
        "health_check_results": health_results(models),
        "health_check_results_per_model": {
            m.model: {k: _health_detail(v) for k, v in m.health.items()} for m in models
        },
        "bytes_sent": sum(m.bytes_sent for m in models),
        "status": _status_of(outcome),
        "error": outcome.error or "; ".join(m.error for m in models if m.error) or None,
        "duration_s": outcome.duration_s,
    }


_WORST = ("failed", "rolled_back", "aborted", "held", "success")
# Actions that change what runs; a transfer, precheck or verify alone changes nothing.
CHANGES_WHAT_RUNS = ("deploy", "rollback", "activate")


def record(
    params: Params,
    action: str,
    outcomes: list[EndpointOutcome],
    run_id: str,
    cycle: int | None = None,
    rollout: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """`rollout`: for a staged rollout, the wave these outcomes belong to (kept in each
    entry as `rollout`: {wave, index, waves, halted}), so history shows how far it went."""
    adapters = params.adapters_dir
    entries = [log_entry(action, o, run_id, cycle) for o in outcomes]
    if rollout is not None:
        entries = [{**entry, "rollout": rollout} for entry in entries]
    for entry in entries:
        append_jsonl(adapters / DEPLOY_LOG, entry)
    if action in ("deploy", "rollback"):
        with updating_manifest(adapters, f"{action} {run_id}") as manifest:
            manifest["deployments"].append(_deployment(action, run_id, cycle, entries, outcomes))
    if action in CHANGES_WHAT_RUNS:
        _update_status(adapters, outcomes)
        _assign_stages(params, outcomes)
    registry.commit_records(
        adapters,
        [DEPLOY_LOG, MANIFEST, STATUS, ".gitignore"],
        _commit_message(action, run_id, entries),
    )
    return entries


def _commit_message(action: str, run_id: str, entries: list[dict[str, Any]]) -> str:
    """`deploy <run_id>: gemma_4b cycle1_… on mac-dev: success`, one line per endpoint."""
    lines = []
    for entry in entries:
        versions = ", ".join(f"{m} {v}" for m, v in entry["versions"].items()) or "nothing"
        lines.append(f"{versions} on {entry['endpoint']}: {entry['status']}")
    lines = [printable(line) for line in lines]  # a status or id never forges a git line
    if len(lines) == 1:
        return f"{action} {run_id}: {lines[0]}"
    return f"{action} {run_id}: {len(lines)} endpoints\n\n" + "\n".join(lines)


def _deployment(
    action: str,
    run_id: str,
    cycle: int | None,
    entries: list[dict[str, Any]],
    outcomes: list[EndpointOutcome],
) -> dict[str, Any]:
    """the operator's plan: one entry per run with its models and endpoints."""
    statuses = [e["status"] for e in entries]
    models = sorted({m for e in entries for m in e["models"]})
    return {
        "timestamp": entries[0]["timestamp"] if entries else utc_now(),
        "cycle": cycle,
        "models": models,
        "endpoints": [e["endpoint"] for e in entries],
        "status": next((s for s in _WORST if s in statuses), "success"),
        "health_check_results": health_results([m for o in outcomes for m in o.models]),
        "run_id": run_id,
        "action": action,
        "versions": {m: v for e in entries for m, v in e["versions"].items()},
        "endpoint_status": {e["endpoint"]: e["status"] for e in entries},
    }


def _update_status(adapters: Path, outcomes: list[EndpointOutcome]) -> None:
    ignore_in_store(adapters, "/.status.lock")
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
    plan = dict.fromkeys(("active_version", "previous_version", "last_reload", "health_status"))
    if m.status == "rolled_back":
        return {**plan, **old, "health_status": "rolled back from " + str(m.version_id)}
    if m.status == "unchanged":
        return {**plan, "active_version": m.version_id, "previous_version": m.previous, **old}
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
