"""Self-questioning's first pass, cross-fitted (`--questions predicted`).

The training rows are split into K folds; for each fold a video-only model of the run's preset is trained on the
other folds and proposes the top-k verbs and nouns of its held-out fold, so every training row's candidates come from
a model that never saw it, as every evaluated row's will (docs/model.md, "Self-questioning").
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch
from torch import nn

from mambavl import metrics as M
from mambavl.cache.dataset import SegmentDataset
from mambavl.cache.reader import CacheFile
from mambavl.data.sampling import gather_frames, train_frame_indices
from mambavl.errors import InputError
from mambavl.extract.questions import QuestionSource
from mambavl.fuse.presets import preset_model_fields
from mambavl.runtime import (
    FirstPass,
    Labels,
    TrainConfig,
    TrainedModel,
    batches,
    build_model,
    cache_candidates,
    cache_dims,
    feature_statistics,
    fold_ids,
    loader,
    task_spec,
)
from mambavl.train.distributed import StepPart
from mambavl.train.objective import recognition_loss
from mambavl.train.schedule import Optimizer, mix_seed, plan_steps


def candidate_recall(table: np.ndarray, rows: np.ndarray, labels: Labels, split: str) -> dict[str, float]:
    """Candidate recall@k (%) of the verb (and noun) candidates of `rows`: {"<split>_candidate_recall_verb": ...}.
    table (N, 2, k) int64 from `cache_candidates` / `cross_fit_candidates`."""
    out = {f"{split}_candidate_recall_verb": 100 * M.recall_at_k(table[rows, 0], labels.verb[rows].numpy())}
    noun = labels.noun[rows].numpy()
    if (noun >= 0).any():
        out[f"{split}_candidate_recall_noun"] = 100 * M.recall_at_k(table[rows, 1], noun)
    return out


def fit_video_only(model: nn.Module, cache: CacheFile, rows: np.ndarray, labels: Labels, cfg: TrainConfig,
                    epochs: int, device: torch.device, seed: int) -> None:
    """Train a video-only model (a first-pass fold) on `rows` in one process with the run's optimiser, schedule,
    step floor (`plan_steps`), smoothing and frame sub-sampling, recognition loss only; seeded by `seed`."""
    dataset = SegmentDataset(cache, window=task_spec(cfg.task).window, indices=rows)
    plan = plan_steps(len(rows), cfg.batch_size, epochs, cfg.min_steps)
    per_epoch = plan.passes * math.ceil(len(rows) / plan.batch_size)
    opt = Optimizer(model, cfg, per_epoch * epochs, int(round(cfg.warmup_epochs * per_epoch)), device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    model.train()
    for _ in range(epochs * plan.passes):
        order = torch.randperm(len(rows), generator=gen).numpy()
        for batch in loader(dataset, batches(order, plan.batch_size), cfg.num_workers, device):
            idx = batch["index"].to(torch.long)  # (B,) cache rows
            p = StepPart.whole(order, idx, batch["num_frames"].to(torch.long))  # one process
            feats = batch["features"].to(device, non_blocking=True).float()  # (B, F, D)
            frames, vmask = train_frame_indices(p.num_frames, feats.shape[1], cfg.frames, gen)  # (B, K)
            with opt.autocast():
                out = model(gather_frames(feats, frames.to(device)), vmask.to(device))
            opt.step(recognition_loss(out, idx, p, labels, cfg.label_smoothing, device).total)
            opt.schedule()
    model.eval()


def check_self_questioning(cfg: TrainConfig) -> None:
    """InputError for a `predicted` run whose model reads no question (its K first-pass models would be wasted)."""
    if not {**preset_model_fields(cfg.preset), **cfg.model_overrides}.get("use_question", True):
        raise InputError(f"--questions predicted: preset {cfg.preset!r} reads no question (use_question false), so "
                         "the candidates would never reach it; use a question-reading preset or --questions templates")


def given_first_pass(cfg: TrainConfig, cache: CacheFile, device: torch.device) -> FirstPass:
    """The checkpoint `cfg.candidates_from` as a first pass, checked against the training cache's classes and task."""
    given = TrainedModel.load(cfg.candidates_from, device)
    diff = given.vocab.difference(cache.verb_keys, cache.noun_keys)
    if diff is not None:
        raise InputError(f"--candidates-from {cfg.candidates_from}: its verb/noun classes differ from the train "
                         f"cache {cache.path} ({diff})")
    if given.task != cfg.task:
        raise InputError(f"--candidates-from {cfg.candidates_from}: trained for {given.task.value!r}, this run is "
                         f"{cfg.task.value!r}")
    if given.question_source == QuestionSource.PREDICTED:
        raise InputError(f"--candidates-from {cfg.candidates_from}: trained with --questions predicted, so it needs a "
                         "first pass of its own; give a model trained with templates, or the video-only preset")
    model = given.model(device)
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
    given = given_first_pass(cfg, cache, device) if cfg.candidates_from else None  # checked before the folds
    dims = cache_dims(cache, num_actions=0)
    folds = fold_ids(len(rows), cfg.candidate_folds, cfg.seed)
    epochs = cfg.candidate_epochs or cfg.epochs
    fold_cfg = dataclasses.replace(cfg, model_overrides={**cfg.model_overrides, "use_question": False})
    models, table = [], None
    for f in range(cfg.candidate_folds):
        torch.manual_seed(mix_seed(cfg.seed, f, 7))
        fit_rows = rows[folds != f]
        window = task_spec(cfg.task).window
        model, _ = build_model(fold_cfg, dims, functools.partial(feature_statistics, cache, window, fit_rows))
        model.to(device)
        fit_video_only(model, cache, fit_rows, labels, cfg, epochs, device, mix_seed(cfg.seed, f, 8))
        held = rows[folds == f]
        fold_table, _ = cache_candidates(FirstPass([model], "fold", cfg.candidates_k), cache, task_spec(cfg.task).window,
                                         held, device, max(cfg.batch_size, 64), cfg.frames, cfg.num_workers)
        table = fold_table if table is None else np.where(fold_table >= 0, fold_table, table)
        models.append(model)
    return (given or FirstPass(models, "cross-fitted", cfg.candidates_k)), table
