"""The one rich Console, progress bars, and how errors are shown."""

from __future__ import annotations

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


class _Console(Console):
    """rich's Console, except that off a terminal (piped, redirected to a log) a line of text is printed whole:
    rich would wrap it at 80 columns, its default width there, in the middle of a sentence or a path. Tables
    and panels keep their layout; on a terminal nothing changes."""

    def print(self, *objects, soft_wrap=None, **kwargs):
        if soft_wrap is None and not self.is_terminal and all(isinstance(o, (str, Text)) for o in objects):
            soft_wrap = True
        return super().print(*objects, soft_wrap=soft_wrap, **kwargs)


console = _Console(stderr=True, highlight=False)
out = _Console(highlight=False, soft_wrap=True)  # stdout: results and --json


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

    from medtune.redact import redact_text

    console.print(f"[bold red]error:[/] {escape(redact_text(exc.line()))}", soft_wrap=True)
    if getattr(exc, "hint", ""):
        console.print(f"[dim]hint:[/] {escape(redact_text(exc.hint))}", soft_wrap=True)


def is_tty() -> bool:
    return sys.stderr.isatty()
