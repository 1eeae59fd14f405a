"""Scoring a cache with a model: logits for every valid row of a window (`predict_scores`, shared by evaluation
and prediction; `predict_logits`, used by validation during training) and the validation metrics."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from mambavl.cache import schema
from mambavl.cache.reader import CacheFile, SegmentDataset, open_cache
from mambavl.data.sampling import subsample
from mambavl.device import resolve_device
from mambavl.extract.questions import QuestionSource
from mambavl.runtime.config import HEAD_KINDS, Task
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
    require_window(cache, window)
    dev = resolve_device(device)
    model.to(dev)
    questions = Questions(cache, source, HEAD_KINDS[task])
    rows = np.asarray(cache.valid_indices(window), dtype=np.int64)
    dataset = SegmentDataset(cache, window=window, indices=rows)
    res, _ = predict_logits(model, dataset, questions, dev, batch_size, frames)
    n = len(rows)
    return {
        "verb": res["verb"].numpy() if "verb" in res else np.zeros((n, 0), np.float32),
        "noun": res["noun"].numpy() if "noun" in res else None,
        "action": res["action"].numpy() if "action" in res else None,
        "indices": res["indices"].numpy().astype(np.int64) if "indices" in res else np.zeros(0, np.int64),
    }


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


def validation_metrics(scores: dict[str, torch.Tensor], labels: Labels) -> dict[str, float]:
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
