"""Scoring a cache with a model: logits for every valid row of a window (`predict_scores`, shared by evaluation
and prediction; `predict_logits`, used by validation during training) and the validation metrics."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from mambavl import metrics as M
from mambavl.cache import schema
from mambavl.cache.reader import CacheFile, SegmentDataset, open_cache
from mambavl.data.sampling import subsample
from mambavl.device import resolve_device
from mambavl.errors import InputError
from mambavl.extract.questions import QuestionSource
from mambavl.runtime.candidates import FirstPass, candidate_table
from mambavl.runtime.config import HEAD_KINDS, QA_KINDS, QA_TARGET, Task
from mambavl.runtime.questions import Labels, Questions, require_window


def batches(positions: np.ndarray, batch_size: int) -> list[list[int]]:
    """Consecutive batches of `batch_size` dataset positions (the last one shorter)."""
    return [positions[i : i + batch_size].tolist() for i in range(0, len(positions), batch_size)]


def loader(dataset: SegmentDataset, batches: list[list[int]], num_workers: int):
    """A DataLoader over `dataset` yielding exactly `batches` (lists of positions), in order."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        # The loader's own base seed would otherwise be drawn from the global RNG.
        generator=torch.Generator().manual_seed(0),
    )


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    dataset: SegmentDataset,
    questions: Questions,
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
    for batch in loader(dataset, batches(np.arange(len(dataset)), batch_size), num_workers):
        feats = batch["features"].to(device=device, dtype=torch.float32)  # (B, F, D)
        video, vmask = subsample(feats, batch["num_frames"].to(device), frames, train=False)  # (B, K, D), (B, K)
        idx = batch["index"].to(torch.long)
        qt, qm, fb = questions.head_tokens(idx, train=False, generator=None, device=device)  # (B, 2, T', Dt)
        fallbacks += fb
        res = model(video, vmask, qt, qm)
        for key in ("verb", "noun", "action"):
            if key in res:
                out.setdefault(key, []).append(res[key].float().cpu())
        out.setdefault("indices", []).append(idx)
    model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}, fallbacks


@torch.no_grad()
def first_pass_probs(
    first_pass: FirstPass,
    dataset: SegmentDataset,
    templates: Questions,
    device: torch.device,
    batch_size: int,
    frames: int,
    num_workers: int = 0,
) -> dict[str, np.ndarray]:
    """The first pass's mean class probabilities for the rows of `dataset`, in order: {"verb": (R, V), "noun":
    (R, Nn)?} float32. Models that read questions are asked the template questions of `templates` (evaluation
    phrasing); the video is sub-sampled to `frames` tokens like evaluation does."""
    first_pass.to(device)
    out: dict[str, list[torch.Tensor]] = {}
    for batch in loader(dataset, batches(np.arange(len(dataset)), batch_size), num_workers):
        feats = batch["features"].to(device=device, dtype=torch.float32)  # (B, F, D)
        video, vmask = subsample(feats, batch["num_frames"].to(device), frames, train=False)  # (B, K, D), (B, K)
        qt, qm, _ = templates.head_tokens(batch["index"].to(torch.long), train=False, generator=None, device=device)
        for key, p in first_pass.probs(video, vmask, qt, qm).items():
            out.setdefault(key, []).append(p.cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def cache_candidates(
    first_pass: FirstPass,
    cache: CacheFile,
    window: str,
    rows: np.ndarray,
    device: torch.device,
    batch_size: int,
    frames: int,
    num_workers: int = 0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Candidates of `rows` of a cache: ((N, 2, k) int64 table over all N cache rows, -1 outside `rows`; the first
    pass's probabilities {"verb": (R, V), "noun": (R, Nn)?} of `rows`, in order)."""
    task = Task.ANTICIPATION if window == schema.ANTICIPATION else Task.RECOGNITION
    templates = Questions(cache, QuestionSource.TEMPLATES, HEAD_KINDS[task])
    probs = first_pass_probs(first_pass, SegmentDataset(cache, window=window, indices=rows), templates, device,
                             batch_size, frames, num_workers)
    return candidate_table(first_pass, probs, rows, cache.n), probs


def predict_scores(
    model: nn.Module,
    cache: CacheFile | str | os.PathLike,
    window: str = "recognition",
    question_source: QuestionSource | str = QuestionSource.TEMPLATES,
    device: str = "cpu",
    batch_size: int = 256,
    frames: int = 8,
    first_pass: FirstPass | None = None,
    allow_label_keyed: bool = False,
) -> dict[str, np.ndarray | None]:
    """Scores of every valid row of `cache` in `window` (the shared entry point of evaluation and prediction).

    Scores are the heads' logits (apply softmax for probabilities). Questions follow `question_source` with the
    evaluation phrasing (template paraphrase 0); the anticipation window asks next_verb / next_noun. Pass the
    checkpoint's `train_config["frames"]` as `frames` so evaluation sub-samples like training did. `predicted`
    needs the `first_pass` (`FirstPass.from_state(ckpt["first_pass"])`); file questions found by a row's own class
    are refused unless `allow_label_keyed` (the audit measures them).

    Returns dict(verb (N, V) float32, noun (N, Nn) float32 or None without a noun head, action (N, A) float32 or None
    without an action head, indices (N,) int64 cache rows; under `predicted` also candidates (N, 2, k) int64 and
    first_pass {"verb": (N, V), "noun": (N, Nn)?} probabilities), numpy arrays.
    """
    if not isinstance(cache, CacheFile):
        cache = open_cache(cache)
    source = QuestionSource(question_source)
    task = Task.ANTICIPATION if window == schema.ANTICIPATION else Task.RECOGNITION
    require_window(cache, window)
    dev = resolve_device(device)
    model.to(dev)
    rows = np.asarray(cache.valid_indices(window), dtype=np.int64)
    table, probs = None, None
    if source == QuestionSource.PREDICTED:
        if first_pass is None:
            raise InputError("predicted questions need a first pass: a checkpoint trained with --questions predicted "
                             "carries one (Python API: first_pass=)")
        table, probs = cache_candidates(first_pass, cache, window, rows, dev, batch_size, frames)
    questions = Questions(cache, source, HEAD_KINDS[task], candidates=table, evaluation=True,
                          allow_label_keyed=allow_label_keyed)
    dataset = SegmentDataset(cache, window=window, indices=rows)
    res, _ = predict_logits(model, dataset, questions, dev, batch_size, frames)
    n = len(rows)
    out = {
        "verb": res["verb"].numpy() if "verb" in res else np.zeros((n, 0), np.float32),
        "noun": res["noun"].numpy() if "noun" in res else None,
        "action": res["action"].numpy() if "action" in res else None,
        "indices": res["indices"].numpy().astype(np.int64) if "indices" in res else np.zeros(0, np.int64),
    }
    if table is not None:
        out["candidates"] = table[rows]
        out["first_pass"] = probs
    return out


def validation_metrics(scores: dict[str, torch.Tensor], labels: Labels) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) of verb, noun and action on labelled rows, computed by `mambavl.metrics` exactly as
    the evaluation computes them (official tie order; actions from the verb and noun scores, EK-100 style);
    `val_action_head_top1` scores the action head on rows whose pair is in the training action vocabulary."""
    rows = scores["indices"]
    vt, nt, at = (labels.verb[rows].cpu().numpy(), labels.noun[rows].cpu().numpy(), labels.action[rows].cpu().numpy())
    verb = scores["verb"].float().cpu().numpy()  # (N, V)
    m: dict[str, float] = {}

    def pct(acc: dict[int, float], prefix: str) -> None:
        for k, value in acc.items():
            m[f"{prefix}_top{k}"] = float(value * 100)

    lab = vt >= 0
    pct(M.topk_accuracy(verb[lab], vt[lab], (1, 5)), "val_verb")
    if "noun" in scores:
        noun = scores["noun"].float().cpu().numpy()  # (N, Nn)
        nl = nt >= 0
        pct(M.topk_accuracy(noun[nl], nt[nl], (1, 5)), "val_noun")
        both = lab & nl
        pairs, _ = M.action_scores_from_verb_noun(verb[both], noun[both])  # (B, K, 2)
        pct(M.action_topk_accuracy(pairs, vt[both], nt[both], (1, 5)), "val_action")
    if "action" in scores:
        seen = at >= 0
        m["val_action_head_top1"] = float(M.topk_accuracy(scores["action"].float().cpu().numpy()[seen], at[seen],
                                                          (1,))[1] * 100)
    return m


@torch.no_grad()
def qa_scores(
    model: nn.Module,
    cache: CacheFile,
    window: str,
    device: str = "cpu",
    batch_size: int = 256,
    frames: int = 8,
    action_answers: torch.Tensor | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The QA head's answers to every question kind of the task, for every valid row of `window`.

    Each kind's evaluation phrasing (template paraphrase 0) is fused with the clip; `MambaVL.qa_logits` scores the
    verb or noun answers (the cache's), or the action answers `action_answers` (A, Dt) (a checkpoint's
    "action_answers": the training pairs, in the order of its action vocabulary); `MambaVL.scene_logits` the nouns
    for the multi-label scene question. A kind whose answers or template question are missing (no nouns, no
    `action_answers`, a cache without the action question) is left out.
    Returns {kind: (N, K) float32 logits, ..., "indices": (N,) int64}.
    """
    task = Task.ANTICIPATION if window == schema.ANTICIPATION else Task.RECOGNITION
    require_window(cache, window)
    dev = resolve_device(device)
    model.to(dev)
    was_training = model.training
    model.eval()
    answers = cache.answers()
    targets = {"verb": torch.as_tensor(answers.verb, dtype=torch.float32, device=dev)}
    if len(cache.noun_keys):
        targets["noun"] = targets["scene"] = torch.as_tensor(answers.noun, dtype=torch.float32, device=dev)
    if action_answers is not None and len(action_answers):
        targets["action"] = torch.as_tensor(np.asarray(action_answers), dtype=torch.float32, device=dev)
    questions = Questions(cache, QuestionSource.TEMPLATES, HEAD_KINDS[task])
    kinds = [k for k in QA_KINDS[task] if QA_TARGET[k] in targets and len(questions.templates.get(k, ()))]
    rows = np.asarray(cache.valid_indices(window), dtype=np.int64)
    out: dict[str, list[torch.Tensor]] = {}
    dataset = SegmentDataset(cache, window=window, indices=rows)
    for batch in loader(dataset, batches(np.arange(len(dataset)), batch_size), 0):
        feats = batch["features"].to(device=dev, dtype=torch.float32)  # (B, F, D)
        video, vmask = subsample(feats, batch["num_frames"].to(dev), frames, train=False)  # (B, K, D), (B, K)
        for kind in kinds:
            qt, qm = questions.gather(questions.template(kind, len(video), train=False, generator=None), dev)
            emb = model.qa_embed(model.fuse(video, vmask, qt, qm))  # (B, Dt)
            score = model.scene_logits if QA_TARGET[kind] == "scene" else model.qa_logits
            out.setdefault(kind, []).append(score(emb, targets[QA_TARGET[kind]]).float().cpu())
        out.setdefault("indices", []).append(batch["index"].to(torch.long))
    model.train(was_training)
    return {k: torch.cat(v).numpy() for k, v in out.items()} if out else {"indices": np.zeros(0, np.int64)}
