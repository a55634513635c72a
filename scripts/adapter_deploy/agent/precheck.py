"""PRE-CHECK of a staged release: inside the running service when it can, else in a process.

Inside the service (engines/control_client.py, service/control.py) the candidate is loaded
beside the active adapter on the base already in memory: no second copy of the base, live
requests keep their release. A service that is down, has no control socket, or cannot hold
the release beside its own (merged, bitsandbytes, GGUF, an engine without candidates) makes
the check run in this process instead, as before, and the result says why (`via_reason`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import AdapterDeployError, ServiceUnavailable

log = logging.getLogger(__name__)


def precheck(
    adapter_dir: Path,
    model: str,
    release: Path,
    checks: Any,
    *,
    base_model: str | None,
    engine: str,
    latency_limit: float,
    task: str,
    in_service: bool,
) -> dict[str, Any]:
    """The health check of the staged `release`, with `via` ("service" or "process").
    `checks`: the sentence or clip file's path (None: the default sentences)."""
    why = "the endpoint runs no service with hot reload (service_url, sigusr1)"
    if in_service:
        try:
            return {**_in_service(adapter_dir, model, release.name, checks, latency_limit,
                                  task), "via": "service"}  # fmt: skip
        except ServiceUnavailable as err:
            why = err.one_line()
            log.warning("%s: pre-check in a separate process: %s", model, why)
    return {**_in_process(release, checks, base_model, engine, latency_limit, task),
            "via": "process", "via_reason": why}  # fmt: skip


def _in_service(
    adapter_dir: Path, model: str, version_id: str, checks: Any, limit: float, task: str
) -> dict[str, Any]:
    from adapter_deploy.engines.control_client import CandidateSession
    from adapter_deploy.health import (
        load_clips,
        load_failure,
        load_sentences,
        run_health_check,
        run_transcription_check,
    )

    # A bad sentence or clip file is the operator's error, raised as in a process check.
    if task == "transcription":
        clips = load_clips(checks) if checks else ()
    else:
        sentences = load_sentences(checks) if checks else None
    try:
        with CandidateSession(adapter_dir, model, version_id) as candidate:
            if task == "transcription":
                result = run_transcription_check(candidate, clips, limit).to_dict()
            else:
                result = run_health_check(candidate, sentences, limit).to_dict()
            result["shadow"] = candidate.shadow() if task == "translation" else None
            return result
    except ServiceUnavailable:
        raise
    except AdapterDeployError as err:  # it did not load or failed mid-check: nothing changed
        return load_failure(err.one_line()).to_dict()


def _in_process(
    release: Path, checks: Any, base_model: str | None, engine: str, limit: float, task: str
) -> dict[str, Any]:
    from adapter_deploy.health import check_release, load_sentences

    # A transcription check takes the clip file's path: it fails (not raises) without one.
    chosen: Any = checks
    if task != "transcription" and checks:
        chosen = load_sentences(checks)
    return check_release(release.resolve(), base_model, engine, chosen, limit, task=task).to_dict()
