"""EPIC-KITCHENS-100 metrics as pure numpy functions over score arrays.

Nothing here knows about models, caches or files: the functions take scores (N, C) and labels (N,) and return
numbers, so they can be unit-tested on hand-made cases and reused on any scores (ours or an official results file).

What the official code does, and what we follow (re-implemented, not copied):

* ``epic-kitchens/C1-Action-Recognition`` ``utils/metrics.py:topk_accuracy`` — ranks classes by descending score
  (``utils/scoring.py:_scores_array_to_ranks``: ``scores.argsort()[:, ::-1]``) and counts a hit when the label is
  among the first k ranks. k larger than the number of classes means "all classes" (the official slice
  ``rankings[:, :k]`` does the same).
* **Ties (this project's rule).** Among equal scores the **higher class index ranks first**: a stable ascending sort,
  reversed, so the order is the same on every machine and numpy version. The official code has no tie rule: its
  ``argsort()`` is numpy's default (unstable) sort, whose order of equal keys depends on the numpy version and the
  CPU's sort kernels (on rounded scores, 0 of 3,000 tied rows ranked alike under numpy 1.23 and 2.4). Numbers on
  scores without ties equal the official ones; on tied scores they can differ from the official script's by the
  tied rows, in either direction, as two runs of the official script on two numpy versions do.
* ``utils/scoring.py:compute_action_scores`` — action scores from verb and noun scores: keep the top-100 verb and
  top-100 noun scores of each segment, softmax each, take the outer product and keep the 100 best (verb, noun)
  pairs. Inputs are **logits** (the softmax is applied here). The official code calls
  ``scipy.special.softmax`` without an axis, which normalises over the whole batch; that rescales every segment's
  scores by one batch-wide constant and never changes a segment's ranking. We normalise per segment so the pair
  scores are per-segment probabilities p(verb) * p(noun); rankings (hence accuracies) are identical. Tied pair
  scores follow the project's rule applied to the flattened (verb position, noun position) matrix (stable sort,
  reversed): among equal products the later position in the top-verb list (then the top-noun list) comes first.
* ``utils/actions.py:action_id_from_verb_noun`` — the action class of a (verb, noun) pair is ``verb * 1000 + noun``.
* ``utils/metrics.py:compute_metrics`` — subsets: ``all`` (every segment, top-1 and top-5), ``unseen`` (segments
  whose participant is in ``EPIC_100_unseen_participant_ids_*.csv``, top-1 only; omitted with a warning when
  empty), ``tail`` (top-1 only): verb accuracy on segments whose *verb* is a tail verb, noun accuracy on segments
  whose *noun* is a tail noun, action accuracy on segments whose verb **or** noun is tail
  (``tail_verb_bool_idx | tail_noun_bool_idx``). We compute every requested k on every subset; the official
  numbers are the subset of keys listed in `OFFICIAL_KS`.
* Anticipation (``fpv-iplab/rulstm`` ``RULSTM/utils.py:topk_recall``, used by ``RULSTM/main.py`` for the EK-100
  anticipation challenge, the baseline code of ``epic-kitchens/C2-Action-Anticipation``): class-mean top-5 recall —
  the top-5 accuracy of each class's segments, averaged over the classes **present in the labels** of the subset
  (``np.unique(labels)``), optionally intersected with a given class list (EK-55's many-shot classes). The EK-100
  branch reports it for overall / unseen / tail subsets with ``classes=None``. An empty subset gives NaN (the
  official code divides by zero).

Empty inputs: every accuracy/recall of an empty set is NaN (the official ``topk_accuracy`` raises instead), so a
subset with no members is visible in the output rather than an exception halfway through an evaluation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

# The official action id: verb * 1000 + noun (utils/actions.py:_ACTION_VERB_MULTIPLIER).
ACTION_VERB_MULTIPLIER = 1000
# How many (verb, noun) pairs the official evaluation keeps per segment (compute_action_scores(top_n=100)).
ACTION_TOP_N = 100
# The k values the official evaluation reports per subset (utils/metrics.py:compute_metrics).
OFFICIAL_KS = {"all": (1, 5), "unseen": (1,), "tail": (1,)}
SUBSETS = ("all", "unseen", "tail")
TASKS = ("verb", "noun", "action")


def _check_scores(scores: np.ndarray, labels: np.ndarray, what: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    labels = np.asarray(labels).reshape(-1)
    if scores.ndim != 2:
        raise ValueError(f"{what} must be 2-d (N, C), got shape {scores.shape}")
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(f"{what} has {scores.shape[0]} rows but there are {labels.shape[0]} labels")
    return scores, labels


def rank_classes(scores: np.ndarray, k: int | None = None) -> np.ndarray:
    """Class indices by descending score, ties ranking the **higher** class index first (the project's rule).

    scores (N, C) -> ranks (N, min(k, C)) int64 (all C when k is None). Row i, column r holds the class ranked r-th.
    A stable ascending sort, reversed (the official ``_scores_array_to_ranks`` is ``scores.argsort()[:, ::-1]`` with
    numpy's unstable default sort, whose order of equal scores is not defined; see the module docstring). NaN ranks
    last (never a top guess). Every top-k of the package (metrics, training validation, predictions) goes through it.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-d (N, C), got shape {scores.shape}")
    ranks = np.argsort(np.nan_to_num(scores.astype(np.float64), nan=-np.inf), axis=1, kind="stable")[:, ::-1]
    return ranks if k is None else ranks[:, : max(0, int(k))]


def topk_hits(ranks: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """ranks (N, K) class indices in rank order, labels (N,) -> (N,) bool: label among the first k ranks."""
    ranks = np.asarray(ranks)
    labels = np.asarray(labels).reshape(-1, 1)
    return (ranks[:, : max(0, int(k))] == labels).any(axis=1)


def _mean(hits: np.ndarray) -> float:
    return float(np.mean(hits)) if len(hits) else math.nan


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy (fraction in [0, 1]) for each k, as the official ``utils/metrics.py:topk_accuracy``.

    scores (N, C) any real scores (logits or probabilities: only the order matters), labels (N,) class ids.
    Returns {k: accuracy}; NaN for every k when N == 0. Ties rank the higher class index first (`rank_classes`); k > C
    counts all classes. A label outside [0, C) is never a hit.
    """
    scores, labels = _check_scores(scores, labels)
    ks = tuple(int(k) for k in ks)
    if not ks:
        return {}
    ranks = rank_classes(scores, max(ks))
    return {k: _mean(topk_hits(ranks, labels, k)) for k in ks}


def _softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) in float64 (max-subtracted for stability)."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def action_scores_from_verb_noun(
    verb_scores: np.ndarray, noun_scores: np.ndarray, top: int = ACTION_TOP_N
) -> tuple[np.ndarray, np.ndarray]:
    """The official action scores: the `top` best (verb, noun) pairs by p(verb) * p(noun).

    verb_scores (N, V) and noun_scores (N, Nn) are logits. As ``utils/scoring.py:compute_action_scores``: the top-`top`
    verbs and nouns of each segment are kept, each softmaxed (per segment here, see the module docstring), their
    outer product ranked, and the best `top` pairs returned. Restricting to the top verbs/nouns first is exact: a pair
    whose noun is not among the `top` best nouns has at least `top` better pairs.

    Returns pairs (N, K, 2) int64 [verb, noun] in rank order and scores (N, K) float64, K = min(top, V * Nn).
    Tied pair scores rank by the project's rule on the flattened (verb position, noun position) matrix: the later
    verb position first, then the later noun position.
    """
    verb_scores = np.asarray(verb_scores)
    noun_scores = np.asarray(noun_scores)
    if verb_scores.ndim != 2 or noun_scores.ndim != 2 or verb_scores.shape[0] != noun_scores.shape[0]:
        raise ValueError(f"verb/noun scores must be (N, V) and (N, Nn), got {verb_scores.shape}, {noun_scores.shape}")
    n, nv = verb_scores.shape
    nn = noun_scores.shape[1]
    k = min(int(top), nv * nn)
    if n == 0 or k == 0:
        return np.zeros((n, k, 2), np.int64), np.zeros((n, k), np.float64)
    kv, kn = min(int(top), nv), min(int(top), nn)
    top_v = rank_classes(verb_scores, kv)  # (N, kv) the top lists, ties: higher class first
    top_n = rank_classes(noun_scores, kn)  # (N, kn)
    rows = np.arange(n)[:, None]
    pv = _softmax(verb_scores[rows, top_v])  # (N, kv), non-increasing along the row
    pn = _softmax(noun_scores[rows, top_n])  # (N, kn)
    # Only pairs of rank positions (i, j) with (i + 1) * (j + 1) <= k can make the top k when no two kept verb (or
    # noun) probabilities are equal: every pair (i', j') with i' <= i and j' <= j then has a strictly larger
    # product. That leaves ~k ln k candidates instead of kv * kn, so a full EK-100 split needs megabytes, not
    # gigabytes. Rows with tied probabilities (where an equal product may sit outside) take the full matrix.
    ci, cj = _candidate_positions(kv, kn, k)  # (M,), (M,)
    prod = pv[:, ci] * pn[:, cj]  # (N, M)
    # product descending, ties by flattened position descending (verb position, then noun)
    order = np.lexsort((np.broadcast_to(-cj, prod.shape), np.broadcast_to(-ci, prod.shape), -prod), axis=-1)[:, :k]
    pi, pj = ci[order], cj[order]  # (N, K) positions
    scores = prod[rows, order]
    tied = (np.diff(pv, axis=1) == 0).any(axis=1) | (np.diff(pn, axis=1) == 0).any(axis=1)  # (N,)
    for r in np.flatnonzero(tied):
        full = (pv[r][:, None] * pn[r][None, :]).reshape(-1)  # (kv * kn,)
        flat = np.argsort(full, kind="stable")[::-1][:k]
        pi[r], pj[r] = flat // kn, flat % kn
        scores[r] = full[flat]
    pairs = np.stack([top_v[rows, pi], top_n[rows, pj]], axis=-1).astype(np.int64)  # (N, K, 2)
    return pairs, scores


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (N, C) in float64."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def action_pairs_in_vocabulary(
    verb_scores: np.ndarray, noun_scores: np.ndarray, vocabulary: np.ndarray, k: int = 5, chunk: int = 1024
) -> np.ndarray:
    """The best `k` actions of each segment among a given action vocabulary (the "training actions" ranking).

    verb_scores (N, V), noun_scores (N, Nn) logits; vocabulary (A, 2) [verb, noun] pairs, e.g. the actions seen in
    training (RULSTM's EK-100 anticipation model scores only its 3,806 training actions, so published anticipation
    numbers rank those). A pair's score is p(verb) * p(noun) (softmax over all classes), compared in log space; ties
    rank the later vocabulary entry first (`rank_classes`). Rows are processed `chunk` at a time (N x A scores would
    not fit for a whole split). Returns (N, min(k, A), 2) int64 [verb, noun] in rank order.
    """
    vocabulary = np.asarray(vocabulary, dtype=np.int64).reshape(-1, 2)
    verb_scores, noun_scores = np.asarray(verb_scores), np.asarray(noun_scores)
    n, kk = verb_scores.shape[0], min(int(k), len(vocabulary))
    out = np.zeros((n, kk, 2), dtype=np.int64)
    if kk == 0:
        return out
    for lo in range(0, n, chunk):
        lv = _log_softmax(verb_scores[lo:lo + chunk])[:, vocabulary[:, 0]]  # (n', A)
        ln = _log_softmax(noun_scores[lo:lo + chunk])[:, vocabulary[:, 1]]
        out[lo:lo + chunk] = vocabulary[rank_classes(lv + ln, kk)]
    return out


def _candidate_positions(kv: int, kn: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank positions (i, j), i < kv, j < kn, with (i + 1) * (j + 1) <= k: the only pairs that can rank in the top k."""
    ci, cj = [], []
    for i in range(min(kv, k)):
        m = min(kn, k // (i + 1))
        ci.extend([i] * m)
        cj.extend(range(m))
    return np.asarray(ci, dtype=np.int64), np.asarray(cj, dtype=np.int64)


def action_ids(verbs: np.ndarray, nouns: np.ndarray) -> np.ndarray:
    """Official action class ids ``verb * 1000 + noun`` (``utils/actions.py:action_id_from_verb_noun``).

    Valid for up to 1000 noun classes (EK-100 has 300); raises ValueError beyond that, where ids would collide.
    """
    verbs = np.asarray(verbs, dtype=np.int64)
    nouns = np.asarray(nouns, dtype=np.int64)
    if nouns.size and nouns.max() >= ACTION_VERB_MULTIPLIER:
        raise ValueError(f"noun class {int(nouns.max())} >= {ACTION_VERB_MULTIPLIER}: action ids would collide")
    return verbs * ACTION_VERB_MULTIPLIER + nouns


def action_topk_hits(pairs: np.ndarray, verb_labels: np.ndarray, noun_labels: np.ndarray, k: int) -> np.ndarray:
    """pairs (N, K, 2) ranked (verb, noun), labels (N,) each -> (N,) bool: the labelled pair is among the first k."""
    pairs = np.asarray(pairs)
    top = pairs[:, : max(0, int(k))]  # (N, k, 2)
    v = np.asarray(verb_labels).reshape(-1, 1)
    nn = np.asarray(noun_labels).reshape(-1, 1)
    return ((top[..., 0] == v) & (top[..., 1] == nn)).any(axis=1)


def action_topk_accuracy(
    pairs: np.ndarray, verb_labels: np.ndarray, noun_labels: np.ndarray, ks: Iterable[int] = (1, 5)
) -> dict[int, float]:
    """Action top-k accuracy from ranked pairs (see `action_scores_from_verb_noun`): {k: fraction}, NaN when N == 0.

    The official evaluation ranks the (at most 100) pairs kept per segment; a labelled pair outside them is a miss.
    """
    pairs = np.asarray(pairs)
    if pairs.ndim != 3 or pairs.shape[-1] != 2:
        raise ValueError(f"pairs must be (N, K, 2), got shape {pairs.shape}")
    if pairs.shape[0] != len(verb_labels) or pairs.shape[0] != len(noun_labels):
        raise ValueError(f"pairs has {pairs.shape[0]} rows but labels have {len(verb_labels)} / {len(noun_labels)}")
    return {int(k): _mean(action_topk_hits(pairs, verb_labels, noun_labels, int(k))) for k in ks}


def class_mean_recall(hits: np.ndarray, labels: np.ndarray, classes: Iterable[int] | None = None) -> float:
    """Mean over classes of the per-class hit rate (recall), as RULSTM ``utils.py:topk_recall``.

    hits (N,) bool (e.g. top-5 hits), labels (N,) class ids. Classes averaged = classes present in `labels`,
    intersected with `classes` when given (EK-55's many-shot lists). NaN when no class remains.
    """
    hits = np.asarray(hits, dtype=bool).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if hits.shape != labels.shape:
        raise ValueError(f"hits has {hits.shape[0]} entries but there are {labels.shape[0]} labels")
    present = np.unique(labels)
    if classes is not None:
        present = np.intersect1d(present, np.asarray(list(classes)))
    if len(present) == 0:
        return math.nan
    return float(np.mean([hits[labels == c].mean() for c in present]))


def class_mean_topk_recall(
    scores: np.ndarray, labels: np.ndarray, k: int = 5, classes: Iterable[int] | None = None
) -> float:
    """Class-mean top-k recall (the EK-100 anticipation metric with k = 5), fraction in [0, 1].

    scores (N, C), labels (N,). See `class_mean_recall` for which classes are averaged; NaN when none.
    """
    scores, labels = _check_scores(scores, labels)
    return class_mean_recall(topk_hits(rank_classes(scores, k), labels, k), labels, classes)


def per_class_accuracy(
    scores: np.ndarray, labels: np.ndarray, num_classes: int | None = None, ks: Sequence[int] = (1, 5)
) -> dict[str, np.ndarray]:
    """Per-class support and top-k accuracy.

    scores (N, C), labels (N,) -> {"support": (C,) int64, "top1": (C,) float64, "top5": ..., one "top{k}" per k};
    accuracy is NaN for classes with no segment. `num_classes` defaults to C.
    """
    scores, labels = _check_scores(scores, labels)
    c = scores.shape[1] if num_classes is None else int(num_classes)
    labels = labels.astype(np.int64)
    inside = (labels >= 0) & (labels < c)
    support = np.bincount(labels[inside], minlength=c).astype(np.int64)
    out: dict[str, np.ndarray] = {"support": support}
    ranks = rank_classes(scores, max(ks)) if len(ks) else None
    with np.errstate(invalid="ignore", divide="ignore"):
        for k in ks:
            hits = topk_hits(ranks, labels, k)[inside].astype(np.float64)
            correct = np.bincount(labels[inside], weights=hits, minlength=c)
            out[f"top{k}"] = np.where(support > 0, correct / np.maximum(support, 1), np.nan)
    return out


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows = true class, columns = predicted class (labels outside [0, C) are skipped)."""
    predicted = np.asarray(predicted, dtype=np.int64).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    keep = (labels >= 0) & (labels < num_classes) & (predicted >= 0) & (predicted < num_classes)
    flat = labels[keep] * num_classes + predicted[keep]
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


# Frequency buckets: classes sorted by training frequency; "head" holds the most frequent classes that together
# cover the first HEAD_SHARE of training instances, "mid" the next ones up to MID_SHARE, "tail" the rest (the
# rarest ~20 % of instances, like EK-100's own tail definition) and classes never seen in training.
BUCKETS = ("head", "mid", "tail")
HEAD_SHARE = 0.5
MID_SHARE = 0.8


def frequency_buckets(
    counts: np.ndarray, head_share: float = HEAD_SHARE, mid_share: float = MID_SHARE
) -> np.ndarray:
    """Training counts (C,) -> (C,) array of bucket names ("head" / "mid" / "tail").

    Classes are sorted by descending count (ties: lower index first); a class is "head" while the share of
    instances in more frequent classes is below `head_share`, "mid" while below `mid_share`, else "tail". So the
    most frequent class is always head, and classes with zero count are tail.
    """
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    if not 0 < head_share <= mid_share <= 1:
        raise ValueError(f"need 0 < head_share <= mid_share <= 1, got {head_share}, {mid_share}")
    out = np.full(counts.shape, "tail", dtype=object)
    total = counts.sum()
    if total <= 0:
        return out.astype(str)
    order = np.argsort(-counts, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(counts[order])[:-1]]) / total  # share of instances ranked earlier
    for cls, share, cnt in zip(order, before, counts[order]):
        if cnt <= 0:
            break
        out[cls] = "head" if share < head_share else "mid" if share < mid_share else "tail"
    return out.astype(str)


def bucket_accuracy(
    scores: np.ndarray, labels: np.ndarray, buckets: np.ndarray, ks: Iterable[int] = (1, 5)
) -> dict[str, dict]:
    """Accuracy of the segments whose label falls in each frequency bucket.

    scores (N, C), labels (N,), buckets (C,) names from `frequency_buckets`. Returns
    {bucket: {"classes": number of classes, "n": segments, "top1": ..., "top5": ...}} (NaN accuracy when n == 0).
    """
    scores, labels = _check_scores(scores, labels)
    buckets = np.asarray(buckets)
    labels = labels.astype(np.int64)
    inside = (labels >= 0) & (labels < len(buckets))
    label_bucket = np.full(len(labels), "", dtype=object)
    label_bucket[inside] = buckets[labels[inside]]
    out: dict[str, dict] = {}
    for name in BUCKETS:
        sel = label_bucket == name
        acc = topk_accuracy(scores[sel], labels[sel], ks)
        out[name] = {"classes": int((buckets == name).sum()), "n": int(sel.sum())}
        out[name].update({f"top{k}": v for k, v in acc.items()})
    return out


def _subset_masks(
    verb_labels: np.ndarray,
    noun_labels: np.ndarray | None,
    participant_ids: Sequence[str] | None,
    unseen_ids: Iterable[str] | None,
    tail_verbs: Iterable[int] | None,
    tail_nouns: Iterable[int] | None,
) -> dict[str, dict[str, np.ndarray]]:
    """Per subset, per task, the (N,) bool mask of segments counted (compute_metrics' boolean indices)."""
    n = len(verb_labels)
    every = np.ones(n, dtype=bool)
    masks: dict[str, dict[str, np.ndarray]] = {"all": {t: every for t in TASKS}}
    if unseen_ids is not None and participant_ids is not None:
        unseen = np.isin(np.asarray(participant_ids, dtype=str), np.asarray(sorted(set(unseen_ids)), dtype=str))
        masks["unseen"] = {t: unseen for t in TASKS}
    if tail_verbs is not None or tail_nouns is not None:
        tv = np.isin(verb_labels, np.asarray(sorted(set(tail_verbs or ())), dtype=np.int64))
        tn = (
            np.isin(noun_labels, np.asarray(sorted(set(tail_nouns or ())), dtype=np.int64))
            if noun_labels is not None
            else np.zeros(n, dtype=bool)
        )
        # compute_metrics: tail action = tail verb OR tail noun.
        masks["tail"] = {"verb": tv, "noun": tn, "action": tv | tn}
    return masks


def ek100_recognition_metrics(
    verb_scores: np.ndarray,
    noun_scores: np.ndarray | None,
    verb_labels: np.ndarray,
    noun_labels: np.ndarray | None,
    participant_ids: Sequence[str] | None = None,
    unseen_ids: Iterable[str] | None = None,
    tail_verbs: Iterable[int] | None = None,
    tail_nouns: Iterable[int] | None = None,
    ks: Sequence[int] = (1, 5),
) -> dict[str, dict[str, dict]]:
    """EK-100 action recognition metrics (``utils/metrics.py:compute_metrics``), fractions in [0, 1].

    verb_scores (N, V) and noun_scores (N, Nn) logits; labels (N,) each; participant_ids (N,) strings.
    noun_scores/noun_labels None (datasets without nouns) -> verb metrics only.

    Returns {subset: {task: {"n": segments, "top1": ..., "top5": ...}}} for subsets "all", "unseen" (when
    `unseen_ids` and `participant_ids` are given; omitted, with a warning, when no segment is unseen — as the
    official code does) and "tail" (when tail classes are given; verb on tail-verb segments, noun on tail-noun
    segments, action on segments with a tail verb or a tail noun). Accuracy of an empty set is NaN.
    """
    verb_scores, verb_labels = _check_scores(verb_scores, verb_labels, "verb_scores")
    verb_labels = verb_labels.astype(np.int64)
    has_nouns = noun_scores is not None and noun_labels is not None
    pairs = None
    if has_nouns:
        noun_scores, noun_labels = _check_scores(noun_scores, noun_labels, "noun_scores")
        noun_labels = noun_labels.astype(np.int64)
        if noun_scores.shape[0] != verb_scores.shape[0]:
            raise ValueError(f"verb scores have {verb_scores.shape[0]} rows, noun scores {noun_scores.shape[0]}")
        pairs, _ = action_scores_from_verb_noun(verb_scores, noun_scores, ACTION_TOP_N)  # (N, 100, 2)
    if participant_ids is not None and len(participant_ids) != len(verb_labels):
        raise ValueError(f"{len(participant_ids)} participant ids for {len(verb_labels)} segments")
    masks = _subset_masks(verb_labels, noun_labels if has_nouns else None, participant_ids, unseen_ids,
                          tail_verbs, tail_nouns)
    if "unseen" in masks and not masks["unseen"]["verb"].any():
        warnings.warn("There are no unseen segments to evaluate; the 'unseen' subset is omitted", stacklevel=2)
        del masks["unseen"]
    out: dict[str, dict[str, dict]] = {}
    for subset, by_task in masks.items():
        out[subset] = {}
        m = by_task["verb"]
        out[subset]["verb"] = {"n": int(m.sum()), **_rename(topk_accuracy(verb_scores[m], verb_labels[m], ks))}
        if has_nouns:
            m = by_task["noun"]
            out[subset]["noun"] = {"n": int(m.sum()), **_rename(topk_accuracy(noun_scores[m], noun_labels[m], ks))}
            m = by_task["action"]
            acc = action_topk_accuracy(pairs[m], verb_labels[m], noun_labels[m], ks)
            out[subset]["action"] = {"n": int(m.sum()), **_rename(acc)}
    return out


def ek100_anticipation_metrics(
    verb_scores: np.ndarray,
    noun_scores: np.ndarray | None,
    verb_labels: np.ndarray,
    noun_labels: np.ndarray | None,
    participant_ids: Sequence[str] | None = None,
    unseen_ids: Iterable[str] | None = None,
    tail_verbs: Iterable[int] | None = None,
    tail_nouns: Iterable[int] | None = None,
    k: int = 5,
    training_actions: np.ndarray | Sequence[tuple[int, int]] | None = None,
) -> dict[str, dict[str, dict]]:
    """EK-100 action anticipation metrics: class-mean top-k recall (k = 5) per subset, fractions in [0, 1].

    As the EK-100 branch of RULSTM ``main.py`` (``topk_recall`` with ``classes=None``): the classes averaged are the
    classes present in each subset. Action classes are (verb, noun) pairs ranked by p(verb) * p(noun) (the top-100
    pairs of `action_scores_from_verb_noun`). Subsets as `ek100_recognition_metrics` (tail action = tail verb or
    tail noun: the EK-100 ``validation_tail_actions_ids.csv`` shipped with RULSTM is exactly that union).

    Action recall is computed over two action vocabularies when `training_actions` (A, 2) is given:
    ``action`` (the headline) ranks only the training actions, as RULSTM does and as published EK-100 anticipation
    numbers are computed (on EK-100 validation this roughly doubles the number: 17.3 % over all pairs vs 34.1 % over
    RULSTM's 3,806 training actions for the same scores); ``action_all_pairs`` ranks all V x Nn pairs. A segment
    whose action never occurs in training cannot be ranked among the training actions: it counts as a miss and its
    class stays in the mean. Without `training_actions`, ``action`` ranks all pairs (as before). With it, each action
    entry names its ``vocabulary`` ("training actions" / "all pairs") and ``vocabulary_size``.

    Returns {subset: {task: {"n": segments, "classes": classes averaged, "recall@k": ...}}}.
    """
    verb_scores, verb_labels = _check_scores(verb_scores, verb_labels, "verb_scores")
    verb_labels = verb_labels.astype(np.int64)
    has_nouns = noun_scores is not None and noun_labels is not None
    hits = {"verb": topk_hits(rank_classes(verb_scores, k), verb_labels, k)}
    labels = {"verb": verb_labels}
    if has_nouns:
        noun_scores, noun_labels = _check_scores(noun_scores, noun_labels, "noun_scores")
        noun_labels = noun_labels.astype(np.int64)
        hits["noun"] = topk_hits(rank_classes(noun_scores, k), noun_labels, k)
        labels["noun"] = noun_labels
        pairs, _ = action_scores_from_verb_noun(verb_scores, noun_scores, ACTION_TOP_N)
        all_pairs = action_topk_hits(pairs, verb_labels, noun_labels, k)
        action_id = verb_labels * (int(noun_scores.shape[1]) + 1) + noun_labels  # unique pair id
        vocab_size = {"all pairs": int(verb_scores.shape[1]) * int(noun_scores.shape[1])}
        if training_actions is not None:
            vocab = np.asarray(training_actions, dtype=np.int64).reshape(-1, 2)
            ranked = action_pairs_in_vocabulary(verb_scores, noun_scores, vocab, k)
            hits["action"], vocabulary = action_topk_hits(ranked, verb_labels, noun_labels, k), "training actions"
            hits["action_all_pairs"], labels["action_all_pairs"] = all_pairs, action_id
            vocab_size["training actions"] = len(vocab)
        else:
            hits["action"], vocabulary = all_pairs, "all pairs"
        labels["action"] = action_id
    masks = _subset_masks(verb_labels, noun_labels if has_nouns else None, participant_ids, unseen_ids,
                          tail_verbs, tail_nouns)
    if "unseen" in masks and not masks["unseen"]["verb"].any():
        warnings.warn("There are no unseen segments to evaluate; the 'unseen' subset is omitted", stacklevel=2)
        del masks["unseen"]
    key = f"recall@{k}"
    out: dict[str, dict[str, dict]] = {}
    for subset, by_task in masks.items():
        out[subset] = {}
        for task in hits:
            m = by_task["action" if task == "action_all_pairs" else task]
            lab = labels[task][m]
            out[subset][task] = {
                "n": int(m.sum()),
                "classes": int(len(np.unique(lab))),
                key: class_mean_recall(hits[task][m], lab),
            }
            if task.startswith("action") and training_actions is not None:
                name = "all pairs" if task == "action_all_pairs" else vocabulary
                out[subset][task].update(vocabulary=name, vocabulary_size=vocab_size[name])
    return out


def _rename(acc: dict[int, float]) -> dict[str, float]:
    return {f"top{k}": v for k, v in acc.items()}


def official_recognition_keys(metrics: dict[str, dict[str, dict]]) -> dict[str, float]:
    """Flatten `ek100_recognition_metrics` output to the official evaluate.py display names, in percent.

    Keys ``{subset}_{task}_accuracy_at_{k}`` for the (subset, k) the official script prints (`OFFICIAL_KS`).
    """
    flat: dict[str, float] = {}
    for subset, ks in OFFICIAL_KS.items():
        for task in TASKS:
            entry = metrics.get(subset, {}).get(task)
            if entry is None:
                continue
            for k in ks:
                if f"top{k}" in entry:
                    flat[f"{subset}_{task}_accuracy_at_{k}"] = float(entry[f"top{k}"]) * 100
    return flat


# ----------------------------------------------------------------------------------------------------------------
# question answering and self-questioning candidates


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Multi-label mAP (scene question: which nouns are present), as scikit-learn's `average_precision_score`
    (AP = sum over ranks of (recall step) x precision, no interpolation).

    scores (N, C) real, targets (N, C) {0, 1}. Returns {"mAP": mean AP over the classes with at least one positive
    (a class without positives has no defined AP and is left out, as in the usual multi-label protocol),
    "classes": how many entered the mean}. NaN mAP when no class has a positive.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be (N, C)")
    present = np.flatnonzero(targets.sum(axis=0) > 0)
    if not len(present):
        return {"mAP": math.nan, "classes": 0}
    # Imported here, not at the top: scikit-learn takes about 1 s to import, and this leaf module is on the import
    # path of every command's --help (docs/architecture.md lists the exceptions to imports at the top).
    from sklearn.metrics import average_precision_score

    ap = average_precision_score(targets[:, present], scores[:, present], average=None)
    return {"mAP": float(np.mean(ap)), "classes": int(len(present))}


def recall_at_k(candidates: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose label is among their candidates. candidates (N, k) class ids, labels (N,); rows with
    label < 0 (unlabelled) are left out. NaN when no row is labelled. Equal to `topk_accuracy` at k when the
    candidates are the top-k classes of a score array."""
    candidates = np.asarray(candidates)
    candidates = candidates.reshape(candidates.shape[0], -1) if candidates.ndim != 2 else candidates
    labels = np.asarray(labels).reshape(-1)
    if candidates.shape[0] != labels.shape[0]:
        raise ValueError(f"{candidates.shape[0]} candidate rows for {labels.shape[0]} labels")
    keep = labels >= 0
    return _mean((candidates[keep] == labels[keep, None]).any(axis=1))


# ----------------------------------------------------------------------------------------------------------------
# chance levels


def chance_levels(num_classes: dict[str, int], ks: tuple[int, ...] = (1, 5)) -> dict[str, dict[str, float | int]]:
    """Expected accuracy of a uniform random ranking, in percent, per head: top-k chance = min(k, C) / C for C
    classes. The same number is the expected *class-mean* top-k recall (each class is recalled with probability
    min(k, C) / C), so it is the chance level of mean per-class accuracy and of EK-100 anticipation's class-mean
    recall@5 too. `num_classes`: head -> C (EK-100 actions, verb and noun both right: C = verbs x nouns).
    Example: 6 classes -> top-1 16.7 %, top-5 83.3 %; with few classes top-5 says little."""
    out: dict[str, dict[str, float | int]] = {}
    for head, c in num_classes.items():
        if c <= 0:
            continue
        out[head] = {"classes": int(c), **{f"top{k}": round(100.0 * min(k, c) / c, 4) for k in ks}}
    return out
