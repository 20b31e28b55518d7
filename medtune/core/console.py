"""The one rich Console, progress bars, and how errors are shown."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

TABLE_WIDTH = 200  # off a terminal, the most a table may take


class _Console(Console):
    """rich's Console, except that off a terminal (piped, redirected to a log) a line of text is printed whole:
    rich would wrap it at 80 columns, its default width there, in the middle of a sentence or a path. Tables
    keep their layout, up to TABLE_WIDTH columns (unless COLUMNS says otherwise); on a terminal nothing changes."""

    def print(self, *objects, soft_wrap=None, **kwargs):
        if soft_wrap is None and not self.is_terminal and all(isinstance(o, (str, Text)) for o in objects):
            soft_wrap = True
        return super().print(*objects, soft_wrap=soft_wrap, **kwargs)


def _make(**kwargs) -> _Console:
    c = _Console(**kwargs)
    if not c.is_terminal and not os.environ.get("COLUMNS"):
        c.width = TABLE_WIDTH  # a table is laid out at its natural width, not squeezed into 80 columns
    return c


console = _make(stderr=True, highlight=False)
out = _make(highlight=False, soft_wrap=True)  # stdout: results and --json


def info(msg: str) -> None:
    console.print(msg)


def step(msg: str) -> None:
    console.print(f"[bold cyan]▶[/] {msg}")


def done(msg: str) -> None:
    console.print(f"[bold green]✓[/] {msg}")


def warn(msg: str) -> None:
    console.print(f"[bold yellow]![/] {msg}")


def progress(*extra_columns, transient: bool = False) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not console.is_terminal and not _force_progress(),
    )


def _force_progress() -> bool:
    import os

    return os.environ.get("MEDTUNE_PROGRESS", "") == "1"


def error(exc) -> None:
    """Render a MedtuneError: one line, one hint."""
    from rich.markup import escape

    from medtune.core.redact import redact_text

    console.print(f"[bold red]error:[/] {escape(redact_text(exc.line()))}", soft_wrap=True)
    if getattr(exc, "hint", ""):
        console.print(f"[dim]hint:[/] {escape(redact_text(exc.hint))}", soft_wrap=True)


def is_tty() -> bool:
    return sys.stderr.isatty()
