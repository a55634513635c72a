"""What every command does, as functions that return results: the CLIs parse, call, render.

Every policy decision a command makes lives here or below (which releases, quiet hours,
what a bare rollback undoes, which endpoints exist), never in a CLI. Nothing here prints
or exits; errors are `adapter_deploy.common.errors` with their exit codes.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapter_deploy import protocol, signing
from adapter_deploy.common.errors import AdapterDeployError, NothingToRollBack, UsageError
from adapter_deploy.common.fsutil import read_jsonl
from adapter_deploy.common.names import check_version_id
from adapter_deploy.config import EndpointParams, Params
from adapter_deploy.deploy import doctor as preflight
from adapter_deploy.deploy import fleet, quiet, rollout
from adapter_deploy.deploy import pull as pulling
from adapter_deploy.deploy.alerts import send_alerts
from adapter_deploy.deploy.fleet_status import fleet_status
from adapter_deploy.deploy.phases import run_phase
from adapter_deploy.deploy.plan import EndpointOutcome, choose_releases, dry_run_plan
from adapter_deploy.deploy.progress import NO_PROGRESS, Progress
from adapter_deploy.deploy.records import DEPLOY_LOG, last_run, record
from adapter_deploy.deploy.remote import Connection, Session, connect
from adapter_deploy.deploy.rollback import rollback_endpoint
from adapter_deploy.deploy.service_install import (
    ServiceFiles,
    pull_timer_files,
    service_files,
    start_script,
)
from adapter_deploy.store import registry, stages
from adapter_deploy.store.conversions import ConversionResult, convert_release
from adapter_deploy.store.manifest import (
    load_manifest,
    models_in_cycle,
    pick_version,
    versions_of,
)
from adapter_deploy.store.versioning import VersionResult, version_adapter


@dataclass
class RunResult:
    """The outcome of a deploy, rollback or single phase over endpoints."""

    action: str
    outcomes: list[EndpointOutcome] = field(default_factory=list)
    run_id: str | None = None
    note: str | None = None  # e.g. what a bare rollback undoes
    plan: list[str] | None = None  # the dry run's actions; nothing was done
    not_in_cycle: list[str] = field(default_factory=list)  # --all-adapters: models left out
    rollout: list[str] | None = None  # a staged rollout's plan, wave by wave

    @property
    def exit_code(self) -> int:
        """The worst outcome decides (0 when all succeeded or nothing changed)."""
        return max([0, *(o.worst for o in self.outcomes)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "run_id": self.run_id,
            "exit_code": self.exit_code,
            "note": self.note,
            "plan": self.plan,
            "not_in_cycle": self.not_in_cycle,
            "rollout": self.rollout,
            "endpoints": [o.to_dict() for o in self.outcomes],
        }


@dataclass
class StatusResult:
    endpoints: list[dict[str, Any]]

    @property
    def exit_code(self) -> int:
        return max([0, *(s.get("exit_code", 0) for s in self.endpoints)])


# --- the store ----------------------------------------------------------------------------


def version(
    params: Params,
    model: str,
    cycle: int,
    src: Path,
    metrics: Path | None = None,
    retag: bool = False,
) -> VersionResult:
    return version_adapter(params, model, cycle, src, metrics, retag=retag)


def _models(params: Params, model: str | None) -> list[str]:
    if model:
        params.model(model)
        return [model]
    return sorted(params.models)


def versions(params: Params, model: str | None = None) -> dict[str, list[dict[str, Any]]]:
    manifest = load_manifest(params.adapters_dir)
    return {m: versions_of(manifest, m) for m in _models(params, model)}


def history(params: Params, model: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Each version with where it was deployed, rolled back or refused (the deploy log)."""
    log = read_jsonl(params.adapters_dir / DEPLOY_LOG)
    listing = versions(params, model)
    return {
        m: [
            {
                **v,
                "deployments": _deployments_of(log, m, v["version_id"]),
                "rollouts": rollout.progress_of(log, m, v["version_id"]),
            }
            for v in vs
        ]
        for m, vs in listing.items()
    }


def _deployments_of(log: list[dict[str, Any]], model: str, version_id: str) -> list[str]:
    seen = []
    for e in log:
        per_model = e.get("per_model", {}).get(model)
        if e.get("versions", {}).get(model) == version_id and per_model:
            seen.append(f"{e['action']}@{e['endpoint']}:{per_model['status']}")
    return seen


def convert(
    params: Params,
    model: str,
    cycle: int | None,
    version_id: str | None,
    fmt: str,
    dtype: str = "float16",
    gguf_type: str = "Q4_K_M",
) -> ConversionResult:
    params.model(model)
    entry = pick_version(load_manifest(params.adapters_dir), model, cycle, version_id)
    return convert_release(
        params, model, entry["version_id"], fmt, dtype=dtype, gguf_type=gguf_type
    )


# --- endpoints ----------------------------------------------------------------------------


def _refuse_in_quiet_hours(params: Params, endpoints: list[str], force: bool) -> None:
    """A restart outage inside an endpoint's service hours is refused before anything moves."""
    now = datetime.now(UTC)
    for name in endpoints:
        ep = params.endpoint(name)
        window = quiet.quiet_window(ep, now) if quiet.causes_outage(ep) else None
        if window and not force:
            allowed = quiet.next_allowed(ep, now).strftime("%a %Y-%m-%d %H:%M %Z")
            raise UsageError(
                f"{name} is in its quiet hours ({','.join(window.days)} "
                f"{window.start}-{window.end}) and a restart would interrupt the service",
                f"deploy after {allowed}, or pass --force (FORCE=1)",
            )


def deploy(
    params: Params,
    endpoints: list[str],
    models: list[str] | None,
    cycle: int | None,
    version_id: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> RunResult:
    """Phases 3-6 on every endpoint in parallel, logged, alerted.

    `models` None is --all-adapters: the models that have a version in `cycle` (the plan's
    "deploy all adapters from the cycle"); the others are reported, not an error.
    """
    if cycle is None and version_id is None:
        raise UsageError("nothing to deploy", "pass --cycle N (make deploy CYCLE=N)")
    if not endpoints and params.rollout is not None:
        # a staged rollout covers the whole fleet that is pushed to
        endpoints = sorted(n for n, ep in params.endpoints.items() if ep.mode == "push")
    if not endpoints:
        raise UsageError(
            "no endpoint given",
            "pass --endpoints NAME (make deploy ENDPOINT=NAME), or set rollout: in params.yaml",
        )
    params.check_endpoints(endpoints)
    params.check_pushable(endpoints)
    models, not_in_cycle = _models_to_deploy(params, models, cycle)
    chosen = choose_releases(params, models, cycle, version_id)
    _refuse_in_quiet_hours(params, endpoints, force)
    waves = rollout.plan_waves(params, endpoints)
    staged = rollout.plan_lines(waves) if params.rollout is not None else None
    if dry_run:
        plan = dry_run_plan(params, endpoints, chosen)
        plan = ["rollout plan:", *staged, *plan] if staged else plan
        return RunResult("deploy", plan=plan, not_in_cycle=not_in_cycle)
    run_id = fleet.new_run_id()
    outcomes, halt = rollout.roll_out(params, waves, chosen, run_id, cycle, progress)
    result = RunResult("deploy", outcomes, run_id, not_in_cycle=not_in_cycle, rollout=staged)
    if halt is not None:
        result.note = f"rollout halted at wave {halt.wave}: {halt.reason}"
    return result


def _models_to_deploy(
    params: Params, models: list[str] | None, cycle: int | None
) -> tuple[list[str], list[str]]:
    """(models to deploy, models of --all-adapters that cycle has no version of)."""
    if models is not None:
        if not models:
            raise UsageError("no models chosen", "pass --all-adapters or --models NAME [NAME ...]")
        return models, []
    everything = sorted(params.models)
    if cycle is None:
        return everything, []
    have, missing = models_in_cycle(load_manifest(params.adapters_dir), everything, cycle)
    if not have:
        raise UsageError(
            f"cycle {cycle} has no version of any model",
            f"version one first: make version MODEL=<model> CYCLE={cycle} SRC=<adapter dir>",
        )
    return have, missing


def rollback(
    params: Params,
    endpoints: list[str] | None,
    models: list[str] | None,
    to: str | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> RunResult:
    """Back to previous (or `to`); with no endpoints, undo the last successful deploy."""
    note = None
    if to:
        check_version_id(to)
    if not endpoints:
        last = [e for e in last_run(params.adapters_dir) if e["status"] == "success"]
        if not last:
            raise NothingToRollBack("the deploy log has no successful deploy", "name ENDPOINT=")
        endpoints = sorted({e["endpoint"] for e in last})
        models = models or sorted({m for e in last for m in e["models"]})
        note = f"undoing deploy {last[0]['run_id']}: {', '.join(models)} on {', '.join(endpoints)}"
    params.check_endpoints(endpoints)
    params.check_pushable(endpoints)
    _refuse_in_quiet_hours(params, endpoints, force)
    if dry_run:
        what = ", ".join(models or ["every model"])
        plan = [f"[{name}] roll back {what} to {to or 'previous'}" for name in endpoints]
        return RunResult("rollback", note=note, plan=plan)
    outcomes = fleet.run_parallel(
        params,
        endpoints,
        lambda name, control: rollback_endpoint(params, name, models, to, control),
    )
    run_id = fleet.new_run_id()
    record(params, "rollback", outcomes, run_id)
    send_alerts(params, "rollback", outcomes)
    return RunResult("rollback", outcomes, run_id, note)


def phase(
    params: Params,
    name: str,
    endpoints: list[str],
    models: list[str] | None,
    cycle: int | None,
    version_id: str | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """One deploy phase alone (transfer, precheck, activate, verify); safe to re-run."""
    if not endpoints:
        raise UsageError("no endpoint given", "pass --endpoints NAME (ENDPOINT=NAME)")
    params.check_endpoints(endpoints)
    params.check_pushable(endpoints)
    models, not_in_cycle = _models_to_deploy(params, models or None, cycle)
    chosen = choose_releases(params, models, cycle, version_id)
    run_id = fleet.new_run_id()
    outcomes = run_phase(params, name, endpoints, chosen, progress)
    record(params, name, outcomes, run_id, cycle)
    return RunResult(name, outcomes, run_id, not_in_cycle=not_in_cycle)


# --- pulling endpoints ----------------------------------------------------------------------


@dataclass
class PromoteResult:
    """Each (endpoint, model) promoted: its version, its stage tag (None: already assigned),
    and the git remote the tags went to."""

    assignments: list[dict[str, Any]]
    git_remote: str
    not_in_cycle: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "git_remote": self.git_remote,
            "assignments": self.assignments,
            "not_in_cycle": self.not_in_cycle,
        }


def pulling_endpoints(params: Params, names: list[str]) -> list[str]:
    """Endpoint or rollout-group names as pulling endpoint names (a pushed one is refused)."""
    if not names:
        raise UsageError("no endpoint given", "pass ENDPOINT=<pulling endpoint or group>")
    groups = params.rollout.groups if params.rollout else {}
    expanded = list(dict.fromkeys(n for name in names for n in groups.get(name, [name])))
    params.check_endpoints(expanded)
    pushed = [n for n in expanded if params.endpoint(n).mode != "pull"]
    if pushed:
        raise UsageError(
            f"{', '.join(pushed)} {'is' if len(pushed) == 1 else 'are'} pushed to (mode: push): "
            "make promote only records what pulling endpoints should run",
            f'deploy to it with make deploy CYCLE=N ENDPOINT="{" ".join(pushed)}", '
            "or set mode: pull for it in params.yaml",
        )
    return expanded


def promote(
    params: Params,
    endpoints: list[str],
    models: list[str] | None,
    cycle: int | None,
    version_id: str | None = None,
) -> PromoteResult:
    """Record which version each pulling endpoint should run (GTO stage tags on the version's
    commit) and push those tags to the git remote; nothing is sent to any endpoint."""
    if cycle is None and version_id is None:
        raise UsageError("nothing to promote", "pass --cycle N (make promote CYCLE=N)")
    names = pulling_endpoints(params, endpoints)
    if not params.store.git_remote:
        raise UsageError(
            "no git remote to publish the desired state on",
            "set store.git_remote in params.yaml (the repository pulling endpoints fetch)",
        )
    models, not_in_cycle = _models_to_deploy(params, models, cycle)
    manifest = load_manifest(params.adapters_dir)
    repo = registry.repo_root(params.adapters_dir)
    chosen = []
    for model in models:
        params.model(model)
        entry = pick_version(manifest, model, cycle, version_id)
        if not entry.get("signed"):
            raise UsageError(
                f"{model} {entry['version_id']} is unsigned and pulling endpoints refuse "
                "unsigned releases",
                "set store.signing_key, run make keygen, version the adapter again, then promote",
            )
        commit = stages.version_commit(repo, params.adapters_dir, model, entry["version_id"])
        chosen.append((model, entry["version_id"], commit))
    done, to_push = [], []
    for name in names:
        wanted = set(params.endpoint(name).models or models)
        for model, vid, commit in chosen:
            if model not in wanted:
                continue
            tag = stages.assign(repo, model, name, commit, vid)
            done.append({"endpoint": name, "model": model, "version_id": vid, "tag": tag})
            to_push += [tag] if tag else []
            to_push += stages.version_tags(repo, model, commit)
    # Every stage tag of these endpoints, so a push that failed before is completed now.
    for name in names:
        for model, _, _ in chosen:
            to_push += registry.tags(repo, f"{model}#{name}#*")
            to_push += registry.tags(repo, f"{model}#{name}!#*")
    stages.push_tags(repo, params.store.git_remote, sorted(set(to_push)))
    return PromoteResult(done, params.store.git_remote, not_in_cycle)


def this_pulling_endpoint(params: Params, name: str | None) -> str:
    """The endpoint `make pull` runs for: the one named, else the only pulling one."""
    if name:
        params.check_endpoints([name])
        return name
    pulling = sorted(n for n, ep in params.endpoints.items() if ep.mode == "pull")
    if len(pulling) != 1:
        listed = ", ".join(pulling) or "none"
        raise UsageError(
            f"which endpoint is this? params.yaml has {len(pulling)} pulling endpoints ({listed})",
            "pass ENDPOINT=<this endpoint's name> (make pull ENDPOINT=...)",
        )
    return pulling[0]


def pull(params: Params, endpoint: str | None, force: bool = False) -> pulling.PullResult:
    """On a pulling endpoint: fetch and deploy here what `make promote` assigned it."""
    return pulling.pull(params, this_pulling_endpoint(params, endpoint), force)


def trust_here(params: Params, endpoint: str | None, public_key: Path) -> tuple[str, str]:
    """On a pulling endpoint: trust this public signing key; (endpoint, key id)."""
    name = this_pulling_endpoint(params, endpoint)
    if not public_key.is_file():
        raise UsageError(f"public key {public_key} not found", "copy <signing_key>.pub here first")
    return name, pulling.trust_here(params, name, public_key.read_text())


def status(params: Params, endpoints: list[str] | None = None) -> StatusResult:
    names = endpoints or sorted(params.endpoints)
    params.check_endpoints(names)
    statuses = fleet_status(params, names)
    held = rollout.held_back(read_jsonl(params.adapters_dir / DEPLOY_LOG))
    for st in statuses:
        st["rollout"] = held.get(st["endpoint"])
    return StatusResult(statuses)


@dataclass
class DoctorResult:
    """Per endpoint its checks (ok / warn / FAIL / skip rows) and the code a deploy would
    stop with; the worst endpoint decides (0: a deploy would work everywhere)."""

    endpoints: list[dict[str, Any]]

    @property
    def exit_code(self) -> int:
        return max([0, *(e["exit_code"] for e in self.endpoints)])

    def to_dict(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "endpoints": self.endpoints}


def doctor(params: Params, endpoints: list[str] | None = None) -> DoctorResult:
    """Live preflight of each endpoint (default: all): would a deploy work there?"""
    names = endpoints or sorted(params.endpoints)
    if not names:
        raise UsageError("no endpoints in params.yaml", "add one under endpoints:")
    params.check_endpoints(names)
    return DoctorResult(preflight.doctor(params, names))


def keygen(params: Params, out: Path | None = None) -> tuple[Path, str]:
    """A new signing key pair at `out` (default store.signing_key): public key path, key id."""
    target = out or (params.resolve(params.store.signing_key) if params.store.signing_key else None)
    if target is None:
        raise UsageError(
            "no key path", "set store.signing_key in params.yaml (e.g. ~/.adapter-deploy/key.pem)"
        )
    registry.refuse_unignored_secret(target)
    return signing.generate(target)


def trust(params: Params, endpoints: list[str]) -> dict[str, str]:
    """Install the public signing key on each endpoint; its key id per endpoint."""
    if not params.store.signing_key:
        raise UsageError("no signing key configured", "set store.signing_key and run make keygen")
    pub = params.resolve(params.store.signing_key + ".pub")
    if not pub.is_file():
        raise UsageError(f"public key {pub} not found", "run make keygen first")
    if not endpoints:
        raise UsageError("no endpoint given", "pass ENDPOINT=<name>")
    params.check_endpoints(endpoints)
    pulling = [n for n in endpoints if params.endpoint(n).mode == "pull"]
    if pulling:
        raise UsageError(
            f"{', '.join(pulling)} pulls its releases (mode: pull): this machine does not reach it",
            f"copy {pub} there and run scripts/pull.py --endpoint {pulling[0]} --trust <that file>",
        )
    trusted = {}
    with tempfile.TemporaryDirectory() as control:
        for name in endpoints:
            ep = params.endpoint(name)
            session = Session(connect(name, ep, Path(control)), ep.adapter_dir)
            try:
                reply = session.call(protocol.Trust(public_pem=pub.read_text()))
                trusted[name] = reply["key_id"]
            finally:
                session.close()
    return trusted


# What `make bootstrap` sends: the code an endpoint runs (agent, service), never the store,
# the tests or the test kits.
BOOTSTRAP_CODE = [
    "Makefile",
    "pyproject.toml",
    "uv.lock",
    ".python-version",
    "params.yaml",
    "README.md",
    "scripts",
    "engines",
    "systemd",
    "launchd",
    "health",
]
BOOTSTRAP_LEFT_BEHIND = ["/scripts/adapter_deploy/kit/"]


def install_targets(ep: EndpointParams) -> list[str]:
    """What bootstrap makes on an endpoint: the project, and llama.cpp's tools (a CUDA build
    where the endpoint has nvcc and the NVIDIA driver) where it serves GGUF releases."""
    serves_gguf = bool({ep.format, *ep.formats.values()} & {"gguf", "gguf-lora"})
    return ["install-endpoint", "gguf-tools"] if serves_gguf else ["install-endpoint"]


def bootstrap(
    params: Params,
    endpoints: list[str],
    source: Path | None = None,
    install: bool = True,
    progress: Progress = NO_PROGRESS,
) -> dict[str, int]:
    """Copy this project's checkout (default: the params file's directory) to each endpoint's
    project_dir and `make install-endpoint` it there (the locked serving dependencies, plus
    `gguf-tools` for an endpoint serving GGUF releases); bytes sent per endpoint."""
    if not endpoints:
        raise UsageError("no endpoint given", "pass ENDPOINT=<name>")
    params.check_endpoints(endpoints)
    checkout = (source or params.project_dir).resolve()
    if not (checkout / "scripts" / "adapter_deploy" / "agent").is_dir():
        raise UsageError(
            f"{checkout} is not an Adapter Deploy checkout",
            "run from the project checkout or pass --from <checkout>",
        )
    sent = {}
    with tempfile.TemporaryDirectory() as control:
        for name in endpoints:
            ep = params.endpoint(name)
            if not ep.project_dir:
                raise UsageError(f"{name} has no project_dir", "set project_dir in params.yaml")
            conn = connect(name, ep, Path(control))
            try:
                code = [checkout / c for c in BOOTSTRAP_CODE if (checkout / c).exists()]
                progress.step(name, "copying the project code")
                sent[name] = conn.sync_tree(code, ep.project_dir, BOOTSTRAP_LEFT_BEHIND)
                if install:
                    progress.step(name, f"make {' '.join(install_targets(ep))}")
                    conn.run(["make", "-C", ep.project_dir, *install_targets(ep)])
            finally:
                conn.close()
                progress.done(name)
    return sent


@dataclass
class ServiceInstall:
    """What `make service-install` did (or, in a dry run, would do) on one endpoint."""

    endpoint: str
    kind: str  # systemd | launchd
    path: str
    text: str
    start: str  # the shell line that starts it
    started: bool = False
    warning: str | None = None


def service_install(
    params: Params, endpoints: list[str], start: bool = True, dry_run: bool = False
) -> list[ServiceInstall]:
    """Install the inference service as the endpoint's service manager runs it (systemd user
    unit, launchd agent) and start it; see deploy/service_install.py."""
    if not endpoints:
        raise UsageError("no endpoint given", "pass ENDPOINT=<name>")
    params.check_endpoints(endpoints)
    planned = []
    for name in endpoints:
        ep = params.endpoint(name)
        planned.append((name, service_files(name, ep)))
        if ep.mode == "pull":  # and its pull timer
            planned += [(name, files) for files in pull_timer_files(name, ep)]
    results = [
        ServiceInstall(name, files.kind, files.path, files.text, start_script(files))
        for name, files in planned
    ]
    if dry_run:
        return results
    with tempfile.TemporaryDirectory() as work:
        for (name, files), result in zip(planned, results, strict=True):
            conn = connect(name, params.endpoint(name), Path(work))
            try:
                _install_service(conn, files, Path(work), result, start)
            finally:
                conn.close()
    return results


def _install_service(
    conn: Connection, files: ServiceFiles, work: Path, result: ServiceInstall, start: bool
) -> None:
    local = work / conn.name / files.filename
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(files.text)
    directory = conn.remote_path(files.directory)
    conn.make_dir(directory)
    conn.push([local], directory)
    if not start or not result.start:
        return
    conn.run(["sh", "-c", result.start])
    result.started = True
    if files.kind == "systemd":
        try:
            conn.run(["loginctl", "enable-linger"])
        except AdapterDeployError as err:
            result.warning = (
                f"lingering is off, so the service starts at login, not at boot "
                f"({err.one_line()}); run `sudo loginctl enable-linger <user>` there once"
            )
