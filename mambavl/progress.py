"""One progress protocol for every long library function (extraction, import, training, evaluation, audit, ablation,
efficiency, prediction, the demo and the synthetic dataset writer).

A library function takes `progress: Progress | None` and calls `start(total)` once, `advance(n, **fields)` as work
units finish (fields describe the latest unit: a loss, a stage name, a message) and `finish()` at the end. It never
renders anything; the command line renders with rich (`mambavl.cli.progress`), a program or a test passes its own
object, and `None` means `NO_PROGRESS`, which does nothing.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    """Receiver of progress reports. `total` counts work units (segments, steps, stages); `advance(n)` reports n
    more done, with fields about them (e.g. ``loss=0.7``, ``stage="metrics"``, ``message="training full"``)."""

    def start(self, total: int, **fields: Any) -> None: ...

    def advance(self, n: int = 1, **fields: Any) -> None: ...

    def finish(self, **fields: Any) -> None: ...


class NoProgress:
    """The default receiver: reports nothing."""

    def start(self, total: int, **fields: Any) -> None:
        pass

    def advance(self, n: int = 1, **fields: Any) -> None:
        pass

    def finish(self, **fields: Any) -> None:
        pass


NO_PROGRESS = NoProgress()


def or_none(progress: Progress | None) -> Progress:
    """`progress`, or the no-op receiver for None."""
    return NO_PROGRESS if progress is None else progress


class Recorder:
    """A receiver that keeps what it was told: `total`, `done` (units so far) and `events`, a list of
    ("start" | "advance" | "finish", n, fields). For tests and for programs that poll a run."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.done = 0
        self.finished = False
        self.events: list[tuple[str, int, dict[str, Any]]] = []

    def start(self, total: int, **fields: Any) -> None:
        self.total, self.done = int(total), 0
        self.events.append(("start", int(total), fields))

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self.events.append(("advance", n, fields))

    def finish(self, **fields: Any) -> None:
        self.finished = True
        self.events.append(("finish", 0, fields))


class Stages:
    """Reports a run made of a known number of stages: `enter(message)` completes the stage before (if any) and
    names the one starting; `done()` completes the last one and finishes."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress = or_none(progress)
        self.entered = 0
        self.progress.start(total)

    def enter(self, message: str, **fields: Any) -> None:
        self.progress.advance(1 if self.entered else 0, message=message, **fields)
        self.entered += 1

    def done(self, **fields: Any) -> None:
        self.progress.advance(1 if self.entered else 0, message="done", **fields)
        self.progress.finish()
