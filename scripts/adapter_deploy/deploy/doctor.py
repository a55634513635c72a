"""`make doctor`: a live preflight of each endpoint, one row per check, nothing changed.

Each row is ok, warn or FAIL with a one-line fix. A FAIL carries the exit code the deploy
would stop with (3 ssh/rsync/disk/base model, 2 protocol/signing/config, 5 reload), so the
doctor exits 0 only when a deploy would work. After a failed ssh login or agent start the
remaining checks of that endpoint cannot run: they are listed as `skip`.

The endpoint's side is one read-only agent session (no lock, nothing created) answering one
`doctor` request (agent/doctor.py); everything is judged here.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from adapter_deploy import __version__
from adapter_deploy import protocol as p
from adapter_deploy.common.errors import AdapterDeployError
from adapter_deploy.common.prereqs import install_hint
from adapter_deploy.config import EndpointParams, Params
from adapter_deploy.deploy.doctor_checks import (
    SKIP,
    Check,
    check_base_model,
    check_clock,
    check_disk,
    check_python,
    check_restart,
    check_rsync,
    check_signing,
    check_sigusr1,
    endpoint_models,
    fail,
    ok,
    warn,
)
from adapter_deploy.deploy.fleet import run_parallel
from adapter_deploy.deploy.plan import base_model_for, reload_spec
from adapter_deploy.deploy.remote import Connection, Session, connect

COLUMNS = ("endpoint", "check", "status", "detail", "fix")


def planned(params: Params, ep: EndpointParams) -> list[str]:
    """Every check of this endpoint, in order."""
    reload = {"sigusr1": ["service", "pidfile"], "restart": ["restart"]}
    return [
        "ssh",
        "agent",
        "python",
        "rsync",
        *(f"base_model {m}" for m in endpoint_models(params, ep)),
        "disk",
        *reload.get(ep.reload_method, ["reload"]),
        "signing",
        "clock",
    ]


def doctor_endpoint(params: Params, name: str, control_dir: Path) -> dict[str, Any]:
    ep = params.endpoint(name)
    conn = connect(name, ep, control_dir)
    rows: list[Check] = []
    try:
        facts, arrived = _reach(params, conn, rows)
        if facts is not None:
            rows += _judge(params, conn, facts, arrived)
    finally:
        conn.close()
    done = {r.check for r in rows}
    why = f"not checked: fix {rows[-1].check} first" if rows else "not checked"
    rows += [Check(c, SKIP, why) for c in planned(params, ep) if c not in done]
    return {
        "endpoint": name,
        "exit_code": max([0, *(r.exit_code for r in rows)]),
        "checks": [asdict(r) for r in rows],
    }


def _reach(
    params: Params, conn: Connection, rows: list[Check]
) -> tuple[dict[str, Any] | None, float]:
    """ssh login, then the agent's ready line and its facts (rows appended as they pass)."""
    ep = conn.ep
    try:
        rows.append(ok("ssh", conn.log_in()))
    except AdapterDeployError as err:
        rows.append(fail("ssh", err.message, err.fix, err.exit_code))
        return None, 0.0
    try:
        session = Session(conn, ep.adapter_dir, read_only=True)
        try:
            request = p.Doctor(
                base_models={m: base_model_for(params, ep, m) for m in endpoint_models(params, ep)},
                reload=reload_spec(ep),
                service_url=ep.service_url if ep.reload_method == "sigusr1" else None,
                rsync_path=ep.rsync_path,
            )
            facts = session.call(request)
            arrived = time.time()
        finally:
            session.close()
    except AdapterDeployError as err:
        rows.append(python_missing(conn, err) or fail("agent", err.message, err.fix, err.exit_code))
        return None, 0.0
    agent = f"protocol {p.PROTOCOL_VERSION}, code {session.agent_version}"
    if session.agent_version != __version__:
        rows.append(
            warn(
                "agent",
                f"{agent}; this deployer runs code {__version__}",
                f"run `make bootstrap ENDPOINT={conn.name}` to install this code there",
            )
        )
    else:
        rows.append(ok("agent", agent))
    return facts, arrived


def python_missing(conn: Connection, err: AdapterDeployError) -> Check | None:
    """The python row when the endpoint's shell found no `python` command to start the agent
    with (a path that is missing there means the project is not installed: the agent row)."""
    python = conn.endpoint_python()
    name = re.escape(python)  # bash, dash: "python3: (command) not found"; zsh: the reverse
    said = re.search(
        rf"(^|\W){name}: (command )?not found|command not found: {name}\b", err.message
    )
    if "/" in python or said is None:
        return None
    fix = f"install it on the endpoint: {install_hint('python3')}; or set python: to one there"
    return fail("python", f"{python} is missing on the endpoint", fix, 3)


def _judge(params: Params, conn: Connection, facts: dict[str, Any], arrived: float) -> list[Check]:
    name, ep = conn.name, conn.ep
    rows = [check_python(facts), check_rsync(ep, facts, conn.needs_endpoint_rsync)]
    rows += [check_base_model(m, facts["base_models"][m]) for m in endpoint_models(params, ep)]
    rows.append(check_disk(params, ep, facts["disk"]))
    if ep.reload_method == "sigusr1":
        rows += check_sigusr1(name, ep, facts)
    elif ep.reload_method == "restart":
        rows.append(check_restart(facts["restart"]))
    else:
        rows.append(ok("reload", "reload_method none: nothing to signal"))
    rows.append(check_signing(params, name, facts["trusted_keys"]))
    rows.append(check_clock(params, ep, facts["time"] - arrived))
    return rows


def doctor(params: Params, endpoints: list[str]) -> list[dict[str, Any]]:
    """Every endpoint's checks, in parallel; one endpoint's trouble is its own rows."""
    results = run_parallel(params, endpoints, lambda n, ctl: doctor_endpoint(params, n, ctl))
    out = []
    for name, result in zip(endpoints, results, strict=True):
        if not isinstance(result, dict):  # an unexpected error, reported by run_parallel
            error = result.error or "unexpected error"
            row = asdict(fail("doctor", error, "rerun with -v", result.worst or 1))
            result = {"endpoint": name, "exit_code": row["exit_code"], "checks": [row]}
        out.append(result)
    return out
