"""Single phases of a deploy, run on their own (each safe to re-run).

`make transfer|precheck|activate|verify CYCLE=N ENDPOINT=x [MODELS=...]` run one
step of the same EndpointRun a full deploy uses. Verify here only reports: it
does not roll back (a full deploy does; `make rollback` does it by hand).
"""

from __future__ import annotations

from pathlib import Path

from adapter_deploy.common.errors import HealthCheckFailed
from adapter_deploy.config import Params
from adapter_deploy.deploy.fleet import (
    endpoint_run,
    per_model,
    run_parallel,
)
from adapter_deploy.deploy.plan import (
    EndpointOutcome,
    ModelOutcome,
    Release,
)
from adapter_deploy.deploy.progress import Progress
from adapter_deploy.deploy.steps import EndpointRun

PHASES = ("transfer", "precheck", "activate", "verify")


def _step(run: EndpointRun, phase: str, release: Release) -> ModelOutcome:
    out = ModelOutcome(release.model, release.version_id, status="success")
    if phase == "transfer":
        run.transfer(release, out)
    elif phase == "precheck":
        if not run.precheck(release, out):
            return out
    elif phase == "activate":
        run.activate(release, out)
    else:
        run.step(release.model, "verify")
        result = run.health(release.model, None, via_service=run.via_service)
        out.health["post_activation"] = result
        out.phases.append("verify")
        if result["all_passed"]:
            run.mark_verified(release.model, release.version_id)
        else:
            out.status, out.exit_code = "failed", HealthCheckFailed.exit_code
            out.error = result.get("error") or "verify failed: " + "; ".join(
                f"{r['input']!r}: {r['reason']}" for r in result["results"] if not r["passed"]
            )
    return out


def _phase_endpoint(
    params: Params,
    name: str,
    phase: str,
    chosen: list[Release],
    control_dir: Path,
    progress: Progress | None = None,
) -> EndpointOutcome:
    with endpoint_run(params, name, control_dir, progress) as (run, outcome):
        run.open()
        for r in chosen:
            per_model(outcome, r.model, r.version_id, lambda r=r: _step(run, phase, r))
    return outcome


def run_phase(
    params: Params,
    phase: str,
    endpoints: list[str],
    chosen: list[Release],
    progress: Progress | None = None,
) -> list[EndpointOutcome]:
    return run_parallel(
        params,
        endpoints,
        lambda name, ctl: _phase_endpoint(params, name, phase, chosen, ctl, progress),
    )
