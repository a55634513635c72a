"""The one timestamp format of every record: UTC, seconds, `Z` (seed §7)."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> str:
    return utc_text(datetime.now(UTC))


def utc_text(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
