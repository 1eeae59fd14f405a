"""The command line's one progress renderer: it receives the library's `Progress` reports (`mambavl.progress`) and
draws them on stderr — a rich bar on a terminal, plain lines otherwise (a log file, CI, a Slurm job). Each command
chooses only what its bar says (`describe`) and which reports also print a line (`log`).

Plain lines carry the label, units done of the total, the rate, the time left and the current description (and the
inner loop's counts when a `mambavl.progress.Part` reports); one is printed when another tenth of the run is done,
when the description changes, and by a heartbeat at least every `PLAIN_INTERVAL` seconds while a phase reports
nothing, so no phase of a run is silent for longer.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _Bar

Fields = dict[str, Any]
PLAIN_INTERVAL = 30.0  # seconds between plain lines while nothing else prints one
PART_FIELDS = ("part", "part_done", "part_total")


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


def clock_time(seconds: float | None) -> str:
    """h:mm:ss, or "?" when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Counter:
    """Units done of a total since a start time: rate and time left (`status`)."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.total: int | None = None
        self.done = 0
        self.base = 0  # units already done at the start (a resumed run): not counted in the rate
        self.t0 = clock()

    def start(self, total: int | None) -> None:
        self.total, self.done, self.base, self.t0 = total, 0, 0, self.clock()

    def set(self, done: int, total: int | None) -> None:
        if total != self.total or done < self.done:
            self.start(total)
            self.base = done
        self.done = done

    def status(self) -> str:
        """"k/n (p%), r/s, ETA h:mm:ss" (without the parts that are unknown)."""
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = (self.done - self.base) / elapsed
        if not self.total:
            return f"{self.done}" + (f", {rate:.3g}/s" if self.done > self.base else "")
        left = (self.total - self.done) / rate if rate > 0 else None
        return (f"{self.done}/{self.total} ({100.0 * self.done / self.total:.0f}%), {rate:.3g}/s, "
                f"ETA {clock_time(left)}")


class _Reports:
    """What both renderers make of the reports: the description, the lines to log, and a part's counts."""

    def __init__(self, label: str, describe: Callable[[Fields], str | None], log: Callable[[Fields], str | None],
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.describe, self.log, self.clock = label, describe, log, clock
        self.description = ""
        self.part: str | None = None
        self.part_counter = Counter(clock)

    def take(self, fields: Fields) -> tuple[bool, str | None]:
        """Update from one report's fields; (the description changed, a line to log or None)."""
        if "part" in fields:
            name = str(fields["part"])
            done, total = fields.get("part_done"), fields.get("part_total")
            if name != self.part:
                self.part = name
                self.part_counter.start(total)
            if done is not None:
                self.part_counter.set(int(done), total)
            message = fields.get("message")
            return False, f"{self.label}: {name}: {message}" if message is not None else None
        if not fields:
            return False, None
        before = self.description
        description = self.describe(fields)
        if description is not None:
            self.description = description
        if self.description != before:
            self.part = None  # a new phase: the last one's inner loop is over
        return self.description != before, self.log(fields)

    def part_status(self) -> str:
        return "" if self.part is None else f" [{self.part}: {self.part_counter.status()}]"


class RichProgress:
    """`mambavl.progress.Progress` drawn as one rich task: total from `start`, units from `advance`; a part's
    counts follow the description."""

    def __init__(self, bar: _Bar, label: str, describe: Callable[[Fields], str | None],
                 log: Callable[[Fields], str | None]):
        self.bar, self.label = bar, label
        self.reports = _Reports(label, describe, log)
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
        changed, line = self.reports.take(fields)
        if changed or "part" in fields:
            self.bar.update(self.task, description=self.reports.description + self.reports.part_status())
        if line:
            self.bar.console.print(line)


class PlainProgress:
    """`mambavl.progress.Progress` as plain lines on `stream` (see the module docstring). `interval`: seconds of
    silence before the heartbeat prints the state; `clock`: the time source (a test passes a fake one);
    `heartbeat`: run the heartbeat thread (`stop()` ends it)."""

    def __init__(self, label: str, describe: Callable[[Fields], str | None], log: Callable[[Fields], str | None],
                 stream: TextIO, interval: float = PLAIN_INTERVAL, clock: Callable[[], float] = time.monotonic,
                 heartbeat: bool = True):
        self.stream, self.interval, self.clock = stream, interval, clock
        self.reports = _Reports(label, describe, log, clock)
        self.counter = Counter(clock)
        self.lock = threading.Lock()
        self.last_line = clock()
        self.tenth = 0
        self.finished = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True) if heartbeat else None
        if self._thread is not None:
            self._thread.start()

    def start(self, total: int, **fields: Any) -> None:
        with self.lock:
            self.counter.start(int(total))
            self.tenth = 0
            self._take(fields, force=True)

    def advance(self, n: int = 1, **fields: Any) -> None:
        with self.lock:
            self.counter.set(self.counter.done + n, self.counter.total)
            total = self.counter.total
            tenth = 10 * self.counter.done // total if total else 0
            crossed = tenth > self.tenth
            self.tenth = max(self.tenth, tenth)
            self._take(fields, force=crossed)

    def finish(self, **fields: Any) -> None:
        with self.lock:
            if self.counter.total is not None:
                self.counter.set(self.counter.total, self.counter.total)
            self.reports.take(fields)
            if not self.finished:
                self.finished = True
                self._line("done")

    def tick(self) -> None:
        """The heartbeat: print the state when nothing was printed for `interval` seconds."""
        with self.lock:
            if not self.finished and self.clock() - self.last_line >= self.interval:
                self._line()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(min(self.interval / 3, 10.0)):
            self.tick()

    def _take(self, fields: Fields, force: bool) -> None:
        changed, line = self.reports.take(fields)
        if line:
            self._write(line)
        if force or changed:
            self._line()

    def _line(self, note: str = "") -> None:
        r = self.reports
        text = f"{r.label}: {self.counter.status()}"
        if r.description:
            text += f" - {r.description}"
        text += r.part_status() + (f" ({note})" if note else "")
        self._write(text)

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
        self.last_line = self.clock()


@contextmanager
def rich_progress(label: str, quiet: bool, describe: Callable[[Fields], str | None] = default_describe,
                  log: Callable[[Fields], str | None] = no_log,
                  transient: bool = True) -> Iterator[RichProgress | PlainProgress | None]:
    """A progress receiver on stderr for the duration of the block: a `RichProgress` bar on a terminal, else
    `PlainProgress` lines; None when `quiet` (the library then reports nothing)."""
    if quiet:
        yield None
        return
    console = Console(stderr=True)
    if not console.is_terminal:
        plain = PlainProgress(label, describe, log, sys.stderr)
        try:
            yield plain
        finally:
            plain.stop()
        return
    with _Bar(TextColumn(f"[bold]{label}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(),
              TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=transient) as bar:
        yield RichProgress(bar, label, describe, log)
