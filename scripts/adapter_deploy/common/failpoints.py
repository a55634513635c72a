"""Failpoints: named places where a test or the demo injects a fault.

Endpoint side: `<adapter_dir>/.failpoints.json` maps a failpoint name to an action:
    "crash"  the endpoint process dies at once (os._exit), as under kill -9
    "fail"   the operation fails (a health check reports a forced failure)
Each failpoint fires once and is removed, so the recovery that follows runs clean.
Without that file (every real endpoint) this costs one stat() per failpoint.

Deployer side (the process running deploy_adapters.py): when the environment variable
ADAPTER_DEPLOY_FAILPOINT names one of DEPLOYER_POINTS, the deployer sends itself a real
SIGKILL on reaching it, exactly as `kill -9` would: no cleanup, no deploy log, its ssh
children left to notice on their own. Unset (every real run), this costs one environment
lookup per point. The points, in the order a deploy reaches them:
    deploy.after_transfer   the release is staged on the endpoint, nothing activated
    deploy.after_precheck   the pre-activation check passed
    deploy.after_activate   `active` flipped, VERIFY not started: serving unverified
    deploy.after_verify     VERIFY passed, the endpoint's status.json not yet told so
    deploy.after_record     the endpoint recorded it verified; no prune, no deploy log yet
    deploy.before_log       every endpoint done; the training-side deploy log not written
    rollback.after_mark_bad VERIFY failed and the release is marked bad; links not back yet
    rollback.after_links    links back on the old release and re-signalled, not re-verified
and in a staged rollout (ROLLOUT_POINTS):
    rollout.after_wave      a wave is done and recorded; the next wave not started
and in a manual rollback (MANUAL_ROLLBACK_POINTS):
    manual_rollback.after_mark_bad   the release rolled back from is marked bad; links unmoved
    manual_rollback.after_links      links on the target, not yet health-checked or recorded
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

from adapter_deploy.common.fsutil import atomic_write_json

log = logging.getLogger(__name__)
FILE = ".failpoints.json"
CRASH_EXIT = 137
DEPLOYER_ENV = "ADAPTER_DEPLOY_FAILPOINT"
DEPLOYER_POINTS = (
    "deploy.after_transfer",
    "deploy.after_precheck",
    "deploy.after_activate",
    "deploy.after_verify",
    "deploy.after_record",
    "deploy.before_log",
    "rollback.after_mark_bad",
    "rollback.after_links",
)
ROLLOUT_POINTS = ("rollout.after_wave",)  # reached only by a staged rollout
# Reached by `make rollback` (deploy_adapters.py --rollback), not by a deploy.
MANUAL_ROLLBACK_POINTS = ("manual_rollback.after_mark_bad", "manual_rollback.after_links")


def trigger(adapter_dir: Path, name: str) -> str | None:
    """The action armed at `name` (consumed), or None; "crash" never returns."""
    path = adapter_dir / FILE
    if not path.exists():
        return None
    try:
        armed = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    action = armed.pop(name, None)
    if action is None:
        return None
    if isinstance(action, list):  # a sequence, one action per time the point is reached
        action, rest = (action[0], action[1:]) if action else (None, [])
        if rest:
            armed[name] = rest
    atomic_write_json(path, armed)
    if action is None or action == "pass":
        return None
    log.warning("failpoint %s: %s", name, action)
    if action == "crash":
        os._exit(CRASH_EXIT)
    return action


def arm(adapter_dir: Path, name: str, action: str | list[str]) -> None:
    """Arm `name` with an action, or a list of them ("pass" does nothing) taken in turn."""
    path = adapter_dir / FILE
    armed = json.loads(path.read_text()) if path.exists() else {}
    armed[name] = action
    adapter_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, armed)


def deployer(name: str) -> None:
    """SIGKILL this process when $ADAPTER_DEPLOY_FAILPOINT names `name` (tests only)."""
    if os.environ.get(DEPLOYER_ENV) != name:
        return
    log.warning("deployer failpoint %s: kill -9", name)
    # SIGKILL, not os._exit: the test must see what an operator's kill -9 leaves behind.
    os.kill(os.getpid(), signal.SIGKILL)
