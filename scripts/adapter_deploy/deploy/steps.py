"""One endpoint's part of a deploy or rollback: the named steps (TRANSFER, PRE-CHECK,
ACTIVATE, VERIFY, the automatic rollback) over one endpoint session.

`EndpointRun.deploy_model()` runs them for one release; whatever fails, the endpoint keeps
serving its last verified release (`fallback_for`). deploy/fleet.py runs endpoints in
parallel; phases.py and rollback.py reuse the same steps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from adapter_deploy import protocol as p
from adapter_deploy.common import failpoints
from adapter_deploy.common.errors import DiskFull, HealthCheckFailed, ReloadFailed
from adapter_deploy.common.logs import log_context
from adapter_deploy.config import Params
from adapter_deploy.deploy.base_release import ensure_base
from adapter_deploy.deploy.plan import (
    ModelOutcome,
    Release,
    base_model_for,
    engine_kind,
    links_for,
    reload_spec,
)
from adapter_deploy.deploy.progress import NO_PROGRESS, Progress
from adapter_deploy.deploy.remote import Connection, Session

log = logging.getLogger("adapter_deploy.deploy.fleet")


class EndpointRun:
    """One endpoint's part of a deploy or rollback, over one session."""

    def __init__(
        self, params: Params, name: str, control_dir: Path, progress: Progress | None = None
    ) -> None:
        self.params = params
        self.name = name
        self.ep = params.endpoint(name)
        self.conn = Connection(name, self.ep, control_dir)
        self.progress = progress or NO_PROGRESS
        self.session: Session | None = None
        self.pushed: dict[str, int] = {}  # model -> bytes sent by push_all (-1: was present)

    def say(self, model: str, phase: str, detail: str = "") -> None:
        with log_context(endpoint=self.name, model=model):
            log.info("%s%s", phase, f": {detail}" if detail else "")

    def step(self, model: str, name: str) -> None:
        """Tell the operator which step this endpoint is in now (a spinner, a line)."""
        self.progress.step(self.name, f"{model} {name}")

    def open(self) -> Session:
        self.session = Session(self.conn, self.ep.adapter_dir)
        return self.session

    def close(self) -> None:
        if self.session:
            self.session.close()
        self.conn.close()

    def health(self, model: str, version_id: str | None, via_service: bool) -> dict[str, Any]:
        assert self.session
        return self.session.call(
            p.Health(
                model=model,
                version_id=version_id,
                base_model=base_model_for(self.params, self.ep, model),
                engine=engine_kind(self.params, self.ep),
                latency_limit=self.params.health_check.latency_limit_s,
                service_url=self.ep.service_url if via_service else None,
                task=self.params.models[model].task,
                sentences=self.sentences_path(model),
                reload_timeout=self.params.health_check.reload_timeout_s,
            )
        )

    def sentences_path(self, model: str) -> str | None:
        """The model's sentence (or clip) file as a path on the endpoint: a relative one
        resolves against the endpoint's checkout (`project_dir`), else against the params
        file's directory here (a local endpoint shares this checkout)."""
        sentences = self.params.models[model].sentences
        if sentences is None or Path(sentences).is_absolute():
            return sentences
        if self.ep.project_dir and not self.conn.local:
            return self.conn.remote_path(f"{self.ep.project_dir.rstrip('/')}/{sentences}")
        return str(self.params.resolve(sentences))

    @property
    def via_service(self) -> bool:
        return self.ep.reload_method != "none" and self.ep.service_url is not None

    # --- the deploy steps -------------------------------------------------------------

    def _prepare(self, release: Release) -> dict[str, Any]:
        assert self.session
        return self.session.call(
            p.Prepare(
                model=release.model,
                version_id=release.version_id,
                files=release.files,
                size=release.size,
                reserve=self.ep.min_free_bytes,
            )
        )

    def push_all(self, chosen: list[Release], store: Path) -> None:
        """TRANSFER's network part for every store release at once: one rsync per endpoint.

        Releases laid out as <store>/<model>/<id>/ land in incoming/<model>/<id>/ through one
        `rsync --relative`; others (conversions) travel one by one in transfer().
        """
        batch: list[Release] = []
        files: list[str] = []
        incoming_root = None
        for release in chosen:
            rel = f"{release.model}/{release.version_id}"
            if release.local_dir != store / rel:
                continue
            prep = self._prepare(release)
            if prep["present"]:
                self.pushed[release.model] = -1  # verified by prepare: nothing to send
                continue
            incoming_root = prep["incoming"][: -len(rel)]
            batch.append(release)
            # a string: pathlib would drop the "/./" that marks where --relative starts
            files += [f"{store}/./{rel}/{name}" for name in release.files]
        if not batch:
            return
        total = sum(r.size for r in batch)
        self.say(",".join(r.model for r in batch), "transfer", f"{total} bytes")
        self.step(",".join(r.model for r in batch), "transfer")
        sent = self._push(batch, files, str(incoming_root), total, relative=True)
        for release in batch:  # rsync reports one figure; attribute it by size
            self.pushed[release.model] = round(sent * release.size / max(total, 1))

    def _push(
        self, batch: list[Release], files: list, dest: str, total: int, relative: bool = False
    ) -> int:
        """rsync `files`; on a full endpoint disk, remove what landed (partials too) first."""
        assert self.session
        theirs = self.session.rsync_version
        self.progress.start(self.name, total)
        # no one watching: rsync prints no progress and nothing is parsed
        watched = self.progress is not NO_PROGRESS
        try:
            sent = self.conn.push(
                files,
                dest,
                (lambda done: self.progress.advance(self.name, min(done, total)))
                if watched
                else None,
                relative,
                protect_args=theirs >= (3, 0),
                endpoint_rsync=theirs,
            )
            self.progress.advance(self.name, total)  # files rsync found in place count too
            return sent
        except DiskFull:
            for release in batch:
                self.session.call(
                    p.DropIncoming(model=release.model, version_id=release.version_id)
                )
            raise

    def transfer(self, release: Release, out: ModelOutcome) -> None:
        assert self.session
        pushed = self.pushed.pop(release.model, None)
        present = pushed == -1 or (pushed is None and (prep := self._prepare(release))["present"])
        if present:
            # Staged anyway: on an endpoint that trusts a key, a release that arrived before
            # `make trust` has its signature checked here, before it can become active.
            self.say(release.model, "transfer", "already present (0 B)")
        elif pushed is not None:
            out.bytes_sent = pushed
        else:
            files = [release.local_dir / n for n in release.files]
            self.say(release.model, "transfer", f"{release.size} bytes")
            self.step(release.model, "transfer")
            out.bytes_sent = self._push([release], files, prep["incoming"], release.size)
        self.step(release.model, "sha256 check")
        # The operator's request travels as asked (--cycle N or --version ID): the endpoint
        # waives its rollback-attack guard only when that names the release's signed fields.
        staged = self.session.call(
            p.Stage(
                model=release.model,
                version_id=release.version_id,
                files=release.files,
                signed=release.signed,
                requested=release.requested,
            )
        )
        self.say(release.model, "transfer", f"{staged['result']}, verified ({out.bytes_sent} B)")
        out.phases.append("transfer")

    def precheck(self, release: Release, out: ModelOutcome) -> bool:
        self.step(release.model, "pre-check")
        result = self.health(release.model, release.version_id, via_service=False)
        out.health["pre_activation"] = result
        out.phases.append("health_check")
        if not result["all_passed"]:
            self._fail(out, "aborted", "pre-activation health check failed", result)
            return False
        self.say(release.model, "pre-check", "passed")
        return True

    def activate(
        self, release: Release, out: ModelOutcome, fallback: dict[str, Any] | None = None
    ) -> bool:
        """Flip and reload; a reload that fails puts `fallback` back at once (default: what
        served, or the last verified release when what served never passed VERIFY)."""
        assert self.session
        self.step(release.model, "activate")
        self.session.call(p.ClearBad(model=release.model, version_id=release.version_id))
        before = self.session.call(p.Hello(models=[release.model]))["models"][release.model]
        out.previous = before["active"]
        fallback = fallback or fallback_for(release, before)
        try:
            flip = self.session.call(
                p.Activate(
                    model=release.model,
                    version_id=release.version_id,
                    reload=reload_spec(self.ep),
                    links=links_for(self.ep),
                )
            )
        except ReloadFailed as err:
            out.status, out.error, out.exit_code = "rolled_back", err.one_line(), err.exit_code
            log.warning("reload failed: %s", err.one_line())
            self.restore(
                release.model, fallback["active"], fallback["previous"], release.version_id
            )
            return False
        out.phases.append("activate")
        self.say(release.model, "activate", f"{flip['old']} -> {flip['new']}")
        return True

    def verify(self, release: Release, out: ModelOutcome, before: dict[str, Any]) -> None:
        self.step(release.model, "verify")
        try:
            result = self.health(release.model, None, via_service=self.via_service)
        except ReloadFailed as err:
            result = {"all_passed": False, "error": err.one_line(), "reload_failed": True}
        out.health["post_activation"] = result
        if result["all_passed"]:
            out.phases.append("verify")
            out.status = "success"
            failpoints.deployer("deploy.after_verify")
            self.mark_verified(release.model, release.version_id)
            failpoints.deployer("deploy.after_record")
            self.say(release.model, "verify", "passed")
            return
        self._fail(out, "rolled_back", "post-activation health check failed", result)
        if result.get("reload_failed"):
            out.exit_code = ReloadFailed.exit_code
        self.restore(release.model, before["active"], before["previous"], release.version_id)

    def restore(self, model: str, active: str | None, previous: str | None, bad: str) -> None:
        """Automatic rollback: links back, re-signal, verify the old release."""
        assert self.session
        self.step(model, "rollback")
        self.session.call(p.MarkBad(model=model, version_id=bad, reason="failed verify"))
        failpoints.deployer("rollback.after_mark_bad")
        try:
            self.session.call(
                p.Restore(
                    model=model,
                    active=active,
                    previous=previous,
                    reload=reload_spec(self.ep),
                )
            )
        except ReloadFailed as err:
            log.error("links restored, but reload failed: %s", err)
            return
        failpoints.deployer("rollback.after_links")
        if active is None:
            self.say(model, "rollback", "no earlier release: active removed, base model serves")
            return
        check = self.health(model, None, via_service=self.via_service)
        if check["all_passed"]:
            self.mark_verified(model, active)
        else:
            unhealthy = f"unhealthy: {active} failed its check after the rollback from {bad}"
            self.session.call(p.Record(model=model, health_status=unhealthy))
        self.say(model, "rollback", f"back on {active}, healthy={check['all_passed']}")

    def mark_verified(self, model: str, version_id: str) -> None:
        """Remember on the endpoint that what `active` points at passed VERIFY."""
        assert self.session
        self.session.call(p.Record(model=model, verified=version_id, health_status="healthy"))

    def _fail(self, out: ModelOutcome, status: str, why: str, result: dict[str, Any]) -> None:
        out.status = status
        failures = [r for r in result.get("results", []) if not r["passed"]]
        detail = result.get("error") or "; ".join(
            f"{r['input']!r}: {r['reason']}" for r in failures
        )
        out.error = f"{why}: {detail}"
        out.exit_code = HealthCheckFailed.exit_code
        log.warning("%s: %s", status.upper(), out.error)

    def deploy_model(self, release: Release, on_endpoint: dict[str, Any]) -> ModelOutcome:
        out = ModelOutcome(release.model, release.version_id)
        active, previous = on_endpoint.get("active"), on_endpoint.get("previous")
        before = fallback_for(release, on_endpoint)
        trusted = before["active"] != active
        if active == release.version_id and release.version_id not in on_endpoint["bad"]:
            if on_endpoint.get("verified") == release.version_id:
                out.status, out.previous = "unchanged", previous
                self.say(release.model, "unchanged", f"{release.version_id} already active")
                return out
            # Active but never verified: an earlier deploy was cut after ACTIVATE. Verify it
            # now, or roll back to the last verified release (else what served before it).
            self.say(release.model, "reconcile", "active but unverified; verifying now")
            out.previous = previous
            fallback = before if trusted else {"active": previous, "previous": None}
            self.verify(release, out, fallback)
            return out
        if release.converted:
            out.phases.append("convert")
        self.transfer(release, out)
        if release.base is not None and not ensure_base(self, release.base, out):
            return out  # gguf-lora: its base failed its check; nothing was activated
        failpoints.deployer("deploy.after_transfer")
        if not self.precheck(release, out):
            return out
        failpoints.deployer("deploy.after_precheck")
        if self.activate(release, out, before):
            failpoints.deployer("deploy.after_activate")
            self.verify(release, out, before)
        if out.status == "success":
            assert self.session
            self.session.call(p.Prune(model=release.model, keep=self.params.release.keep))
        return out


def fallback_for(release: Release, on_endpoint: dict[str, Any]) -> dict[str, Any]:
    """Where a failed ACTIVATE or VERIFY of `release` goes back to: what serves now, unless
    that never passed VERIFY (an earlier run was cut after ACTIVATE or in the middle of a
    rollback) and a verified release is still kept: then that one."""
    active, previous = on_endpoint.get("active"), on_endpoint.get("previous")
    trusted = _last_verified(on_endpoint)
    if active is not None and trusted not in (None, active, release.version_id):
        return {"active": trusted, "previous": None}
    return {"active": active, "previous": previous}


def _last_verified(on_endpoint: dict[str, Any]) -> str | None:
    """The release the endpoint last recorded as verified, if it is kept and not marked bad."""
    verified = on_endpoint.get("verified")
    if (
        verified
        and verified in on_endpoint.get("releases", ())
        and verified not in on_endpoint["bad"]
    ):
        return verified
    return None
