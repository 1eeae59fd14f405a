"""Scoring clips with a model: one batch type for cache rows and freshly encoded clips (`ClipBatch`, made by
`present`), and the loops every inference front-end shares — the heads' logits (`head_logits`), the QA head's answers
(`qa_logits`), the first pass's probabilities and candidates — plus `predict_scores` (every valid row of a cache
window) and the validation metrics. Training's validation, `evaluate`, the audit and `predict` all score through
these functions and an `Asker`."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mambavl import metrics as M
from mambavl.cache import schema
from mambavl.cache.dataset import SegmentDataset
from mambavl.cache.reader import CacheFile, QuestionBank, open_cache
from mambavl.data.sampling import subsample
from mambavl.device import Precision, autocast, resolve_device, resolve_precision
from mambavl.errors import InputError
from mambavl.extract.questions import QuestionSource
from mambavl.extract.views import AGGREGATION
from mambavl.runtime.candidates import FirstPass, candidate_table
from mambavl.runtime.questions import Asker, Labels, require_window
from mambavl.runtime.task import TaskSpec, spec_of_window


@dataclass
class ClipBatch:
    """Clips as the model reads them: video tokens (B, K, D) float32 and mask (B, K) on the model's device, and the
    rows (B,) int64 they are (cache rows, or 0..B-1 for fresh clips), which index per-row questions and candidates."""

    video: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)


def present(features: torch.Tensor, num_frames: torch.Tensor, frames: int, device: torch.device,
            rows: torch.Tensor | None = None) -> ClipBatch:
    """The one way clips reach the model at inference: features (B, F, D) with num_frames (B,) valid tokens each,
    sub-sampled to `frames` tokens (0: all) as evaluation does (`mambavl.data.sampling.subsample`), on `device`.
    Pinned, non-blocking copies when the device is a GPU."""
    # the cache's dtype crosses to the device (asynchronously from pinned memory) and is widened there: a dtype
    # change inside the host-to-device copy would convert on the host into unpinned memory and copy twice the bytes
    feats = features.to(device, non_blocking=True).float()  # (B, F, D)
    video, mask = subsample(feats, num_frames.to(device), frames, train=False)  # (B, K, D), (B, K)
    rows = torch.arange(len(video)) if rows is None else rows.to(torch.long)
    return ClipBatch(video, mask, rows)


def batches(positions: np.ndarray, batch_size: int) -> list[list[int]]:
    """Consecutive batches of `batch_size` dataset positions (the last one shorter)."""
    return [positions[i : i + batch_size].tolist() for i in range(0, len(positions), batch_size)]


def loader(dataset: SegmentDataset, batches: list[list[int]], num_workers: int, device: torch.device | None = None):
    """A DataLoader over `dataset` yielding exactly `batches` (lists of positions), in order; batches in pinned
    memory when they go to a CUDA `device` (the copies to it are then asynchronous)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=device is not None and device.type == "cuda",
        # The loader's own base seed would otherwise be drawn from the global RNG.
        generator=torch.Generator().manual_seed(0),
    )


def clip_batches(dataset: SegmentDataset, batch_size: int, frames: int, device: torch.device,
                 num_workers: int = 0) -> Iterator[ClipBatch]:
    """The rows of `dataset`, in order, as ClipBatches of at most `batch_size` clips."""
    for batch in loader(dataset, batches(np.arange(len(dataset)), batch_size), num_workers, device):
        yield present(batch["features"], batch["num_frames"], frames, device, batch["index"])


@torch.no_grad()
def head_logits(model: nn.Module, clips: Iterable[ClipBatch], asker: Asker) -> tuple[dict[str, torch.Tensor], int]:
    """The heads' logits for `clips`, in order: {"verb": (N, V), "noun": (N, Nn)?, "action": (N, A)?, "indices":
    (N,)} (CPU float32; evaluation phrasing of the asker's questions), and the number of question fallbacks."""
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {}
    fallbacks = 0
    for clip in clips:
        qt, qm, fb = asker.head_tokens(clip.rows, train=False, generator=None, device=clip.video.device)
        fallbacks += fb
        res = model(clip.video, clip.mask, qt, qm)
        for key in ("verb", "noun", "action"):
            if key in res:
                out.setdefault(key, []).append(res[key].float().cpu())
        out.setdefault("indices", []).append(clip.rows)
    model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}, fallbacks


@torch.no_grad()
def qa_logits(model: nn.Module, clips: Iterable[ClipBatch], asker: Asker,
              kinds: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The QA head's answers to each question kind (default: every kind the asker can ask), for `clips` in order.

    Each kind's evaluation phrasing is fused with the clip; `MambaVL.qa_logits` scores the kind's answer table,
    `MambaVL.scene_logits` the nouns of a multi-label kind. Returns {kind: (N, K) float32 logits, "indices": (N,)}.
    """
    kinds = asker.qa_kinds() if kinds is None else kinds
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {}
    for clip in clips:
        dev = clip.video.device
        for kind in kinds:
            qt, qm = asker.qa_question(kind, len(clip), train=False, generator=None, device=dev)
            emb = model.qa_embed(model.fuse(clip.video, clip.mask, qt, qm))  # (B, Dt)
            score = model.scene_logits if asker.spec.is_multi_label(kind) else model.qa_logits
            out.setdefault(kind, []).append(score(emb, asker.answers.for_kind(kind).to(dev)).float().cpu())
        out.setdefault("indices", []).append(clip.rows)
    model.train(was_training)
    return {k: torch.cat(v).numpy() for k, v in out.items()} if out else {"indices": np.zeros(0, np.int64)}


@torch.no_grad()
def first_pass_probs(first_pass: FirstPass, clips: Iterable[ClipBatch], templates: Asker) -> dict[str, np.ndarray]:
    """The first pass's mean class probabilities for `clips`, in order: {"verb": (R, V), "noun": (R, Nn)?} float32.
    Models that read questions are asked the template questions of `templates` (evaluation phrasing)."""
    out: dict[str, list[torch.Tensor]] = {}
    for clip in clips:
        first_pass.to(clip.video.device)
        qt, qm, _ = templates.head_tokens(clip.rows, train=False, generator=None, device=clip.video.device)
        for key, p in first_pass.probs(clip.video, clip.mask, qt, qm).items():
            out.setdefault(key, []).append(p.cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def cache_candidates(first_pass: FirstPass, cache: CacheFile, window: str, rows: np.ndarray, device: torch.device,
                     batch_size: int, frames: int, num_workers: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Candidates of `rows` of a cache: ((N, 2, k) int64 table over all N cache rows, -1 outside `rows`; the first
    pass's probabilities {"verb": (R, V), "noun": (R, Nn)?} of `rows`, in order)."""
    templates = Asker.of_cache(cache, spec_of_window(window))
    clips = clip_batches(SegmentDataset(cache, window=window, indices=rows), batch_size, frames, device, num_workers)
    probs = first_pass_probs(first_pass, clips, templates)
    return candidate_table(first_pass, probs, rows, cache.n), probs


def chosen_views(available: int, views: Sequence[int] | None) -> list[int]:
    """The view indices to score: `views` (checked against the `available` ones), or all of them."""
    if views is None:
        return list(range(available))
    chosen = [int(v) for v in views]
    bad = [v for v in chosen if not 0 <= v < available]
    if bad or not chosen:
        raise InputError(f"views {chosen}: the cache holds views 0..{available - 1}")
    return chosen


def average_views(per_view: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Combine the `head_logits` of the same rows seen through several views: for each head, the log of the mean of
    the views' softmax probabilities, (N, C) -- softmax of it is that mean exactly (it sums to 1), and its ranking is
    the mean probability's. One view: returned as it is (its logits)."""
    if len(per_view) == 1:
        return per_view[0]
    out = dict(per_view[0])
    for key in ("verb", "noun", "action"):
        if key in out:
            logp = torch.stack([torch.log_softmax(v[key].double(), dim=-1) for v in per_view])  # (V, N, C)
            # log(mean_v p_v) in log space: no probability underflows to log(0)
            out[key] = (torch.logsumexp(logp, dim=0) - math.log(len(per_view))).float()
    return out


def view_protocol(cache: CacheFile, views: Sequence[int] | None = None, window: str = schema.RECOGNITION) -> dict:
    """metrics.json's "views" block: {"temporal": T, "spatial": S, "scored": [view indices], "aggregation": ...,
    "definition": ...} of `cache` scored with `views` (default all; the anticipation window has one view)."""
    temporal, spatial = schema.view_counts(cache.attrs) if window == schema.RECOGNITION else (1, 1)
    scored = chosen_views(temporal * spatial, views)
    return {"temporal": temporal, "spatial": spatial, "scored": scored,
            "aggregation": AGGREGATION if len(scored) > 1 else "none (one view)",
            "definition": str(cache.attrs.get("view_definition", "one view: the centre crop of the uniform grid"))}


def predict_scores(
    model: nn.Module,
    cache: CacheFile | str | os.PathLike,
    window: str = schema.RECOGNITION,
    question_source: QuestionSource | str = QuestionSource.TEMPLATES,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    frames: int = 8,
    first_pass: FirstPass | None = None,
    allow_label_keyed: bool = False,
    bank: QuestionBank | None = None,
    views: Sequence[int] | None = None,
    precision: Precision | str = Precision.FP32,
) -> dict[str, np.ndarray | None]:
    """Scores of every valid row of `cache` in `window` (the shared entry point of evaluation and the audit).

    Scores are the heads' logits (apply softmax for probabilities). Questions follow `question_source` with the
    evaluation phrasing (template paraphrase 0); the anticipation window asks next_verb / next_noun. Pass the run's
    `train_config.frames` as `frames` so evaluation sub-samples like training did. `predicted` needs the
    `first_pass` (`TrainedModel.first_pass`); file questions found by a row's own class are refused unless
    `allow_label_keyed` (the audit measures them). `bank` replaces the cache's question table (the audit's shuffled
    and label-permuted tables).

    Views: a multi-view cache (`mambavl.extract.views`) is scored view by view and the views are averaged
    (`average_views`: the mean of their softmax probabilities, returned as its log, so that a softmax of the scores
    gives that mean exactly); `views` picks view indices (default: all; `view_protocol` describes the choice).
    A single view's scores are its logits, untouched. Predicted questions' candidates come from view 0.
    `precision`: the autocast of the forward passes (`mambavl.device.resolve_precision`; auto is fp32); scores are
    float32 either way.

    Returns dict(verb (N, V) float32, noun (N, Nn) float32 or None without a noun head, action (N, A) float32 or None
    without an action head, indices (N,) int64 cache rows; under `predicted` also candidates (N, 2, k) int64 and
    first_pass {"verb": (N, V), "noun": (N, Nn)?} probabilities), numpy arrays.
    """
    with contextlib.ExitStack() as owned:
        if not isinstance(cache, CacheFile):  # a path: the cache opened here is closed on return; a CacheFile given
            cache = owned.enter_context(open_cache(cache))  # is the caller's to close (its handle stays open)
        source = QuestionSource(question_source)
        spec: TaskSpec = spec_of_window(window)
        require_window(cache, window)
        dev = resolve_device(device) if isinstance(device, str) else device
        half = autocast(resolve_precision(precision, dev), dev)
        model.to(dev)
        rows = np.asarray(cache.valid_indices(window), dtype=np.int64)
        table, probs = None, None
        if source == QuestionSource.PREDICTED:
            if first_pass is None:
                raise InputError("predicted questions need a first pass: a checkpoint trained with --questions "
                                 "predicted carries one (Python API: first_pass=)")
            with half:
                table, probs = cache_candidates(first_pass, cache, window, rows, dev, batch_size, frames)
        asker = Asker.of_cache(cache, spec, source, candidates=table, evaluation=True,
                               allow_label_keyed=allow_label_keyed, bank=bank)
        dataset = SegmentDataset(cache, window=window, indices=rows)
        per_view = []
        for view in chosen_views(dataset.num_views, views):
            dataset.view = view
            with half:
                per_view.append(head_logits(model, clip_batches(dataset, batch_size, frames, dev), asker)[0])
        res = average_views(per_view)
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
    the evaluation computes them (the project's tie order; actions from the verb and noun scores, EK-100 style);
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
