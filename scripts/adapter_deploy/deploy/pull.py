"""`make pull` on a pulling endpoint: fetch what `make promote` assigned it and deploy it here
with the same steps a push deploy runs (deploy/steps.py over a local agent session).

One pull, under the endpoint's pull lock (a second pull at once exits with Locked):
    1. the git remote's tags into a bare mirror (read-only), each model's stage tag resolved;
    2. a version that failed here before is skipped until a newer one is promoted;
    3. exactly that release's files from the DVC remote (store/pull_source.py);
    4. TRANSFER (a local rsync into the agent's incoming/, sha256 and the signature checked;
       an endpoint that trusts no key refuses to pull at all), PRE-CHECK, ACTIVATE, reload,
       VERIFY, automatic rollback: `EndpointRun.deploy_model`, as a push deploy runs it;
    5. a deploy-log line in <adapter_dir>/deploy_log.jsonl (status.json is the agent's own),
       and the report `make status` reads: <reports>/<endpoint>.json, written atomically.
Whatever fails, the endpoint keeps serving its last good release and the report says why.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter_deploy import protocol as p
from adapter_deploy.common.clock import utc_now
from adapter_deploy.common.errors import (
    AdapterDeployError,
    RemoteError,
    SignatureRefused,
    UsageError,
)
from adapter_deploy.common.fsutil import append_jsonl, atomic_write_json, file_lock, read_state
from adapter_deploy.common.logs import log_context
from adapter_deploy.config import Params
from adapter_deploy.deploy import records
from adapter_deploy.deploy.doctor_checks import CLOCK_WARN_S
from adapter_deploy.deploy.fleet import endpoint_run, new_run_id, per_model
from adapter_deploy.deploy.plan import EndpointOutcome, ModelOutcome, Release
from adapter_deploy.deploy.remote import PullConnection, holder_text
from adapter_deploy.deploy.steps import EndpointRun
from adapter_deploy.signing import EXPIRED
from adapter_deploy.store import pull_source
from adapter_deploy.store.pull_source import Desired, Place

log = logging.getLogger(__name__)

WORK = ".pull"  # under adapter_dir: the git mirror, the fetch cache, state, lock, report
STATE = "state.json"
REPORT = "report.json"
# Failures that say nothing about the release (a remote away, a lock): retried next pull.
TRANSIENT = (RemoteError.exit_code, 7)


@dataclass
class PullResult:
    endpoint: str
    outcome: EndpointOutcome
    run_id: str
    notes: dict[str, str] = field(default_factory=dict)  # model -> why nothing was done
    report: dict[str, Any] = field(default_factory=dict)
    report_at: str | None = None  # where the report went (None: it could not be written)
    clock_behind_s: float | None = None  # see clock_behind()

    @property
    def exit_code(self) -> int:
        return self.outcome.worst

    def to_dict(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "run_id": self.run_id,
            "exit_code": self.exit_code,
            "notes": self.notes,
            "report_at": self.report_at,
            "outcome": self.outcome.to_dict(),
        }


def adapter_dir_of(params: Params, name: str) -> Path:
    return Path(os.path.expanduser(params.endpoint(name).adapter_dir))


def pull(params: Params, name: str, force: bool = False) -> PullResult:
    """One pull of endpoint `name` (run on that endpoint)."""
    ep = params.endpoint(name)
    if ep.mode != "pull":
        raise UsageError(
            f"{name} is pushed to (mode: push): it does not pull",
            f"deploy to it with make deploy ENDPOINT={name}, or set its mode: pull",
        )
    git_remote, dvc_remote, reports = params.pull_remotes(name)
    adapter_dir = adapter_dir_of(params, name)
    work = adapter_dir / WORK
    with file_lock(work / "lock", holder_text().replace("deploy", "pull", 1), f"pull on {name}"):
        return _pull(params, name, force, (git_remote, dvc_remote, reports), adapter_dir)


def _pull(
    params: Params, name: str, force: bool, remotes: tuple[str, str, str], adapter_dir: Path
) -> PullResult:
    git_remote, dvc_remote, reports = remotes
    work = adapter_dir / WORK
    result = PullResult(name, EndpointOutcome(name), new_run_id())
    started = time.monotonic()
    state = _read_state(work)
    status: dict[str, Any] = {}
    wants: dict[str, Desired] = {}
    try:
        _require_trust(adapter_dir, name)
        pull_source.sync_tags(work / "git", git_remote, ssh_options(params, name))
        for model in params.endpoint(name).models or sorted(params.models):
            want = pull_source.desired(work / "git", model, name)
            if want is None:
                result.notes[model] = "nothing promoted to this endpoint"
                continue
            bad = state.get("bad", {}).get(model) or {}
            if bad.get("version_id") == want.version_id and not force:
                result.notes[model] = (
                    f"{want.version_id} failed here ({bad.get('reason')}); "
                    "not retried until a newer version is promoted"
                )
                continue
            wants[model] = want
    except AdapterDeployError as err:
        result.outcome.error, result.outcome.exit_code = err.one_line(), err.exit_code
        log.error("%s", err.one_line())
    result.clock_behind_s = clock_behind(wants.values())
    early = result.outcome
    # Through the agent even after a failure: the report must say what still runs here.
    here = PullConnection(name, params.endpoint(name))
    with endpoint_run(params, name, work / "control", conn=here) as (run, outcome):
        result.outcome = outcome
        outcome.error, outcome.exit_code = early.error, early.exit_code
        session = run.open()
        ssh = ssh_options(params, name)
        on_endpoint = session.call(p.Hello(models=sorted(wants)))["models"]
        for model, want in wants.items():
            per_model(
                outcome,
                model,
                want.version_id,
                lambda w=want: _deploy(run, w, on_endpoint[w.model], dvc_remote, work, ssh),
            )
        status = session.call(p.Status(service_url=None))
    result.outcome.duration_s = round(time.monotonic() - started, 3)
    _remember(work, state, wants, result.outcome)
    cycles = [w.cycle for w in wants.values()]
    entry = records.log_entry("pull", result.outcome, result.run_id, max(cycles, default=None))
    entry["notes"] = result.notes
    append_jsonl(adapter_dir / records.DEPLOY_LOG, entry)
    result.report = _report(result, wants, status, entry)
    result.report_at = _leave_report(work, reports, name, result.report, ssh_options(params, name))
    return result


def _require_trust(adapter_dir: Path, name: str) -> None:
    """A pulling endpoint takes signed releases only: without a trusted key it pulls nothing."""
    keys = adapter_dir / "trusted_keys"
    if not (keys.is_dir() and any(keys.glob("*.pub"))):
        raise SignatureRefused(
            f"{name} trusts no signing key, and a pulling endpoint refuses unsigned releases",
            f"copy the training machine's <signing_key>.pub here and run "
            f"scripts/pull.py --endpoint {name} --trust <that file>",
        )


def _deploy(
    run: EndpointRun,
    want: Desired,
    on_endpoint: dict[str, Any],
    dvc_remote: str,
    work: Path,
    ssh: tuple[str, ...],
) -> ModelOutcome:
    with log_context(model=want.model):
        if want.signed is None:
            raise SignatureRefused(
                f"{want.model} {want.version_id} is unsigned: a pulling endpoint refuses it",
                "version it again with store.signing_key set, then make promote",
            )
        cache = work / "cache" / want.model
        unchanged = on_endpoint.get("active") == want.version_id == on_endpoint.get("verified")
        if not unchanged:
            log.info("fetching %s %s from the DVC remote", want.model, want.version_id)
            pull_source.fetch(dvc_remote, want, cache / want.version_id, ssh)
        # Asked for by its exact id: the operator promoted this one (an older one too).
        release = Release(
            want.model,
            want.version_id,
            want.cycle,
            want.files,
            cache / want.version_id,
            want.signed,
            {"version_id": want.version_id},
        )
        try:
            return run.deploy_model(release, on_endpoint)
        finally:
            shutil.rmtree(cache, ignore_errors=True)  # staged (or refused) by now


def clock_behind(wants: Iterable[Desired]) -> float | None:
    """How far this machine's clock is at least behind the training machine's, when the
    newest stage tag was made in this machine's future (None: no sign of it). Its reports
    would otherwise look older than they are; an endpoint ahead shows in `make status`."""
    behind = max((w.tagged_at for w in wants), default=0.0) - time.time()
    if behind <= CLOCK_WARN_S:
        return None
    log.warning(
        "this machine's clock is at least %.0f s behind the training machine's (a stage tag "
        "was made in its future): set it right (NTP: timedatectl set-ntp true)",
        behind,
    )
    return round(behind, 1)


def _read_state(work: Path) -> dict[str, Any]:
    path = work / STATE
    return read_state(path, f"remove {path}; the pull then forgets which versions failed here")


def _remember(
    work: Path, state: dict[str, Any], wants: dict[str, Desired], outcome: EndpointOutcome
) -> None:
    """A version that failed here for a reason of its own is bad here until a newer one."""
    bad = state.setdefault("bad", {})
    for m in outcome.models:
        want = wants.get(m.model)
        if want is None:
            continue
        if m.status in ("success", "unchanged"):
            bad.pop(m.model, None)
        elif EXPIRED in (m.error or ""):
            continue  # expired by this machine's clock, which may be what is wrong
        elif m.status in ("aborted", "rolled_back") or m.exit_code not in TRANSIENT:
            bad[m.model] = {
                "version_id": m.version_id,
                "tag": want.tag,
                "reason": m.error or m.status,
                "at": utc_now(),
            }
            log.warning("%s %s marked bad here: %s", m.model, m.version_id, m.error or m.status)
    atomic_write_json(work / STATE, state)


def _report(
    result: PullResult, wants: dict[str, Desired], status: dict[str, Any], entry: dict[str, Any]
) -> dict[str, Any]:
    """What the operator's `make status` shows for this endpoint, without reaching it."""
    return {
        "endpoint": result.endpoint,
        "reported_at": utc_now(),
        "run_id": result.run_id,
        "result": _result(result, wants, entry),
        "error": entry["error"],
        "desired": {m: w.version_id for m, w in wants.items()},
        "notes": result.notes,
        "models": status.get("models", {}),
        "clock_behind_s": result.clock_behind_s,
    }


def _result(result: PullResult, wants: dict[str, Desired], entry: dict[str, Any]) -> str:
    if not wants and not result.outcome.error:
        return "nothing to do"
    statuses = {m.status for m in result.outcome.models}
    return (
        "unchanged" if statuses == {"unchanged"} and not result.outcome.error else entry["status"]
    )


def _leave_report(
    work: Path, reports: str, name: str, report: dict[str, Any], ssh: tuple[str, ...]
) -> str | None:
    """The report here and at `reports` (one object per endpoint, replaced whole)."""
    atomic_write_json(work / REPORT, report)
    data = (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
    try:
        target = Place.parse(reports, "reports location", ssh).child(f"{name}.json")
        target.write_atomic(data)
    except (AdapterDeployError, OSError, subprocess.SubprocessError) as err:
        text = err.one_line() if isinstance(err, AdapterDeployError) else str(err)
        log.warning("the report could not be left at %s: %s (kept in %s)", reports, text, work)
        return None
    return f"{target.host}:{target.path}" if target.host else target.path


def ssh_options(params: Params, name: str) -> tuple[str, ...]:
    """How this endpoint reaches ssh:// remotes: its own ssh_config and identity_file."""
    ep = params.endpoint(name)
    options: list[str] = []
    if ep.ssh_config:
        options += ["-F", os.path.expanduser(ep.ssh_config)]
    if ep.identity_file:
        options += ["-i", os.path.expanduser(ep.identity_file)]
    return tuple(options)


def trust_here(params: Params, name: str, public_pem: str) -> str:
    """Install the public signing key on this pulling endpoint (what `make trust` does over
    ssh for a pushed one); its key id."""
    control = adapter_dir_of(params, name) / WORK / "control"
    run = EndpointRun(params, name, control, conn=PullConnection(name, params.endpoint(name)))
    try:
        return run.open().call(p.Trust(public_pem=public_pem))["key_id"]
    finally:
        run.close()
