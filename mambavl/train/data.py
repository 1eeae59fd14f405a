"""The data of one run: the caches (checked against each other and against a resumed run), the labelled rows, the
labels, the askers of the training and validation rows, the action vocabulary and, under self-questioning, the
candidate tables."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mambavl.cache import schema
from mambavl.cache.reader import CacheFile, open_cache, require_complete
from mambavl.errors import InputError
from mambavl.extract.questions import QuestionSource
from mambavl.runtime import (
    Asker,
    FirstPass,
    Labels,
    TaskSpec,
    TrainConfig,
    TrainedModel,
    action_answers,
    action_vocab,
    cache_candidates,
    cache_dims,
    labelled_rows,
    load_labels,
    require_window,
    task_spec,
)
from mambavl.train.distributed import ProcessLayout
from mambavl.train.selfq import candidate_recall, check_self_questioning, cross_fit_candidates
from mambavl.train.state import check_resumed_cache


@dataclass
class RunData:
    """The caches of one run and what training reads from them: labelled rows, labels, askers, vocabularies and
    (with QA steps) the answer tables."""

    spec: TaskSpec
    train_cache: CacheFile
    val_cache: CacheFile | None
    train_rows: np.ndarray  # (N,) labelled valid rows of the training cache
    val_rows: np.ndarray | None
    verbs: list[str]
    nouns: list[str]
    action_pairs: list[tuple[int, int]]  # the action vocabulary: (verb, noun) pairs seen in training labels
    train_labels: Labels
    val_labels: Labels | None
    train_q: Asker
    val_q: Asker | None
    qa_kinds: tuple[str, ...]  # question kinds a QA step may draw (none without QA steps)
    # question_source "predicted": the first pass, the training rows' candidates (N_train_cache, 2, k) and the
    # candidates' recall@k on the training and validation rows (metrics row fields)
    first_pass: FirstPass | None = None
    train_candidates: np.ndarray | None = None
    candidate_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def window(self) -> str:
        return self.spec.window

    @property
    def has_nouns(self) -> bool:
        return len(self.nouns) > 0

    def data_dims(self) -> dict[str, int]:
        """The ModelConfig fields that come from the data (`mambavl.runtime.DATA_FIELDS`)."""
        return cache_dims(self.train_cache, len(self.action_pairs))


def open_caches(cfg: TrainConfig, resumed: TrainedModel | None, run: Path) -> tuple[CacheFile, CacheFile | None]:
    """The training and validation caches, checked against each other (and against the run being resumed)."""
    window = task_spec(cfg.task).window
    train_cache = open_cache(cfg.train_cache)
    require_window(train_cache, window)
    require_complete(train_cache, window, cfg.allow_incomplete, "train")
    if resumed is not None:
        check_resumed_cache(resumed, train_cache, run)
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


def load_data(cfg: TrainConfig, resumed: TrainedModel | None, run: Path, device: torch.device,
              layout: ProcessLayout) -> RunData:
    """Open and check the caches; the action vocabulary comes from the resumed run or the training labels.
    Under `predicted`, the candidate tables: every process computes them alike (the same seeds), then rank 0's are
    sent to all, so that no rank's candidates can differ by a nondeterministic GPU kernel."""
    spec = task_spec(cfg.task)
    if cfg.question_source == QuestionSource.PREDICTED:
        check_self_questioning(cfg)
    train_cache, val_cache = open_caches(cfg, resumed, run)
    train_rows = labelled_rows(train_cache, spec.window, "train")
    val_rows = labelled_rows(val_cache, spec.window, "val") if val_cache is not None else None
    verbs, nouns = list(train_cache.verb_keys), list(train_cache.noun_keys)
    if resumed is not None:
        action_pairs = list(resumed.vocab.action_pairs)
    else:
        action_pairs = action_vocab(train_cache, train_rows) if nouns else []
    pair_index = {p: i for i, p in enumerate(action_pairs)}
    train_labels = load_labels(train_cache, pair_index)
    val_labels = load_labels(val_cache, pair_index) if val_cache is not None else None
    first_pass, train_cand, val_cand, recall = None, None, None, {}
    if cfg.question_source == QuestionSource.PREDICTED:
        if resumed is not None:  # resume: the first pass and the training rows' candidates travel in the checkpoint
            first_pass = resumed.first_pass_models(device)
            train_cand = resumed.train_candidates.numpy()
        else:
            # each process trains the folds alone, with the global batch (batch_size is per process)
            first_pass, train_cand = cross_fit_candidates(
                dataclasses.replace(cfg, batch_size=cfg.batch_size * layout.world), train_cache, train_rows,
                train_labels, device)
        if val_cache is not None:
            val_cand, _ = cache_candidates(first_pass, val_cache, spec.window, val_rows, device,
                                           max(cfg.batch_size, 64), cfg.frames, cfg.num_workers)
        if layout.world > 1:
            tables = [train_cand, val_cand]
            dist.broadcast_object_list(tables, src=0)
            train_cand, val_cand = tables
        recall = candidate_recall(train_cand, train_rows, train_labels, "train")
        if val_cache is not None:
            recall.update(candidate_recall(val_cand, val_rows, val_labels, "val"))
    action = action_answers(train_cache, action_pairs) if cfg.qa_weight > 0 else None  # (A, Dt)
    train_q = Asker.of_cache(train_cache, spec, cfg.question_source, candidates=train_cand, action_answers=action)
    val_q = (Asker.of_cache(val_cache, spec, cfg.question_source, candidates=val_cand, evaluation=True)
             if val_cache is not None else None)
    qa_kinds: tuple[str, ...] = ()
    if cfg.qa_weight > 0:
        # a cache without the action question (or its answers) trains the other kinds only
        qa_kinds = spec.qa_kinds_for(bool(nouns), action is not None)
        for kind in qa_kinds:
            if kind not in train_q.templates or len(train_q.templates[kind]) == 0:
                raise InputError(f"cache {train_cache.path} has no {kind!r} template questions for QA steps")
    return RunData(spec=spec, train_cache=train_cache, val_cache=val_cache, train_rows=train_rows, val_rows=val_rows,
                   verbs=verbs, nouns=nouns, action_pairs=action_pairs, train_labels=train_labels,
                   val_labels=val_labels, train_q=train_q, val_q=val_q, qa_kinds=qa_kinds, first_pass=first_pass,
                   train_candidates=train_cand, candidate_metrics=recall)
