"""One endpoint's part of a deploy or rollback: the named steps (TRANSFER, PRE-CHECK,
ACTIVATE, VERIFY, the automatic rollback) over one endpoint session.

`EndpointRun.deploy_model()` runs them for one release; whatever fails, the endpoint keeps
serving its last verified release (`fallback_for`). deploy/fleet.py runs endpoints in
parallel; phases.py and rollback.py reuse the same steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapter_deploy import protocol as p
from adapter_deploy.common import failpoints
from adapter_deploy.common.errors import DiskFull, HealthCheckFailed, ReloadFailed
from adapter_deploy.common.logs import log_context
from adapter_deploy.config import Params
from adapter_deploy.deploy.base_release import ensure_base
from adapter_deploy.deploy.early import EarlyPush, landing_files, landing_root
from adapter_deploy.deploy.plan import (
    ModelOutcome,
    Release,
    base_model_for,
    engine_kind,
    links_for,
    reload_spec,
)
from adapter_deploy.deploy.progress import NO_PROGRESS, Progress
from adapter_deploy.deploy.remote import Connection, Session, connect

log = logging.getLogger("adapter_deploy.deploy.fleet")


class EndpointRun:
    """One endpoint's part of a deploy or rollback, over one session."""

    def __init__(
        self,
        params: Params,
        name: str,
        control_dir: Path,
        progress: Progress | None = None,
        conn: Connection | None = None,
    ) -> None:
        """`conn`: how the endpoint is reached, where not as its params say (a pull reaches
        its own endpoint, deploy/pull.py); `control_dir` holds ssh's sockets."""
        self.params = params
        self.name = name
        self.ep = params.endpoint(name)
        self.conn = conn or connect(name, self.ep, control_dir)
        self.progress = progress or NO_PROGRESS
        self.session: Session | None = None
        self.pushed: dict[str, int] = {}  # model -> bytes sent by push_all (-1: was present)
        self.early: EarlyPush | None = None

    def say(self, model: str, phase: str, detail: str = "") -> None:
        with log_context(endpoint=self.name, model=model):
            log.info("%s%s", phase, f": {detail}" if detail else "")

    def step(self, model: str, name: str) -> None:
        """Tell the operator which step this endpoint is in now (a spinner, a line)."""
        self.progress.step(self.name, f"{model} {name}")

    def open(self, early: list[Release] = (), farm: Path | None = None) -> Session:
        """Start the endpoint session; with `early` store releases, their rsync starts as
        soon as the ssh connection is up, while the agent is still starting (deploy/early.py).
        `farm`: a private dir for the landing-path symlinks."""
        self.session = Session(self.conn, self.ep.adapter_dir, wait=False)
        if early and farm is not None and self.session.connected():
            self.early = self._start_early(list(early), farm)
        try:
            self.session.ready()
        except BaseException:
            if self.early:
                self.early.cancel()  # this deploy stops here; what landed stays for a resume
            raise
        return self.session

    def _start_early(self, releases: list[Release], farm: Path) -> EarlyPush:
        total = sum(r.size for r in releases)
        models = ",".join(r.model for r in releases)
        self.say(models, "transfer", f"{total} bytes, starting with the connection")
        self.step(models, "transfer")
        self.progress.start(self.name, total)
        return EarlyPush(self.conn, releases, farm, self.ep.min_free_bytes, self._reporter(total))

    def _reporter(self, total: int) -> Callable[[int], None] | None:
        """rsync's running byte count to the progress display; None when no one watches
        (rsync then prints no progress and nothing is parsed)."""
        if self.progress is NO_PROGRESS:
            return None
        return lambda done: self.progress.advance(self.name, min(done, total))

    def close(self) -> None:
        if self.early:
            self.early.cancel()
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
        resolves against the endpoint's checkout (`Connection.project_file`)."""
        sentences = self.params.models[model].sentences
        if sentences is None or Path(sentences).is_absolute():
            return sentences
        return self.conn.project_file(sentences, self.params.resolve(sentences))

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

    def push_all(self, chosen: list[Release], store: Path, farm: Path) -> None:
        """TRANSFER's network part for every store release at once: one rsync per endpoint.

        Releases laid out as <store>/<model>/<id>/ land in incoming/<model>/releases/<id>/
        through one `rsync --relative` (the early one, when open() started it); others
        (conversions) travel one by one in transfer(). `farm`: as for open().
        """
        early = self.early
        sent_early: list[Release] = []
        batch: list[Release] = []
        for release in chosen:
            if release.local_dir != store / release.model / release.version_id:
                continue
            try:
                prep = self._prepare(release)
            except DiskFull:
                self._drop_early()
                raise
            if prep["present"]:
                self.pushed[release.model] = -1  # verified by prepare: nothing to send
            elif early and release in early.releases and not prep["damaged"]:
                sent_early.append(release)
            else:  # not sent early, or --compare-dest may have skipped a damaged copy's files
                batch.append(release)
        if early:
            self.early = None
            sent = early.finish()
            if isinstance(early.error, DiskFull):
                self._drop(early.releases)
                raise early.error
            if sent is None:  # it did not start or failed: the ordinary rsync resumes it
                if sent_early:
                    models = ",".join(r.model for r in sent_early)
                    self.say(models, "transfer", f"early rsync sent nothing: {early.why_not()}")
                batch, sent_early = sent_early + batch, []
            else:
                self.progress.advance(self.name, early.size)  # files found in place count too
            self._attribute(sent_early, sent or 0)
        if not batch:
            return
        total = sum(r.size for r in batch)
        self.say(",".join(r.model for r in batch), "transfer", f"{total} bytes")
        self.step(",".join(r.model for r in batch), "transfer")
        root = landing_root(self.conn)
        sent = self._push(batch, landing_files(batch, farm), root, total, relative=True)
        self._attribute(batch, sent)

    def _attribute(self, batch: list[Release], sent: int) -> None:
        """rsync reports one figure for all it sent; attribute it by size."""
        total = sum(r.size for r in batch)
        for release in batch:
            self.pushed[release.model] = round(sent * release.size / max(total, 1))

    def _drop_early(self) -> None:
        if self.early:
            self.early.cancel()
            self._drop(self.early.releases)
            self.early = None

    def _drop(self, batch: list[Release]) -> None:
        """After a full disk, remove what landed (partials too): a resume would keep it full."""
        assert self.session
        for release in batch:
            self.session.call(p.DropIncoming(model=release.model, version_id=release.version_id))

    def _push(
        self, batch: list[Release], files: list, dest: str, total: int, relative: bool = False
    ) -> int:
        """rsync `files`; on a full endpoint disk, remove what landed (partials too) first."""
        assert self.session
        theirs = self.session.rsync_version
        self.progress.start(self.name, total)
        try:
            sent = self.conn.push(
                files,
                dest,
                self._reporter(total),
                relative,
                protect_args=theirs >= (3, 0),
                endpoint_rsync=theirs,
            )
            self.progress.advance(self.name, total)  # files rsync found in place count too
            return sent
        except DiskFull:
            self._drop(batch)
            raise

    def transfer(self, release: Release, out: ModelOutcome) -> str:
        """Send what the endpoint lacks and stage it; the endpoint's 'present' or 'staged'."""
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
        return staged["result"]

    def precheck(self, release: Release, out: ModelOutcome) -> bool:
        self.step(release.model, "pre-check")
        # Inside the running service when there is one: no second base in memory.
        result = self.health(release.model, release.version_id, via_service=self.via_service)
        out.health["pre_activation"] = result
        out.phases.append("health_check")
        self._gate_shadow(result)
        if result.get("via_reason") and self.via_service:
            self.say(release.model, "pre-check", f"in a separate process: {result['via_reason']}")
        if not result["all_passed"]:
            self._fail(out, "aborted", "pre-activation health check failed", result)
            return False
        self.say(release.model, "pre-check", "passed")
        return True

    def _gate_shadow(self, result: dict[str, Any]) -> None:
        """health_check.shadow_max_changed: too many changed live answers fail the check."""
        limit, shadow = self.params.health_check.shadow_max_changed, result.get("shadow")
        if limit is None or not shadow or shadow["changed"] <= limit:
            return
        result["all_passed"] = False
        result["error"] = (
            f"shadow replay: {shadow['changed']} of {shadow['compared']} live answers changed, "
            f"over health_check.shadow_max_changed {limit}"
        )

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
