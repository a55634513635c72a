"""The deploy protocol between the deployer and the endpoint agent, shared by both sides.

One session per deploy: the deployer starts `python -m adapter_deploy.agent session` over
ssh (or locally), the agent answers with a ready line that carries its protocol version,
then every request is one JSON line `{"op": ..., <fields>}` and every reply one JSON line
`{"ok": true, "result": {...}}` or `{"ok": false, "error": {type, exit_code, message, fix}}`.

Each request is one frozen dataclass below; its fields are the whole request. A change to a
request's fields or meaning raises `PROTOCOL_VERSION`, so a deployer and an endpoint of
different code refuse each other at the ready line, before anything is transferred, instead
of failing mid-deploy. Protocol 1 was the unversioned protocol of `scripts/endpoint.py`;
protocol 3 added `doctor` (the endpoint's facts for `make doctor`); protocol 4 moved the
landing dir to `incoming/<model>/releases/<id>/` (the deployer's rsync names it before the
session is up) and added `damaged` to prepare's reply; protocol 5 gave `health` of a staged
release with a `service_url` its meaning: pre-check inside the running service (reply `via`,
`via_reason`, `shadow`), where protocol 4 waited for the service to serve it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from adapter_deploy.common.errors import ProtocolError, ProtocolMismatch, UntrustedReply
from adapter_deploy.common.names import NAME_RE, VERSION_RE
from adapter_deploy.common.wire import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]  # kept in common/wire.py, where a shell can ask for it cheaply

# Where transfers land under an endpoint's adapter_dir: <LANDING>/<model>/releases/<id>/
# mirrors the release's own path <model>/releases/<id>/, so an rsync into LANDING with
# --compare-dest=.. finds a kept release's files and sends nothing for them.
LANDING = "incoming"


def landing_path(model: str, version_id: str) -> str:
    """A release's landing dir, relative to LANDING (and its kept path, to adapter_dir)."""
    return f"{model}/releases/{version_id}"


@dataclass(frozen=True)
class Request:
    op: ClassVar[str]


@dataclass(frozen=True)
class Hello(Request):
    """What the endpoint holds per model (releases, links, bad, verified), free space, rsync."""

    op: ClassVar[str] = "hello"
    models: list[str] | None = None


@dataclass(frozen=True)
class Prepare(Request):
    """Is this release already present and whole? If not, a private incoming dir for rsync,
    once the disk has room for what has not landed yet (`damaged`: a kept copy differs)."""

    op: ClassVar[str] = "prepare"
    model: str
    version_id: str
    files: dict[str, dict[str, Any]]
    size: int
    reserve: int = 0


@dataclass(frozen=True)
class DropIncoming(Request):
    """Delete a transfer's landing dir, partial files included."""

    op: ClassVar[str] = "drop_incoming"
    model: str
    version_id: str


@dataclass(frozen=True)
class Stage(Request):
    """Verify an arrived transfer (signature first on a trusting endpoint) into releases/."""

    op: ClassVar[str] = "stage"
    model: str
    version_id: str
    files: dict[str, dict[str, Any]]
    signed: dict[str, Any] | None = None
    # What the operator asked for: {"cycle": N} or {"version_id": id}. A release older than
    # the newest accepted passes only when the request names its *signed* cycle or id.
    requested: dict[str, Any] | None = None


@dataclass(frozen=True)
class Trust(Request):
    """Install a public signing key: from then on only signed releases are staged."""

    op: ClassVar[str] = "trust"
    public_pem: str


@dataclass(frozen=True)
class Health(Request):
    """Health-check a staged release (`version_id`), or the active one (`version_id` None),
    through the running service when `service_url` is given: a staged release is loaded in
    it beside the active one over its control socket (else checked in the agent's process;
    the reply's `via` says which). `sentences` is an absolute path on the endpoint."""

    op: ClassVar[str] = "health"
    model: str
    version_id: str | None
    base_model: str | None
    engine: str = "auto"
    latency_limit: float = 5.0
    sentences: str | None = None
    service_url: str | None = None
    task: str = "translation"
    reload_timeout: float = 120.0


@dataclass(frozen=True)
class Reload:
    """How the endpoint's service learns of a new release."""

    method: str = "none"
    pidfile: str | None = None
    restart_command: list[str] | None = None


@dataclass(frozen=True)
class Activate(Request):
    """Flip `active` to the release (`previous` to the old one), then reload the service."""

    op: ClassVar[str] = "activate"
    model: str
    version_id: str
    reload: Reload = field(default_factory=Reload)
    links: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Restore(Request):
    """Put `active`/`previous` back to the given releases (None removes a link), reload."""

    op: ClassVar[str] = "restore"
    model: str
    active: str | None
    previous: str | None
    reload: Reload = field(default_factory=Reload)


@dataclass(frozen=True)
class RollbackTarget(Request):
    """Where a manual rollback would go: `to`, else previous (never a bad release)."""

    op: ClassVar[str] = "rollback_target"
    model: str
    to: str | None = None


@dataclass(frozen=True)
class MarkBad(Request):
    op: ClassVar[str] = "mark_bad"
    model: str
    version_id: str
    reason: str


@dataclass(frozen=True)
class ClearBad(Request):
    op: ClassVar[str] = "clear_bad"
    model: str
    version_id: str


@dataclass(frozen=True)
class Prune(Request):
    """Remove releases beyond the newest `keep`, never active or previous."""

    op: ClassVar[str] = "prune"
    model: str
    keep: int


@dataclass(frozen=True)
class Record(Request):
    """Record fields of a model in the endpoint's status.json (e.g. which release verified)."""

    op: ClassVar[str] = "record"
    model: str
    verified: str | None = None  # the release `active` points at passed VERIFY
    health_status: str | None = None  # the operator's plan: "healthy", or why not


@dataclass(frozen=True)
class Status(Request):
    """The endpoint's status.json with live links, and the service's view when asked."""

    op: ClassVar[str] = "status"
    service_url: str | None = None


@dataclass(frozen=True)
class Doctor(Request):
    """The endpoint's facts for `make doctor`, changing nothing: python, rsync, clock, free
    space at adapter_dir, each base model (model -> path or hub id) present and readable,
    trusted keys, and per `reload` the service's pid (pidfile, `service_url`'s /status) or
    whether the restart command can run without a password."""

    op: ClassVar[str] = "doctor"
    base_models: dict[str, str] = field(default_factory=dict)
    reload: Reload = field(default_factory=Reload)
    service_url: str | None = None
    rsync_path: str | None = None


REQUESTS: dict[str, type[Request]] = {
    cls.op: cls
    for cls in (
        Hello,
        Prepare,
        DropIncoming,
        Stage,
        Trust,
        Health,
        Activate,
        Restore,
        RollbackTarget,
        MarkBad,
        ClearBad,
        Prune,
        Record,
        Status,
        Doctor,
    )
}
_NESTED = {"reload": Reload}


def encode(request: Request) -> str:
    """One request as its JSON line (without the newline)."""
    return json.dumps({"op": request.op, **dataclasses.asdict(request)})


def decode(line: str) -> Request:
    """A request line back into its dataclass; anything else is a ProtocolError."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as err:
        raise ProtocolError(f"request is not JSON ({err})", _UPGRADE) from None
    if not isinstance(raw, dict) or raw.get("op") not in REQUESTS:
        op = raw.get("op") if isinstance(raw, dict) else None
        raise ProtocolError(f"unknown endpoint operation {op!r}", _UPGRADE)
    cls = REQUESTS[raw.pop("op")]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ProtocolError(f"{cls.op}: unknown fields {unknown}", _UPGRADE)
    for name, nested in _NESTED.items():
        if name in known and isinstance(raw.get(name), dict):
            raw[name] = _build(nested, raw[name])
    return _build(cls, raw)


def _build(cls: type, raw: dict[str, Any]) -> Any:
    try:
        return cls(**raw)
    except TypeError as err:  # a required field is missing, or an unknown nested one
        raise ProtocolError(f"{cls.__name__}: {err}", _UPGRADE) from None


def ready_line(pid: int, version: str, rsync_version: list[int] | None = None) -> dict[str, Any]:
    """What the agent says first: it holds the lock, speaks PROTOCOL_VERSION, and which
    rsync the deployer's transfers will meet on this endpoint."""
    return {
        "ready": True,
        "pid": pid,
        "protocol": PROTOCOL_VERSION,
        "version": version,
        "rsync_version": rsync_version,
    }


def check_ready(endpoint: str, ready: dict[str, Any]) -> None:
    """Refuse an endpoint that speaks another protocol (an agent without a version is 1)."""
    theirs = ready.get("protocol", 1)
    if theirs != PROTOCOL_VERSION:
        raise ProtocolMismatch(
            f"endpoint {endpoint} runs protocol {theirs}, this deployer speaks {PROTOCOL_VERSION}",
            f"run `make bootstrap ENDPOINT={endpoint}` to install this code there",
        )


_UPGRADE = "run make bootstrap for this endpoint so both sides run the same code"


# Reply keys whose values name a release, and keys whose members do: an endpoint that answers
# with anything else (escape codes, forged log lines, rich markup, paths) is refused before
# its answer reaches a terminal, a table, a git commit or deploy_log.jsonl.
_ID_KEYS = frozenset(
    {"active", "previous", "from", "to", "old", "new", "version_id", "active_version",
     "previous_version", "verified"}
)  # fmt: skip
_ID_COLLECTIONS = frozenset({"releases", "bad", "removed"})


def check_reply(endpoint: str, reply: Any) -> Any:
    """Every version id and model name in an endpoint's reply, held to the rules this
    project's own ids and names follow; the reply unchanged, or UntrustedReply."""
    for key, value in _walk(reply):
        if key in _ID_KEYS and value is not None and not isinstance(value, bool):
            _check(endpoint, "version id", value, VERSION_RE)
        elif key in _ID_COLLECTIONS and isinstance(value, dict | list):
            for member in value:
                _check(endpoint, "version id", member, VERSION_RE)
        elif key == "models" and isinstance(value, dict):
            for member in value:
                _check(endpoint, "model name", member, NAME_RE)
    return reply


def _walk(node: Any) -> Any:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _check(endpoint: str, kind: str, value: Any, rule: Any) -> None:
    if not isinstance(value, str) or not rule.fullmatch(value):
        raise UntrustedReply(
            f"endpoint {endpoint} answered with an invalid {kind} {value!r}; nothing of its "
            "answer was used",
            f"something on {endpoint} is not this project's: run `make doctor ENDPOINT="
            f"{endpoint}` and `make bootstrap ENDPOINT={endpoint}`",
        )
