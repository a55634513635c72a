"""Service hours (the operator's plan: "schedule deployments between services").

An endpoint may declare `quiet_hours`: weekday and time ranges in its own time
zone (`timezone`, IANA name; default this machine's). A deploy or rollback that
would cause a restart outage there (reload_method: restart) is refused inside
them, naming the next allowed time, unless forced; hot reloads are allowed.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from adapter_deploy.config import EndpointParams, QuietWindow

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _inside(window: QuietWindow, when: datetime) -> bool:
    if DAYS[when.weekday()] not in window.days:
        return False
    now = when.strftime("%H:%M")
    return window.start <= now < window.end


def quiet_window(ep: EndpointParams, now: datetime) -> QuietWindow | None:
    """The quiet window `now` falls in for this endpoint, if any."""
    local = now.astimezone(ZoneInfo(ep.timezone)) if ep.timezone else now.astimezone()
    return next((w for w in ep.quiet_hours if _inside(w, local)), None)


def next_allowed(ep: EndpointParams, now: datetime) -> datetime:
    """The first minute after `now` outside every quiet window (searched a week ahead)."""
    when = now.replace(second=0, microsecond=0)
    for _ in range(8 * 24 * 60):
        when += timedelta(minutes=1)
        if quiet_window(ep, when) is None:
            break
    return when.astimezone(ZoneInfo(ep.timezone)) if ep.timezone else when.astimezone()


def causes_outage(ep: EndpointParams) -> bool:
    return ep.reload_method == "restart"
