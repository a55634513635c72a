"""Phases 3-6 of a deploy (TRANSFER, PRE-CHECK, ACTIVATE, VERIFY) per endpoint.

A deploy is a list of small named steps per endpoint and model (deploy/steps.py);
rollback reuses the same link-restoring step. Endpoints run in parallel (bounded), each
over one endpoint session (one multiplexed ssh connection); a failure on one
endpoint never stops the others. Whatever fails, the endpoint keeps serving
its last verified release.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from adapter_deploy import protocol as p
from adapter_deploy.common.errors import (
    AdapterDeployError,
    RemoteError,
)
from adapter_deploy.common.logs import log_context
from adapter_deploy.common.prereqs import install_hint
from adapter_deploy.config import Params
from adapter_deploy.deploy import records
from adapter_deploy.deploy.plan import (
    EndpointOutcome,
    ModelOutcome,
    Release,
    for_endpoint,
    release_format,
)
from adapter_deploy.deploy.progress import Progress
from adapter_deploy.deploy.remote import Connection
from adapter_deploy.deploy.steps import EndpointRun

log = logging.getLogger(__name__)


def _needs_transfer(release: Release, on_endpoint: dict[str, Any]) -> bool:
    return not (on_endpoint.get("active") == release.version_id == on_endpoint.get("verified"))


def _guard(outcome: EndpointOutcome, model_out: ModelOutcome | None, err: AdapterDeployError):
    target = model_out if model_out is not None else outcome
    target.error = err.one_line()
    target.exit_code = err.exit_code
    if model_out is not None:
        model_out.status = "failed" if model_out.status == "pending" else model_out.status
    text = err.one_line()
    log.error("%s", text.removeprefix(f"{outcome.endpoint}: "))  # the context names it


@contextlib.contextmanager
def endpoint_run(
    params: Params,
    name: str,
    control_dir: Path,
    progress: Progress | None = None,
    conn: Connection | None = None,
) -> Iterator[tuple[EndpointRun, EndpointOutcome]]:
    """One endpoint's run: an endpoint-wide failure is recorded in its outcome, never raised,
    so one endpoint's trouble never stops the others. `conn`: as for EndpointRun."""
    started = time.monotonic()
    outcome = EndpointOutcome(name)
    run = EndpointRun(params, name, control_dir, progress, conn)
    try:
        yield run, outcome
    except AdapterDeployError as err:
        _guard(outcome, None, err)
    finally:
        run.close()
        run.progress.done(name)
        outcome.duration_s = round(time.monotonic() - started, 3)


def per_model(
    outcome: EndpointOutcome, model: str, version_id: str | None, step: Callable[[], ModelOutcome]
) -> None:
    """Run one model's step; its failure is that model's outcome, the others go on."""
    with log_context(model=model):
        try:
            outcome.models.append(step())
        except AdapterDeployError as err:
            failed = ModelOutcome(model, version_id)
            _guard(outcome, failed, err)
            outcome.models.append(failed)


def deploy_endpoint(
    params: Params,
    name: str,
    chosen: list[Release],
    control_dir: Path,
    progress: Progress | None = None,
) -> EndpointOutcome:
    farm = control_dir / f"{name}.landing"
    with endpoint_run(params, name, control_dir, progress) as (run, outcome):
        session = run.open(early_releases(params, name, chosen), farm)
        hello = session.call(p.Hello(models=[r.model for r in chosen]))
        if not hello["rsync"] and run.conn.needs_endpoint_rsync:
            fix = f"install it on the endpoint: {install_hint('rsync')}"
            raise RemoteError(f"{name}: rsync is missing on the endpoint", fix)
        prepared = [for_endpoint(params, run.ep, r) for r in chosen]
        on_endpoint = hello["models"]
        run.push_all(
            [r for r in prepared if _needs_transfer(r, on_endpoint[r.model])],
            params.adapters_dir,
            farm,
        )
        for r in prepared:
            per_model(
                outcome,
                r.model,
                r.version_id,
                lambda r=r: run.deploy_model(r, on_endpoint[r.model]),
            )
    return outcome


def early_releases(params: Params, name: str, chosen: list[Release]) -> list[Release]:
    """The store releases whose rsync starts with the connection: each one this endpoint
    takes as the adapter itself, unless the last run recorded it active and healthy there
    (an unchanged re-deploy then costs no rsync at all; the session decides either way)."""
    ep = params.endpoint(name)
    try:
        recorded = records.read_status(params.adapters_dir).get(name, {})
    except AdapterDeployError:
        recorded = {}
    early = []
    for release in chosen:
        if release_format(ep, release.model) != "adapter":
            continue
        last = recorded.get(release.model) or {}
        healthy = last.get("health_status") == "healthy"
        if not (healthy and last.get("active_version") == release.version_id):
            early.append(release)
    return early


def run_parallel(params: Params, endpoints: list[str], job) -> list[EndpointOutcome]:
    """Run `job(name, control_dir)` for every endpoint, bounded, each isolated."""
    with tempfile.TemporaryDirectory(prefix="adeploy-") as control:
        control_dir = Path(control)
        workers = max(1, min(params.release.parallel, len(endpoints)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # each worker in its own copy of the caller's log context (threads start empty)
            futures = [
                pool.submit(contextvars.copy_context().run, _isolated, job, name, control_dir)
                for name in endpoints
            ]
            return [f.result() for f in futures]


def _isolated(job, name: str, control_dir: Path) -> EndpointOutcome:
    """A bug or a malformed reply on one endpoint becomes that endpoint's failed outcome
    (exit 1); the other endpoints finish and the run is still logged and alerted."""
    with log_context(endpoint=name):
        try:
            return job(name, control_dir)
        except AdapterDeployError as err:  # raised outside endpoint_run (e.g. while planning)
            outcome = EndpointOutcome(name)
            _guard(outcome, None, err)
            return outcome
        except Exception as err:
            log.debug("unexpected error", exc_info=True)
            log.error("unexpected error: %r (rerun with -v for the traceback)", err)
            return EndpointOutcome(name, error=f"unexpected error: {err!r}", exit_code=1)


def deploy(
    params: Params,
    endpoints: list[str],
    chosen: list[Release],
    progress: Progress | None = None,
) -> list[EndpointOutcome]:
    return run_parallel(
        params,
        endpoints,
        lambda name, control: deploy_endpoint(params, name, chosen, control, progress),
    )


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]
