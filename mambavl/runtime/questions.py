"""Questions and labels of one cache: which question each head reads for each row (`Questions`), the class labels
as tensors (`Labels`), the training action vocabulary, and the labelled rows of a window."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mambavl.cache.reader import CacheFile
from mambavl.errors import InputError
from mambavl.extract.questions import QuestionSource, refuse_label_keyed
from mambavl.runtime.candidates import head_candidate_questions


class Questions:
    """Question choice for one cache under one protocol.

    Holds the cache's question table (tokens (Q, T, Dt), mask (Q, T)) on the CPU — the annotation protocol can hold
    two questions per segment, too many for accelerator memory — and gathers the rows a batch needs.

    `predicted` needs `candidates` (N, 2, k): the first pass's verb and noun candidates of every cache row (see
    `mambavl.runtime.candidates`); `head_tokens` appends their answer embeddings to the template questions.
    `evaluation=True` refuses per-segment questions found by a row's own class (`label_keyed` file entries), which
    would hand the model its label; `allow_label_keyed` lifts that for the audit, which measures such leaks.
    """

    def __init__(self, cache: CacheFile, source: QuestionSource, head_kinds: tuple[str, str],
                 candidates: np.ndarray | None = None, evaluation: bool = False, allow_label_keyed: bool = False):
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
        self.candidates: torch.Tensor | None = None
        if source == QuestionSource.PREDICTED:
            if candidates is None:
                raise InputError("predicted questions need first-pass candidates: a checkpoint trained with "
                                 "--questions predicted carries its first pass")
            answers = cache.answers()
            verb = torch.as_tensor(answers.verb, dtype=torch.float32)  # (V, Dt)
            noun = torch.as_tensor(answers.noun, dtype=torch.float32) if len(cache.noun_keys) else verb  # (Nn, Dt)
            self.answers = (verb, noun)
            self.candidates = torch.as_tensor(np.asarray(candidates), dtype=torch.long)  # (N, 2, k)
        elif source != QuestionSource.TEMPLATES:
            table = bank.per_segment.get(source.value) if bank.per_segment else None
            if table is None:
                hint = "--questions templates,annotation" if source == QuestionSource.ANNOTATION else "a questions file"
                raise InputError(f"cache {cache.path} has no {source.value} questions (extract with {hint})")
            self.per_segment = torch.as_tensor(np.asarray(table), dtype=torch.long)  # (N, 2)
            if evaluation and source == QuestionSource.FILE and not allow_label_keyed:
                keyed = bank.label_keyed.get(source.value)
                if keyed is None:
                    raise InputError(f"cache {cache.path}: its file questions do not record how they were keyed "
                                     "(extracted by an older mambavl); re-extract before evaluating with them")
                has_q = np.flatnonzero(np.asarray(table)[:, 0] >= 0)
                refuse_label_keyed(source.value, keyed, has_q, str(cache.attrs.get("questions_file") or "(file)"),
                                   cache.labels()["narration_id"])

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

    def fallbacks(self, rows: torch.Tensor) -> int:
        """How many (verb, noun) questions of cache rows (B,) fall back to a template because the row has no
        question of this source (0 for templates); what `heads` counts."""
        return 0 if self.per_segment is None else int((self.per_segment[rows] < 0).sum())

    def gather(self, q: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Question indices (...,) -> tokens (..., T, Dt) float32 and mask (..., T) bool on `device`."""
        return self.tokens[q].to(device), self.mask[q].to(device)

    def head_tokens(self, rows: torch.Tensor, train: bool, generator: torch.Generator | None,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The two head questions of cache rows (B,): tokens (B, 2, T', Dt), mask (B, 2, T') on `device`, and the
        number of template fallbacks. T' = T, or T + k under `predicted` (template + candidate answers)."""
        q, fallbacks = self.heads(rows, train, generator)  # (B, 2)
        qt, qm = self.tokens_of(q, rows, device)
        return qt, qm, fallbacks

    def tokens_of(self, q: torch.Tensor, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, 2, T', Dt) and mask (B, 2, T') on `device` of head questions q (B, 2) (from `heads`) asked of
        cache rows (B,); under `predicted` each question is followed by the answer texts of the row's candidates.
        InputError when a row has no candidates."""
        qt, qm = self.gather(q, device)  # (B, 2, T, Dt), (B, 2, T)
        if self.candidates is None:
            return qt, qm
        cand = self.candidates[rows]  # (B, 2, k)
        if bool((cand < 0).any()):
            raise InputError("predicted questions: some rows have no first-pass candidates")
        return head_candidate_questions(qt, qm, self.answers, cand)  # (B, 2, T+k, Dt), (B, 2, T+k)


@dataclass
class Labels:
    verb: torch.Tensor  # (N,) long, -1 unlabelled
    noun: torch.Tensor  # (N,) long, -1 unlabelled / no nouns
    action: torch.Tensor  # (N,) long index into the train action vocabulary, -1 unseen pair
    all_nouns: list  # N sequences of noun ids


def load_labels(cache: CacheFile, pairs: dict[tuple[int, int], int]) -> Labels:
    """The cache's labels as tensors; `pairs` maps (verb, noun) to its index in the training action vocabulary."""
    lab = cache.labels()
    verb = torch.as_tensor(np.asarray(lab["verb_class"], dtype=np.int64))
    noun = torch.as_tensor(np.asarray(lab["noun_class"], dtype=np.int64))
    action = torch.tensor([pairs.get((int(v), int(n)), -1) for v, n in zip(verb, noun)], dtype=torch.long)
    all_nouns = [np.asarray(a, dtype=np.int64).reshape(-1) for a in lab["all_noun_classes"]]
    return Labels(verb, noun, action, all_nouns)


def action_answers(cache: CacheFile, pairs: list[tuple[int, int]]) -> torch.Tensor | None:
    """The cache's action answer embeddings (A, Dt) float32, in the order of `pairs` (a run's action vocabulary), for
    the action QA question; None when the cache cannot ask it: no `action` template question (caches from before that
    kind), no pairs, or a pair of the vocabulary without an answer embedding in the cache."""
    bank = cache.questions()
    if not pairs or "action" not in bank.templates or len(bank.templates["action"]) == 0:
        return None
    answers = cache.answers()
    where = {(int(v), int(n)): i for i, (v, n) in enumerate(answers.action_pairs.tolist())}
    idx = [where.get((int(v), int(n)), -1) for v, n in pairs]
    if min(idx) < 0:
        return None
    return torch.as_tensor(np.asarray(answers.action, dtype=np.float32)[idx])


def action_vocab(cache: CacheFile, rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted (verb, noun) pairs seen among the labelled training rows."""
    lab = cache.labels()
    verb = np.asarray(lab["verb_class"], dtype=np.int64)[rows]
    noun = np.asarray(lab["noun_class"], dtype=np.int64)[rows]
    keep = (verb >= 0) & (noun >= 0)
    return sorted({(int(v), int(n)) for v, n in zip(verb[keep], noun[keep])})


def require_window(cache: CacheFile, window: str) -> None:
    """InputError unless the cache holds `window` (the anticipation window is optional at extraction)."""
    if not cache.has_window(window):
        raise InputError(f"cache {cache.path} has no anticipation window (extract with --anticipation)")


def labelled_rows(cache: CacheFile, window: str, what: str) -> np.ndarray:
    """(N,) int64 valid rows of `window` with a verb label; InputError (naming `what` and the cache) if none."""
    rows = np.asarray(cache.valid_indices(window), dtype=np.int64)
    verb = np.asarray(cache.labels()["verb_class"], dtype=np.int64)
    rows = rows[verb[rows] >= 0]
    if len(rows) == 0:
        raise InputError(f"{what} cache {cache.path} has no labelled valid segments in the {window} window")
    return rows
