"""Tables for operators: colored on a terminal, plain text when piped."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table


def render(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render a table to a string (the caller prints it)."""
    tty = sys.stdout.isatty()
    console = Console(
        file=None, force_terminal=tty, no_color=not tty, width=200 if not tty else None
    )
    table = Table(title=title, box=box.SIMPLE if tty else box.ASCII2, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    with console.capture() as capture:
        console.print(table)
    return capture.get()
