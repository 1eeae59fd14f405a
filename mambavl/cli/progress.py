"""The command line's one progress renderer: a rich bar on stderr that receives the library's `Progress` reports
(`mambavl.progress`). Each command chooses only what its bar says (`describe`) and which reports also print a line
(`log`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _Bar

Fields = dict[str, Any]


def default_describe(fields: Fields) -> str | None:
    """The report's message, else its stage; None keeps the bar's current description."""
    value = fields.get("message", fields.get("stage"))
    return None if value is None else str(value)


def no_log(fields: Fields) -> str | None:
    """Print no lines: the bar alone shows the run."""
    return None


def log_messages(label: str) -> Callable[[Fields], str | None]:
    """Print every report's message as a line "label: message" above the bar."""
    return lambda fields: f"{label}: {fields['message']}" if "message" in fields else None


class RichProgress:
    """`mambavl.progress.Progress` drawn as one rich task: total from `start`, units from `advance`."""

    def __init__(self, bar: _Bar, label: str, describe: Callable[[Fields], str | None],
                 log: Callable[[Fields], str | None]):
        self.bar, self.label, self.describe, self.log = bar, label, describe, log
        self.task = bar.add_task("", total=None)

    def start(self, total: int, **fields: Any) -> None:
        self.bar.update(self.task, total=total, completed=0)
        self._show(fields)

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.bar.advance(self.task, n)
        self._show(fields)

    def finish(self, **fields: Any) -> None:
        total = self.bar.tasks[self.task].total
        if total is not None:
            self.bar.update(self.task, completed=total)
        self._show(fields)

    def _show(self, fields: Fields) -> None:
        if not fields:
            return
        description = self.describe(fields)
        if description is not None:
            self.bar.update(self.task, description=description)
        line = self.log(fields)
        if line:
            self.bar.console.print(line)


@contextmanager
def rich_progress(label: str, quiet: bool, describe: Callable[[Fields], str | None] = default_describe,
                  log: Callable[[Fields], str | None] = no_log,
                  transient: bool = True) -> Iterator[RichProgress | None]:
    """A `RichProgress` on stderr for the duration of the block (None when `quiet`: the library then reports
    nothing)."""
    if quiet:
        yield None
        return
    with _Bar(TextColumn(f"[bold]{label}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(),
              TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=transient) as bar:
        yield RichProgress(bar, label, describe, log)
