"""The endpoint side: one session per deploy, driven by JSON lines on stdin.

The training side starts `python -m adapter_deploy.agent session` over ssh (or locally)
and sends one request per line; each gets one JSON line back. The session
holds the endpoint's lock for its whole life and exits when stdin closes, so
a dropped ssh connection releases the lock. Model libraries are imported only
for health checks: moving files stays lean.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from adapter_deploy.agent import releases
from adapter_deploy.agent.releases import ModelSlots
from adapter_deploy.common import failpoints
from adapter_deploy.common.errors import (
    AdapterDeployError,
    ReloadFailed,
    RemoteError,
    SignatureRefused,
    UsageError,
)
from adapter_deploy.common.fsutil import atomic_write_json, file_lock
from adapter_deploy.common.names import check_name, check_version_id

log = logging.getLogger(__name__)
LOCK = ".deploy.lock"
STATUS = "status.json"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EndpointSide:
    """Operations on one endpoint's adapter_dir (what the session dispatches to)."""

    def __init__(self, adapter_dir: Path) -> None:
        self.adapter_dir = adapter_dir

    def slots(self, model: str) -> ModelSlots:
        return ModelSlots(self.adapter_dir, check_name("model", model))

    def op_hello(self, models: list[str] | None = None) -> dict[str, Any]:
        usage = shutil.disk_usage(self.adapter_dir)
        names = models or [p.name for p in self.adapter_dir.iterdir() if (p / "releases").is_dir()]
        status = read_status(self.adapter_dir).get("models", {})
        return {
            "pid": os.getpid(),
            "rsync": shutil.which("rsync") is not None,
            "free_bytes": usage.free,
            "models": {
                m: {**self.slots(m).describe(), "verified": status.get(m, {}).get("verified")}
                for m in names
            },
        }

    def op_prepare(
        self, model: str, version_id: str, files: dict, size: int, reserve: int = 0
    ) -> dict[str, Any]:
        slots = self.slots(model)
        release = slots.release(check_version_id(version_id))
        if release.is_dir() and not releases.file_problems(release, files):
            return {"present": True, "incoming": None}
        free = shutil.disk_usage(self.adapter_dir).free
        if free < size + reserve:
            raise RemoteError(
                f"endpoint disk is full: {free} bytes free under {self.adapter_dir}, "
                f"need {size} plus {reserve} kept free",
                "free space on the endpoint (old releases, caches) and deploy again",
            )
        return {"present": False, "incoming": str(releases.prepare_incoming(slots, version_id))}

    def op_drop_incoming(self, model: str, version_id: str) -> dict[str, Any]:
        """Delete a transfer's landing dir, partial files included (after a full disk: keeping
        the partial for a resume would keep the disk full)."""
        incoming = self.slots(model).incoming(check_version_id(version_id))
        shutil.rmtree(incoming, ignore_errors=True)
        return {}

    def op_stage(
        self,
        model: str,
        version_id: str,
        files: dict,
        signed: dict | None = None,
        explicit: bool = False,
    ) -> dict[str, Any]:
        """Verify (signature first, when this endpoint trusts a key) and stage a transfer."""
        slots = self.slots(model)
        check_version_id(version_id)
        trusted = _trusted_keys(self.adapter_dir)
        if not trusted:
            result = releases.stage(slots, version_id, files)
            self._record(model, signature="unsigned: this endpoint trusts no signing key")
            return {"result": result, "signed": False}
        from adapter_deploy import signing
        from adapter_deploy.agent import trust

        try:
            metadata = signing.verify(signed, trusted, model, version_id)
            trust.check_not_older(slots, metadata, explicit)
        except SignatureRefused:
            releases.discard_incoming(slots, version_id)
            raise
        # The signed file list, not the request's, decides what may become a release.
        result = releases.stage(slots, version_id, metadata["files"])
        trust.record_accepted(slots, metadata)
        return {"result": result, "signed": True}

    def op_trust(self, public_pem: str) -> dict[str, Any]:
        from adapter_deploy.agent import trust

        return {"key_id": trust.install_key(self.adapter_dir, public_pem.encode())}

    def op_health(
        self,
        model: str,
        version_id: str | None,
        base_model: str | None,
        engine: str = "auto",
        latency_limit: float = 5.0,
        sentences: str | None = None,
        service_url: str | None = None,
        task: str = "translation",
        reload_timeout: float = 120.0,
    ) -> dict[str, Any]:
        """Health-check a staged release, or the active one (through the service if given).

        `sentences` names the model's own sentence (or, for transcription, clip) file on
        this endpoint, as an absolute path (the deployer resolves it).
        """
        from adapter_deploy.health import check_release, load_sentences, run_health_check

        slots = self.slots(model)
        path = slots.release(check_version_id(version_id)) if version_id else slots.active
        if version_id and not path.is_dir():
            raise UsageError(
                f"{model} {version_id} was not transferred to this endpoint",
                "run the transfer phase first (make transfer)",
            )
        if version_id is None and failpoints.trigger(self.adapter_dir, "verify") == "fail":
            return _forced_failure("failpoint verify: post-activation check forced to fail")
        where = Path(sentences) if sentences else None
        if task == "transcription":
            return check_release(
                path.resolve(), base_model, engine, where, latency_limit, task=task
            ).to_dict()
        chosen = load_sentences(where) if where else None
        if service_url is None:
            return check_release(
                path.resolve(), base_model, engine, chosen, latency_limit
            ).to_dict()
        from adapter_deploy.engines.service_client import ServiceEngine, wait_for_version

        # Acknowledged reload: the service must report the release `active` points at now.
        wait_for_version(service_url, model, path.resolve().name, timeout_s=reload_timeout)
        return run_health_check(ServiceEngine(service_url, model), chosen, latency_limit).to_dict()

    def op_activate(
        self, model: str, version_id: str, reload: dict, links: dict[str, str]
    ) -> dict[str, Any]:
        slots = self.slots(model)
        failpoints.trigger(self.adapter_dir, "activate.before_flip")
        old, new = releases.activate(slots, check_version_id(version_id))
        failpoints.trigger(self.adapter_dir, "activate.after_flip")
        for link, linked_model in links.items():
            if linked_model == model:
                releases.compat_link(self.adapter_dir, link, model)
        reloaded = signal_reload(**reload)
        failpoints.trigger(self.adapter_dir, "activate.after_reload")
        self._record(model, active=new, previous=slots.previous_id(), last_reload=reloaded)
        return {"old": old, "new": new, "reload": reloaded}

    def op_restore(
        self, model: str, active: str | None, previous: str | None, reload: dict
    ) -> dict[str, Any]:
        slots = self.slots(model)
        failpoints.trigger(self.adapter_dir, "restore.before_links")
        releases.set_links(slots, active and check_version_id(active), previous)
        failpoints.trigger(self.adapter_dir, "restore.after_links")
        reloaded = signal_reload(**reload)
        self._record(model, active=active, previous=slots.previous_id(), last_reload=reloaded)
        return {"active": active, "previous": slots.previous_id(), "reload": reloaded}

    def op_rollback_target(self, model: str, to: str | None) -> dict[str, Any]:
        slots = self.slots(model)
        return {"from": slots.active_id(), "to": releases.rollback_target(slots, to)}

    def op_mark_bad(self, model: str, version_id: str, reason: str) -> dict[str, Any]:
        self.slots(model).mark_bad(check_version_id(version_id), reason)
        return {}

    def op_clear_bad(self, model: str, version_id: str) -> dict[str, Any]:
        self.slots(model).clear_bad(check_version_id(version_id))
        return {}

    def op_prune(self, model: str, keep: int) -> dict[str, Any]:
        return {"removed": releases.prune(self.slots(model), keep)}

    def op_record(self, model: str, **fields: Any) -> dict[str, Any]:
        self._record(model, **fields)
        return {}

    def op_status(self, service_url: str | None = None) -> dict[str, Any]:
        status = read_status(self.adapter_dir)
        hello = self.op_hello()
        for model, slots in hello["models"].items():
            entry = status.setdefault("models", {}).setdefault(model, {})
            entry.update(active_version=slots["active"], previous_version=slots["previous"])
            entry["bad"] = sorted(slots["bad"])
        if service_url:
            status["service"] = _service_view(service_url)
        return status

    def _record(self, model: str, **fields: Any) -> None:
        """status.json on the endpoint (seed §7.2), written atomically."""
        status = read_status(self.adapter_dir)
        entry = status.setdefault("models", {}).setdefault(model, {})
        renamed = {"active": "active_version", "previous": "previous_version"}
        for key, value in fields.items():
            entry[renamed.get(key, key)] = value
        status["updated"] = _now()
        atomic_write_json(self.adapter_dir / STATUS, status)


def _trusted_keys(adapter_dir: Path) -> dict[str, bytes]:
    """Trusted public keys; cryptography is imported only where keys are installed."""
    if not (adapter_dir / "trusted_keys").is_dir():
        return {}
    from adapter_deploy.agent.trust import trusted_keys

    return trusted_keys(adapter_dir)


def _forced_failure(reason: str) -> dict[str, Any]:
    return {"all_passed": False, "timestamp": _now(), "results": [], "error": reason}


def _service_view(url: str) -> dict[str, Any]:
    """What the running service says it loaded (or why it could not be asked)."""
    from adapter_deploy.engines.service_client import service_status

    try:
        return service_status(url, timeout=5)
    except (AdapterDeployError, OSError) as err:
        return {"error": str(err)}


def read_status(adapter_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((adapter_dir / STATUS).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"models": {}}


def signal_reload(
    method: str = "none",
    pidfile: str | None = None,
    restart_command: list[str] | None = None,
) -> dict[str, Any]:
    """Tell the service to load what `active` points at now."""
    when = _now()
    if method == "none":
        return {"method": "none", "at": when}
    if method == "sigusr1":
        pid = _service_pid(pidfile)
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            raise ReloadFailed(
                f"service pid {pid} from {pidfile} is not running",
                "start the inference service (python -m adapter_deploy.service) and deploy again",
            ) from None
        return {"method": "sigusr1", "pid": pid, "at": when}
    command = restart_command or ["systemctl", "restart", "stark-translate"]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ReloadFailed(
            f"restart command {command} failed: {proc.stderr.strip()[-200:]}",
            "check the service unit on the endpoint (systemctl status)",
        )
    return {"method": "restart", "command": command, "at": when}


def _service_pid(pidfile: str | None) -> int:
    if not pidfile:
        raise ReloadFailed("reload_method sigusr1 needs a pidfile", "set pidfile: in params.yaml")
    try:
        return int(Path(pidfile).read_text().strip())
    except (FileNotFoundError, ValueError):
        raise ReloadFailed(
            f"no service pid in {pidfile}",
            "start the inference service (python -m adapter_deploy.service) and deploy again",
        ) from None


def _error_reply(err: AdapterDeployError) -> dict[str, Any]:
    return {
        "ok": False,
        "error": {
            "type": type(err).__name__,
            "exit_code": err.exit_code,
            "message": err.message,
            "fix": err.fix,
        },
    }


def _reply(out: TextIO, payload: dict[str, Any]) -> None:
    out.write(json.dumps(payload) + "\n")
    out.flush()


def serve_session(adapter_dir: Path, holder: str, inp: TextIO, out: TextIO) -> int:
    """Answer requests until stdin closes; hold the endpoint lock throughout."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    side = EndpointSide(adapter_dir)
    try:
        with file_lock(adapter_dir / LOCK, holder, f"endpoint {adapter_dir}"):
            _reply(out, {"ok": True, "result": {"ready": True, "pid": os.getpid()}})
            for line in inp:
                _reply(out, dispatch(side, line))
    except AdapterDeployError as err:
        _reply(out, _error_reply(err))
        return err.exit_code
    return 0


def dispatch(side: EndpointSide, line: str) -> dict[str, Any]:
    try:
        request = json.loads(line)
        op = request.pop("op")
        handler: Callable[..., dict[str, Any]] | None = getattr(side, f"op_{op}", None)
        if handler is None:
            raise UsageError(f"unknown endpoint operation {op!r}", "update the endpoint's code")
        return {"ok": True, "result": handler(**request)}
    except AdapterDeployError as err:
        return _error_reply(err)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return _error_reply(UsageError(f"bad request: {err}", "update the endpoint's code"))
    except OSError as err:
        log.exception("endpoint operation failed")
        return _error_reply(RemoteError(f"endpoint I/O error: {err}", "check the endpoint's disk"))


def read_only_session(adapter_dir: Path, inp: TextIO, out: TextIO) -> int:
    """Status queries only: no lock, nothing created (an endpoint never deployed is empty)."""
    _reply(out, {"ok": True, "result": {"ready": True, "pid": os.getpid()}})
    for line in inp:
        if json.loads(line).get("op") != "status":
            _reply(out, _error_reply(UsageError("read-only session", "open a deploy session")))
        elif not adapter_dir.is_dir():
            _reply(out, {"ok": True, "result": {"models": {}}})
        else:
            _reply(out, dispatch(EndpointSide(adapter_dir), line))
    return 0
