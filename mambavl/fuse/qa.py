"""The auxiliary QA objective as pure functions: answer targets and losses from logits and labels.

A QA step asks one kind of question (``verb`` / ``noun`` / ``scene``; ``next_verb`` / ``next_noun`` for
anticipation), maps the fused vector into the answer-text space and scores candidates (`MambaVL.qa_logits`,
`MambaVL.scene_logits`). Targets come from training annotations only:

* verb / next_verb — the segment's ``verb_class`` among the verb answers (single label, cross-entropy);
* noun / next_noun — its ``noun_class`` among the noun answers (single label, cross-entropy);
* scene — a multi-hot over the noun answers from ``all_noun_classes`` (every object the narration mentions);
* action — the segment's (verb_class, noun_class) pair among the action answers: the training split's pairs, in the
  order of the run's action vocabulary (single label; a pair not in it is no target).

The scene question has hundreds of candidates and one to three positives. A plain mean BCE over all of them is
swamped by the negatives (each starts at p = 0.5 and their gradient dwarfs the positives'). Two remedies, as in
RetinaNet (Lin et al., 2017, "Focal Loss for Dense Object Detection", §3.3 and §4.1): the scene logits carry a
learnable bias initialised at the prior logit log(π / (1 - π)) with π = 1 / num_nouns (one object expected per
segment), and the summed BCE is normalised by the number of positives instead of the number of entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mambavl.fuse.config import QA_TARGET
from mambavl.fuse.ops import cross_entropy_sum



def scene_prior_logit(num_nouns: int) -> float:
    """Initial scene bias: the logit of π = 1 / num_nouns (clamped to π <= 0.5; 0 for no nouns)."""
    if num_nouns <= 0:
        return 0.0
    p = min(0.5, 1.0 / num_nouns)
    return math.log(p / (1.0 - p))


def answer_targets(kind: str, verb: torch.Tensor, noun: torch.Tensor, action: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Single-label QA targets (B,) long for a verb / noun / action kind: the segment's verb_class, noun_class or
    action index (its pair's index in the action answers) (-1 kept as 'no target'). verb, noun, action (B,) long.
    ValueError for the scene kind (see `scene_targets`), an unknown kind, or an action kind without `action`."""
    target = QA_TARGET.get(kind)
    if target == "verb":
        return verb.long()
    if target == "noun":
        return noun.long()
    if target == "action":
        if action is None:
            raise ValueError("action QA targets need the segments' action indices")
        return action.long()
    raise ValueError(f"QA kind {kind!r} has no single-label target (kinds: {sorted(QA_TARGET)})")


def scene_targets(all_nouns: Sequence[Sequence[int] | np.ndarray], num_nouns: int) -> torch.Tensor:
    """Multi-hot (B, num_nouns) float32 of each segment's all_noun_classes; ids outside [0, num_nouns) are ignored."""
    out = torch.zeros(len(all_nouns), num_nouns, dtype=torch.float32)
    for i, ids in enumerate(all_nouns):
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[(ids >= 0) & (ids < num_nouns)]
        out[i, torch.as_tensor(ids)] = 1.0
    return out


def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor, positives: float | None = None) -> torch.Tensor:
    """BCE-with-logits summed over all (B, C) entries and divided by the number of positives (at least 1), the
    normalisation RetinaNet uses so that many easy negatives do not drown the few positives. logits, targets (B, C).
    Rows without any positive still contribute their negatives. `positives`: the count to divide by (default: this
    batch's; data-parallel training passes the global batch's so that the ranks' shares add up to its loss)."""
    loss = F.binary_cross_entropy_with_logits(logits if logits.dtype == torch.float32 else logits.float(),
                                              targets.float(), reduction="sum")
    count = targets.sum() if positives is None else torch.as_tensor(float(positives))
    return loss / count.clamp(min=1.0)


def single_label_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0,
                      count: int | None = None, scale: float = 1.0) -> torch.Tensor:
    """Cross-entropy (B, K) vs (B,) ignoring target -1, with optional label smoothing: the sum over usable targets
    divided by `count` (default: their number, i.e. PyTorch's mean; data-parallel training passes the global
    batch's count so that the ranks' shares add up to its mean), times `scale`. With no usable target the loss is 0
    but stays connected to the graph (DistributedDataParallel expects every used head to receive a gradient)."""
    if count is None:
        count = int((target >= 0).sum())  # a read of the targets; callers that know the count spare it
    if count == 0:
        return logits.sum() * 0.0 * scale
    # With a given count and no usable target in this part the sum is 0, still connected to the graph.
    logits = logits if logits.dtype == torch.float32 else logits.float()
    return cross_entropy_sum(logits, target, smoothing, scale / count)  # F.cross_entropy's sum, fewer ops


def qa_loss(kind: str, logits: torch.Tensor, target: torch.Tensor, count: float | None = None) -> torch.Tensor:
    """The loss of one QA step: `multilabel_loss` for the scene kind (target (B, Nn) multi-hot), cross-entropy
    otherwise (target (B,) class ids, -1 ignored). `count`: the positives (scene) or usable targets to divide by
    (default: this batch's)."""
    if QA_TARGET.get(kind) == "scene":
        return multilabel_loss(logits, target, count)
    return single_label_loss(logits, target, count=None if count is None else int(count))
