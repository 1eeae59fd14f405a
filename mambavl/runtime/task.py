"""What a task asks of the model, in one table: `TaskSpec` per `Task`.

Every stage that needs to know "which questions do the heads read", "which QA kinds exist", "which cache window",
"which challenge does a submission go to" or "which metric picks best.pt" asks the spec instead of comparing task
strings. Adding a QA kind is an edit here (the kinds of a task), in `mambavl.fuse.config.QA_TARGET` (what the kind is
answered with) and in the extraction templates (`mambavl.extract.questions.TEMPLATES`, `schema.TEMPLATE_KINDS`);
docs/architecture.md walks through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mambavl.cache import schema
from mambavl.errors import InputError
from mambavl.fuse.config import QA_TARGET


class Task(str, Enum):
    """What the heads predict: the action in the window (recognition) or the action after it (anticipation)."""

    RECOGNITION = "recognition"
    ANTICIPATION = "anticipation"


@dataclass(frozen=True)
class TaskSpec:
    """One task's questions, window, QA kinds and reporting conventions.

    head_kinds: the template question kinds the verb and noun heads read (in that order).
    qa_kinds: the kinds a QA step may draw and evaluation answers, in report order; each names its answer table in
        `mambavl.fuse.config.QA_TARGET`.
    multi_label_kinds: QA kinds scored per candidate (sigmoid, the scene question) instead of one softmax.
    window: the cache window the task reads (`schema.RECOGNITION` / `schema.ANTICIPATION`).
    challenge: the EK-100 challenge a submission of this task goes to (its JSON "challenge" field).
    ranking: how the official evaluation scores it: "accuracy" (top-k accuracy) or "class_mean_recall" (mean top-5
        recall over classes, the anticipation challenge's measure).
    """

    task: Task
    head_kinds: tuple[str, str]
    qa_kinds: tuple[str, ...]
    window: str
    challenge: str
    ranking: str
    multi_label_kinds: tuple[str, ...] = ()

    def qa_kinds_for(self, has_nouns: bool, has_action_answers: bool = True) -> tuple[str, ...]:
        """The QA kinds that can be asked of data with (or without) nouns and action answers: a dataset with one
        label set has no noun answers, and a cache or checkpoint without action answers cannot score the action
        question."""
        return tuple(k for k in self.qa_kinds
                     if (has_nouns or QA_TARGET[k] == "verb") and (has_action_answers or QA_TARGET[k] != "action"))

    def selection_metric(self, has_nouns: bool) -> str:
        """The validation metric that picks best.pt: action top-1 (verb and noun both right), or verb top-1 for data
        with one label set."""
        return "val_action_top1" if has_nouns else "val_verb_top1"

    def headline(self, head: str) -> str:
        """The name of `head`'s headline number in a flat metrics table (the audit's): top-1 accuracy, or the mean
        top-5 recall of class-mean-recall tasks (e.g. "verb_top1", "verb_recall@5")."""
        return f"{head}_top1" if self.ranking == "accuracy" else f"{head}_recall@5"

    def is_multi_label(self, kind: str) -> bool:
        return kind in self.multi_label_kinds


# The scene question is about the segment's own objects, which the anticipation window does not show, so
# anticipation QA asks only what comes next.
TASKS: dict[Task, TaskSpec] = {
    Task.RECOGNITION: TaskSpec(
        task=Task.RECOGNITION, head_kinds=("verb", "noun"), qa_kinds=("verb", "noun", "scene", "action"),
        window=schema.RECOGNITION, challenge="action_recognition", ranking="accuracy", multi_label_kinds=("scene",)),
    Task.ANTICIPATION: TaskSpec(
        task=Task.ANTICIPATION, head_kinds=("next_verb", "next_noun"), qa_kinds=("next_verb", "next_noun"),
        window=schema.ANTICIPATION, challenge="action_anticipation", ranking="class_mean_recall"),
}


def task_spec(task: Task | str) -> TaskSpec:
    """The spec of `task` (a Task or its value); InputError naming the valid tasks."""
    try:
        return TASKS[Task(task)]
    except ValueError:
        raise InputError(f"task {task!r} is not one of {[t.value for t in Task]}") from None


def spec_of_window(window: str) -> TaskSpec:
    """The spec of the task that reads cache window `window`."""
    for spec in TASKS.values():
        if spec.window == window:
            return spec
    raise InputError(f"cache window {window!r} is not one of {[s.window for s in TASKS.values()]}")
