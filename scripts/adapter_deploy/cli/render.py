"""What the CLIs show: tables (colored on a terminal, plain when piped), run summaries."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adapter_deploy.api import RunResult
from adapter_deploy.common.names import printable
from adapter_deploy.deploy.plan import EndpointOutcome


def cell(value: object) -> str:
    """A value as table text: rich markup (`[link=...]`, `[red]`) shown, not obeyed, and no
    control characters (cells carry what endpoints and models said)."""
    return escape(printable(value))


def render(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render a table to a string (the caller prints it)."""
    tty = sys.stdout.isatty()
    console = Console(
        file=None, force_terminal=tty, no_color=not tty, width=200 if not tty else None
    )
    table = Table(title=cell(title), box=box.SIMPLE if tty else box.ASCII2, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else cell(v) for v in row))
    with console.capture() as capture:
        console.print(table)
    return capture.get()


OUTCOME_COLUMNS = ("endpoint", "model", "version", "status", "phases", "sent", "note")


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


def print_per_model(
    listing: dict[str, list[dict[str, Any]]],
    columns: Sequence[str],
    rows_for: Callable[[list[dict[str, Any]]], list[list[object]]],
    as_json: bool,
) -> int:
    """One table per model (versions, history), or the whole listing as JSON."""
    if as_json:
        print(json.dumps(listing, indent=2))
        return 0
    for model, versions in listing.items():
        if versions:
            print(render(model, columns, rows_for(versions)), end="")
        else:
            print(f"{model}: no versions yet (make version MODEL={model} CYCLE=1 SRC=...)")
    return 0


def print_run(result: RunResult, as_json: bool) -> int:
    """Print a deploy/rollback/phase result (table or JSON); its exit code."""
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return result.exit_code
    if result.note:
        print(printable(result.note))
    if result.not_in_cycle:
        print("not in this cycle (left as they are): " + ", ".join(result.not_in_cycle))
    if result.plan is not None:
        print("dry run: nothing will be changed")
        print("\n".join(result.plan))
        return result.exit_code
    title = f"{result.action} {result.run_id}" if result.run_id else result.action
    print(render(title, OUTCOME_COLUMNS, summary_rows(result.outcomes)), end="")
    return result.exit_code
