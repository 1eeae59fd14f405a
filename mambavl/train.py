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

Distributed: launched under torchrun (WORLD_SIZE > 1) each process trains on its shard of the same seeded
permutation (DistributedSampler-style padding), gradients are averaged by DistributedDataParallel, and only rank 0
validates and writes checkpoints and logs. `batch_size` is per process.
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
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mambavl import __version__
from mambavl.cache import schema
from mambavl.cache.reader import CacheFile, SegmentDataset, open_cache
from mambavl.data.sampling import subsample
from mambavl.device import resolve_device
from mambavl.errors import InputError
from mambavl.extract.questions import QuestionSource

CHECKPOINT_FORMAT = 1
CHECKPOINT_KIND = "mambavl-checkpoint"

# Progress callback: progress(done_steps, total_steps, info). info carries "epoch", "epochs", "loss" on steps and,
# once per epoch, "metrics" (the epoch's metrics row).
ProgressFn = Callable[[int, int, dict], None]


# Cache attributes describing the frame sampling, copied into checkpoints (see `mambavl.predict`).
SAMPLING_ATTRS = ("sampling_mode", "frames_per_segment", "decoded_frames", "fps", "frame_size",
                  "tokens_per_frame_pooling")


def _question_tokens(cache: CacheFile) -> dict[str, int]:
    """{"question_tokens": T} of the cache's question table ({} when it has none)."""
    try:
        return {"question_tokens": int(cache.questions().tokens.shape[1])}
    except InputError:
        return {}


class Task(str, Enum):
    """What the heads predict: the action in the window (recognition) or the action after it (anticipation)."""

    RECOGNITION = "recognition"
    ANTICIPATION = "anticipation"


# Question kinds asked of the verb and noun heads, and the kinds a QA step may draw, per task. The scene question is
# about the segment's own objects, which the anticipation window does not show, so anticipation QA asks only what
# comes next.
HEAD_KINDS = {Task.RECOGNITION: ("verb", "noun"), Task.ANTICIPATION: ("next_verb", "next_noun")}
QA_KINDS = {Task.RECOGNITION: ("verb", "noun", "scene"), Task.ANTICIPATION: ("next_verb", "next_noun")}
# What each QA kind is scored against: the verb or noun answer embeddings.
QA_TARGET = {"verb": "verb", "next_verb": "verb", "noun": "noun", "next_noun": "noun", "scene": "scene"}


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved whole in the checkpoint.

    `model_overrides` are ModelConfig fields applied on top of the preset (dims and class counts come from the cache).
    `frames` is the number of frame tokens the model consumes, sub-sampled from the cached F (0 = all F).
    `batch_size` is per process under torchrun. `resume=True` continues the run in `out_dir` from last.pt.
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
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int = 0
    resume: bool = False

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
        self.train_cache = str(self.train_cache)
        self.val_cache = None if self.val_cache in (None, "") else str(self.val_cache)
        self.out_dir = str(self.out_dir)
        self.model_overrides = dict(self.model_overrides or {})
        self._apply_preset_training()
        checks = (
            ("epochs", self.epochs >= 1),
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
            ("num_workers", self.num_workers >= 0),
        )
        for name, ok in checks:
            if not ok:
                raise InputError(f"train config: {name}={getattr(self, name)!r} is out of range")

    def _apply_preset_training(self) -> None:
        """Some presets carry training settings (no-qa: qa_weight 0; paper: 2 warm-up epochs). They replace the
        class defaults, not values set explicitly: a field still at its default takes the preset's value."""
        from mambavl.fuse.presets import preset_train_overrides  # lazy: the fuse package is heavier

        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, value in preset_train_overrides(self.preset).items():
            if key not in defaults:
                raise InputError(f"preset {self.preset!r} sets unknown training field {key!r}")
            if getattr(self, key) == defaults[key]:
                setattr(self, key, value)


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


def _plain(value: Any) -> Any:
    """Enums -> their value, numpy scalars -> Python, recursively: checkpoints must load with weights_only=True."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


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


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then cosine decay to `min_lr_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _ce(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy ignoring target -1. With no usable target the loss is 0 but stays connected to the graph, so
    DDP sees every head take part in every step."""
    if not bool((target >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, ignore_index=-1, label_smoothing=smoothing)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ----------------------------------------------------------------------------------------------------------------
# questions and labels of one cache


class _Questions:
    """Question choice for one cache under one protocol.

    Holds the cache's question table (tokens (Q, T, Dt), mask (Q, T)) on the CPU — the annotation protocol can hold
    two questions per segment, too many for accelerator memory — and gathers the rows a batch needs.
    """

    def __init__(self, cache: CacheFile, source: QuestionSource, head_kinds: tuple[str, str]):
        bank = cache.questions()
        self.tokens = torch.as_tensor(bank.tokens, dtype=torch.float32)  # (Q, T, Dt)
        self.mask = torch.as_tensor(bank.mask, dtype=torch.bool)  # (Q, T)
        self.templates: dict[str, torch.Tensor] = {
            kind: torch.as_tensor(np.asarray(idx), dtype=torch.long) for kind, idx in bank.templates.items()
        }
        self.head_kinds = head_kinds
        for kind in head_kinds:
            if kind not in self.templates or len(self.templates[kind]) == 0:
                raise InputError(f"cache {cache.path} has no {kind!r} template questions (questions/templates/{kind})")
        self.source = source
        self.per_segment: torch.Tensor | None = None
        if source != QuestionSource.TEMPLATES:
            table = bank.per_segment.get(source.value) if bank.per_segment else None
            if table is None:
                hint = "--questions templates,annotation" if source == QuestionSource.ANNOTATION else "a questions file"
                raise InputError(f"cache {cache.path} has no {source.value} questions (extract with {hint})")
            self.per_segment = torch.as_tensor(np.asarray(table), dtype=torch.long)  # (N, 2)

    def template(self, kind: str, n: int, train: bool, generator: torch.Generator | None) -> torch.Tensor:
        """(n,) question indices of `kind`: a uniform paraphrase per sample in training, paraphrase 0 otherwise."""
        choices = self.templates[kind]  # (P,)
        if train:
            pick = torch.randint(len(choices), (n,), generator=generator)
            return choices[pick]
        return choices[:1].expand(n).clone()

    def heads(self, rows: torch.Tensor, train: bool, generator: torch.Generator | None) -> tuple[torch.Tensor, int]:
        """(B, 2) question indices (verb head, noun head) for cache rows (B,), and how many fell back to templates."""
        verb_q = self.template(self.head_kinds[0], len(rows), train, generator)
        noun_q = self.template(self.head_kinds[1], len(rows), train, generator)
        q = torch.stack([verb_q, noun_q], dim=1)  # (B, 2)
        if self.per_segment is None:
            return q, 0
        own = self.per_segment[rows]  # (B, 2); -1 where the row has no question of this source
        q = torch.where(own >= 0, own, q)
        return q, int((own < 0).sum())

    def gather(self, q: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Question indices (...,) -> tokens (..., T, Dt) float32 and mask (..., T) bool on `device`."""
        return self.tokens[q].to(device), self.mask[q].to(device)


@dataclass
class _Labels:
    verb: torch.Tensor  # (N,) long, -1 unlabelled
    noun: torch.Tensor  # (N,) long, -1 unlabelled / no nouns
    action: torch.Tensor  # (N,) long index into the train action vocabulary, -1 unseen pair
    all_nouns: list  # N sequences of noun ids


def _labels(cache: CacheFile, pairs: dict[tuple[int, int], int]) -> _Labels:
    lab = cache.labels()
    verb = torch.as_tensor(np.asarray(lab["verb_class"], dtype=np.int64))
    noun = torch.as_tensor(np.asarray(lab["noun_class"], dtype=np.int64))
    action = torch.tensor([pairs.get((int(v), int(n)), -1) for v, n in zip(verb, noun)], dtype=torch.long)
    all_nouns = [np.asarray(a, dtype=np.int64).reshape(-1) for a in lab["all_noun_classes"]]
    return _Labels(verb, noun, action, all_nouns)


def _action_vocab(cache: CacheFile, rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted (verb, noun) pairs seen among the labelled training rows."""
    lab = cache.labels()
    verb = np.asarray(lab["verb_class"], dtype=np.int64)[rows]
    noun = np.asarray(lab["noun_class"], dtype=np.int64)[rows]
    keep = (verb >= 0) & (noun >= 0)
    return sorted({(int(v), int(n)) for v, n in zip(verb[keep], noun[keep])})


def _window(task: Task) -> str:
    return schema.ANTICIPATION if task == Task.ANTICIPATION else schema.RECOGNITION


def _require_window(cache: CacheFile, window: str) -> None:
    if not cache.has_window(window):
        raise InputError(f"cache {cache.path} has no anticipation window (extract with --anticipation)")


def _labelled_rows(cache: CacheFile, window: str, what: str) -> np.ndarray:
    rows = np.asarray(cache.valid_indices(window), dtype=np.int64)
    verb = np.asarray(cache.labels()["verb_class"], dtype=np.int64)
    rows = rows[verb[rows] >= 0]
    if len(rows) == 0:
        raise InputError(f"{what} cache {cache.path} has no labelled valid segments in the {window} window")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# model construction and checkpoints


def _fuse():
    # Imported lazily: the fusion package (scan kernels) is only needed once a model is built.
    from mambavl.fuse import model as fuse_model
    from mambavl.fuse import presets

    return fuse_model, presets


# ModelConfig fields that come from the caches, not from the user.
DATA_FIELDS = ("video_dim", "text_dim", "num_verbs", "num_nouns", "num_actions")


def build_model(cfg: TrainConfig, data_dims: dict) -> tuple[nn.Module, Any]:
    """The preset's model with the user's overrides and the cache-derived dims (video/text dim, class counts)."""
    _, presets = _fuse()
    clash = sorted(set(cfg.model_overrides) & set(DATA_FIELDS))
    if clash:
        raise InputError(f"model override(s) {', '.join(clash)} are set from the cache and cannot be overridden")
    # create_model refuses unknown presets and unknown override keys with InputError
    return presets.create_model(cfg.preset, **data_dims, **cfg.model_overrides)


def load_checkpoint(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Load a mambavl checkpoint (last.pt / best.pt) with `weights_only=True`.

    Returns (model in eval mode on `device`, checkpoint dict). The dict holds "model_config", "train_config",
    "vocab" {"verbs", "nouns", "action_pairs"}, "cache_attrs", "epoch", "step", "best_metric", "history", ...
    Raises InputError for a missing file or one that is not a mambavl checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    dev = resolve_device(device)
    try:
        ckpt = torch.load(path, map_location=dev, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not our checkpoint"
        raise InputError(f"{path}: not a mambavl checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise InputError(f"{path}: not a mambavl checkpoint (no 'kind': {CHECKPOINT_KIND!r} entry)")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: checkpoint format {ckpt.get('format')!r}, this mambavl reads {CHECKPOINT_FORMAT}")
    fuse_model, _ = _fuse()
    model = fuse_model.MambaVL(fuse_model.model_config_from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(dev).eval()
    return model, ckpt


def config_from_checkpoint(path: str | os.PathLike) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with (for `--resume`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: not a mambavl checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise InputError(f"{path}: not a mambavl checkpoint")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k in known})


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
        return self.model.qa_logits(self.model.qa_embed(h), candidates)  # (B, K)


def _batches(positions: np.ndarray, batch_size: int) -> list[list[int]]:
    return [positions[i : i + batch_size].tolist() for i in range(0, len(positions), batch_size)]


def _loader(dataset: SegmentDataset, batches: list[list[int]], num_workers: int):
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        # The loader's own base seed would otherwise be drawn from the global RNG.
        generator=torch.Generator().manual_seed(0),
    )


@torch.no_grad()
def _predict(
    model: nn.Module,
    dataset: SegmentDataset,
    questions: _Questions,
    device: torch.device,
    batch_size: int,
    frames: int,
    num_workers: int = 0,
) -> tuple[dict[str, torch.Tensor], int]:
    """Logits for `rows` of a cache, in order: {"verb": (N, V), "noun": (N, Nn)?, "action": (N, A)?, "indices": (N,)}
    (CPU float32) for the rows of `dataset` in order, and the number of question fallbacks."""
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {}
    fallbacks = 0
    for batch in _loader(dataset, _batches(np.arange(len(dataset)), batch_size), num_workers):
        feats = batch["features"].to(device=device, dtype=torch.float32)  # (B, F, D)
        video, vmask = subsample(feats, batch["num_frames"].to(device), frames, train=False)  # (B, K, D), (B, K)
        idx = batch["index"].to(torch.long)
        q, fb = questions.heads(idx, train=False, generator=None)  # (B, 2)
        fallbacks += fb
        qt, qm = questions.gather(q, device)  # (B, 2, T, Dt), (B, 2, T)
        res = model(video, vmask, qt, qm)
        for key in ("verb", "noun", "action"):
            if key in res:
                out.setdefault(key, []).append(res[key].float().cpu())
        out.setdefault("indices", []).append(idx)
    model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}, fallbacks


def predict_scores(
    model: nn.Module,
    cache: CacheFile | str | os.PathLike,
    window: str = "recognition",
    question_source: QuestionSource | str = QuestionSource.TEMPLATES,
    device: str = "cpu",
    batch_size: int = 256,
    frames: int = 8,
) -> dict[str, np.ndarray | None]:
    """Scores of every valid row of `cache` in `window` (the shared entry point of evaluation and prediction).

    Scores are the heads' logits (apply softmax for probabilities). Questions follow `question_source` with the
    evaluation phrasing (template paraphrase 0); the anticipation window asks next_verb / next_noun. Pass the
    checkpoint's `train_config["frames"]` as `frames` so evaluation sub-samples like training did.

    Returns dict(verb (N, V) float32, noun (N, Nn) float32 or None without a noun head, action (N, A) float32 or None
    without an action head, indices (N,) int64 cache rows), numpy arrays.
    """
    if not isinstance(cache, CacheFile):
        cache = open_cache(cache)
    source = QuestionSource(question_source)
    task = Task.ANTICIPATION if window == schema.ANTICIPATION else Task.RECOGNITION
    _require_window(cache, window)
    dev = resolve_device(device)
    model.to(dev)
    questions = _Questions(cache, source, HEAD_KINDS[task])
    rows = np.asarray(cache.valid_indices(window), dtype=np.int64)
    res, _ = _predict(model, SegmentDataset(cache, window=window, indices=rows), questions, dev, batch_size, frames)
    n = len(rows)
    return {
        "verb": res["verb"].numpy() if "verb" in res else np.zeros((n, 0), np.float32),
        "noun": res["noun"].numpy() if "noun" in res else None,
        "action": res["action"].numpy() if "action" in res else None,
        "indices": res["indices"].numpy().astype(np.int64) if "indices" in res else np.zeros(0, np.int64),
    }


# ----------------------------------------------------------------------------------------------------------------
# validation metrics


def _topk_hits(scores: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C), (N,) -> (N,) bool: target among the top-k scores."""
    k = min(k, scores.shape[1])
    return (scores.topk(k, dim=1).indices == target[:, None]).any(dim=1)


def _action_top5(verb: torch.Tensor, noun: torch.Tensor, vt: torch.Tensor, nt: torch.Tensor) -> torch.Tensor:
    """EK-100 action top-5 from the verb and noun heads: pairs ranked by p(verb) * p(noun). The top 5 pairs of a
    product of non-negative factors lie within the top-5 verbs x top-5 nouns, so only those 25 are scored."""
    kv, kn = min(5, verb.shape[1]), min(5, noun.shape[1])
    pv, iv = verb.softmax(1).topk(kv, dim=1)  # (N, kv)
    pn, inn = noun.softmax(1).topk(kn, dim=1)  # (N, kn)
    prod = (pv[:, :, None] * pn[:, None, :]).reshape(len(verb), -1)  # (N, kv*kn)
    top = prod.topk(min(5, prod.shape[1]), dim=1).indices  # (N, 5)
    v_hit = iv.gather(1, top // kn) == vt[:, None]
    n_hit = inn.gather(1, top % kn) == nt[:, None]
    return (v_hit & n_hit).any(dim=1)


def validation_metrics(scores: dict[str, torch.Tensor], labels: _Labels) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) of verb, noun and action (verb and noun both right, EK-100 style) on labelled rows;
    `val_action_head_top1` scores the action head on rows whose pair is in the training action vocabulary."""
    rows = scores["indices"]
    vt, nt, at = labels.verb[rows], labels.noun[rows], labels.action[rows]
    m: dict[str, float] = {}

    def pct(hits: torch.Tensor) -> float:
        return float(hits.float().mean() * 100) if len(hits) else float("nan")

    lab = vt >= 0
    m["val_verb_top1"] = pct(_topk_hits(scores["verb"][lab], vt[lab], 1))
    m["val_verb_top5"] = pct(_topk_hits(scores["verb"][lab], vt[lab], 5))
    if "noun" in scores:
        nl = nt >= 0
        m["val_noun_top1"] = pct(_topk_hits(scores["noun"][nl], nt[nl], 1))
        m["val_noun_top5"] = pct(_topk_hits(scores["noun"][nl], nt[nl], 5))
        both = lab & nl
        v1 = _topk_hits(scores["verb"][both], vt[both], 1)
        n1 = _topk_hits(scores["noun"][both], nt[both], 1)
        m["val_action_top1"] = pct(v1 & n1)
        m["val_action_top5"] = pct(_action_top5(scores["verb"][both], scores["noun"][both], vt[both], nt[both]))
    if "action" in scores:
        seen = at >= 0
        m["val_action_head_top1"] = pct(_topk_hits(scores["action"][seen], at[seen], 1))
    return m


# ----------------------------------------------------------------------------------------------------------------
# logs


METRIC_COLUMNS = (
    "epoch", "step", "lr", "task", "question_source",
    "train_loss", "train_loss_verb", "train_loss_noun", "train_loss_action", "train_loss_qa",
    "rec_steps", "qa_steps", "question_fallbacks",
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
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_setup(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def _shard(perm: torch.Tensor, d: _Dist) -> torch.Tensor:
    """DistributedSampler-style: pad the permutation by wrapping to a multiple of the world size, take every
    world-th element, so every rank runs the same number of steps."""
    if d.world == 1:
        return perm
    total = math.ceil(len(perm) / d.world) * d.world
    padded = torch.cat([perm, perm[: total - len(perm)]]) if total > len(perm) else perm
    return padded[d.rank :: d.world]


def _broadcast(obj: Any, d: _Dist) -> Any:
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------------------------
# training


# Config fields a resumed run may change without changing what is computed (on the same device type).
RESUME_FREE_FIELDS = ("resume", "device", "num_workers", "out_dir")


def _check_resume_config(cfg: TrainConfig, saved: dict, path: Path) -> None:
    current = _plain(asdict(cfg))
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


def train(cfg: TrainConfig, progress: ProgressFn | None = None, stop_after_epochs: int | None = None) -> TrainResult:
    """Train MambaVL on `cfg.train_cache`, validating on `cfg.val_cache` after every epoch.

    Writes into `cfg.out_dir`: last.pt (every epoch), best.pt (best validation action top-1 — verb and noun both
    right — or verb top-1 when the data has no nouns), metrics.csv, train_config.json, tensorboard/ (if installed).
    `stop_after_epochs=k` returns after k epochs of this call (the run can be continued with `resume=True`).
    Raises InputError for unusable caches, an incompatible validation cache, or an existing run without `resume`.
    """
    device = resolve_device(cfg.device)
    d = _dist_setup(device)
    try:
        return _train(cfg, device, d, progress, stop_after_epochs)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig, device: torch.device, d: _Dist, progress: ProgressFn | None, stop_after_epochs: int | None
) -> TrainResult:
    if device.type == "cuda" and d.world > 1:
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    out_dir = Path(cfg.out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    window = _window(cfg.task)

    # ---- resume or fresh start
    ckpt = None
    if cfg.resume:
        if not last_path.is_file():
            raise InputError(f"cannot resume: {last_path} does not exist")
        ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
            raise InputError(f"cannot resume: {last_path} is not a mambavl checkpoint")
        _check_resume_config(cfg, ckpt["train_config"], last_path)
    elif last_path.exists():
        raise InputError(f"{out_dir} already holds a run ({last_path.name}); resume it or choose another output folder")

    # ---- data
    train_cache = open_cache(cfg.train_cache)
    _require_window(train_cache, window)
    if ckpt is not None:
        schema.check_compatible(
            ckpt["cache_attrs"], train_cache.attrs, f"run {last_path}", f"train cache {train_cache.path}"
        )
    val_cache = None
    if cfg.val_cache is not None:
        val_cache = open_cache(cfg.val_cache)
        schema.check_compatible(
            train_cache.attrs, val_cache.attrs, f"train cache {train_cache.path}", f"val cache {val_cache.path}"
        )
        if list(val_cache.verb_keys) != list(train_cache.verb_keys) or list(val_cache.noun_keys) != list(
            train_cache.noun_keys
        ):
            raise InputError(
                f"val cache {val_cache.path} has other verb/noun classes than train cache {train_cache.path}"
            )
        _require_window(val_cache, window)
    train_rows = _labelled_rows(train_cache, window, "train")
    val_rows = _labelled_rows(val_cache, window, "val") if val_cache is not None else None

    verbs, nouns = list(train_cache.verb_keys), list(train_cache.noun_keys)
    has_nouns = len(nouns) > 0
    if ckpt is not None:
        action_pairs = [tuple(p) for p in ckpt["vocab"]["action_pairs"]]
    else:
        action_pairs = _action_vocab(train_cache, train_rows) if has_nouns else []
    pair_index = {p: i for i, p in enumerate(action_pairs)}
    train_labels = _labels(train_cache, pair_index)
    val_labels = _labels(val_cache, pair_index) if val_cache is not None else None

    head_kinds = HEAD_KINDS[cfg.task]
    train_q = _Questions(train_cache, cfg.question_source, head_kinds)
    val_q = _Questions(val_cache, cfg.question_source, head_kinds) if val_cache is not None else None
    qa_kinds = tuple(k for k in QA_KINDS[cfg.task] if has_nouns or QA_TARGET[k] == "verb")
    qa_on = cfg.qa_weight > 0
    answers = train_cache.answers() if qa_on else None
    if qa_on:
        for kind in qa_kinds:
            if kind not in train_q.templates or len(train_q.templates[kind]) == 0:
                raise InputError(f"cache {train_cache.path} has no {kind!r} template questions for QA steps")
        cand = {
            "verb": torch.as_tensor(answers.verb, dtype=torch.float32).to(device),  # (V, Dt)
            "noun": torch.as_tensor(answers.noun, dtype=torch.float32).to(device) if has_nouns else None,  # (Nn, Dt)
        }
        cand["scene"] = cand["noun"]

    # ---- model, optimiser, schedule
    torch.manual_seed(cfg.seed)
    data_dims = {
        "video_dim": int(train_cache.attrs["feature_dim"]),
        "text_dim": int(train_cache.attrs["text_dim"]),
        "num_verbs": len(verbs),
        "num_nouns": len(nouns),
        "num_actions": len(action_pairs),
    }
    if ckpt is not None:
        fuse_model, _ = _fuse()
        mcfg = fuse_model.model_config_from_dict(ckpt["model_config"])
        model = fuse_model.MambaVL(mcfg)
        model.load_state_dict(ckpt["model"])
    else:
        model, mcfg = build_model(cfg, data_dims)
    model.to(device)
    objective: nn.Module = _Objective(model)
    if d.world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective,
            device_ids=[device.index] if device.type == "cuda" else None,
            # Recognition and QA steps use different heads.
            find_unused_parameters=True,
        )

    dataset = SegmentDataset(train_cache, window=window, indices=train_rows)
    val_dataset = SegmentDataset(val_cache, window=window, indices=val_rows) if val_cache is not None else None
    per_rank = math.ceil(len(train_rows) / d.world)
    steps_per_epoch = math.ceil(per_rank / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, cfg.min_lr_ratio)
    )
    use_amp = cfg.amp and device.type == "cuda"
    # bf16 needs no loss scaling; fp16 (older GPUs) does. The dtype is irrelevant when autocast is off.
    amp_dtype = torch.float16 if use_amp and not torch.cuda.is_bf16_supported() else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    sample_gen = torch.Generator()

    start_epoch, step, qa_total = 0, 0, 0
    best_metric: float | None = None
    history: list[dict] = []
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step, qa_total = int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt.get("qa_steps", 0))
        best_metric = ckpt.get("best_metric")
        history = list(ckpt.get("history", []))
        _set_rng_state(ckpt["rng"], sample_gen)

    metric_name = "val_action_top1" if has_nouns else "val_verb_top1"
    writer = None
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(_plain(asdict(cfg)), indent=2, sort_keys=True) + "\n")
        writer = _summary_writer(out_dir)

    static = {
        "kind": CHECKPOINT_KIND,
        "format": CHECKPOINT_FORMAT,
        "package_version": __version__,
        "model_config": mcfg.to_dict(),
        "train_config": _plain(asdict(cfg)),
        "task": cfg.task.value,
        "question_source": cfg.question_source.value,
        "window": window,
        "vocab": {"verbs": verbs, "nouns": nouns, "action_pairs": [list(p) for p in action_pairs]},
        # What the features are (compatibility) and how they were sampled, so that `mambavl predict` can extract a
        # new clip the same way without the cache.
        "cache_attrs": {
            **{k: _plain(schema.normalise_attr(train_cache.attrs[k]))
               for k in SAMPLING_ATTRS if k in train_cache.attrs},
            **{k: _plain(schema.normalise_attr(train_cache.attrs.get(k))) for k in schema.COMPATIBILITY_ATTRS},
            **_question_tokens(train_cache),
        },
        "best_metric_name": metric_name,
    }

    def rec_loss(out: dict, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        vt = train_labels.verb[rows].to(device)
        parts = {"verb": _ce(out["verb"], vt, cfg.label_smoothing)}
        if "noun" in out:
            parts["noun"] = _ce(out["noun"], train_labels.noun[rows].to(device), cfg.label_smoothing)
        if "action" in out:
            parts["action"] = _ce(out["action"], train_labels.action[rows].to(device), cfg.label_smoothing)
        total = sum(parts.values())
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def qa_loss(kind: str, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        target_kind = QA_TARGET[kind]
        if target_kind == "verb":
            return _ce(logits, train_labels.verb[rows].to(device), 0.0)
        if target_kind == "noun":
            return _ce(logits, train_labels.noun[rows].to(device), 0.0)
        multi = torch.zeros(logits.shape, dtype=torch.float32)  # (B, Nn) multi-hot of the segment's nouns
        for i, r in enumerate(rows.tolist()):
            ids = train_labels.all_nouns[r]
            ids = ids[(ids >= 0) & (ids < logits.shape[1])]
            multi[i, ids] = 1.0
        return F.binary_cross_entropy_with_logits(logits.float(), multi.to(device))

    def optimise(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()

    objective.train()
    epochs_run = 0
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
            break
        t0 = time.perf_counter()
        # Every random draw of the epoch is seeded by (seed, epoch): resuming at an epoch boundary replays exactly.
        torch.manual_seed(_mix(cfg.seed, epoch, 1, d.rank))  # dropout
        sample_gen.manual_seed(_mix(cfg.seed, epoch, 2, d.rank))  # frames, paraphrases, QA kinds
        perm = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(_mix(cfg.seed, epoch, 0)))
        positions = _shard(perm, d).numpy()
        sums = torch.zeros(6, dtype=torch.float64)  # loss, verb, noun, action, qa, fallbacks
        rec_steps = qa_steps = 0
        for batch in _loader(dataset, _batches(positions, cfg.batch_size), cfg.num_workers):
            rows = batch["index"].to(torch.long)  # (B,) cache rows
            feats = batch["features"].to(device=device, dtype=torch.float32)  # (B, F, D)
            video, vmask = subsample(feats, batch["num_frames"], cfg.frames, train=True, generator=sample_gen)
            q, fb = train_q.heads(rows, train=True, generator=sample_gen)  # (B, 2)
            qt, qm = train_q.gather(q, device)  # (B, 2, T, Dt), (B, 2, T)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                out = objective("rec", video, vmask, qt, qm)
            loss, parts = rec_loss(out, rows)
            optimise(loss)
            scheduler.step()
            step += 1
            rec_steps += 1
            sums += torch.tensor(
                [float(loss.detach()), parts["verb"], parts.get("noun", 0.0), parts.get("action", 0.0), 0.0, fb],
                dtype=torch.float64,
            )

            if qa_on and rec_steps % cfg.qa_every == 0:
                kind = qa_kinds[int(torch.randint(len(qa_kinds), (1,), generator=sample_gen))]
                qk = train_q.template(kind, len(rows), train=True, generator=sample_gen)  # (B,)
                qkt, qkm = train_q.gather(qk, device)  # (B, T, Dt), (B, T)
                with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                    logits = objective("qa", video, vmask, qkt, qkm, cand[QA_TARGET[kind]])  # (B, K)
                lq = qa_loss(kind, logits, rows)
                optimise(cfg.qa_weight * lq)
                qa_steps += 1
                qa_total += 1
                sums[4] += float(lq.detach())

            if progress is not None and d.main:
                progress(step, total_steps, {"epoch": epoch + 1, "epochs": cfg.epochs, "loss": float(loss.detach())})

        if d.world > 1:
            dist.all_reduce(sums)
            sums /= d.world
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "task": cfg.task.value,
            "question_source": cfg.question_source.value,
            "train_loss": float(sums[0] / max(rec_steps, 1)),
            "train_loss_verb": float(sums[1] / max(rec_steps, 1)),
            "rec_steps": rec_steps,
            "qa_steps": qa_steps,
            "question_fallbacks": int(sums[5]),
        }
        if has_nouns:
            row["train_loss_noun"] = float(sums[2] / max(rec_steps, 1))
        if action_pairs:
            row["train_loss_action"] = float(sums[3] / max(rec_steps, 1))
        if qa_on:
            row["train_loss_qa"] = float(sums[4] / max(qa_steps, 1))

        # Validation on rank 0 only (the unwrapped model holds the synchronised weights); others get the metrics.
        metrics = None
        if d.main and val_cache is not None:
            scores, vfb = _predict(
                model, val_dataset, val_q, device, max(cfg.batch_size, 64), cfg.frames, cfg.num_workers
            )
            metrics = validation_metrics(scores, val_labels)
            metrics["val_question_fallbacks"] = vfb
        metrics = _broadcast(metrics, d)
        if metrics:
            row.update(metrics)
        row["time_s"] = round(time.perf_counter() - t0, 3)
        improved = metrics is not None and not math.isnan(metrics[metric_name]) and (
            best_metric is None or metrics[metric_name] > best_metric
        )
        if improved:
            best_metric = float(metrics[metric_name])
        history.append(_plain(row))
        epochs_run += 1

        if d.main:
            state = dict(static)
            state.update(
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict() if scaler.is_enabled() else None,
                epoch=epoch + 1,
                step=step,
                qa_steps=qa_total,
                rng=_rng_state(sample_gen),
                best_metric=best_metric,
                history=history,
            )
            _atomic_torch_save(state, last_path)
            if improved:
                _atomic_copy(last_path, best_path)
            _write_metrics_csv(history, out_dir / "metrics.csv")
            if writer is not None:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                        writer.add_scalar(key, value, epoch + 1)
                writer.flush()
            if progress is not None:
                progress(step, total_steps, {"epoch": epoch + 1, "epochs": cfg.epochs, "metrics": dict(row)})

    if writer is not None:
        writer.close()
    if d.world > 1:
        dist.barrier()
    return TrainResult(
        best_metric=best_metric,
        last_checkpoint=last_path if d.main and last_path.exists() else None,
        best_checkpoint=best_path if d.main and best_path.exists() else None,
        history=history,
        best_metric_name=metric_name,
        model=model,
    )
