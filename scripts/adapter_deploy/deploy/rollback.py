"""Manual rollback: back to `previous` (or TO=<version_id>) on each endpoint.

Reuses the deploy's link-restoring step. The release rolled back from is
marked bad, so a later rollback never picks it; an explicit deploy of it runs
every check again.
"""

from __future__ import annotations

from pathlib import Path

from adapter_deploy import protocol as p
from adapter_deploy.common import failpoints
from adapter_deploy.common.errors import (
    HealthCheckFailed,
    NothingToRollBack,
    ReloadFailed,
)
from adapter_deploy.config import Params
from adapter_deploy.deploy.fleet import (
    endpoint_run,
    per_model,
)
from adapter_deploy.deploy.plan import (
    EndpointOutcome,
    ModelOutcome,
    reload_spec,
)
from adapter_deploy.deploy.steps import EndpointRun


def rollback_model(run: EndpointRun, model: str, to: str | None) -> ModelOutcome:
    assert run.session
    choice = run.session.call(p.RollbackTarget(model=model, to=to))
    current, target = choice["from"], choice["to"]
    out = ModelOutcome(model, target, previous=current)
    # Marked before the links move: a rollback cut after the flip is rerun from the target,
    # where it no longer knows what it rolled back from.
    if current and current != target:
        run.session.call(p.MarkBad(model=model, version_id=current, reason="rolled back"))
    failpoints.deployer("manual_rollback.after_mark_bad")
    run.session.call(
        p.Restore(model=model, active=target, previous=current, reload=reload_spec(run.ep))
    )
    failpoints.deployer("manual_rollback.after_links")
    out.phases.append("activate")
    run.say(model, "rollback", f"{current} -> {target}")
    try:
        result = run.health(model, None, via_service=run.via_service)
    except ReloadFailed as err:
        result = {"all_passed": False, "error": err.one_line(), "results": []}
    out.health["post_activation"] = result
    if result["all_passed"]:
        out.status = "success"
        out.phases.append("verify")
        run.mark_verified(model, target)
    else:
        out.status = "failed"
        out.error = f"{target} failed its health check after rollback"
        out.exit_code = HealthCheckFailed.exit_code
    return out


def rollback_endpoint(
    params: Params, name: str, models: list[str] | None, to: str | None, control_dir: Path
) -> EndpointOutcome:
    with endpoint_run(params, name, control_dir) as (run, outcome):
        hello = run.open().call(p.Hello(models=models))
        chosen = models or sorted(m for m, s in hello["models"].items() if s["active"])
        if not chosen:
            raise NothingToRollBack(f"{name} has nothing deployed", "deploy a version first")
        for model in chosen:
            per_model(outcome, model, None, lambda m=model: rollback_model(run, m, to))
    return outcome
