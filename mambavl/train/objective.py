"""The training objective: the model's forward for both objectives behind one module (`Objective`, what
DistributedDataParallel wraps) and the losses with their named parts.

* recognition — cross-entropy with label smoothing on the verb, noun and action heads (unlabelled targets and pairs
  outside the training action vocabulary ignored);
* QA — one question kind for the whole batch, answered against its answer table (`mambavl.fuse.qa`): cross-entropy
  for single-label kinds, the positives-normalised multi-label loss over nouns for the scene question.

Every loss is this rank's share of the global batch's mean (the sum over its rows / the global count, times the
part's scale), so the parts add up over ranks to the global means.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch
from torch import nn

from mambavl.fuse.qa import QA_TARGET, answer_targets, qa_loss, scene_targets, single_label_loss
from mambavl.runtime import Labels
from mambavl.train.distributed import StepPart


class Objective(nn.Module):
    """Both objectives behind one forward, so DistributedDataParallel sees (and synchronises) every step.

    forward("rec", video (B, K, Dv), video_mask (B, K), q_tokens (B, 2, T, Dt), q_mask (B, 2, T)) -> {"verb" (B, V),
    "noun" (B, Nn)?, "action" (B, A)?} logits; forward("qa" | "scene", video, video_mask, q_tokens (B, T, Dt), q_mask
    (B, T), candidates (K, Dt)) -> (B, K) answer logits (scene: multi-label, with the learned prior bias).
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


@dataclass
class RecognitionLoss:
    """The recognition loss to step on (`total`, this rank's share times the part's scale), the total and its parts
    per head as shares of the global batch's means (floats; absent heads are 0)."""

    total: torch.Tensor
    share: float = 0.0
    verb: float = 0.0
    noun: float = 0.0
    action: float = 0.0


def recognition_loss(out: dict, rows: torch.Tensor, part: StepPart, labels: Labels, smoothing: float,
                     device: torch.device) -> RecognitionLoss:
    """The sum of the heads' cross-entropies (`single_label_loss` over the global count of labelled targets, times
    `part.scale`) for this rank's rows (B,) of the global batch."""
    parts: dict[str, torch.Tensor] = {}
    for head, target in (("verb", labels.verb), ("noun", labels.noun), ("action", labels.action)):
        if head in out:
            count = int((target[part.grows] >= 0).sum())
            parts[head] = single_label_loss(out[head], target[rows].to(device), smoothing, count, part.scale)
    total = functools.reduce(operator.add, parts.values())  # (sum() would start with a Python 0: one more op)
    shares = {k: float(v.detach()) / part.scale if part.scale else 0.0 for k, v in parts.items()}
    share = float(total.detach()) / part.scale if part.scale else 0.0
    return RecognitionLoss(total, share, **shares)


def qa_loss_share(kind: str, logits: torch.Tensor, rows: torch.Tensor, part: StepPart, labels: Labels,
                  device: torch.device) -> torch.Tensor:
    """QA loss of one question kind (`mambavl.fuse.qa`) as this rank's share of the global batch's loss:
    cross-entropy against the verb, noun or action answer; for the scene question the positives-normalised
    multi-label loss over nouns (targets: all nouns of the segment). Counts (usable targets, positives) are the global
    batch's."""
    if QA_TARGET[kind] == "scene":
        target = scene_targets([labels.all_nouns[r] for r in rows.tolist()], logits.shape[1])  # (B, Nn)
        count = float(scene_targets([labels.all_nouns[r] for r in part.grows.tolist()], logits.shape[1]).sum())
    else:
        target = answer_targets(kind, labels.verb[rows], labels.noun[rows], labels.action[rows])  # (B,)
        count = int((answer_targets(kind, labels.verb[part.grows], labels.noun[part.grows],
                                    labels.action[part.grows]) >= 0).sum())
    return qa_loss(kind, logits, target.to(device), count) * part.scale
