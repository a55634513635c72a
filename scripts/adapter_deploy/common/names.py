"""Names that end up in paths and remote commands, checked against an allowlist.

Kept apart from config.py so the endpoint side can check names without
importing pydantic or yaml (its start-up time is part of every deploy).
"""

from __future__ import annotations

import re

from adapter_deploy.common.errors import UsageError

NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_-]{0,62}[A-Za-z0-9])?")
VERSION_RE = re.compile(r"cycle[0-9]+_[0-9]{8}_[0-9a-f]{8}")
# A file of a release: one plain name, no directory part (never `..`, `/`, NUL or a dot file).
FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")


# Terminal control (C0, DEL, C1) and the bidirectional overrides that reorder what is shown.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """`text` safe to show on a terminal or in a one-line log: every control character
    (escapes, carriage returns, newlines that would forge a line) written as `\\xNN`."""

    def escaped(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _UNPRINTABLE.sub(escaped, str(text))


def check_name(kind: str, value: str) -> str:
    """Names end up in paths and remote commands: allow only a safe alphabet."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise UsageError(
            f"invalid {kind} name {value!r}",
            "use letters, digits, '_' or '-' (at most 64; start and end with a letter or digit)",
        )
    return value


def check_version_id(value: str) -> str:
    if not isinstance(value, str) or not VERSION_RE.fullmatch(value):
        raise UsageError(
            f"invalid version id {value!r}",
            "a version id looks like cycle1_20260315_a4b2c8d1 (see `make versions`)",
        )
    return value


def check_file_names(files: dict) -> dict:
    """Every file name of a release request is one plain name inside the release dir."""
    bad = [name for name in files if not isinstance(name, str) or not FILE_RE.fullmatch(name)]
    if bad or not files:
        raise UsageError(
            f"release file names refused: {bad or 'none given'}",
            "a release holds plain file names only (no '/', '..', absolute paths or NUL)",
        )
    return files
