"""Stage 2: train the MambaVL fusion on a feature cache.

Only cached tensors are touched here (through `mambavl.cache.reader`): frame tokens, question tokens and answer
embeddings were computed once by stage 1, so an epoch over EK-100 costs seconds to minutes on one GPU.

Objectives (alternating, as in the paper):

* recognition steps — cross-entropy with label smoothing on the verb, noun and action heads. The action vocabulary
  is the set of (verb, noun) pairs seen in the *training* cache labels (EK-100 convention); it is stored in the
  checkpoint, and segments whose pair is not in it are ignored by the action-head loss and metric.
* QA steps — one after every `qa_every` recognition steps, on the same batch, weighted by `qa_weight`
  (`qa_weight=0` runs none: the no-QA ablation). Each QA step asks one kind of template question for the whole batch
  (verb / noun / scene; for anticipation next_verb / next_noun), fuses the video with it, maps the fused vector into
  the text space (`model.qa_embed`) and scores the answer candidates of the cache's AnswerBank (`model.qa_logits`):
  cross-entropy for verb/noun answers, multi-label BCE over nouns for the scene question (targets = all nouns of the
  segment). QA targets come from training annotations only.

Question protocol (`question_source`, recorded in the checkpoint and in every metrics row):

* ``templates`` (default) — label-free template questions: the verb head reads a `verb`-kind question, the noun head a
  `noun`-kind one (`next_verb` / `next_noun` for anticipation). Training draws one paraphrase uniformly per sample;
  evaluation always uses paraphrase 0, the fixed evaluation phrasing.
* ``annotation`` — the paper's narration-derived questions (other label masked), `questions/per_segment/annotation`.
* ``file`` — user-supplied questions, `questions/per_segment/file`.
  Rows without a question of the chosen source fall back to the evaluation template and are counted
  (`question_fallbacks` in the metrics).

Reproducibility: every random draw of an epoch (order, frames, paraphrases, QA kinds, dropout) comes from seeds
derived from (seed, epoch, stream, rank), and the checkpoint carries optimizer, scheduler and RNG states, so a run that
is stopped after k epochs and resumed ends with exactly the weights of an uninterrupted run (bitwise on CPU).

Distributed: launched under torchrun (WORLD_SIZE > 1), W processes take one step per *global* batch of
batch_size x W rows of the seeded permutation, each process a contiguous part of it (`batch_size` is per process).
Frames, paraphrases and QA kinds are drawn for the whole global batch from one stream seeded alike on every rank, and
each rank's loss is its share of the global batch's mean (sum over its rows / the global count x W), so the gradient
DistributedDataParallel averages is the gradient one process with the global batch would take, the last, shorter
batch included: the runs agree up to float rounding (tests/test_ddp.py; dropout masks are drawn per rank, so with
dropout they agree in distribution only). Validation scores each rank's part of the split and gathers the parts
(the whole split, once); epoch losses add the ranks' shares and question-fallback counts are summed. Rank 0 writes
checkpoints (atomically) and logs; every rank loads the checkpoint on resume.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mambavl import __version__
from mambavl import metrics as M
from mambavl.cache import schema
from mambavl.cache.reader import CacheFile, SegmentDataset, open_cache, require_complete
from mambavl.data.sampling import gather_frames, train_frame_indices
from mambavl.device import join_process_group, resolve_device
from mambavl.errors import InputError, TrainingStopped, check_writable
from mambavl.extract.questions import QuestionSource
from mambavl.fuse.config import ModelConfig, question_is_offset
from mambavl.fuse.model import MambaVL, model_config_from_dict
from mambavl.fuse.presets import preset_model_fields
from mambavl.fuse.qa import answer_targets, qa_loss, scene_targets, single_label_loss
from mambavl.progress import NO_PROGRESS, Progress, or_none
from mambavl.runtime import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_KIND,
    HEAD_KINDS,
    QA_KINDS,
    QA_TARGET,
    SAMPLING_ATTRS,
    Labels,
    Questions,
    TrainConfig,  # also re-exported: `from mambavl.train import TrainConfig, train`
    action_vocab,
    atomic_copy,
    action_answers,
    atomic_torch_save,
    batches,
    build_model,
    labelled_rows,
    load_checkpoint,
    load_labels,
    loader,
    plain,
    predict_logits,
    question_tokens,
    require_window,
    validation_metrics,
    window_of,
)
from mambavl.runtime.candidates import FirstPass, fold_ids
from mambavl.runtime.scoring import cache_candidates

@dataclass
class TrainResult:
    """Outcome of `train`: best validation metric (action top-1, or verb top-1 without nouns; None without a
    validation cache), checkpoint paths (None where not written, e.g. on ranks > 0 or without validation for best),
    one metrics dict per epoch (the rows of metrics.csv), the name of the selection metric, and the trained model
    (unwrapped, on its device)."""

    best_metric: float | None
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    history: list[dict]
    best_metric_name: str = "val_action_top1"
    model: nn.Module | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers; hashing keeps streams (seed, epoch, purpose, rank) independent."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: no weight decay for parameters tagged `_no_weight_decay` (A_log, D, norms, biases, as
    mamba-ssm tags them where they are defined) or with fewer than 2 dims; decay for the rest."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "_no_weight_decay", False) or p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def question_warning(mcfg: ModelConfig, source: QuestionSource) -> str | None:
    """Why a configuration cannot use its questions, or None. With template questions every clip is asked the same
    question per head; in a fusion where the question only adds its own term (`question_is_offset`: the parallel
    layout, preset `paper`) that term is then a constant, so `h_verb - h_noun` is the same vector for every clip."""
    if QuestionSource(source) != QuestionSource.TEMPLATES or not question_is_offset(mcfg):
        return None
    return ("this configuration cannot use its questions: in the parallel layout (preset 'paper') the question "
            "stream never sees the video, and with template questions (one fixed question per head) its pooled output "
            "is the same vector for every clip, so the model is video-only plus a per-head bias. Use the joint layout "
            "(preset 'small'), or questions that differ per clip (--questions annotation / file), to let the question "
            "change how the video is read. See docs/model.md.")


# The smallest batch `plan_steps` shrinks to: smaller batches make noisy steps without making them much cheaper.
MIN_BATCH = 8


@dataclass(frozen=True)
class StepPlan:
    """How an epoch is cut into recognition steps: `passes` passes over the rows in batches of `batch_size`."""

    batch_size: int
    passes: int
    steps_per_epoch: int


def plan_steps(rows: int, batch_size: int, epochs: int, min_steps: int) -> StepPlan:
    """Batch size and passes per epoch so that a run makes at least `min_steps` recognition steps.

    rows: training rows per process. With `epochs * ceil(rows / batch_size) >= min_steps` (or min_steps 0) nothing
    changes: one pass, the given batch. Otherwise the batch shrinks towards rows * epochs / min_steps, not below
    MIN_BATCH (nor above the given batch), and when that is still short each epoch makes `passes` passes over the rows,
    each in its own order and with its own frame draws. Measured (docs/model.md): on 72 clips the default batch of 64
    gives 40 steps in 20 epochs and every model stays at the majority class; 1000 steps reach the linear probe.
    """
    steps = math.ceil(rows / batch_size)
    if min_steps <= 0 or steps * epochs >= min_steps:
        return StepPlan(batch_size, 1, steps)
    batch = min(batch_size, max(MIN_BATCH, (rows * epochs) // min_steps))
    steps = math.ceil(rows / batch)
    passes = max(1, math.ceil(min_steps / (steps * epochs)))
    return StepPlan(batch, passes, steps * passes)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then cosine decay to `min_lr_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "generator": generator.get_state(),
    }


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    generator.set_state(state["generator"].cpu())


# ----------------------------------------------------------------------------------------------------------------
# forward passes


class _Objective(nn.Module):
    """Both objectives behind one forward, so DistributedDataParallel sees (and synchronises) every step.

    Returns only tensors that enter the loss: DDP must not wait for gradients of outputs nobody uses.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, mode: str, video, video_mask, q_tokens, q_mask, candidates=None):
        if mode == "rec":
            out = self.model(video, video_mask, q_tokens, q_mask)
            return {k: out[k] for k in ("verb", "noun", "action") if k in out}
        h = self.model.fuse(video, video_mask, q_tokens, q_mask)  # (B, d)
        if mode == "scene":  # multi-label: scaled cosine + the learnable prior bias
            return self.model.scene_logits(self.model.qa_embed(h), candidates)  # (B, Nn)
        return self.model.qa_logits(self.model.qa_embed(h), candidates)  # (B, K)


# ----------------------------------------------------------------------------------------------------------------
# logs


METRIC_COLUMNS = (
    "epoch", "step", "lr", "task", "question_source",
    "train_loss", "train_loss_verb", "train_loss_noun", "train_loss_action", "train_loss_qa",
    "rec_steps", "qa_steps", "batch_size", "passes", "question_fallbacks",
    "val_verb_top1", "val_verb_top5", "val_noun_top1", "val_noun_top5",
    "val_action_top1", "val_action_top5", "val_action_head_top1", "val_question_fallbacks",
    "time_s",
)  # fmt: skip


def _write_metrics_csv(history: list[dict], path: Path) -> None:
    """Rewrite metrics.csv from the whole history (atomic; a resumed run keeps earlier rows)."""
    columns = [c for c in METRIC_COLUMNS if any(c in row for row in history)]
    columns += sorted({k for row in history for k in row} - set(columns))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in columns})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def _summary_writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.csv is always written
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


# ----------------------------------------------------------------------------------------------------------------
# distributed


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_setup(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    join_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@dataclass
class _Part:
    """One training step seen from one rank: the global batch as dataset positions (G,), cache rows (G,) and their
    cached frame counts (G,); this rank's slice of it; the weight of this rank's loss (the world size, or 0 for a
    stand-in row, see `_global_batches`)."""

    positions: np.ndarray
    grows: torch.Tensor
    num_frames: torch.Tensor
    part: slice
    scale: float


def _global_batches(positions: np.ndarray, rows: np.ndarray, num_frames: np.ndarray, batch_size: int,
                    d: _Dist) -> list[_Part]:
    """Cut an epoch's dataset positions into global batches of batch_size x world (`rows`: position -> cache row;
    `num_frames`: cache row -> cached frames). Each rank takes a contiguous part of each batch (`np.array_split`:
    parts differ by at most one row), so every rank runs the same steps on the same global batches as one process
    with batch_size x world would, the last, shorter batch included. A rank whose part of a short last batch is
    empty takes the batch's first row as a stand-in with zero weight, so that it still joins the all-reduce."""
    out = []
    for lo in range(0, len(positions), batch_size * d.world):
        pos = positions[lo : lo + batch_size * d.world]
        bounds = np.cumsum([0] + [len(x) for x in np.array_split(np.arange(len(pos)), d.world)])
        a, b = int(bounds[d.rank]), int(bounds[d.rank + 1])
        part, scale = (slice(a, b), float(d.world)) if b > a else (slice(0, 1), 0.0)
        out.append(_Part(pos, torch.as_tensor(rows[pos], dtype=torch.long),
                         torch.as_tensor(num_frames[rows[pos]], dtype=torch.long), part, scale))
    return out


def _gather_parts(obj: Any, d: _Dist) -> list:
    """Every rank's `obj`, in rank order (just [obj] for one process)."""
    if d.world == 1:
        return [obj]
    box: list = [None] * d.world
    dist.all_gather_object(box, obj)
    return box


# ----------------------------------------------------------------------------------------------------------------
# the run's data, optimiser and checkpoints


@dataclass
class _Data:
    """The caches of one run and what training reads from them: labelled rows, labels, questions, vocabularies and
    (with QA steps) the answer candidates on the device."""

    train_cache: CacheFile
    val_cache: CacheFile | None
    window: str
    train_rows: np.ndarray  # (N,) labelled valid rows of the training cache
    val_rows: np.ndarray | None
    verbs: list[str]
    nouns: list[str]
    action_pairs: list[tuple[int, int]]  # the action vocabulary: (verb, noun) pairs seen in training labels
    train_labels: Labels
    val_labels: Labels | None
    train_q: Questions
    val_q: Questions | None
    qa_kinds: tuple[str, ...]  # question kinds a QA step may draw
    candidates: dict[str, torch.Tensor] | None  # QA target kind -> answer embeddings (K, Dt); None without QA
    # question_source "predicted": the first pass, the training rows' candidates (N_train_cache, 2, k) and the
    # candidates' recall@k on the training and validation rows (metrics row fields)
    first_pass: FirstPass | None = None
    train_candidates: np.ndarray | None = None
    candidate_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def has_nouns(self) -> bool:
        return len(self.nouns) > 0

    def data_dims(self) -> dict[str, int]:
        """The ModelConfig fields that come from the data (`mambavl.runtime.DATA_FIELDS`)."""
        return {
            "video_dim": int(self.train_cache.attrs["feature_dim"]),
            "text_dim": int(self.train_cache.attrs["text_dim"]),
            "num_verbs": len(self.verbs),
            "num_nouns": len(self.nouns),
            "num_actions": len(self.action_pairs),
        }


def _open_caches(cfg: TrainConfig, ckpt: dict | None, run: Path) -> tuple[CacheFile, CacheFile | None]:
    """The training and validation caches, checked against each other (and against the run being resumed)."""
    window = window_of(cfg.task)
    train_cache = open_cache(cfg.train_cache)
    require_window(train_cache, window)
    require_complete(train_cache, window, cfg.allow_incomplete, "train")
    if ckpt is not None:
        schema.check_compatible(ckpt["cache_attrs"], train_cache.attrs, f"run {run}", f"train cache {train_cache.path}")
    if cfg.val_cache is None:
        return train_cache, None
    val_cache = open_cache(cfg.val_cache)
    schema.check_compatible(
        train_cache.attrs, val_cache.attrs, f"train cache {train_cache.path}", f"val cache {val_cache.path}"
    )
    if list(val_cache.verb_keys) != list(train_cache.verb_keys) or list(val_cache.noun_keys) != list(
        train_cache.noun_keys
    ):
        raise InputError(f"val cache {val_cache.path} has other verb/noun classes than train cache {train_cache.path}")
    require_window(val_cache, window)
    require_complete(val_cache, window, cfg.allow_incomplete, "val")
    return train_cache, val_cache


def _load_data(cfg: TrainConfig, ckpt: dict | None, run: Path, device: torch.device, d: _Dist) -> _Data:
    """Open and check the caches; the action vocabulary comes from the resumed checkpoint or the training labels.
    Under `predicted`, the candidate tables: every process computes them alike (the same seeds), then rank 0's are
    sent to all, so that no rank's candidates can differ by a nondeterministic GPU kernel."""
    window = window_of(cfg.task)
    if cfg.question_source == QuestionSource.PREDICTED:
        _check_self_questioning(cfg)
    train_cache, val_cache = _open_caches(cfg, ckpt, run)
    train_rows = labelled_rows(train_cache, window, "train")
    val_rows = labelled_rows(val_cache, window, "val") if val_cache is not None else None
    verbs, nouns = list(train_cache.verb_keys), list(train_cache.noun_keys)
    if ckpt is not None:
        action_pairs = [tuple(p) for p in ckpt["vocab"]["action_pairs"]]
    else:
        action_pairs = action_vocab(train_cache, train_rows) if nouns else []
    pair_index = {p: i for i, p in enumerate(action_pairs)}
    train_labels = load_labels(train_cache, pair_index)
    val_labels = load_labels(val_cache, pair_index) if val_cache is not None else None
    head_kinds = HEAD_KINDS[cfg.task]
    first_pass, train_cand, val_cand, recall = None, None, None, {}
    if cfg.question_source == QuestionSource.PREDICTED:
        if ckpt is not None:  # resume: the first pass and the training rows' candidates travel in the checkpoint
            first_pass = FirstPass.from_state(ckpt["first_pass"], device)
            train_cand = ckpt["train_candidates"].numpy()
        else:
            # each process trains the folds alone, with the global batch (batch_size is per process)
            first_pass, train_cand = cross_fit_candidates(dataclasses.replace(cfg, batch_size=cfg.batch_size * d.world),
                                                          train_cache, train_rows, train_labels, device)
        if val_cache is not None:
            val_cand, _ = cache_candidates(first_pass, val_cache, window, val_rows, device, max(cfg.batch_size, 64),
                                           cfg.frames, cfg.num_workers)
        if d.world > 1:
            tables = [train_cand, val_cand]
            dist.broadcast_object_list(tables, src=0)
            train_cand, val_cand = tables
        recall = candidate_recall(train_cand, train_rows, train_labels, "train")
        if val_cache is not None:
            recall.update(candidate_recall(val_cand, val_rows, val_labels, "val"))
    train_q = Questions(train_cache, cfg.question_source, head_kinds, candidates=train_cand)
    val_q = (Questions(val_cache, cfg.question_source, head_kinds, candidates=val_cand, evaluation=True)
             if val_cache is not None else None)
    qa_kinds = tuple(k for k in QA_KINDS[cfg.task] if nouns or QA_TARGET[k] == "verb")
    candidates = None
    if cfg.qa_weight > 0:
        answers = train_cache.answers()
        action = action_answers(train_cache, action_pairs) if "action" in qa_kinds else None  # (A, Dt)
        if action is None:  # a cache without the action question (or its answers): the other kinds only
            qa_kinds = tuple(k for k in qa_kinds if k != "action")
        for kind in qa_kinds:
            if kind not in train_q.templates or len(train_q.templates[kind]) == 0:
                raise InputError(f"cache {train_cache.path} has no {kind!r} template questions for QA steps")
        noun = torch.as_tensor(answers.noun, dtype=torch.float32).to(device) if nouns else None  # (Nn, Dt)
        candidates = {"verb": torch.as_tensor(answers.verb, dtype=torch.float32).to(device), "noun": noun,
                      "scene": noun, "action": action.to(device) if action is not None else None}  # fmt: skip
    return _Data(
        train_cache=train_cache,
        val_cache=val_cache,
        window=window,
        train_rows=train_rows,
        val_rows=val_rows,
        verbs=verbs,
        nouns=nouns,
        action_pairs=action_pairs,
        train_labels=train_labels,
        val_labels=val_labels,
        train_q=train_q,
        val_q=val_q,
        qa_kinds=qa_kinds,
        candidates=candidates,
        first_pass=first_pass,
        train_candidates=train_cand,
        candidate_metrics=recall,
    )


class NonFiniteLoss(ArithmeticError):
    """A training loss that is NaN or inf (raised before the step; `_train` adds the epoch and step)."""


class Optimizer:
    """AdamW (no decay for tagged parameters), warm-up + cosine schedule per recognition step, mixed precision on
    CUDA (bf16, or fp16 with loss scaling where bf16 is unsupported) and gradient clipping."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, total_steps: int, warmup_steps: int, device: torch.device):
        self.model, self.grad_clip, self.device_type = model, cfg.grad_clip, device.type
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, cfg.min_lr_ratio)
        )
        self.use_amp = cfg.amp and device.type == "cuda"
        # bf16 needs no loss scaling; fp16 (older GPUs) does. The dtype is irrelevant when autocast is off.
        self.amp_dtype = torch.float16 if self.use_amp and not torch.cuda.is_bf16_supported() else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device_type, dtype=self.amp_dtype, enabled=self.use_amp)

    def step(self, loss: torch.Tensor) -> None:
        """One optimiser step on `loss` (the schedule advances separately, per recognition step: `schedule`).

        NonFiniteLoss (before any gradient is applied) when the loss is NaN or inf on any process."""
        bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0], device=loss.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad)  # every rank stops together, none waits in the gradient all-reduce
        if float(bad) > 0:
            raise NonFiniteLoss(float(loss.detach()))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def schedule(self) -> None:
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }

    def load_state_dict(self, ckpt: dict) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])


@dataclass
class _Progress:
    """Where a run stands; saved in last.pt and restored on resume."""

    epoch: int = 0  # epochs completed
    step: int = 0  # recognition steps taken
    qa_steps: int = 0
    best_metric: float | None = None
    history: list[dict] = field(default_factory=list)


class Checkpointer:
    """Writes the run folder on rank 0: train_config.json, last.pt every epoch (atomic), best.pt when the selection
    metric improves, metrics.csv and tensorboard scalars (when tensorboard is installed)."""

    def __init__(self, out_dir: Path, header: dict, cfg: TrainConfig, main: bool):
        self.out_dir, self.header, self.main = out_dir, header, main
        self.last, self.best = out_dir / "last.pt", out_dir / "best.pt"
        self.writer = None
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "train_config.json").write_text(json.dumps(plain(asdict(cfg)), indent=2, sort_keys=True) + "\n")
            self.writer = _summary_writer(out_dir)

    def save(self, model: nn.Module, opt: Optimizer, state: _Progress, sample_gen: torch.Generator,
             improved: bool) -> None:
        """Checkpoint the end of epoch `state.epoch` and log its metrics row (`state.history[-1]`)."""
        if not self.main:
            return
        ckpt = dict(self.header)
        ckpt.update(model=model.state_dict(), **opt.state_dict(), epoch=state.epoch, step=state.step,
                    qa_steps=state.qa_steps, rng=_rng_state(sample_gen), best_metric=state.best_metric,
                    history=state.history)  # fmt: skip
        atomic_torch_save(ckpt, self.last)
        if improved:
            atomic_copy(self.last, self.best)
        _write_metrics_csv(state.history, self.out_dir / "metrics.csv")
        if self.writer is not None:
            for key, value in state.history[-1].items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.writer.add_scalar(key, value, state.epoch)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _resume_checkpoint(cfg: TrainConfig, last_path: Path) -> dict | None:
    """last.pt of the run to resume (checked against `cfg`), None for a fresh run; InputError when a fresh run would
    overwrite an existing one or there is nothing to resume."""
    if not cfg.resume:
        if last_path.exists():
            raise InputError(
                f"{last_path.parent} already holds a run ({last_path.name}); resume it or choose another output folder"
            )
        return None
    if not last_path.is_file():
        raise InputError(f"cannot resume: {last_path} does not exist")
    ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise InputError(f"cannot resume: {last_path} is not a mambavl checkpoint")
    _check_resume_config(cfg, ckpt["train_config"], last_path)
    return ckpt


def _checkpoint_header(cfg: TrainConfig, mcfg: Any, data: _Data, metric_name: str) -> dict:
    """The part of every checkpoint that does not change during a run: format, configs, vocabularies and the
    cache attributes (what the features are, for compatibility checks, and how they were sampled, so that
    `mambavl predict` can extract a new clip the same way without the cache)."""
    attrs = data.train_cache.attrs
    header = {
        "kind": CHECKPOINT_KIND,
        "format": CHECKPOINT_FORMAT,
        "package_version": __version__,
        "model_config": mcfg.to_dict(),
        "train_config": plain(asdict(cfg)),
        "task": cfg.task.value,
        "question_source": cfg.question_source.value,
        "window": data.window,
        "vocab": {"verbs": data.verbs, "nouns": data.nouns, "action_pairs": [list(p) for p in data.action_pairs]},
        "cache_attrs": {
            **{k: plain(schema.normalise_attr(attrs[k])) for k in SAMPLING_ATTRS if k in attrs},
            **{k: plain(schema.normalise_attr(attrs.get(k))) for k in schema.COMPATIBILITY_ATTRS},
            **question_tokens(data.train_cache),
        },
        "best_metric_name": metric_name,
    }
    if data.candidates is not None and data.candidates.get("action") is not None:
        # the action QA answers, in the order of vocab["action_pairs"]: evaluation scores them without the training
        # cache (an evaluated cache's own action answers are the pairs of *its* labels)
        header["action_answers"] = data.candidates["action"].detach().cpu()  # (A, Dt)
    if data.first_pass is not None:
        header["first_pass"] = data.first_pass.state()
        header["train_candidates"] = torch.as_tensor(data.train_candidates)  # (N, 2, k), -1 outside training rows
        header["candidate_recall"] = dict(data.candidate_metrics)
    return header


# ----------------------------------------------------------------------------------------------------------------
# self-questioning: the cross-fitted first pass


def candidate_recall(table: np.ndarray, rows: np.ndarray, labels: Labels, split: str) -> dict[str, float]:
    """Candidate recall@k (%) of the verb (and noun) candidates of `rows`: {"<split>_candidate_recall_verb": ...}.
    table (N, 2, k) int64 from `cache_candidates` / `cross_fit_candidates`."""
    out = {f"{split}_candidate_recall_verb": 100 * M.recall_at_k(table[rows, 0], labels.verb[rows].numpy())}
    noun = labels.noun[rows].numpy()
    if (noun >= 0).any():
        out[f"{split}_candidate_recall_noun"] = 100 * M.recall_at_k(table[rows, 1], noun)
    return out


def _fit_video_only(model: nn.Module, cache: CacheFile, rows: np.ndarray, labels: Labels, cfg: TrainConfig,
                    epochs: int, device: torch.device, seed: int) -> None:
    """Train a video-only model (a first-pass fold) on `rows` in one process with the run's optimiser, schedule,
    step floor (`plan_steps`), smoothing and frame sub-sampling, recognition loss only; seeded by `seed`."""
    dataset = SegmentDataset(cache, window=window_of(cfg.task), indices=rows)
    plan = plan_steps(len(rows), cfg.batch_size, epochs, cfg.min_steps)
    per_epoch = plan.passes * math.ceil(len(rows) / plan.batch_size)
    opt = Optimizer(model, cfg, per_epoch * epochs, int(round(cfg.warmup_epochs * per_epoch)), device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    model.train()
    for _ in range(epochs * plan.passes):
        order = torch.randperm(len(rows), generator=gen).numpy()
        for batch in loader(dataset, batches(order, plan.batch_size), cfg.num_workers):
            idx = batch["index"].to(torch.long)  # (B,) cache rows
            p = _Part(order, idx, batch["num_frames"].to(torch.long), slice(0, len(idx)), 1.0)  # one process
            feats = batch["features"].to(device=device, dtype=torch.float32)  # (B, F, D)
            frames, vmask = train_frame_indices(p.num_frames, feats.shape[1], cfg.frames, gen)  # (B, K)
            with opt.autocast():
                out = model(gather_frames(feats, frames.to(device)), vmask.to(device))
            loss, _ = _rec_loss(out, idx, p, labels, cfg.label_smoothing, device)
            opt.step(loss)
            opt.schedule()
    model.eval()


def _check_self_questioning(cfg: TrainConfig) -> None:
    """InputError for a `predicted` run whose model reads no question (its K first-pass models would be wasted)."""
    if not {**preset_model_fields(cfg.preset), **cfg.model_overrides}.get("use_question", True):
        raise InputError(f"--questions predicted: preset {cfg.preset!r} reads no question (use_question false), so "
                         "the candidates would never reach it; use a question-reading preset or --questions templates")


def _given_first_pass(cfg: TrainConfig, cache: CacheFile, device: torch.device) -> FirstPass:
    """The checkpoint `cfg.candidates_from` as a first pass, checked against the training cache's classes and task."""
    model, ckpt = load_checkpoint(cfg.candidates_from, device=str(device))
    vocab = ckpt.get("vocab", {})
    if list(vocab.get("verbs", [])) != list(cache.verb_keys) or list(vocab.get("nouns", [])) != list(cache.noun_keys):
        raise InputError(f"--candidates-from {cfg.candidates_from}: its verb/noun classes differ from the train "
                         f"cache {cache.path}")
    if ckpt.get("task", "recognition") != cfg.task.value:
        raise InputError(f"--candidates-from {cfg.candidates_from}: trained for {ckpt.get('task')!r}, this run is "
                         f"{cfg.task.value!r}")
    if ckpt.get("question_source") == QuestionSource.PREDICTED.value:
        raise InputError(f"--candidates-from {cfg.candidates_from}: trained with --questions predicted, so it needs a "
                         "first pass of its own; give a model trained with templates, or the video-only preset")
    return FirstPass([model], str(cfg.candidates_from), cfg.candidates_k)


def cross_fit_candidates(cfg: TrainConfig, cache: CacheFile, rows: np.ndarray, labels: Labels,
                         device: torch.device) -> tuple[FirstPass, np.ndarray]:
    """The first pass of a `predicted` run and the training rows' candidates.

    The training rows are split into `cfg.candidate_folds` folds (`fold_ids`); for each fold a video-only model of
    the run's preset (use_question=False) is trained on the other folds for `cfg.candidate_epochs` epochs (0: the
    run's epochs) and proposes the top-`cfg.candidates_k` verbs and nouns of its held-out fold. So every training
    row's candidates come from a model that never saw it, as every evaluated row's will. The evaluation first pass
    is the mean of the fold models, or the checkpoint `cfg.candidates_from` when given (then the fold models only
    supply the training rows' candidates).

    Returns (evaluation first pass, (N, 2, k) int64 candidate table over the cache rows, -1 outside `rows`).
    """
    given = _given_first_pass(cfg, cache, device) if cfg.candidates_from else None  # checked before the folds
    dims = {"video_dim": int(cache.attrs["feature_dim"]), "text_dim": int(cache.attrs["text_dim"]),
            "num_verbs": len(cache.verb_keys), "num_nouns": len(cache.noun_keys), "num_actions": 0}
    folds = fold_ids(len(rows), cfg.candidate_folds, cfg.seed)
    epochs = cfg.candidate_epochs or cfg.epochs
    fold_cfg = dataclasses.replace(cfg, model_overrides={**cfg.model_overrides, "use_question": False})
    models, table = [], None
    for f in range(cfg.candidate_folds):
        torch.manual_seed(_mix(cfg.seed, f, 7))
        model, _ = build_model(fold_cfg, dims)
        model.to(device)
        _fit_video_only(model, cache, rows[folds != f], labels, cfg, epochs, device, _mix(cfg.seed, f, 8))
        held = rows[folds == f]
        fold_table, _ = cache_candidates(FirstPass([model], "fold", cfg.candidates_k), cache, window_of(cfg.task),
                                         held, device, max(cfg.batch_size, 64), cfg.frames, cfg.num_workers)
        table = fold_table if table is None else np.where(fold_table >= 0, fold_table, table)
        models.append(model)
    return (given or FirstPass(models, "cross-fitted", cfg.candidates_k)), table


# ----------------------------------------------------------------------------------------------------------------
# steps


def _rec_loss(out: dict, rows: torch.Tensor, p: _Part, labels: Labels, smoothing: float,
              device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """Recognition loss: the sum of the heads' cross-entropies (unlabelled targets ignored) as this rank's share of
    the global batch's means (`single_label_loss` over the global count, times `p.scale`), and each part as its
    share of the global mean (they add up over ranks)."""
    parts = {}
    for head, target in (("verb", labels.verb), ("noun", labels.noun), ("action", labels.action)):
        if head in out:
            count = int((target[p.grows] >= 0).sum())
            parts[head] = single_label_loss(out[head], target[rows].to(device), smoothing, count) * p.scale
    total = sum(parts.values())
    return total, {k: float(v.detach()) / p.scale if p.scale else 0.0 for k, v in parts.items()}


def _qa_loss(kind: str, logits: torch.Tensor, rows: torch.Tensor, p: _Part, labels: Labels,
             device: torch.device) -> torch.Tensor:
    """QA loss of one question kind (`mambavl.fuse.qa`) as this rank's share of the global batch's loss:
    cross-entropy against the verb or noun answer; for the scene question the positives-normalised multi-label loss
    over nouns (targets: all nouns of the segment). Counts (usable targets, positives) are the global batch's."""
    if QA_TARGET[kind] == "scene":
        target = scene_targets([labels.all_nouns[r] for r in rows.tolist()], logits.shape[1])  # (B, Nn)
        count = float(scene_targets([labels.all_nouns[r] for r in p.grows.tolist()], logits.shape[1]).sum())
    else:
        target = answer_targets(kind, labels.verb[rows], labels.noun[rows], labels.action[rows])  # (B,)
        count = int((answer_targets(kind, labels.verb[p.grows], labels.noun[p.grows], labels.action[p.grows])
                     >= 0).sum())
    return qa_loss(kind, logits, target.to(device), count) * p.scale


@dataclass
class _Batch:
    """One training batch on the device: this rank's cache rows (B,), sub-sampled video (B, K, D) and mask (B, K),
    and where they sit in the global batch."""

    rows: torch.Tensor
    video: torch.Tensor
    vmask: torch.Tensor
    p: _Part


def _recognition_step(objective: nn.Module, opt: Optimizer, data: _Data, cfg: TrainConfig, batch: dict, p: _Part,
                      sample_gen: torch.Generator, device: torch.device) -> tuple[_Batch, torch.Tensor, list[float]]:
    """Sub-sample frames, pick the heads' questions, one optimiser step on the recognition loss. Frames and
    paraphrases are drawn for the whole global batch (every rank draws the same) and each rank keeps its part, so
    the draws are those of one process with the global batch. Returns the batch (reused by a QA step), the loss
    and the epoch sums' increments [loss, verb, noun, action, qa (shares of global means), fallbacks (count)]."""
    rows = batch["index"].to(torch.long)  # (B,) cache rows of this rank
    feats = batch["features"].to(device=device, dtype=torch.float32)  # (B, F, D)
    idx, vmask = train_frame_indices(p.num_frames, feats.shape[1], cfg.frames, sample_gen)  # (G, K)
    video, vmask = gather_frames(feats, idx[p.part].to(device)), vmask[p.part].to(device)  # (B, K, D), (B, K)
    q = data.train_q.heads(p.grows, train=True, generator=sample_gen)[0][p.part]  # (B, 2)
    fb = data.train_q.fallbacks(rows) if p.scale else 0
    qt, qm = data.train_q.tokens_of(q, rows, device)  # (B, 2, T', Dt), (B, 2, T')
    with opt.autocast():
        out = objective("rec", video, vmask, qt, qm)
    loss, parts = _rec_loss(out, rows, p, data.train_labels, cfg.label_smoothing, device)
    opt.step(loss)
    opt.schedule()
    share = float(loss.detach()) / p.scale if p.scale else 0.0
    sums = [share, parts["verb"], parts.get("noun", 0.0), parts.get("action", 0.0), 0.0, fb]
    return _Batch(rows, video, vmask, p), loss, sums


def _qa_step(objective: nn.Module, opt: Optimizer, data: _Data, cfg: TrainConfig, b: _Batch,
             sample_gen: torch.Generator, device: torch.device) -> float:
    """One QA step on the batch: a question kind drawn for the whole batch, answers scored against the candidates,
    one optimiser step on `qa_weight` x the QA loss. Returns this rank's share of the global batch's (unweighted)
    QA loss."""
    kind = data.qa_kinds[int(torch.randint(len(data.qa_kinds), (1,), generator=sample_gen))]
    qk = data.train_q.template(kind, len(b.p.grows), train=True, generator=sample_gen)[b.p.part]  # (B,)
    qkt, qkm = data.train_q.gather(qk, device)  # (B, T, Dt), (B, T)
    with opt.autocast():
        mode = "scene" if QA_TARGET[kind] == "scene" else "qa"
        logits = objective(mode, b.video, b.vmask, qkt, qkm, data.candidates[QA_TARGET[kind]])  # (B, K)
    lq = _qa_loss(kind, logits, b.rows, b.p, data.train_labels, device)
    opt.step(cfg.qa_weight * lq)
    return float(lq.detach()) / b.p.scale if b.p.scale else 0.0


def _validate(model: nn.Module, val_dataset: SegmentDataset | None, data: _Data, cfg: TrainConfig,
              device: torch.device, d: _Dist) -> dict | None:
    """Validation metrics of the epoch over the whole split, once: each rank scores its contiguous part of it (all
    hold the same synchronised weights; `val_dataset` is this rank's part, None when empty), the parts are gathered
    in rank order and every rank computes the metrics; question fallbacks are summed. None without a validation
    cache."""
    if data.val_cache is None:
        return None
    part = (predict_logits(model, val_dataset, data.val_q, device, max(cfg.batch_size, 64), cfg.frames,
                           cfg.num_workers) if val_dataset is not None else (None, 0))
    gathered = _gather_parts(part, d)
    pieces = [scores for scores, _ in gathered if scores is not None]
    scores = {k: torch.cat([sc[k] for sc in pieces]) for k in pieces[0]}
    metrics = validation_metrics(scores, data.val_labels)
    metrics["val_question_fallbacks"] = sum(n for _, n in gathered)
    return metrics


def _epoch_row(cfg: TrainConfig, data: _Data, epoch: int, step: int, lr: float, sums: torch.Tensor,
               rec_steps: int, qa_steps: int, plan: StepPlan) -> dict[str, Any]:
    """The training half of an epoch's metrics row (mean losses over the epoch's steps)."""
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": step,
        "lr": lr,
        "task": cfg.task.value,
        "question_source": cfg.question_source.value,
        "train_loss": float(sums[0] / max(rec_steps, 1)),
        "train_loss_verb": float(sums[1] / max(rec_steps, 1)),
        "rec_steps": rec_steps,
        "qa_steps": qa_steps,
        "batch_size": plan.batch_size,
        "passes": plan.passes,
        "question_fallbacks": int(sums[5]),
    }
    if data.has_nouns:
        row["train_loss_noun"] = float(sums[2] / max(rec_steps, 1))
    if data.action_pairs:
        row["train_loss_action"] = float(sums[3] / max(rec_steps, 1))
    if cfg.qa_weight > 0:
        row["train_loss_qa"] = float(sums[4] / max(qa_steps, 1))
    row.update(data.candidate_metrics)
    return row


# ----------------------------------------------------------------------------------------------------------------
# training


# Config fields a resumed run may change without changing what is computed (on the same device type).
RESUME_FREE_FIELDS = ("resume", "device", "num_workers", "out_dir")


def _kept(saver: "Checkpointer") -> str:
    return (f"the last good checkpoint {saver.last} is kept" if saver.last.exists()
            else "no checkpoint was written (the first epoch did not finish)")


@contextmanager
def _stop_on_nonfinite(epoch: int, step: int, kind: str, saver: "Checkpointer"):
    """NonFiniteLoss inside -> TrainingStopped naming the epoch (1-based), the step and what to do."""
    try:
        yield
    except NonFiniteLoss as exc:
        raise TrainingStopped(
            f"non-finite {kind} loss ({exc.args[0]}) at epoch {epoch + 1}, step {step}: training stopped before "
            f"the step was applied, and {_kept(saver)}. Check the features for NaN/inf (`mambavl cache inspect`), "
            "or lower --lr; then resume with --resume") from None


def _check_weights(model: nn.Module, epoch: int, step: int, saver: "Checkpointer") -> None:
    """TrainingStopped instead of checkpointing weights that are NaN or inf."""
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise TrainingStopped(f"non-finite weights after epoch {epoch + 1} (step {step}) in {', '.join(bad[:3])}: "
                              f"not saved, {_kept(saver)}; lower --lr and resume with --resume")


def _check_resume_config(cfg: TrainConfig, saved: dict, path: Path) -> None:
    current = plain(asdict(cfg))
    for key, value in saved.items():
        if key in RESUME_FREE_FIELDS or key not in current:
            continue
        mine = current[key]
        if key in ("train_cache", "val_cache") and mine and value:
            if Path(mine).resolve() == Path(value).resolve():
                continue
        if mine != value:
            raise InputError(
                f"cannot resume {path}: {key} is {mine!r} but the run was started with {value!r} "
                f"(resume with the run's own settings)"
            )


def train(cfg: TrainConfig, progress: Progress | None = None, stop_after_epochs: int | None = None) -> TrainResult:
    """Train MambaVL on `cfg.train_cache`, validating on `cfg.val_cache` after every epoch.

    Writes into `cfg.out_dir`: last.pt (every epoch), best.pt (best validation action top-1 — verb and noun both
    right — or verb top-1 when the data has no nouns), metrics.csv, train_config.json, tensorboard/ (if installed).
    `stop_after_epochs=k` returns after k epochs of this call (the run can be continued with `resume=True`).
    Progress (rank 0 only): one unit per recognition step (fields epoch, epochs, loss), and once per epoch a report
    with its metrics row (`metrics`); a resumed run first reports the steps already taken (`resumed=True`).
    Raises InputError for unusable caches, an incompatible validation cache, or an existing run without `resume`.
    """
    device = resolve_device(cfg.device)
    return _train(cfg, device, _dist_setup(device), progress, stop_after_epochs)


def _build(cfg: TrainConfig, ckpt: dict | None, data: _Data, device: torch.device, d: _Dist):
    """The model (fresh from the preset, or the resumed weights) on `device`, and the objective that runs it
    (wrapped in DistributedDataParallel under torchrun)."""
    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        mcfg = model_config_from_dict(ckpt["model_config"])
        model = MambaVL(mcfg)
        model.load_state_dict(ckpt["model"])
    else:
        model, mcfg = build_model(cfg, data.data_dims())
    message = question_warning(mcfg, cfg.question_source)
    if message is not None and d.main:
        warnings.warn(message, UserWarning, stacklevel=4)
    model.to(device)
    objective: nn.Module = _Objective(model)
    if d.world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # recognition and QA steps use different heads
        )
    return model, mcfg, objective


def _train(
    cfg: TrainConfig, device: torch.device, d: _Dist, progress: Progress | None, stop_after_epochs: int | None
) -> TrainResult:
    """The training loop: set-up, then per epoch the recognition steps (a QA step after every `qa_every`-th),
    validation and a checkpoint. Every random draw of an epoch is seeded by (seed, epoch, stream), so a run
    resumed at an epoch boundary replays exactly. Just over 80 lines on purpose: the loop is kept whole so that it
    reads top to bottom; every step in it is a named function above."""
    if device.type == "cuda" and d.world > 1:
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    out_dir = Path(cfg.out_dir)
    check_writable(out_dir, "run folder (--out)")
    ckpt = _resume_checkpoint(cfg, out_dir / "last.pt")
    data = _load_data(cfg, ckpt, out_dir / "last.pt", device, d)
    model, mcfg, objective = _build(cfg, ckpt, data, device, d)
    dataset = SegmentDataset(data.train_cache, window=data.window, indices=data.train_rows)
    val_part = np.array_split(data.val_rows, d.world)[d.rank] if data.val_cache is not None else []
    val_dataset = (SegmentDataset(data.val_cache, window=data.window, indices=val_part)
                   if len(val_part) else None)  # fmt: skip

    plan = plan_steps(math.ceil(len(data.train_rows) / d.world), cfg.batch_size, cfg.epochs, cfg.min_steps)
    steps_per_epoch = plan.passes * math.ceil(len(data.train_rows) / (plan.batch_size * d.world))  # global batches
    total_steps = steps_per_epoch * cfg.epochs
    opt = Optimizer(model, cfg, total_steps, int(round(cfg.warmup_epochs * steps_per_epoch)), device)
    sample_gen = torch.Generator()
    state = _Progress()
    if ckpt is not None:
        opt.load_state_dict(ckpt)
        state = _Progress(int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt.get("qa_steps", 0)),
                          ckpt.get("best_metric"), list(ckpt.get("history", [])))  # fmt: skip
        _set_rng_state(ckpt["rng"], sample_gen)
    metric_name = "val_action_top1" if data.has_nouns else "val_verb_top1"
    saver = Checkpointer(out_dir, _checkpoint_header(cfg, mcfg, data, metric_name), cfg, d.main)
    progress = or_none(progress) if d.main else NO_PROGRESS
    progress.start(total_steps)
    if state.step:
        progress.advance(state.step, resumed=True)

    objective.train()
    first_epoch = state.epoch
    for epoch in range(first_epoch, cfg.epochs):
        if stop_after_epochs is not None and epoch - first_epoch >= stop_after_epochs:
            break
        t0 = time.perf_counter()
        torch.manual_seed(_mix(cfg.seed, epoch, 1, d.rank))  # dropout: each rank its own masks
        sample_gen.manual_seed(_mix(cfg.seed, epoch, 2, 0))  # frames, paraphrases, QA kinds: alike on every rank
        parts = []
        for k in range(plan.passes):  # each pass in its own order (pass 0: the single-pass order)
            order = _mix(cfg.seed, epoch, 0) if k == 0 else _mix(cfg.seed, epoch, 0, k)
            perm = torch.randperm(len(data.train_rows), generator=torch.Generator().manual_seed(order))
            parts += _global_batches(perm.numpy(), data.train_rows, dataset.num_frames, plan.batch_size, d)
        sums = torch.zeros(6, dtype=torch.float64)  # loss, verb, noun, action, qa (global means), fallbacks (count)
        rec_steps = qa_steps = 0
        local = [p.positions[p.part].tolist() for p in parts]
        for p, raw in zip(parts, loader(dataset, local, cfg.num_workers)):
            with _stop_on_nonfinite(epoch, state.step + 1, "recognition", saver):
                b, loss, inc = _recognition_step(objective, opt, data, cfg, raw, p, sample_gen, device)
            state.step += 1
            rec_steps += 1
            sums += torch.tensor(inc, dtype=torch.float64)
            if cfg.qa_weight > 0 and rec_steps % cfg.qa_every == 0:
                with _stop_on_nonfinite(epoch, state.step, "QA", saver):
                    sums[4] += _qa_step(objective, opt, data, cfg, b, sample_gen, device)
                qa_steps += 1
                state.qa_steps += 1
            progress.advance(1, epoch=epoch + 1, epochs=cfg.epochs, loss=float(loss.detach()))

        if d.world > 1:
            dist.all_reduce(sums)  # the ranks' loss shares add up to the global means; fallback counts add up
        row = _epoch_row(cfg, data, epoch, state.step, opt.lr, sums, rec_steps, qa_steps, plan)
        metrics = _validate(model, val_dataset, data, cfg, device, d)
        if metrics:
            row.update(metrics)
        row["time_s"] = round(time.perf_counter() - t0, 3)
        improved = metrics is not None and not math.isnan(metrics[metric_name]) and (
            state.best_metric is None or metrics[metric_name] > state.best_metric
        )
        if improved:
            state.best_metric = float(metrics[metric_name])
        state.history.append(plain(row))
        state.epoch = epoch + 1
        _check_weights(model, epoch, state.step, saver)
        saver.save(model, opt, state, sample_gen, improved)
        progress.advance(0, epoch=epoch + 1, epochs=cfg.epochs, metrics=dict(row))

    saver.close()
    progress.finish()
    if d.world > 1:
        dist.barrier()
    return TrainResult(
        best_metric=state.best_metric,
        last_checkpoint=saver.last if d.main and saver.last.exists() else None,
        best_checkpoint=saver.best if d.main and saver.best.exists() else None,
        history=state.history,
        best_metric_name=metric_name,
        model=model,
    )
