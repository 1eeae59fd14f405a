"""Question-protocol audit: how much of a checkpoint's accuracy comes from the question text?

The paper's protocol builds each segment's questions from its own narration (``question_source = "annotation"``),
so a question can name the answer. `audit_questions` measures that two ways, on one checkpoint and one cache:

* **dynamic** — the same checkpoint is evaluated under every question protocol the cache holds (``templates``:
  label-free; ``annotation``; ``file``) and under ``<source>-shuffled``: the per-segment questions of that source
  permuted across segments with a fixed seed (each segment is asked another segment's question). A model that reads
  the answer from the question collapses under shuffling and under templates; an honest one barely moves.
  Deltas are reported in percentage points against ``templates``.
* **label permutation** — every unshuffled protocol is scored a second time on a view of the cache
  (`CacheFile.view`) whose labels (verb_class, noun_class, all_noun_classes, narration, and every question derived
  from them: annotation questions, class-keyed file entries) were permuted across segments (`label_permuted`).
  Whatever on the scoring path reads the cache's labels or questions reads the permuted ones. The scores must be
  bit-identical; any changed row proves that label information reached the model. Templates and predicted
  questions pass by construction; annotation and class-keyed file questions fail.
* **static** — per protocol, the fraction of verb (noun) questions that contain their own answer word
  (`mambavl.extract.questions.leak_rate` against the class instances; class keys when no class CSV is given). For
  ``predicted`` (the checkpoint carries a first pass) a question contains its answer when the answer is among its k
  candidates: that rate equals the first pass's top-k accuracy (both are reported), not 100 %.

Outputs (``cfg.out_dir``): ``audit.json`` and ``audit.md`` (the same table in markdown).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mambavl import __version__
from mambavl import metrics as M
from mambavl.data.annotations import load_classes
from mambavl.errors import InputError
from mambavl.evaluate import (
    Loaded,
    atomic_write_text,
    cache_identity,
    check_question_source,
    checkpoint_identity,
    compute_metrics,
    load_for_eval,
    score_cache,
    write_json,
)
from mambavl.extract.questions import QuestionSource, leak_rate
from mambavl.progress import Progress, or_none
from mambavl.runtime import Task, task_spec
from mambavl.tables import markdown_table
from mambavl.cache.reader import QuestionBank, releases_caches


SHUFFLED_SUFFIX = "-shuffled"
PER_SEGMENT_SOURCES = ("annotation", "file")
PREDICTED = "predicted"
# Row fields that are labels: permuted together by the label-permutation check.
LABEL_FIELDS = ("verb_class", "noun_class", "all_noun_classes", "narration")
VERB_CLASSES_FILE = "EPIC_100_verb_classes.csv"
NOUN_CLASSES_FILE = "EPIC_100_noun_classes.csv"


@dataclass
class AuditConfig:
    """One audit run. `protocols` None = every protocol the cache holds, plus a shuffled copy of each per-segment
    one. Class instances for the static check come from `verb_classes` / `noun_classes` CSVs or `ek100_dir`
    (EPIC_100_verb_classes.csv, EPIC_100_noun_classes.csv); without them the class keys are the answer words."""

    checkpoint: str
    cache: str
    out_dir: str
    task: Task | None = None
    batch_size: int = 256
    device: str = "auto"
    shuffle_seed: int = 0
    protocols: tuple[str, ...] | None = None
    ek100_dir: str | None = None
    verb_classes: str | None = None
    noun_classes: str | None = None

    def __post_init__(self) -> None:
        for name in ("checkpoint", "cache", "out_dir"):
            setattr(self, name, str(getattr(self, name)))
        if self.task is not None:
            try:
                self.task = Task(self.task)
            except ValueError:
                raise InputError(f"audit config: task {self.task!r} is not one of {[t.value for t in Task]}") from None
        if self.protocols is not None:
            self.protocols = tuple(self.protocols)
            allowed = {"templates", PREDICTED, *PER_SEGMENT_SOURCES,
                       *(s + SHUFFLED_SUFFIX for s in PER_SEGMENT_SOURCES)}
            bad = [p for p in self.protocols if p not in allowed]
            if bad:
                raise InputError(f"audit config: unknown protocol(s) {bad}; choose from {sorted(allowed)}")
        if self.batch_size < 1:
            raise InputError(f"audit config: batch_size must be >= 1, got {self.batch_size}")


# ----------------------------------------------------------------------------------------------------------------
# question tables per protocol


def shuffle_permutation(has_question: np.ndarray, seed: int) -> np.ndarray:
    """(N,) bool -> (N,) int64 row map: rows with a question get another such row's question (seeded permutation of
    those rows); rows without keep themselves. A random permutation leaves ~1 row in place on average."""
    rows = np.flatnonzero(has_question)
    perm = np.arange(len(has_question), dtype=np.int64)
    perm[rows] = rows[np.random.default_rng(seed).permutation(len(rows))]
    return perm


def shuffled_bank(bank: QuestionBank, source: str, perm: np.ndarray) -> QuestionBank:
    """The question table with per_segment[source] rows permuted by `perm` ((N,) row map: row i is asked row
    perm[i]'s questions). The cache is not touched."""
    per_segment = dict(bank.per_segment)
    per_segment[source] = np.asarray(bank.per_segment[source])[perm]  # (N, 2)
    return dataclasses.replace(bank, per_segment=per_segment)


def label_permuted(labels: dict, bank: QuestionBank, perm: np.ndarray) -> tuple[dict, QuestionBank]:
    """The split's labels and question table as if its labels had been dealt to other segments: row i holds the
    labels of row perm[i] (verb_class, noun_class, all_noun_classes, narration), and every question derived from
    labels (`QuestionBank.label_keyed`: annotation questions, class-keyed file entries; in a cache that does not
    record the flag, every annotation and file question) follows its labels to row i. Features, narration ids and
    label-free questions stay. The cache is not touched.

    Scoring with this table must give bit-identical scores to scoring the original: any difference proves that label
    information reaches the model (the label-permutation check of `audit_questions`)."""
    labels = dict(labels)
    for key in LABEL_FIELDS:
        if key in labels:
            value = labels[key]
            labels[key] = (np.asarray(value)[perm] if isinstance(value, np.ndarray)
                           else [value[int(j)] for j in perm])
    per_segment = dict(bank.per_segment)
    for source, table in bank.per_segment.items():
        table = np.asarray(table)
        keyed = bank.label_keyed.get(source)
        if keyed is None:
            # Caches written before the flag. Annotation questions are label-derived by definition; file questions
            # may be class-keyed, and nothing says which: every one is treated as label-derived, so that an unknown
            # keying can only make the check fail (re-extract to know), never hide a leak.
            keyed = (table[:, 0] >= 0) if source in ("annotation", "file") else np.zeros(len(table), dtype=bool)
        moved = np.asarray(keyed, dtype=bool)[perm]  # row i now holds labels whose question was label-derived
        per_segment[source] = np.where(moved[:, None], table[perm], table)
    return labels, dataclasses.replace(bank, per_segment=per_segment)


def scores_identical(a: Any, b: Any) -> dict[str, Any]:
    """Bitwise comparison of two `Scored` results of the same rows: {"identical", "rows_changed",
    "max_abs_diff"} over the verb, noun and action scores."""
    changed = np.zeros(len(a.rows), dtype=bool)
    diff = 0.0
    for key in ("verb", "noun", "action"):
        x, y = getattr(a, key), getattr(b, key)
        if x is None or y is None:
            continue
        changed |= (x.view(np.uint32) != y.view(np.uint32)).any(axis=1)
        if x.size:
            diff = max(diff, float(np.nanmax(np.abs(x.astype(np.float64) - y))))
    return {"identical": not bool(changed.any()), "rows_changed": int(changed.sum()), "max_abs_diff": diff}


def question_indices(bank: Any, protocol: str, rows: np.ndarray, head_kinds: tuple[str, str],
                     perm: np.ndarray | None = None) -> np.ndarray:
    """(len(rows), 2) question-table indices (verb head, noun head) asked under `protocol` — the same choice as
    evaluation: template paraphrase 0, or the row's per-segment question with the template as fallback."""
    templates = [int(np.asarray(bank.templates[k])[0]) for k in head_kinds]
    q = np.tile(np.asarray(templates, dtype=np.int64), (len(rows), 1))  # (R, 2)
    source = protocol.removesuffix(SHUFFLED_SUFFIX)
    if source == QuestionSource.TEMPLATES.value:
        return q
    table = np.asarray(bank.per_segment[source], dtype=np.int64)  # (N, 2)
    if perm is not None:
        table = table[perm]
    own = table[rows]
    return np.where(own >= 0, own, q)


def _class_instances(keys: list[str], path: Path | None, what: str) -> tuple[list[tuple[str, ...]], str]:
    """Answer words per class: the class CSV's instances (checked against the cache's keys) or the keys."""
    if path is None:
        return [(k,) for k in keys], "class keys"

    vocab = load_classes(path)
    if list(vocab.keys) != list(keys):
        raise InputError(f"{path}: its {what} classes differ from the cache's classes/{what} (keys do not match)")
    return [tuple(inst) if inst else (key,) for key, inst in zip(vocab.keys, vocab.instances)], str(path)


def _class_csv(explicit: str | None, ek100_dir: str | None, name: str) -> Path | None:
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise InputError(f"class CSV {p} not found")
        return p
    if ek100_dir and (Path(ek100_dir) / name).is_file():
        return Path(ek100_dir) / name
    return None


def candidate_leak(scored: Any, verb_labels: np.ndarray, noun_labels: np.ndarray | None) -> dict[str, Any]:
    """Static leak of predicted questions: the fraction of verb (noun) questions whose candidates contain the answer
    (recall@k of the first pass), beside the first pass's top-k accuracy computed from its probabilities; the two
    agree by construction (the question holds the answer exactly when the first pass ranked it in its top k)."""
    k = scored.candidates.shape[2]
    out: dict[str, Any] = {"k": int(k)}
    for h, (task, lab) in enumerate((("verb", verb_labels), ("noun", noun_labels))):
        if lab is None or scored.first_pass.get(task) is None or not (lab >= 0).any():
            continue
        out[task] = M.recall_at_k(scored.candidates[:, h], lab)
        keep = lab >= 0
        out[f"{task}_first_pass_top{k}"] = M.topk_accuracy(scored.first_pass[task][keep], lab[keep], (k,))[k]
    return out


def static_leak(
    texts: list[str], q: np.ndarray, verb_labels: np.ndarray, noun_labels: np.ndarray | None,
    verb_inst: list[tuple[str, ...]], noun_inst: list[tuple[str, ...]] | None,
) -> dict[str, float | None]:
    """Fraction of verb (noun) questions containing their own answer word, over the rows given.

    q (R, 2) question indices, labels (R,). Uses `mambavl.extract.questions.leak_rate`.
    """

    out: dict[str, float | None] = {}
    keep = verb_labels >= 0
    out["verb"] = (leak_rate([texts[i] for i in q[keep, 0]], [verb_inst[v] for v in verb_labels[keep]])
                   if keep.any() else None)
    if noun_labels is not None and noun_inst is not None:
        keep = noun_labels >= 0
        out["noun"] = (leak_rate([texts[i] for i in q[keep, 1]], [noun_inst[n] for n in noun_labels[keep]])
                       if keep.any() else None)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the run


def _flat(result: dict[str, Any], task: str) -> dict[str, float | None]:
    """The headline numbers of one protocol: overall top-1/top-5 (recognition) or mean top-5 recall (anticipation)."""
    allm = (result.get("metrics") or {}).get("all", {})
    out: dict[str, float | None] = {}
    for t, entry in allm.items():
        for key, value in entry.items():
            if key in ("n", "classes"):
                continue
            out[f"{t}_{key}"] = value
    return out


def _delta(a: dict[str, float | None], b: dict[str, float | None]) -> dict[str, float | None]:
    return {k: (None if a.get(k) is None or b.get(k) is None else round(a[k] - b[k], 4)) for k in a}


def audit_markdown(report: dict[str, Any]) -> str:
    """audit.md: one row per protocol with its metrics, deltas vs templates and static leak rates."""
    protos = report["protocols"]
    metric_keys = list(next(iter(protos.values()))["metrics"].keys()) if protos else []
    head = ["protocol"] + metric_keys + [f"Δ {k}" for k in metric_keys]
    head += ["leak verb", "leak noun", "fallbacks", "labels permuted"]
    lines = [
        f"# Question audit — {report['checkpoint']['path']}",
        "",
        f"Cache: `{report['cache']['path']}`; trained with question_source = "
        f"**{report['trained_question_source']}**; task {report['task']}. Metrics in percent on "
        f"{report['n']} labelled segments; Δ = percentage points vs `templates`; leak = fraction of questions that "
        f"contain their own answer word (answers: {report['answer_words']}; predicted: answer among the k "
        f"candidates); labels permuted = scores with the split's labels permuted across segments (must be identical).",
        "",
    ]

    def fmt(v: Any, signed: bool = False) -> str:
        if v is None:
            return "–"
        return f"{v:+.2f}" if signed else f"{v:.2f}"

    def cells(name: str, p: dict[str, Any]) -> list[str]:
        out = [f"`{name}`"] + [fmt(p["metrics"].get(k)) for k in metric_keys]
        out += [fmt(p["delta_vs_templates"].get(k), True) for k in metric_keys]
        leak = p.get("leak", {})
        perm = p.get("label_permutation")
        perm_cell = "–" if perm is None else ("identical" if perm["identical"] else
                                              f"**{perm['rows_changed']} rows changed**")
        return out + [fmt(leak.get("verb")), fmt(leak.get("noun")), str(p.get("question_fallbacks", 0)), perm_cell]

    lines += markdown_table(head, (cells(name, p) for name, p in protos.items()))
    if report.get("findings"):
        lines += ["", "## Findings", ""] + [f"- {f}" for f in report["findings"]]
    return "\n".join(lines) + "\n"


def _findings(protos: dict[str, dict], task: str, threshold: float = 5.0) -> list[str]:
    """Plain-language reading of the table: large drops under shuffling / templates mean the text carries answers."""
    key = task_spec(task).headline("verb")
    out = []
    for name, p in protos.items():
        if name.endswith(SHUFFLED_SUFFIX):
            source = name.removesuffix(SHUFFLED_SUFFIX)
            base = protos.get(source, {}).get("metrics", {}).get(key)
            shuf = p["metrics"].get(key)
            if base is not None and shuf is not None and base - shuf > threshold:
                out.append(f"`{source}` questions carry segment-specific answer information: {key} drops by "
                           f"{base - shuf:.1f} points when they are shuffled across segments.")
        elif name != "templates":
            d = p["delta_vs_templates"].get(key)
            if d is not None and d > threshold:
                out.append(f"`{name}` beats label-free templates by {d:.1f} points of {key}; that gain is not "
                           "available on the test split.")
        perm = p.get("label_permutation")
        if perm is not None and not perm["identical"]:
            out.append(f"`{name}`: scores changed on {perm['rows_changed']} segments when the labels were permuted "
                       "across segments: label information reaches the model.")
        leak = p.get("leak", {})
        for t in ("verb", "noun"):
            if name != PREDICTED and (leak.get(t) or 0) > 0.5:
                out.append(f"`{name}`: {leak[t]:.0%} of {t} questions contain their own answer word.")
    return out


def _protocols(cfg: AuditConfig, loaded: Loaded, bank: QuestionBank) -> list[str]:
    """The protocols to score: the asked ones (templates always first, the reference of every delta), or every
    source the cache holds, their shuffled variants and, with a first pass, predicted."""
    available = list(loaded.cache.attrs.get("question_sources") or ["templates"])
    if cfg.protocols is None:
        protocols = ["templates"] + [s for s in PER_SEGMENT_SOURCES if s in available and s in bank.per_segment]
        protocols += [s + SHUFFLED_SUFFIX for s in PER_SEGMENT_SOURCES if s in protocols]
        if loaded.first_pass is not None:
            protocols.append(PREDICTED)
    else:
        protocols = list(cfg.protocols)
        if "templates" not in protocols:
            protocols.insert(0, "templates")  # the reference every delta is taken against
    return protocols


def _shuffles(cfg: AuditConfig, protocols: list[str], bank: QuestionBank, rows: np.ndarray,
              n: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The row permutation of each shuffled protocol (seeded) and what it moved."""
    perms: dict[str, np.ndarray] = {}
    shuffle_info: dict[str, Any] = {"seed": cfg.shuffle_seed}
    for p in protocols:
        if p.endswith(SHUFFLED_SUFFIX):
            source = p.removesuffix(SHUFFLED_SUFFIX)
            table = np.asarray(bank.per_segment[source])
            valid = np.zeros(n, dtype=bool)
            valid[rows] = True
            has_q = valid & (table >= 0).all(axis=1)
            perms[p] = shuffle_permutation(has_q, cfg.shuffle_seed)
            moved = perms[p][has_q] != np.flatnonzero(has_q)
            shuffle_info[source] = {"rows_shuffled": int(has_q.sum()), "kept_own_question": int((~moved).sum())}
    return perms, shuffle_info


@releases_caches
def audit_questions(cfg: AuditConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate one checkpoint under every question protocol (and shuffled questions) and check questions for
    their own answers; writes audit.json and audit.md and returns the report (see the module docstring).

    Over 80 lines on purpose: one straight pass (load, shuffles, score each protocol, compare, write) whose steps
    are calls into `mambavl.evaluate`; split up, the order of the audit would be scattered over helpers."""

    loaded: Loaded = load_for_eval(cfg.checkpoint, cfg.cache, cfg.task, cfg.device)
    cache = loaded.cache
    bank = cache.questions()
    protocols = _protocols(cfg, loaded, bank)
    for p in protocols:
        check_question_source(cache, p.removesuffix(SHUFFLED_SUFFIX), loaded)

    labels = loaded.labels
    rows = np.asarray(cache.valid_indices(loaded.window), dtype=np.int64)
    verb_all = np.asarray(labels["verb_class"], np.int64)
    if not (verb_all[rows] >= 0).any():
        raise InputError(f"cache {cache.path} has no labelled valid segments: the audit needs labels")
    has_nouns = len(cache.noun_keys) > 0
    noun_all = np.asarray(labels["noun_class"], np.int64) if has_nouns else None

    verb_inst, verb_src = _class_instances(list(cache.verb_keys),
                                           _class_csv(cfg.verb_classes, cfg.ek100_dir, VERB_CLASSES_FILE), "verb")
    noun_inst, noun_src = (None, None)
    if has_nouns:
        noun_inst, noun_src = _class_instances(
            list(cache.noun_keys), _class_csv(cfg.noun_classes, cfg.ek100_dir, NOUN_CLASSES_FILE), "noun")
    texts = [str(t) for t in bank.texts]
    head_kinds = loaded.spec.head_kinds
    action_pairs = loaded.run.vocab.action_pairs
    trained_source = loaded.run.question_source.value

    perms, shuffle_info = _shuffles(cfg, protocols, bank, rows, cache.n)
    labelled = np.zeros(cache.n, dtype=bool)
    labelled[rows[verb_all[rows] >= 0]] = True
    label_perm = shuffle_permutation(labelled, cfg.shuffle_seed + 1)
    # The label-permuted view: every reader of the cache's labels or questions on the scoring path sees the split
    # with its labels dealt to other segments.
    permuted_labels, permuted_bank = label_permuted(labels, bank, label_perm)
    permuted = dataclasses.replace(loaded, cache=cache.view(labels=permuted_labels, questions=permuted_bank),
                                   labels=permuted_labels)

    results: dict[str, dict[str, Any]] = {}
    progress = or_none(progress)
    progress.start(len(protocols))  # one unit per question protocol scored
    for p in protocols:
        progress.advance(0, message=p, protocol=p)
        source = p.removesuffix(SHUFFLED_SUFFIX)
        asked = shuffled_bank(bank, source, perms[p]) if p in perms else None
        # The audit measures label-keyed questions rather than refusing them.
        scored = score_cache(loaded, source, cfg.batch_size, cfg.device, bank=asked, allow_label_keyed=True)
        res = compute_metrics(scored, labels, loaded.task, {}, (1, 5), action_pairs)
        vl, nl = verb_all[scored.rows], noun_all[scored.rows] if has_nouns else None
        if p == PREDICTED:
            leak = candidate_leak(scored, vl, nl)
        else:
            q = question_indices(bank, p, scored.rows, head_kinds, perms.get(p))
            leak = static_leak(texts, q, vl, nl, verb_inst, noun_inst)
        results[p] = {"metrics": _flat(res, loaded.task), "question_fallbacks": scored.question_fallbacks,
                      "leak": leak, "n": res["n"]}
        if p not in perms:
            # Label permutation: the same protocol with the split's labels dealt to other segments.
            moved = score_cache(permuted, source, cfg.batch_size, cfg.device, allow_label_keyed=True)
            results[p]["label_permutation"] = scores_identical(scored, moved)
        progress.advance(1, message=p, protocol=p)
    progress.finish()
    base = results["templates"]["metrics"]
    for p in results.values():
        p["delta_vs_templates"] = _delta(p["metrics"], base)

    report: dict[str, Any] = {
        "mambavl_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "task": loaded.task,
        "units": "percent (metrics, deltas in percentage points); leak rates are fractions",
        "trained_question_source": trained_source,
        "checkpoint": checkpoint_identity(cfg.checkpoint, loaded.run),
        "cache": cache_identity(cache),
        "config": asdict(cfg),
        "n": results["templates"]["n"],
        "answer_words": "verb: " + verb_src + ("; noun: " + noun_src if noun_src else ""),
        "shuffle": shuffle_info,
        "label_permutation": {"seed": cfg.shuffle_seed + 1, "rows_permuted": int(labelled.sum()),
                              "rows_kept_own_labels": int((label_perm[labelled] == np.flatnonzero(labelled)).sum())},
        "protocols": results,
    }
    report["findings"] = _findings(results, loaded.task)
    if "class keys" in (verb_src, noun_src):
        report["findings"].append(
            "answer words are the class keys only (no class CSV: pass --ek100-dir, or --verb-classes / "
            "--noun-classes): the static leak rates undercount, since narrations name classes by their instances")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "audit.json", report)
    atomic_write_text(out_dir / "audit.md", audit_markdown(report))
    report["files"] = {"audit_json": str(out_dir / "audit.json"), "audit_md": str(out_dir / "audit.md")}
    return report
