"""The rows of `make doctor`: each judges one of the endpoint's facts (agent/doctor.py)
against params and the local store, with a one-line fix and the exit code a deploy would
stop with (3 ssh/rsync/disk/base model, 2 protocol/signing/config, 5 reload)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from adapter_deploy import signing
from adapter_deploy.agent.doctor import rsync_version
from adapter_deploy.common.prereqs import MIN_PYTHON, install_hint
from adapter_deploy.config import EndpointParams, Params
from adapter_deploy.deploy.plan import release_format
from adapter_deploy.store.manifest import load_manifest, versions_of

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
CLOCK_WARN_S = 5.0


@dataclass
class Check:
    check: str
    status: str
    detail: str
    fix: str | None = None
    exit_code: int = 0  # FAIL rows: the code a deploy would stop with


def ok(check: str, detail: str) -> Check:
    return Check(check, OK, detail)


def warn(check: str, detail: str, fix: str) -> Check:
    return Check(check, WARN, detail, fix)


def fail(check: str, detail: str, fix: str | None, code: int) -> Check:
    return Check(check, FAIL, detail, fix, code)


def endpoint_models(params: Params, ep: EndpointParams) -> list[str]:
    """The models a deploy sends to this endpoint (its `models`, else every model)."""
    return [m for m in (ep.models or sorted(params.models)) if m in params.models]


def _dotted(version: list[int] | tuple[int, ...] | None) -> str:
    return ".".join(map(str, version)) if version else "missing"


def check_python(facts: dict[str, Any]) -> Check:
    theirs = tuple(facts["python"])
    detail = f"endpoint {_dotted(theirs)} ({facts['python_executable']}), "
    detail += f"here {_dotted(sys.version_info[:3])}"
    if theirs[:2] < MIN_PYTHON:
        need = _dotted(MIN_PYTHON)
        fix = f"install Python >= {need} on the endpoint ({install_hint('python3')}), "
        fix += "set python: to it, then make bootstrap"
        return fail("python", detail + f": the endpoint needs >= {need}", fix, 3)
    return ok("python", detail)


def check_rsync(ep: EndpointParams, facts: dict[str, Any], needs_endpoint_rsync: bool) -> Check:
    """`needs_endpoint_rsync`: the connection's (over ssh, rsync runs at both ends)."""
    here, theirs = rsync_version(), facts["rsync_version"]
    if here is None:
        fix = f"install it here: {install_hint('rsync')}"
        return fail("rsync", "rsync is missing on this machine", fix, 3)
    if not needs_endpoint_rsync:
        return ok("rsync", f"here {_dotted(here)} (transport local)")
    detail = f"here {_dotted(here)}, endpoint {_dotted(theirs)}"
    if theirs is None:
        where = f" at {ep.rsync_path}" if ep.rsync_path else " (not on its PATH)"
        fix = f"install it on the endpoint: {install_hint('rsync')}; or set rsync_path"
        return fail("rsync", f"rsync is missing on the endpoint{where}", fix, 3)
    if theirs[0] < 3:
        fix = "install rsync >= 3 on the endpoint (brew install rsync) and set rsync_path"
        return warn("rsync", detail + ": before 3.0, no --protect-args (paths are checked)", fix)
    return ok("rsync", detail)


def check_base_model(model: str, state: dict[str, Any]) -> Check:
    check = f"base_model {model}"
    name = state["name"]
    if state["ok"]:
        return ok(check, f"{state['detail']} has a readable config.json")
    if state["kind"] == "hub":
        fix = f"on the endpoint: hf download {name}, or set base_models.{model}"
        fix += " to a local copy"
    else:
        fix = f"copy the base model to {name} on the endpoint, or fix base_models.{model}"
        fix += f" / models.{model}.base_model in params.yaml"
    return fail(check, state["detail"], fix, 3)


def _release_sizes(params: Params, ep: EndpointParams, model: str) -> list[int]:
    """Sizes of the model's releases as this endpoint takes them (a conversion's where it
    serves one and the store has it, else the adapter's)."""
    manifest = load_manifest(params.adapters_dir)
    fmt = release_format(ep, model)
    converted = [
        int(c.get("size") or sum(f["size"] for f in c["files"].values()))
        for c in manifest.get("conversions", [])
        if c.get("model") == model and c.get("format") == fmt
    ]
    adapters = [sum(f["size"] for f in v["files"].values()) for v in versions_of(manifest, model)]
    return converted if fmt != "adapter" and converted else adapters


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def check_disk(params: Params, ep: EndpointParams, disk: dict[str, Any]) -> Check:
    free, keep, where = disk["free_bytes"], ep.min_free_bytes, disk["path"]
    if not disk["writable"]:
        return fail("disk", f"{where} is not writable", "fix adapter_dir's owner there", 3)
    largest = {
        m: max(_release_sizes(params, ep, m), default=0) for m in endpoint_models(params, ep)
    }
    model, size = max(largest.items(), key=lambda kv: kv[1], default=("-", 0))
    detail = f"{_bytes(free)} free at {where}; " + (
        f"{model}'s largest release is {_bytes(size)}" if size else "no release in the store yet"
    )
    detail += f", min_free_bytes {_bytes(keep)}"
    fix = "free space on the endpoint (old releases, caches) or lower min_free_bytes"
    if free < size + keep:
        return fail("disk", detail, fix, 3)
    if free < sum(largest.values()) + keep:
        every = f"; every model's largest together need {_bytes(sum(largest.values()) + keep)}"
        return warn("disk", detail + every, fix)
    return ok("disk", detail)


def check_sigusr1(name: str, ep: EndpointParams, facts: dict[str, Any]) -> list[Check]:
    start = f"start the service: scripts/service.py start --endpoint {name} (on the endpoint)"
    service, rows, service_pid = facts["service"], [], None
    if ep.service_url is None:
        fix = "set service_url: http://127.0.0.1:PORT (the service's --port) in params.yaml"
        rows.append(warn("service", "no service_url: a deploy cannot confirm the reload", fix))
    elif "error" in service:
        rows.append(fail("service", service["error"], start, 5))
    else:
        service_pid = service.get("pid")
        rows.append(ok("service", f"{ep.service_url}/status answers: pid {service_pid}"))
    held = facts["pidfile"]
    if not ep.pidfile:
        rows.append(fail("pidfile", "reload_method sigusr1 needs a pidfile", "set pidfile:", 2))
    elif "error" in held:
        rows.append(fail("pidfile", held["error"], start, 5))
    elif service_pid is not None and held["pid"] != service_pid:
        detail = f"{ep.pidfile} names pid {held['pid']}, but the service at {ep.service_url} "
        detail += f"is pid {service_pid}: a reload would signal another process"
        fix = "set pidfile: to the file this service writes (its --pidfile), or restart it"
        rows.append(fail("pidfile", detail, fix, 5))
    else:
        rows.append(ok("pidfile", f"live pid {held['pid']} holds {ep.pidfile}"))
    return rows


def check_restart(probe: dict[str, Any]) -> Check:
    command = " ".join(probe["command"])
    if probe["ok"]:
        return ok("restart", f"`{command}` runs without a password ({probe['detail']})")
    if probe.get("missing"):
        detail = f"`{command}`: {probe['missing']} is not installed on the endpoint"
        return fail("restart", detail, "install it there, or fix restart_command", 5)
    first = probe["command"][0]
    if first == "sudo":
        fix = "add a sudoers NOPASSWD rule for exactly this command on the endpoint (visudo)"
    elif probe["command"][:2] == ["systemctl", "--user"]:
        fix = "run the user's systemd there: loginctl enable-linger <user>, then install "
        fix += "systemd/adapter-serve.service as a user unit"
    else:
        fix = "fix restart_command in params.yaml"
    probed = " ".join(probe["probe"] or [first])
    return fail(
        "restart", f"`{command}` cannot run unattended: {probed}: {probe['detail']}", fix, 5
    )


def check_signing(params: Params, name: str, trusted: list[str]) -> Check:
    trust = f"run `make trust ENDPOINT={name}`"
    if not params.store.signing_key:
        if trusted:
            detail = f"the endpoint trusts signed releases only (keys {', '.join(trusted)}), "
            detail += "but store.signing_key is not set: it would refuse every release"
            return fail("signing", detail, "set store.signing_key to the key it trusts", 2)
        return ok("signing", "no store.signing_key: releases go unsigned, no key trusted there")
    pub = params.resolve(params.store.signing_key + ".pub")
    if not pub.is_file():
        return fail("signing", f"public key {pub} not found", "run make keygen", 2)
    kid = signing.key_id(pub.read_bytes())
    if kid in trusted:
        return ok("signing", f"the endpoint trusts signing key {kid}")
    others = f" (it trusts {', '.join(trusted)})" if trusted else ""
    return fail("signing", f"the endpoint does not trust signing key {kid}{others}", trust, 2)


def _expiry_margin(params: Params, ep: EndpointParams) -> tuple[float, str] | None:
    """Seconds until the first of the newest signed releases expires (and which), or the
    signature lifetime when a key is set and nothing is signed yet; None: nothing signed."""
    manifest, now, margins = load_manifest(params.adapters_dir), datetime.now(UTC), []
    for model in endpoint_models(params, ep):
        versions = versions_of(manifest, model)
        newest = max(versions, key=lambda v: (v["cycle"], v["created"]), default=None)
        if newest and newest.get("signed"):
            expires = newest["signed"]["metadata"]["expires"]
            when = datetime.strptime(expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            what = f"{model} {newest['version_id']} expires {expires}"
            margins.append(((when - now).total_seconds(), what))
    if margins:
        return min(margins)
    if params.store.signing_key:
        days = params.store.signature_expiry_days
        return days * 86400.0, f"a release signed now expires in {days} days"
    return None


def check_clock(params: Params, ep: EndpointParams, skew: float) -> Check:
    """`skew` > 0: the endpoint's clock is ahead. Only an endpoint ahead by more than a
    signed release has left makes it refuse that release as expired (signing.verify)."""
    side = "ahead of" if skew > 0 else "behind"
    detail = f"the endpoint's clock is {abs(skew):.1f} s {side} this machine's"
    sync = "sync the endpoint's clock (NTP: timedatectl set-ntp true)"
    margin = _expiry_margin(params, ep)
    if margin is not None and skew >= margin[0]:
        if margin[0] <= 0:
            return fail(
                "clock",
                margin[1].replace("expires", "expired at"),
                "re-sign it: make version re-signs",
                2,
            )
        return fail(
            "clock", f"{detail}: it would refuse a release as expired ({margin[1]})", sync, 2
        )
    if abs(skew) > CLOCK_WARN_S:
        return warn("clock", detail, sync)
    return ok("clock", f"within {CLOCK_WARN_S:g} s of this machine's ({skew:+.1f} s)")
