"""One progress protocol for every long library function (extraction, import, training, evaluation, audit, ablation,
efficiency, prediction, the demo and the synthetic dataset writer).

A library function takes `progress: Progress | None` and calls `start(total)` once, `advance(n, **fields)` as work
units finish (fields describe the latest unit: a loss, a stage name, a message) and `finish()` at the end. It never
renders anything; the command line renders with rich (`mambavl.cli.progress`), a program or a test passes its own
object, and `None` means `NO_PROGRESS`, which does nothing.

A long call inside a run (the trainings of the demo or of an ablation, an extraction, an evaluation) reports to
`part(progress, label)`: its units reach the run's receiver as fields of zero-unit advances (``part``,
``part_done``, ``part_total`` and the call's own fields), so the one renderer shows the inner loop's advance and no
phase of a run goes silent.
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

    def part(self, label: str) -> Progress:
        """The receiver for a long call inside the current stage (see `Part`)."""
        return part(self.progress, label)


class Part:
    """The receiver of a long call inside a run: forwards the call's reports to `parent` without advancing the
    parent's units, as ``advance(0, part=label, part_done=k, part_total=n, **fields)``. A part inside a part joins
    the labels ("ablation: training full (seed 0)")."""

    def __init__(self, parent: Progress, label: str):
        self.parent, self.label = parent, label
        self.total: int | None = None
        self.done = 0

    def start(self, total: int, **fields: Any) -> None:
        self.total, self.done = int(total), 0
        self._forward(fields)

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self._forward(fields)

    def finish(self, **fields: Any) -> None:
        if self.total is not None:
            self.done = self.total
        self._forward(fields)

    def _forward(self, fields: dict[str, Any]) -> None:
        if "part" in fields:  # a part of this part: its own counts, under both labels
            fields = {**fields, "part": f"{self.label}: {fields['part']}"}
        else:
            fields = {**fields, "part": self.label, "part_done": self.done, "part_total": self.total}
        self.parent.advance(0, **fields)


def part(progress: Progress | None, label: str) -> Progress:
    """The receiver for a long call inside a run reporting to `progress` (see `Part`); no-op for None."""
    return NO_PROGRESS if progress is None or progress is NO_PROGRESS else Part(progress, label)
