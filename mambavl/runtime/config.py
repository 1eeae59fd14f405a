"""Run configuration shared by training and every later stage: `TrainConfig`, saved whole in every trained model
(`mambavl.runtime.artifact`)."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from mambavl.precision import Precision, as_precision
from mambavl.errors import InputError
from mambavl.extract.questions import QuestionSource
from mambavl.fuse.presets import preset_train_overrides
from mambavl.runtime.task import Task


class RunLogger(str, Enum):
    """Where a run's scalars go live, besides metrics.csv (always written): TensorBoard event files in
    out_dir/tensorboard, Weights & Biases (honours WANDB_MODE, e.g. offline), or nowhere else."""

    TENSORBOARD = "tensorboard"
    WANDB = "wandb"
    NONE = "none"


class Compile(str, Enum):
    """How a training run compiles the fusion with `torch.compile` (`mambavl.fuse.model.MambaVL.compile_fusion`:
    each layer's arithmetic around the selective scan; the scan stays the chosen kernel). off: eager. fusion: the
    default inductor mode, on CPU or CUDA (the first steps pay the compile: seconds to minutes). cudagraphs: inductor's
    "reduce-overhead" mode, which on CUDA records the compiled parts as CUDA graphs and replays them, one launch per
    part instead of one per kernel; CUDA only. Validation then runs the fusion eagerly (a CUDA graph's outputs are
    overwritten by its next replay). The compiled model computes what the eager one does, up to float rounding."""

    OFF = "off"
    FUSION = "fusion"
    CUDAGRAPHS = "cudagraphs"


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved whole in the checkpoint.

    `model_overrides` are ModelConfig fields applied on top of the preset (dims and class counts come from the cache).
    `frames` is the number of frame tokens the model consumes, sub-sampled from the cached F (0 = all F).
    `batch_size` is per process under torchrun. `min_steps` is the fewest recognition steps a run makes: on data too
    small for it at `epochs` x ceil(rows / batch_size), the batch shrinks (not below 8) and each epoch makes several
    passes over the training rows (`mambavl.train.plan_steps`); 0 turns this off.
    `precision` (`mambavl.device.Precision`): fp32, bf16 or fp16 autocast of the forward passes (fp16 with loss
    scaling, CUDA only); auto = bf16 on CUDA (fp16 on a GPU without bf16), fp32 on the CPU. Weights, optimiser state
    and the selective scan's state stay float32. A resumed run may change it (recorded like `epochs`).
    `patience` (epochs) and `min_delta` (percentage points) stop a run early: after `patience` epochs in a row in
    which the validation selection metric did not rise by more than `min_delta` above its best so far, the run stops
    (0 = off; without a validation cache there is nothing to stop on). `resume=True` continues the run in `out_dir`
    from last.pt; a resumed run may change `epochs`, `patience`, `min_delta` and `precision` (recorded in the run, see
    `mambavl.train.train`).
    Presets may carry training settings (no-qa: qa_weight 0; paper: 2 warm-up epochs): they replace fields left at
    their class default, never values set to something else.
    """

    train_cache: str
    val_cache: str | None
    out_dir: str
    preset: str = "small"
    model_overrides: dict = field(default_factory=dict)
    task: Task = Task.RECOGNITION
    question_source: QuestionSource = QuestionSource.TEMPLATES
    epochs: int = 20
    patience: int = 5
    min_delta: float = 0.0
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.03
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    qa_weight: float = 1.0
    qa_every: int = 2
    frames: int = 8
    min_steps: int = 1000
    seed: int = 0
    device: str = "auto"
    precision: Precision = Precision.AUTO
    compile: Compile = Compile.OFF
    num_workers: int = 0
    resume: bool = False
    # question_source "predicted": k candidates per head, K cross-fitting folds, first-pass epochs (0 = epochs), and
    # an optional checkpoint used as the evaluation first pass (see `mambavl.train.cross_fit_candidates`).
    candidates_k: int = 5
    candidate_folds: int = 5
    candidate_epochs: int = 0
    candidates_from: str | None = None
    allow_incomplete: bool = False  # train / validate on the finished rows of a cache whose extraction did not finish
    logger: RunLogger = RunLogger.TENSORBOARD  # live scalars (mambavl.train.logs); not part of what the run is

    def __post_init__(self) -> None:
        try:
            self.task = Task(self.task)
        except ValueError:
            raise InputError(f"train config: task {self.task!r} is not one of {[t.value for t in Task]}") from None
        try:
            self.question_source = QuestionSource(self.question_source)
        except ValueError:
            raise InputError(
                f"train config: question_source {self.question_source!r} is not one of "
                f"{[q.value for q in QuestionSource]}"
            ) from None
        self.precision = as_precision(self.precision, "train config: precision")
        try:
            self.compile = Compile(self.compile)
        except ValueError:
            raise InputError(f"train config: compile {self.compile!r} is not one of {[c.value for c in Compile]}"
                             ) from None
        try:
            self.logger = RunLogger(self.logger)
        except ValueError:
            raise InputError(f"train config: logger {self.logger!r} is not one of {[x.value for x in RunLogger]}"
                             ) from None
        if self.logger is RunLogger.WANDB and importlib.util.find_spec("wandb") is None:
            raise InputError("train config: logger 'wandb' needs the wandb package (pip install wandb); or log to "
                             "tensorboard or none")
        self.train_cache = str(self.train_cache)
        self.val_cache = None if self.val_cache in (None, "") else str(self.val_cache)
        self.out_dir = str(self.out_dir)
        self.candidates_from = None if self.candidates_from in (None, "") else str(self.candidates_from)
        self.model_overrides = dict(self.model_overrides or {})
        self._apply_preset_training()
        checks = (
            ("epochs", self.epochs >= 1),
            ("patience", self.patience >= 0),
            ("min_delta", self.min_delta >= 0),
            ("batch_size", self.batch_size >= 1),
            ("lr", self.lr > 0),
            ("weight_decay", self.weight_decay >= 0),
            ("warmup_epochs", self.warmup_epochs >= 0),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1),
            ("grad_clip", self.grad_clip >= 0),
            ("label_smoothing", 0 <= self.label_smoothing < 1),
            ("qa_weight", self.qa_weight >= 0),
            ("qa_every", self.qa_every >= 1),
            ("frames", self.frames >= 0),
            ("min_steps", self.min_steps >= 0),
            ("num_workers", self.num_workers >= 0),
            ("candidates_k", self.candidates_k >= 1),
            ("candidate_folds", self.candidate_folds >= 2),
            ("candidate_epochs", self.candidate_epochs >= 0),
        )
        for name, ok in checks:
            if not ok:
                raise InputError(f"train config: {name}={getattr(self, name)!r} is out of range")
        if self.candidates_from and self.question_source != QuestionSource.PREDICTED:
            raise InputError("train config: candidates_from is only used with question_source 'predicted'")

    def _apply_preset_training(self) -> None:
        """Some presets carry training settings (no-qa: qa_weight 0; paper: 2 warm-up epochs). They replace the
        class defaults, not values set explicitly: a field still at its default takes the preset's value."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, value in preset_train_overrides(self.preset).items():
            if key not in defaults:
                raise InputError(f"preset {self.preset!r} sets unknown training field {key!r}")
            if getattr(self, key) == defaults[key]:
                setattr(self, key, value)


def plain(value: Any) -> Any:
    """Enums -> their value, numpy scalars -> Python, recursively: checkpoints must load with weights_only=True."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value
