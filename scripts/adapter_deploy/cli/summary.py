"""Turn endpoint outcomes into the operator's summary and the run's exit code."""

from __future__ import annotations

import json
from typing import Any

from adapter_deploy.cli.table import render
from adapter_deploy.deploy.plan import EndpointOutcome

COLUMNS = ("endpoint", "model", "version", "status", "phases", "sent", "note")


def exit_code(outcomes: list[EndpointOutcome]) -> int:
    """The worst outcome decides (0 when all succeeded or nothing changed)."""
    return max([0, *(o.worst for o in outcomes)])


def summary_rows(outcomes: list[EndpointOutcome]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for o in outcomes:
        if o.error and not o.models:
            rows.append([o.endpoint, "-", "-", "failed", "", "", o.error])
        for m in o.models:
            note = m.error or (f"previous {m.previous}" if m.previous else "")
            rows.append(
                [
                    o.endpoint,
                    m.model,
                    m.version_id,
                    m.status,
                    ",".join(m.phases),
                    m.bytes_sent,
                    note,
                ]
            )
    return rows


def print_outcomes(title: str, outcomes: list[EndpointOutcome], as_json: bool) -> int:
    code = exit_code(outcomes)
    if as_json:
        print(
            json.dumps({"exit_code": code, "endpoints": [o.to_dict() for o in outcomes]}, indent=2)
        )
    else:
        print(render(title, COLUMNS, summary_rows(outcomes)), end="")
    return code
