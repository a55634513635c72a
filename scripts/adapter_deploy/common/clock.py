"""The one timestamp format of every record: UTC ISO 8601 with `Z` (the operator's plan)."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now(ms: bool = False) -> str:
    """Now, to the second (records) or the millisecond (the service's reload log)."""
    return utc_text(datetime.now(UTC), ms)


def utc_text(when: datetime, ms: bool = False) -> str:
    text = when.astimezone(UTC).isoformat(timespec="milliseconds" if ms else "seconds")
    return text.replace("+00:00", "Z")
