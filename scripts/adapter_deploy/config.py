"""params.yaml: the only file users edit, validated on load.

Every unknown key and wrong type is reported at once with its key path.
`PARAMS=<file>` (environment or --params) points at another file; without
either, the nearest `params.yaml` in the working directory or above is used.
Relative paths inside the file resolve against the file's own directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adapter_deploy.common.errors import ConfigError, UsageError
from adapter_deploy.common.names import NAME_RE, VERSION_RE, check_name, check_version_id

__all__ = ["NAME_RE", "VERSION_RE", "check_name", "check_version_id", "load_params", "Params"]


SAFE_PATH_RE = re.compile(r"~|(~/|/|[A-Za-z0-9_.+@%])[A-Za-z0-9_.+@%/-]*")
HOST_RE = re.compile(r"[A-Za-z0-9_\[][A-Za-z0-9_.:@%\[\]-]{0,252}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelParams(_Strict):
    task: Literal["translation", "transcription"] = "translation"
    base_model: str = Field(description="hub id or local path of the base model")
    sentences: str | None = None  # optional health-check sentence file (JSON)


class HealthCheckParams(_Strict):
    latency_limit_s: float = 5.0
    reload_timeout_s: float = Field(120.0, gt=0, description="wait this long for a reload ack")
    # The pre-check's shadow replay (in-service only) as a gate: more changed answers than
    # this refuses the release; None: informational only.
    shadow_max_changed: int | None = Field(None, ge=0)
    engine: Literal["auto", "hf", "mlx"] = "auto"


class ReleaseParams(_Strict):
    keep: int = Field(3, ge=2, description="releases kept per model on an endpoint")
    parallel: int = Field(4, ge=1, description="endpoints deployed at once")


class QuietWindow(_Strict):
    """A service window in which no restart outage may happen (e.g. Sunday 08:30-12:30)."""

    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]]
    start: str = Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    end: str = Field(pattern=r"^([01][0-9]|2[0-4]):[0-5][0-9]$")


# The unit `make service-install` installs, and the restart command that matches it: a systemd
# user unit, which the ssh user restarts without root (see deploy/service_install.py).
SERVICE_UNIT = "adapter-serve"
DEFAULT_RESTART_COMMAND = ["systemctl", "--user", "restart", SERVICE_UNIT]


# What an endpoint serves per model: the PEFT adapter itself, or a conversion of it. gguf-lora:
# the base as one quantized GGUF, sent once, and each cycle only the adapter as a GGUF LoRA.
ReleaseFormat = Literal["adapter", "merged", "bitsandbytes", "gguf", "gguf-lora"]


class PullParams(_Strict):
    """Where a pulling endpoint (mode: pull) reads its desired state and releases, as this
    endpoint reaches them; each defaults to the store's own setting."""

    git_remote: str | None = None  # default: store.git_remote
    dvc_remote: str | None = None  # default: store.remote
    reports: str | None = None  # where it leaves its report; default: <dvc_remote>/reports
    interval_s: float = Field(300.0, gt=0, description="the pull timer's period")


class EndpointParams(_Strict):
    host: str = "localhost"
    user: str | None = None
    port: int | None = None
    ssh_config: str | None = None
    identity_file: str | None = None
    adapter_dir: str
    project_dir: str | None = None
    python: str | None = None
    platform: Literal["mlx", "cuda", "cpu"] = "cuda"
    reload_method: Literal["sigusr1", "restart", "none"] = "none"
    restart_command: list[str] | None = None
    transport: Literal["ssh", "local"] = "ssh"
    # push: the training machine deploys to it; pull: it fetches what `make promote` assigned
    mode: Literal["push", "pull"] = "push"
    pull: PullParams | None = None
    rsync_path: str | None = None  # rsync on the endpoint, when not on its PATH
    min_free_bytes: int = Field(64 << 20, ge=0, description="keep this much free on the endpoint")
    base_models: dict[str, str] = {}
    models: list[str] | None = None
    service_url: str | None = None
    pidfile: str | None = None
    service_dir: str | None = None  # where make service-install puts the unit / launchd agent
    compat_links: dict[str, str] = {}
    format: ReleaseFormat | None = None
    formats: dict[str, ReleaseFormat] = {}
    gguf_type: Literal["Q4_K_M", "Q8_0", "F16"] = "Q4_K_M"  # format gguf; gguf-lora: its base
    quiet_hours: list[QuietWindow] = []
    timezone: str | None = None  # IANA name for quiet_hours; default this machine's

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        from zoneinfo import ZoneInfo

        if value is not None:
            try:
                ZoneInfo(value)
            except (KeyError, ValueError):
                raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("host", "user")
    @classmethod
    def _no_option_injection(cls, value: str | None) -> str | None:
        # ssh reads a host or user starting with "-" as an option (-oProxyCommand=...).
        if value is not None and not HOST_RE.fullmatch(value):
            raise ValueError("must be a plain host/user name (letters, digits, . _ - @ : [ ])")
        return value

    @field_validator("adapter_dir", "project_dir", "python", "pidfile", "rsync_path", "service_dir")
    @classmethod
    def _safe_path(cls, value: str | None) -> str | None:
        # These reach the endpoint's shell (ssh, rsync): no quotes, spaces, `, $, ; or leading -.
        if value is not None and not SAFE_PATH_RE.fullmatch(value):
            raise ValueError(
                "must be a plain path (letters, digits, / . _ + - @ %, a leading ~/ for home)"
            )
        return value

    @field_validator("service_url")
    @classmethod
    def _loopback_only_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("http://"):
            raise ValueError("service_url must start with http://")
        return value


class StoreParams(_Strict):
    adapters_dir: str = "adapters"
    # Any DVC remote URL (ssh://user@host/path, s3://bucket/path, a local dir); becomes the
    # store's default DVC remote, and `make version` pushes every version there.
    remote: str | None = None
    # `dvc remote modify` settings for it (keyfile, port, region, ...); committed with
    # .dvc/config, so never a password: use `dvc remote modify --local` for secrets.
    remote_config: dict[str, str] = {}
    # The project's git remote (URL or path): `make promote` pushes stage tags there and
    # pulling endpoints fetch them from it.
    git_remote: str | None = None
    signing_key: str | None = None  # ed25519 private key (make keygen); never committed
    signature_expiry_days: int = Field(365, description="signed metadata expires after this")


class WaveParams(_Strict):
    """One step of a staged rollout: these endpoints (or groups), then an optional soak."""

    name: str
    endpoints: list[str] = Field(min_length=1, description="endpoint or group names")
    # After the wave verified: wait this long, then run the post-activation check again on
    # the wave's endpoints (through the service, as VERIFY does) before the next wave starts
    # (so only when a later wave waits for it).
    soak_s: float = Field(0.0, ge=0)


class RolloutParams(_Strict):
    """Staged rollout (canary first): the waves in order; a failure holds the later ones."""

    groups: dict[str, list[str]] = {}  # name -> endpoint names, usable in a wave's endpoints
    waves: list[WaveParams] = Field(min_length=1)
    on_failure: Literal["halt"] = "halt"  # the later waves stay on their current release


class Params(_Strict):
    store: StoreParams = StoreParams()
    models: dict[str, ModelParams]
    health_check: HealthCheckParams = HealthCheckParams()
    release: ReleaseParams = ReleaseParams()
    endpoints: dict[str, EndpointParams] = {}
    rollout: RolloutParams | None = None  # absent: every endpoint in one wave
    alert_command: list[str] | None = None
    alert_url: str | None = None
    # extra keys merged into each alert_url body, e.g. ntfy's {topic: ..., priority: 4}
    alert_fields: dict[str, str | int | bool | list[str]] = {}

    # Set after loading: where the file came from (not a user key).
    source: Path = Field(default_factory=lambda: Path("params.yaml").absolute(), exclude=True)

    def model(self, name: str) -> ModelParams:
        check_name("model", name)
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise UsageError(
                f"unknown model {name!r} (known: {known})",
                f"add it under models: in {self.source.name} or pick a known one",
            )
        return self.models[name]

    def endpoint(self, name: str) -> EndpointParams:
        self.check_endpoints([name])
        return self.endpoints[name]

    def check_endpoints(self, names: list[str]) -> None:
        """Every name is a known endpoint; the unknown ones named at once."""
        for name in names:
            check_name("endpoint", name)
        unknown = [n for n in names if n not in self.endpoints]
        if unknown:
            known = ", ".join(sorted(self.endpoints)) or "none"
            raise UsageError(
                f"unknown endpoint{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))} (known: {known})",
                f"add it under endpoints: in {self.source.name} or pick a known one",
            )

    def check_pushable(self, names: list[str]) -> None:
        """A push command (deploy, rollback, a phase) never targets a pulling endpoint."""
        pulling = [n for n in names if self.endpoint(n).mode == "pull"]
        if pulling:
            listed = " ".join(pulling)
            raise UsageError(
                f"{', '.join(pulling)} pull{'s' if len(pulling) == 1 else ''} its releases "
                "(mode: pull): the training machine does not deploy to it",
                f'record the version it should run with make promote CYCLE=N ENDPOINT="{listed}"',
            )

    def pull_remotes(self, name: str) -> tuple[str, str, str]:
        """A pulling endpoint's (git remote, DVC remote, reports location)."""
        ep = self.endpoint(name)
        pull = ep.pull or PullParams()
        git = pull.git_remote or self.store.git_remote
        dvc = pull.dvc_remote or self.store.remote
        if not git or not dvc:
            raise ConfigError(
                f"endpoint {name} (mode: pull) has no {'git' if not git else 'DVC'} remote",
                f"set store.{'git_remote' if not git else 'remote'} (or endpoints.{name}.pull."
                f"{'git_remote' if not git else 'dvc_remote'}) in {self.source.name}",
            )
        return git, dvc, pull.reports or f"{dvc.rstrip('/')}/reports"

    def resolve(self, path: str) -> Path:
        """A path from params: ~ expanded, relative ones against the params file's directory."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else self.project_dir / p

    @property
    def project_dir(self) -> Path:
        """The checkout this params file belongs to: the directory that holds it."""
        return self.source.parent

    @property
    def adapters_dir(self) -> Path:
        return self.resolve(self.store.adapters_dir)


def params_path(explicit: str | None = None) -> Path:
    raw = explicit or os.environ.get("PARAMS")
    if raw:
        p = Path(os.path.expanduser(raw))
        return p if p.is_absolute() else (Path.cwd() / p)
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file():
            return folder / "params.yaml"
    return here / "params.yaml"  # load_params says it is missing and how to fix that


def _format_errors(err: ValidationError, source: Path) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "(top level)"
        what = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{where}: {what}")
    return f"{source} is invalid: " + "; ".join(parts)


def load_params(path: str | Path | None = None) -> Params:
    source = params_path(str(path) if path else None)
    if not source.is_file():
        raise ConfigError(
            f"params file {source} not found",
            "run from the project directory, or pass --params FILE (PARAMS=<file>)",
        )
    try:
        raw = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"{source} is not valid YAML{where}", "fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a mapping at the top level", "see params.yaml")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            _format_errors(exc, source), "correct or remove the keys named above"
        ) from None
    bad = [n for n in [*params.models, *params.endpoints] if not NAME_RE.fullmatch(n)]
    if bad:
        raise ConfigError(
            f"{source}: invalid model/endpoint names {bad}",
            "use letters, digits, '_' or '-'",
        )
    params.source = source
    _check_rollout(params)
    _check_pull(params)
    return params


def _check_pull(params: Params) -> None:
    """`pull:` only on a pulling endpoint, and every pulling endpoint knows its remotes."""
    for name, ep in params.endpoints.items():
        if ep.pull is not None and ep.mode != "pull":
            raise ConfigError(
                f"{params.source}: endpoints.{name} has pull: settings but mode: push",
                f"set endpoints.{name}.mode: pull, or remove its pull: settings",
            )
        if ep.mode == "pull":
            params.pull_remotes(name)


def _check_rollout(params: Params) -> None:
    """Every wave member is a known endpoint or group, and no endpoint is in two waves."""
    rollout = params.rollout
    if rollout is None:
        return
    where = params.source.name
    problems = []
    for group, members in rollout.groups.items():
        if group in params.endpoints:
            problems.append(f"group {group!r} has an endpoint's name")
        problems += [f"group {group}: unknown endpoint {m!r}" for m in members
                     if m not in params.endpoints]  # fmt: skip
    seen: dict[str, str] = {}
    for wave in rollout.waves:
        for member in wave.endpoints:
            names = rollout.groups.get(member, [member])
            if member not in rollout.groups and member not in params.endpoints:
                problems.append(f"wave {wave.name}: {member!r} is neither an endpoint nor a group")
            for name in names:
                if name in seen and seen[name] != wave.name:
                    problems.append(f"{name} is in waves {seen[name]} and {wave.name}")
                seen.setdefault(name, wave.name)
    if len({w.name for w in rollout.waves}) != len(rollout.waves):
        problems.append("two waves share a name")
    if problems:
        raise ConfigError(
            f"{params.source}: rollout is invalid: " + "; ".join(problems),
            f"name endpoints from endpoints: (or groups from rollout.groups) in {where}, "
            "each endpoint in one wave",
        )
