"""Staged rollout: the endpoints of a deploy in waves (canary first), each wave verified —
and, where the rollout says so, soaked and checked again — before the next one starts.

A failure in a wave (a pre-check refusal, a transfer or verify failure, an automatic rollback,
or the soak's re-check failing, which rolls that wave's endpoints back) halts the rollout: the
later waves are not touched and are reported "held". Each wave is recorded as soon as it ends,
so a deployer killed between waves leaves the later waves untouched and the records true.
Without `rollout:` in params.yaml every endpoint is one wave, as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter_deploy.common import failpoints
from adapter_deploy.common.errors import HealthCheckFailed, RolloutHalted
from adapter_deploy.config import Params
from adapter_deploy.deploy import fleet
from adapter_deploy.deploy.alerts import halt_alert, raise_alerts, send_alerts
from adapter_deploy.deploy.plan import EndpointOutcome, ModelOutcome, Release
from adapter_deploy.deploy.progress import Progress
from adapter_deploy.deploy.records import record
from adapter_deploy.deploy.rollback import rollback_model

log = logging.getLogger(__name__)

FAILED = ("failed", "aborted", "rolled_back")


@dataclass
class Wave:
    name: str
    endpoints: list[str]
    soak_s: float = 0.0


@dataclass
class Halt:
    """Where and why a rollout stopped."""

    wave: str
    failed: list[str]  # the endpoints that failed in that wave
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"wave": self.wave, "failed": self.failed, "reason": self.reason}


def plan_waves(params: Params, endpoints: list[str]) -> list[Wave]:
    """The waves this deploy goes through: the rollout's, keeping only `endpoints`, in the
    rollout's order; endpoints no wave names go last, in a wave of their own."""
    rollout = params.rollout
    if rollout is None:
        return [Wave("all", list(endpoints))]
    waves, placed = [], set()
    for wave in rollout.waves:
        members = [n for m in wave.endpoints for n in rollout.groups.get(m, [m])]
        chosen = [n for n in dict.fromkeys(members) if n in endpoints]
        placed.update(chosen)
        if chosen:
            waves.append(Wave(wave.name, chosen, wave.soak_s))
    rest = [n for n in endpoints if n not in placed]
    if rest:
        waves.append(Wave("rest", rest))
    return waves


def plan_lines(waves: list[Wave]) -> list[str]:
    """The plan as the operator reads it before anything starts."""
    lines = []
    for i, wave in enumerate(waves, 1):
        soaks = wave.soak_s and i < len(waves)
        soak = f", then soak {wave.soak_s:g} s and check again" if soaks else ""
        lines.append(f"wave {i}/{len(waves)} {wave.name}: {', '.join(wave.endpoints)}{soak}")
    return lines


def _failure(wave: Wave, outcomes: list[EndpointOutcome]) -> Halt | None:
    failed = [o.endpoint for o in outcomes if o.error or any(m.status in FAILED for m in o.models)]
    if not failed:
        return None
    first = next(o for o in outcomes if o.endpoint == failed[0])
    why = first.error or next(m.error or m.status for m in first.models if m.status in FAILED)
    return Halt(wave.name, failed, f"{failed[0]}: {why}")


def held_outcome(name: str, chosen: list[Release], halt: Halt) -> EndpointOutcome:
    """An endpoint of a later wave: untouched, on whatever it ran before."""
    why = f"held: the rollout halted at wave {halt.wave} ({', '.join(halt.failed)} failed)"
    models = [
        ModelOutcome(
            r.model, r.version_id, status="held", error=why, exit_code=RolloutHalted.exit_code
        )
        for r in chosen
    ]
    return EndpointOutcome(name, models)


def _changed(outcomes: list[EndpointOutcome]) -> list[EndpointOutcome]:
    """The endpoints this wave activated a release on (a soak has something to watch)."""
    return [o for o in outcomes if any(m.status == "success" for m in o.models)]


def soak(
    params: Params,
    wave: Wave,
    outcomes: list[EndpointOutcome],
    sleep: Callable[[float], None] = time.sleep,
) -> Halt | None:
    """Wait, then check the wave's new releases again; on any failure roll the wave back."""
    changed = _changed(outcomes)
    if not wave.soak_s or not changed:
        return None
    log.info("wave %s verified; soaking %g s before checking it again", wave.name, wave.soak_s)
    sleep(wave.soak_s)
    by_name = {o.endpoint: o for o in changed}
    checks = fleet.run_parallel(
        params,
        list(by_name),
        lambda name, control: _recheck(params, by_name[name], control),
    )
    failed = [c.endpoint for c in checks if c.error or any(m.status in FAILED for m in c.models)]
    if not failed:
        log.info("wave %s passed its soak check", wave.name)
        return None
    reason = f"{failed[0]}: soak re-check failed"
    log.error("wave %s failed its soak check on %s: rolling the wave back", wave.name, failed)
    fleet.run_parallel(
        params,
        list(by_name),
        lambda name, control: _roll_back(params, by_name[name], failed, control),
    )
    return Halt(wave.name, failed, reason)


def _new_models(outcome: EndpointOutcome) -> list[ModelOutcome]:
    return [m for m in outcome.models if m.status == "success"]


def _recheck(params: Params, deployed: EndpointOutcome, control: Path) -> EndpointOutcome:
    """The post-activation check again, through the service as VERIFY runs it."""
    with fleet.endpoint_run(params, deployed.endpoint, control) as (run, outcome):
        run.open()
        for m in _new_models(deployed):
            result = run.health(m.model, None, via_service=run.via_service)
            m.health["soak"] = result
            checked = ModelOutcome(m.model, m.version_id, status="success")
            if not result["all_passed"]:
                checked.status, checked.error = "failed", "soak re-check failed"
            outcome.models.append(checked)
    if outcome.error:  # the endpoint could not be reached: the wave is not known good
        deployed.error = outcome.error
    return outcome


def _roll_back(
    params: Params, deployed: EndpointOutcome, failed: list[str], control: Path
) -> EndpointOutcome:
    """Undo this endpoint's part of the wave: each new release marked bad, previous back."""
    why = "soak re-check failed" if deployed.endpoint in failed else (
        f"rolled back with its wave ({', '.join(failed)} failed the soak re-check)"
    )  # fmt: skip
    with fleet.endpoint_run(params, deployed.endpoint, control) as (run, outcome):
        run.open()
        for m in _new_models(deployed):
            if m.previous is None:  # its first release here: back to no release at all
                run.restore(m.model, None, None, m.version_id)
            else:
                back = rollback_model(run, m.model, None)
                m.health["rollback"] = back.health.get("post_activation")
                outcome.models.append(back)
            m.status, m.error = "rolled_back", why
            m.exit_code = HealthCheckFailed.exit_code
            m.phases.append("rollback")
    if outcome.error:
        deployed.error = f"{why}; the rollback failed: {outcome.error}"
        deployed.exit_code = max(deployed.exit_code, outcome.exit_code)
    return outcome


def roll_out(
    params: Params,
    waves: list[Wave],
    chosen: list[Release],
    run_id: str,
    cycle: int | None,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[EndpointOutcome], Halt | None]:
    """Deploy wave after wave; each wave recorded and alerted as it ends. After a failure
    the later waves are recorded as held (one deploy-log entry per endpoint) and alerted."""
    staged = params.rollout is not None
    outcomes: list[EndpointOutcome] = []
    halt: Halt | None = None
    names = [w.name for w in waves]
    for line in plan_lines(waves) if staged else []:
        log.info("rollout plan: %s", line)
    for index, wave in enumerate(waves):
        if staged:
            log.info("rollout wave %d/%d %s: %s", index + 1, len(waves), wave.name,
                     ", ".join(wave.endpoints))  # fmt: skip
        done = fleet.deploy(params, wave.endpoints, chosen, progress=progress)
        last = index == len(waves) - 1  # a soak protects later waves; the last has none
        halt = _failure(wave, done) or (None if last else soak(params, wave, done, sleep))
        failpoints.deployer("deploy.before_log")
        where = _where(wave, index, names, halt) if staged else None
        record(params, "deploy", done, run_id, cycle, rollout=where)
        send_alerts(params, "deploy", done)
        outcomes += done
        if halt is not None:
            held = [held_outcome(n, chosen, halt) for w in waves[index + 1 :] for n in w.endpoints]
            if held:
                record(params, "deploy", held, run_id, cycle, rollout=where)
                log.error("rollout halted at wave %s: %s", wave.name, halt.reason)
                raise_alerts(
                    params, [halt_alert(wave.name, halt.failed, [o.endpoint for o in held])]
                )
            outcomes += held
            break
        failpoints.deployer("rollout.after_wave")
    return outcomes, halt


def _where(wave: Wave, index: int, names: list[str], halt: Halt | None) -> dict[str, Any]:
    return {
        "wave": wave.name,
        "index": index + 1,
        "waves": names,
        "halted": halt.to_dict() if halt else None,
    }


def held_back(log_entries: list[dict[str, Any]]) -> dict[str, str]:
    """Endpoint -> why it is held back from the latest staged rollout (the newest deploy
    run that has a `rollout` field); endpoints a later run reached are not held any more."""
    latest: dict[str, dict[str, Any]] = {}
    for entry in log_entries:
        if entry.get("action") == "deploy":
            latest[entry["endpoint"]] = entry
    rollouts = [e for e in log_entries if e.get("action") == "deploy" and e.get("rollout")]
    if not rollouts:
        return {}
    run_id = rollouts[-1]["run_id"]
    return {
        name: f"held: rollout {run_id} halted at wave {entry['rollout']['wave']}"
        for name, entry in latest.items()
        if entry.get("run_id") == run_id and entry.get("status") == "held"
    }


def progress_of(log_entries: list[dict[str, Any]], model: str, version_id: str) -> list[str]:
    """How far each staged rollout of this version went: `2/2 waves` or
    `1/2 waves, halted at canary (mac-dev: ...)`, one line per run, oldest first."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for entry in log_entries:
        if entry.get("rollout") and entry.get("versions", {}).get(model) == version_id:
            runs.setdefault(entry["run_id"], []).append(entry)
    lines = []
    for run_id, entries in runs.items():
        waves = entries[0]["rollout"]["waves"]
        reached = max(e["rollout"]["index"] for e in entries if e.get("status") != "held")
        halted = next((e["rollout"]["halted"] for e in entries if e["rollout"]["halted"]), None)
        line = f"{run_id}: {reached}/{len(waves)} waves"
        if halted:
            line += f", halted at {halted['wave']} ({halted['reason']})"
        lines.append(line)
    return lines
