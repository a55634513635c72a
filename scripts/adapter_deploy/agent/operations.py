"""What the endpoint agent does for each protocol request, on one endpoint's adapter_dir.

One method per request type of `adapter_deploy.protocol`; each takes its request and
returns a JSON-able dict. Model libraries are imported only for health checks and
cryptography only where a key is trusted: moving files stays lean.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapter_deploy import protocol as p
from adapter_deploy.agent import releases
from adapter_deploy.agent.receive import Receiver, known_hash
from adapter_deploy.agent.releases import KnownHash, ModelReleases
from adapter_deploy.agent.reload import signal_reload
from adapter_deploy.agent.status import read_status, record_status
from adapter_deploy.common import failpoints
from adapter_deploy.common.clock import utc_now
from adapter_deploy.common.errors import (
    AdapterDeployError,
    DiskFull,
    ReloadFailed,
    SignatureRefused,
    UsageError,
)
from adapter_deploy.common.names import check_file_names, check_name, check_version_id


class EndpointSide:
    """Operations on one endpoint's adapter_dir (what the session dispatches to)."""

    def __init__(self, adapter_dir: Path, endpoint: str | None = None) -> None:
        self.adapter_dir = adapter_dir
        self.endpoint = endpoint  # its name in the deployer's params, for status.json
        # (model, version) -> the file list `prepare` found a present release whole against
        self._intact: dict[tuple[str, str], dict[str, Any]] = {}
        # (model, version) -> hashes its files while rsync still sends the rest
        self._receiving: dict[tuple[str, str], Receiver] = {}

    def _record(self, model: str, **fields: Any) -> None:
        record_status(self.adapter_dir, model, self.endpoint, **fields)

    def releases_of(self, model: str) -> ModelReleases:
        return ModelReleases(self.adapter_dir, check_name("model", model))

    def handle(self, request: p.Request) -> dict[str, Any]:
        handler: Callable[[Any], dict[str, Any]] = getattr(self, request.op)
        return handler(request)

    def hello(self, req: p.Hello) -> dict[str, Any]:
        usage = shutil.disk_usage(self.adapter_dir)
        names = req.models or [
            d.name for d in self.adapter_dir.iterdir() if (d / "releases").is_dir()
        ]
        status = read_status(self.adapter_dir).get("models", {})
        return {
            "pid": os.getpid(),
            "protocol": p.PROTOCOL_VERSION,
            "rsync": shutil.which("rsync") is not None,
            "free_bytes": usage.free,
            "models": {
                m: {**self.releases_of(m).describe(), "verified": status.get(m, {}).get("verified")}
                for m in names
            },
        }

    def prepare(self, req: p.Prepare) -> dict[str, Any]:
        kept = self.releases_of(req.model)
        release = kept.release(check_version_id(req.version_id))
        check_file_names(req.files)
        damaged = release.is_dir()
        if damaged and not releases.file_problems(release, req.files):
            self._intact[(req.model, req.version_id)] = req.files
            return {"present": True, "incoming": None, "damaged": False}
        free = shutil.disk_usage(self.adapter_dir).free
        # the deployer's rsync may have started before this session: what it already wrote
        # is no longer free but is part of this release (counted only in real directories)
        landing = releases.check_landing(kept, req.version_id)
        need = max(0, req.size - releases.landed_bytes(landing))
        if free < need + req.reserve:
            raise DiskFull(
                f"endpoint disk is full: {free} bytes free under {self.adapter_dir}, "
                f"need {need} plus {req.reserve} kept free",
                "free space on the endpoint (old releases, caches) and deploy again",
            )
        incoming = releases.prepare_incoming(kept, req.version_id)
        self._received(req.model, req.version_id)  # a second prepare starts afresh
        self._receiving[(req.model, req.version_id)] = Receiver(incoming, req.files)
        # damaged: a kept copy whose files differ; rsync --compare-dest may have skipped
        # files that only look the same (size and mtime), so they must be sent again
        return {"present": False, "incoming": str(incoming), "damaged": damaged}

    def _received(self, model: str, version_id: str) -> KnownHash | None:
        """Stop hashing a transfer as it lands; what was hashed, for staging."""
        receiver = self._receiving.pop((model, version_id), None)
        if receiver is None:
            return None
        hashed = receiver.finish()
        return lambda name, st: known_hash(hashed, name, st)

    def drop_incoming(self, req: p.DropIncoming) -> dict[str, Any]:
        """After a full disk, keeping the partial for a resume would keep the disk full."""
        kept = self.releases_of(req.model)
        self._received(req.model, req.version_id)
        # never through a planted link: rmtree would empty a directory outside the endpoint
        incoming = releases.check_landing(kept, check_version_id(req.version_id))
        shutil.rmtree(incoming, ignore_errors=True)
        return {}

    def stage(self, req: p.Stage) -> dict[str, Any]:
        """Verify (signature first, when this endpoint trusts a key) and stage a transfer."""
        kept = self.releases_of(req.model)
        check_version_id(req.version_id)
        check_file_names(req.files)
        trusted = _trusted_keys(self.adapter_dir)
        known = self._received(req.model, req.version_id)
        if not trusted:
            result = releases.stage(
                kept, req.version_id, req.files, self._was_intact(req, req.files), known
            )
            return {"result": result, "signed": False}
        from adapter_deploy import signing
        from adapter_deploy.agent import trust

        try:
            metadata = signing.verify(req.signed, trusted, req.model, req.version_id)
            trust.check_not_older(kept, metadata, req.requested)
        except SignatureRefused:
            releases.discard_incoming(kept, req.version_id)
            raise
        # The signed file list, not the request's, decides what may become a release.
        signed_files = check_file_names(metadata["files"])
        intact = self._was_intact(req, signed_files)
        result = releases.stage(kept, req.version_id, signed_files, intact, known)
        trust.record_accepted(kept, metadata)
        trust.record_signature(kept, req.version_id, req.signed["key_id"])
        return {"result": result, "signed": True}

    def _was_intact(self, req: p.Stage, files: dict[str, Any]) -> bool:
        return self._intact.pop((req.model, req.version_id), None) == files

    def trust(self, req: p.Trust) -> dict[str, Any]:
        from adapter_deploy.agent import trust

        kid = trust.install_key(self.adapter_dir, req.public_pem.encode())
        for model in self.hello(p.Hello())["models"]:  # status.json tells the new state
            kept = self.releases_of(model)
            state = self._signature_state(kept, kept.active_id())
            self._record(model, signature=state)
        return {"key_id": kid}

    def _require_signed(self, kept: ModelReleases, version_id: str | None) -> None:
        trusted = _trusted_keys(self.adapter_dir)
        if trusted:
            from adapter_deploy.agent import trust

            trust.require_signed(kept, version_id, trusted)

    def _signature_state(self, kept: ModelReleases, version_id: str | None) -> str:
        trusted = _trusted_keys(self.adapter_dir)
        if not trusted:
            return "unsigned: this endpoint trusts no signing key"
        from adapter_deploy.agent import trust

        return trust.signature_state(kept, version_id, trusted)

    def health(self, req: p.Health) -> dict[str, Any]:
        """Health-check a staged release (PRE-CHECK: inside the service given by
        `service_url` when it can, else in this process) or the active one (VERIFY: through
        the service if given)."""
        from adapter_deploy.health import (
            load_clips,
            load_sentences,
            run_health_check,
            run_transcription_check,
        )

        kept = self.releases_of(req.model)
        if req.version_id:
            path = kept.release(check_version_id(req.version_id))
            if not path.is_dir():
                raise UsageError(
                    f"{req.model} {req.version_id} was not transferred to this endpoint",
                    "run the transfer phase first (make transfer)",
                )
            # A trusting endpoint loads nothing unsigned, a gguf-lora release's base included.
            self._require_signed(kept, req.version_id)
        else:
            path = kept.active
            if failpoints.trigger(self.adapter_dir, "verify") == "fail":
                return _forced_failure("failpoint verify: post-activation check forced to fail")
        where = Path(req.sentences) if req.sentences else None
        limit = req.latency_limit
        transcription = req.task == "transcription"
        if req.version_id or req.service_url is None:
            return self._precheck(req, path, where)
        from adapter_deploy.engines.service_client import ServiceEngine, wait_for_version

        # Acknowledged reload: the service must report the release `active` points at now.
        wait_for_version(req.service_url, req.model, path.resolve().name, req.reload_timeout)
        engine = ServiceEngine(req.service_url, req.model)
        if transcription:
            # Each reference clip goes through the service's /transcribe, as a client's would.
            clips = load_clips(where) if where else ()
            return run_transcription_check(engine, clips, limit).to_dict()
        return run_health_check(engine, load_sentences(where) if where else None, limit).to_dict()

    def _precheck(self, req: p.Health, path: Path, where: Path | None) -> dict[str, Any]:
        from adapter_deploy.agent.precheck import precheck

        result = precheck(
            self.adapter_dir,
            req.model,
            path,
            where,
            base_model=req.base_model,
            engine=req.engine,
            latency_limit=req.latency_limit,
            task=req.task,
            in_service=req.service_url is not None,
        )
        if req.version_id:  # `make status` shows the last pre-check (counts, no texts)
            shadow = result.get("shadow") or {}
            self._record(
                req.model,
                last_precheck={
                    "version_id": req.version_id,
                    "at": result.get("timestamp") or utc_now(),
                    "all_passed": bool(result.get("all_passed")),
                    "via": result["via"],
                    "shadow": {k: shadow.get(k) for k in ("compared", "changed")}
                    if shadow
                    else None,
                },
            )
        return result

    def activate(self, req: p.Activate) -> dict[str, Any]:
        kept = self.releases_of(req.model)
        self._require_signed(kept, check_version_id(req.version_id))
        links = [link for link, model in req.links.items() if model == req.model]
        releases.check_compat_links(self.adapter_dir, links)
        failpoints.trigger(self.adapter_dir, "activate.before_flip")
        before = (kept.active_id(), kept.previous_id())
        old, new = releases.activate(kept, check_version_id(req.version_id))
        try:
            failpoints.trigger(self.adapter_dir, "activate.after_flip")
            for link in links:
                releases.compat_link(self.adapter_dir, link, req.model)
        except (AdapterDeployError, OSError) as err:
            # Anything that fails after the flip is undone like a failed reload.
            releases.set_links(kept, *before)
            raise ReloadFailed(
                f"activation of {req.model} {new} failed after the link flip ({err}); "
                "the links were put back",
                "fix the cause named above, then deploy again",
            ) from err
        reloaded = signal_reload(req.reload)
        failpoints.trigger(self.adapter_dir, "activate.after_reload")
        self._record(
            req.model,
            active=new,
            previous=kept.previous_id(),
            last_reload=reloaded["at"],
            last_reload_detail=reloaded,
            health_status="activated, not yet verified",
            signature=self._signature_state(kept, new),
        )
        return {"old": old, "new": new, "reload": reloaded}

    def restore(self, req: p.Restore) -> dict[str, Any]:
        kept = self.releases_of(req.model)
        self._require_signed(kept, req.active)
        failpoints.trigger(self.adapter_dir, "restore.before_links")
        releases.set_links(kept, req.active and check_version_id(req.active), req.previous)
        failpoints.trigger(self.adapter_dir, "restore.after_links")
        reloaded = signal_reload(req.reload)
        previous = kept.previous_id()
        self._record(
            req.model,
            active=req.active,
            previous=previous,
            last_reload=reloaded["at"],
            last_reload_detail=reloaded,
            health_status="restored, not yet verified",
            signature=self._signature_state(kept, req.active),
        )
        return {"active": req.active, "previous": previous, "reload": reloaded}

    def rollback_target(self, req: p.RollbackTarget) -> dict[str, Any]:
        kept = self.releases_of(req.model)
        return {"from": kept.active_id(), "to": releases.rollback_target(kept, req.to)}

    def mark_bad(self, req: p.MarkBad) -> dict[str, Any]:
        self.releases_of(req.model).mark_bad(check_version_id(req.version_id), req.reason)
        return {}

    def clear_bad(self, req: p.ClearBad) -> dict[str, Any]:
        self.releases_of(req.model).clear_bad(check_version_id(req.version_id))
        return {}

    def prune(self, req: p.Prune) -> dict[str, Any]:
        return {"removed": releases.prune(self.releases_of(req.model), req.keep)}

    def record(self, req: p.Record) -> dict[str, Any]:
        fields = {"verified": req.verified, "health_status": req.health_status}
        given = {key: value for key, value in fields.items() if value is not None}
        self._record(check_name("model", req.model), **given)
        return {}

    def status(self, req: p.Status) -> dict[str, Any]:
        status = read_status(self.adapter_dir)
        hello = self.hello(p.Hello())
        for model, view in hello["models"].items():
            entry = status.setdefault("models", {}).setdefault(model, {})
            entry.update(active_version=view["active"], previous_version=view["previous"])
            entry["bad"] = sorted(view["bad"])
        if req.service_url:
            status["service"] = _service_view(req.service_url)
        return status


def _trusted_keys(adapter_dir: Path) -> dict[str, bytes]:
    """Trusted public keys; cryptography is imported only where keys are installed."""
    if not (adapter_dir / "trusted_keys").is_dir():
        return {}
    from adapter_deploy.agent.trust import trusted_keys

    return trusted_keys(adapter_dir)


def _forced_failure(reason: str) -> dict[str, Any]:
    return {"all_passed": False, "timestamp": utc_now(), "results": [], "error": reason}


def _service_view(url: str) -> dict[str, Any]:
    """What the running service says it loaded (or why it could not be asked)."""
    from adapter_deploy.engines.service_client import service_status

    try:
        return service_status(url, timeout=5)
    except (AdapterDeployError, OSError) as err:
        return {"error": str(err)}
