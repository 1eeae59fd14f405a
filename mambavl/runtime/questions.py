"""What the model is asked and what the answers are: `Asker` (the heads' questions per row and the QA questions),
`AnswerTables`, the class labels as tensors (`Labels`), the training action vocabulary, and the labelled rows of a
window."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mambavl.cache.reader import CacheFile, QuestionBank
from mambavl.errors import InputError
from mambavl.extract.questions import QuestionSource, refuse_label_keyed
from mambavl.fuse.qa import QA_TARGET
from mambavl.runtime.candidates import head_candidate_questions
from mambavl.runtime.task import TaskSpec


@dataclass
class AnswerTables:
    """The answer embeddings QA questions are scored against: verb (V, Dt), noun (Nn, Dt) or None without nouns,
    action (A, Dt) or None (the training pairs, in the order of the run's action vocabulary), float32 on the CPU.
    `QA_TARGET` maps each question kind to its table (scene: the nouns, multi-label)."""

    verb: torch.Tensor
    noun: torch.Tensor | None = None
    action: torch.Tensor | None = None

    @classmethod
    def of_cache(cls, cache: CacheFile, action: torch.Tensor | np.ndarray | None = None) -> AnswerTables:
        """The cache's verb and noun answers, and `action` (a run's action answers) when given."""
        answers = cache.answers()
        noun = torch.as_tensor(answers.noun, dtype=torch.float32) if len(cache.noun_keys) else None
        act = torch.as_tensor(np.asarray(action), dtype=torch.float32) if action is not None and len(action) else None
        return cls(torch.as_tensor(answers.verb, dtype=torch.float32), noun, act)

    def for_kind(self, kind: str) -> torch.Tensor | None:
        """The table a QA kind is answered from (None when this data has none)."""
        target = QA_TARGET[kind]
        return {"verb": self.verb, "noun": self.noun, "scene": self.noun, "action": self.action}[target]

    def to(self, device: torch.device) -> AnswerTables:
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return AnswerTables(self.verb.to(device), move(self.noun), move(self.action))


class Asker:
    """What the model is asked, under one question protocol: the heads' questions per row and the QA questions with
    their answer tables. Built from explicit inputs (`of_cache` reads them from a cache), so the audit can ask with
    a permuted question table and prediction with a freshly embedded one.

    bank: the question table (tokens (Q, T, Dt), mask (Q, T), templates, per-segment questions), kept on the CPU —
    the annotation protocol can hold two questions per segment, too many for accelerator memory.
    answers: the answer tables of QA questions (and of self-questioning's candidates).
    candidates (N, 2, k): under `predicted`, the first pass's verb and noun candidates of every row; each head
    question is followed by their answer embeddings (`head_candidate_questions`).
    """

    def __init__(self, spec: TaskSpec, bank: QuestionBank, answers: AnswerTables,
                 source: QuestionSource = QuestionSource.TEMPLATES, candidates: np.ndarray | None = None,
                 where: str = "the question table"):
        self.spec, self.bank, self.answers, self.source = spec, bank, answers, QuestionSource(source)
        self.tokens = torch.as_tensor(bank.tokens, dtype=torch.float32)  # (Q, T, Dt)
        self.mask = torch.as_tensor(bank.mask, dtype=torch.bool)  # (Q, T)
        self.templates: dict[str, torch.Tensor] = {
            kind: torch.as_tensor(np.asarray(idx), dtype=torch.long) for kind, idx in bank.templates.items()
        }
        self.head_kinds = spec.head_kinds
        for kind in self.head_kinds:
            if kind not in self.templates or len(self.templates[kind]) == 0:
                raise InputError(f"{where} has no {kind!r} template questions (questions/templates/{kind})")
        self.per_segment: torch.Tensor | None = None
        if self.source not in (QuestionSource.TEMPLATES, QuestionSource.PREDICTED):
            table = bank.per_segment.get(self.source.value) if bank.per_segment else None
            if table is None:
                hint = ("--questions templates,annotation" if self.source == QuestionSource.ANNOTATION
                        else "a questions file")
                raise InputError(f"{where} has no {self.source.value} questions (extract with {hint})")
            self.per_segment = torch.as_tensor(np.asarray(table), dtype=torch.long)  # (N, 2)
        self.candidates: torch.Tensor | None = None
        if self.source == QuestionSource.PREDICTED:
            if candidates is None:
                raise InputError("predicted questions need first-pass candidates: a checkpoint trained with "
                                 "--questions predicted carries its first pass")
            self.candidates = torch.as_tensor(np.asarray(candidates), dtype=torch.long)  # (N, 2, k)

    @classmethod
    def of_cache(cls, cache: CacheFile, spec: TaskSpec, source: QuestionSource = QuestionSource.TEMPLATES,
                 candidates: np.ndarray | None = None, action_answers: torch.Tensor | np.ndarray | None = None,
                 evaluation: bool = False, allow_label_keyed: bool = False,
                 bank: QuestionBank | None = None) -> Asker:
        """The asker of a cache's rows. `bank` replaces the cache's question table (the audit's shuffled and
        label-permuted tables). `evaluation=True` refuses per-segment questions found by a row's own class
        (`label_keyed` file entries), which would hand the model its label; `allow_label_keyed` lifts that for the
        audit, which measures such leaks."""
        bank = bank if bank is not None else cache.questions()
        source = QuestionSource(source)
        asker = cls(spec, bank, AnswerTables.of_cache(cache, action_answers), source, candidates,
                    where=f"cache {cache.path}")
        if evaluation and source == QuestionSource.FILE and not allow_label_keyed:
            keyed = bank.label_keyed.get(source.value)
            if keyed is None:
                raise InputError(f"cache {cache.path}: its file questions do not record how they were keyed "
                                 "(extracted by an older mambavl); re-extract before evaluating with them")
            table = np.asarray(bank.per_segment[source.value])
            refuse_label_keyed(source.value, keyed, np.flatnonzero(table[:, 0] >= 0),
                               str(cache.attrs.get("questions_file") or "(file)"), cache.labels()["narration_id"])
        return asker

    def with_candidates(self, candidates: np.ndarray) -> Asker:
        """This asker under `predicted`, with the first pass's candidates (N, 2, k) of the rows it will be asked."""
        return Asker(self.spec, self.bank, self.answers, QuestionSource.PREDICTED, candidates)

    # ---- the heads' questions
    def template(self, kind: str, n: int, train: bool, generator: torch.Generator | None) -> torch.Tensor:
        """(n,) question indices of `kind`: a uniform paraphrase per sample in training, paraphrase 0 otherwise."""
        choices = self.templates[kind]  # (P,)
        if train:
            pick = torch.randint(len(choices), (n,), generator=generator)
            return choices[pick]
        return choices[:1].expand(n).clone()

    def heads(self, rows: torch.Tensor, train: bool, generator: torch.Generator | None) -> tuple[torch.Tensor, int]:
        """(B, 2) question indices (verb head, noun head) for rows (B,), and how many fell back to templates."""
        verb_q = self.template(self.head_kinds[0], len(rows), train, generator)
        noun_q = self.template(self.head_kinds[1], len(rows), train, generator)
        q = torch.stack([verb_q, noun_q], dim=1)  # (B, 2)
        if self.per_segment is None:
            return q, 0
        own = self.per_segment[rows]  # (B, 2); -1 where the row has no question of this source
        q = torch.where(own >= 0, own, q)
        return q, int((own < 0).sum())

    def fallbacks(self, rows: torch.Tensor) -> int:
        """How many (verb, noun) questions of rows (B,) fall back to a template because the row has no question of
        this source (0 for templates); what `heads` counts."""
        return 0 if self.per_segment is None else int((self.per_segment[rows] < 0).sum())

    def gather(self, q: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Question indices (...,) -> tokens (..., T, Dt) float32 and mask (..., T) bool on `device`."""
        return self.tokens[q].to(device), self.mask[q].to(device)

    def head_tokens(self, rows: torch.Tensor, train: bool, generator: torch.Generator | None,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The two head questions of rows (B,): tokens (B, 2, T', Dt), mask (B, 2, T') on `device`, and the number
        of template fallbacks. T' = T, or T + k under `predicted` (template + candidate answers)."""
        q, fallbacks = self.heads(rows, train, generator)  # (B, 2)
        qt, qm = self.tokens_of(q, rows, device)
        return qt, qm, fallbacks

    def tokens_of(self, q: torch.Tensor, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, 2, T', Dt) and mask (B, 2, T') on `device` of head questions q (B, 2) (from `heads`) asked of
        rows (B,); under `predicted` each question is followed by the answer texts of the row's candidates.
        InputError when a row has no candidates."""
        qt, qm = self.gather(q, device)  # (B, 2, T, Dt), (B, 2, T)
        if self.candidates is None:
            return qt, qm
        cand = self.candidates[rows]  # (B, 2, k)
        if bool((cand < 0).any()):
            raise InputError("predicted questions: some rows have no first-pass candidates")
        heads = (self.answers.verb, self.answers.noun if self.answers.noun is not None else self.answers.verb)
        return head_candidate_questions(qt, qm, heads, cand)  # (B, 2, T+k, Dt), (B, 2, T+k)

    # ---- QA questions
    def qa_kinds(self) -> tuple[str, ...]:
        """The task's QA kinds this asker can ask: the kind has a template question and its answer table exists."""
        return tuple(k for k in self.spec.qa_kinds
                     if len(self.templates.get(k, ())) and self.answers.for_kind(k) is not None)

    def qa_question(self, kind: str, n: int, train: bool, generator: torch.Generator | None,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`kind`'s template question for n clips: tokens (n, T, Dt), mask (n, T) on `device` (a uniform paraphrase
        per clip in training, paraphrase 0 otherwise)."""
        return self.gather(self.template(kind, n, train, generator), device)

    def question_text(self, kind: str) -> str:
        """The evaluation phrasing of `kind` (paraphrase 0)."""
        return str(self.bank.texts[int(self.templates[kind][0])])


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
