"""Quiet hours: no restart outage during a service unless forced; hot reloads allowed."""

from __future__ import annotations

from datetime import UTC, datetime

from adapter_deploy.config import EndpointParams
from adapter_deploy.deploy.quiet import next_allowed, quiet_window
from fixtures_fleet import Fleet

SUNDAY = {"days": ["sun"], "start": "08:30", "end": "12:30"}


def _ep(**kw) -> EndpointParams:
    return EndpointParams(adapter_dir="/a", reload_method="restart", timezone="Europe/Amsterdam",
                          quiet_hours=[SUNDAY], **kw)  # fmt: skip


def test_window_in_the_endpoints_time_zone() -> None:
    ep = _ep()
    sunday_10_local = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)  # 10:00 in Amsterdam (CET)
    assert quiet_window(ep, sunday_10_local) is not None
    assert quiet_window(ep, datetime(2026, 11, 29, 12, 0, tzinfo=UTC)) is None  # 13:00 local
    assert quiet_window(ep, datetime(2026, 11, 28, 9, 0, tzinfo=UTC)) is None  # Saturday
    assert next_allowed(ep, sunday_10_local).strftime("%a %H:%M") == "Sun 12:30"


def test_deploy_refused_in_quiet_hours_unless_forced(fleet: Fleet) -> None:
    always = {"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": "00:00",
              "end": "24:00"}  # fmt: skip
    fleet.set_endpoint("ep1", reload_method="restart", restart_command=["true"],
                       quiet_hours=[always], timezone="UTC")  # fmt: skip
    args = ("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
    proc = fleet.deploy(*args)
    assert proc.returncode == 2 and "quiet hours" in proc.stderr and "--force" in proc.stderr
    assert not fleet.endpoints["ep1"].exists()
    assert fleet.deploy("--rollback", "--endpoints", "ep1").returncode == 2
    assert fleet.deploy(*args, "--force").returncode == 0
    fleet.set_endpoint("ep1", reload_method="sigusr1")  # hot reload: allowed in quiet hours
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1", "--dry-run")
    assert proc.returncode == 0, proc.stderr
