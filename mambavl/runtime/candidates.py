"""Self-questioning (`question_source = "predicted"`): a video-only first pass proposes candidates, the second pass
is asked about them.

Per head (verb, noun; next_verb, next_noun for anticipation) the question tokens are the template question's tokens
(evaluation phrasing, or a sampled paraphrase in training) followed by the answer-text embeddings of the first
pass's top-k classes, in its rank order::

    tokens (B, T + k, Dt) = [ template tokens (B, T, Dt) ; answers[candidates] (B, k, Dt) ]
    mask   (B, T + k)     = [ template mask ; True * k ]

The answer embeddings are the cache's answers/ tables (the text tower's embedding of every class name, computed
once at extraction), so the second pass runs on cached tensors only, and no text of the evaluated segment's labels
or narration is read: the candidates are a function of the video alone. It therefore runs on the test split.
A padded template position (mask False) sits between the question and the candidates; the scan gives it Δ = 0,
so it leaves the state untouched.

Training rows must see candidates as wrong as evaluation will: a first pass that trained on a row ranks its true
class first almost always, and a second pass trained on such rows learns to copy candidate 1. Training candidates
are therefore cross-fitted (`fold_ids`): the training rows are split into K folds and each fold's candidates come
from a first pass trained on the other K - 1 folds. Evaluation candidates come from the mean probabilities of the K
fold models (so every evaluated row is, like every training row, out-of-sample for the models that propose its
candidates). Candidate recall@k is recorded for the training rows and the validation rows side by side.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mambavl import metrics as M
from mambavl.errors import InputError
from mambavl.fuse.model import MambaVL, model_config_from_dict


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """(n,) int64 fold of each of n rows: a seeded permutation dealt round-robin, so fold sizes differ by <= 1.
    InputError (a ValueError) naming --candidate-folds when folds < 2 or n < folds (every fold must hold a row and leave rows to train on)."""
    if folds < 2:
        raise InputError(f"--candidate-folds {folds}: cross-fitting needs 2 to {max(n, 2)} folds (at least 2, at "
                         f"most the {n} labelled training rows)")
    if n < folds:
        raise InputError(f"--candidate-folds {folds}: {n} labelled training rows cannot be split into {folds} folds; "
                         f"choose 2 to {n}")
    out = np.empty(n, dtype=np.int64)
    out[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return out


def topk_candidates(scores: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """(N, C) scores (probabilities or logits) -> (N, min(k, C)) int64 class ids by descending score, ties towards
    the higher class id (the project's tie rule, `mambavl.metrics.rank_classes`, so the
    candidates are exactly the top-k of top-k accuracy)."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    return M.rank_classes(np.asarray(scores), int(k)).astype(np.int64)


def candidate_questions(
    tokens: torch.Tensor, mask: torch.Tensor, answers: torch.Tensor, candidates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append candidate answers to template questions.

    tokens (..., T, Dt) float, mask (..., T) bool, answers (C, Dt) answer-text embeddings, candidates (..., k) class
    ids -> tokens (..., T + k, Dt), mask (..., T + k) (candidates always valid), on the device of `tokens`."""
    cand = answers.to(device=tokens.device, dtype=tokens.dtype)[candidates.to(tokens.device)]  # (..., k, Dt)
    valid = torch.ones(cand.shape[:-1], dtype=torch.bool, device=tokens.device)  # (..., k)
    return torch.cat([tokens, cand], dim=-2), torch.cat([mask.to(torch.bool), valid], dim=-1)


def head_candidate_questions(
    tokens: torch.Tensor, mask: torch.Tensor, answers: tuple[torch.Tensor, torch.Tensor], candidates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both heads' questions with their own candidates appended (`candidate_questions` per head): tokens
    (B, 2, T, Dt), mask (B, 2, T), answers (verb answers (V, Dt), noun answers (Nn, Dt)), candidates (B, 2, k)
    -> tokens (B, 2, T + k, Dt), mask (B, 2, T + k)."""
    parts = [candidate_questions(tokens[:, h], mask[:, h], answers[h], candidates[:, h]) for h in range(2)]
    return torch.stack([t for t, _ in parts], dim=1), torch.stack([m for _, m in parts], dim=1)


class FirstPass:
    """The first pass of self-questioning: one or more video-only models whose mean class probabilities rank the
    candidates.

    `models` are MambaVL models (use_question=False, or any model, which is then asked the template questions);
    `origin` says where they come from ("cross-fitted" fold models of this run, or a checkpoint path). `probs` takes
    the same inputs as `MambaVL.forward`; with several models the probabilities are averaged (the K fold models of a
    cross-fitted run form the evaluation first pass).
    """

    def __init__(self, models: list[nn.Module], origin: str, k: int):
        if not models:
            raise ValueError("a first pass needs at least one model")
        self.models = models
        self.origin = origin
        self.k = int(k)

    def to(self, device: torch.device) -> FirstPass:
        for m in self.models:
            m.to(device)
        return self

    @torch.no_grad()
    def probs(self, video, video_mask, q_tokens=None, q_mask=None) -> dict[str, torch.Tensor]:
        """video (B, F, Dv), video_mask (B, F), template questions (B, 2, T, Dt) / (B, 2, T) -> {"verb": (B, V),
        "noun": (B, Nn) (absent without a noun head)} mean softmax probabilities (float32)."""
        out: dict[str, torch.Tensor] = {}
        for m in self.models:
            was = m.training
            m.eval()
            res = m(video, video_mask, q_tokens, q_mask)
            m.train(was)
            for key in ("verb", "noun"):
                if key in res:
                    p = res[key].float().softmax(-1) / len(self.models)
                    out[key] = out[key] + p if key in out else p
        return out

    def state(self) -> dict:
        """Plain types and tensors for a checkpoint (loadable with weights_only=True); see `from_state`."""
        return {
            "origin": self.origin,
            "k": self.k,
            "model_config": self.models[0].cfg.to_dict(),
            "states": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in self.models],
        }

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> FirstPass:
        """Rebuild the first pass a trained run carries (`TrainedModel.first_pass`)."""
        cfg = model_config_from_dict(state["model_config"])
        models = []
        for weights in state["states"]:
            m = MambaVL(cfg)
            m.load_state_dict(weights)
            models.append(m.to(device).eval())
        return cls(models, str(state["origin"]), int(state["k"]))


def candidate_table(first_pass: FirstPass, probs: dict[str, np.ndarray], rows: np.ndarray, n: int) -> np.ndarray:
    """(n, 2, k) int64 candidates per cache row (head 0: verbs, head 1: nouns; -1 for rows not in `rows`) from
    first-pass probabilities {"verb": (R, V), "noun": (R, Nn)?} of `rows` (R,). Without a noun head the noun
    question is asked about the verb candidates too (its head does not exist; the shapes must agree)."""
    k = first_pass.k
    verb = topk_candidates(probs["verb"], k)  # (R, k')
    noun = topk_candidates(probs["noun"], k) if probs.get("noun") is not None and probs["noun"].shape[1] else verb
    width = min(verb.shape[1], noun.shape[1])
    table = np.full((n, 2, width), -1, dtype=np.int64)
    table[rows, 0] = verb[:, :width]
    table[rows, 1] = noun[:, :width]
    return table
