"""Evaluate a checkpoint on a feature cache, EK-100 style: metrics, per-class tables, plots, challenge submission.

`evaluate(cfg)` scores every valid row of the cache with the checkpoint (`mambavl.runtime.predict_scores`), then, for
a labelled cache, computes the official EK-100 metrics (`mambavl.metrics`) and writes into `cfg.out_dir`:

* ``metrics.json`` — every metric (percent), the question protocol used (``question_source``; a warning when it is
  the narration-derived ``annotation`` protocol), the checkpoint and cache identities, the subset files used;
* ``per_class.csv`` — per verb / noun: training count, frequency bucket, support, top-1, top-5;
* ``submission.json`` (+ ``submission.zip`` holding it as ``test.json``, the file the challenge server takes) in the
  official format of the action recognition (or anticipation) challenge;
* PNG plots (per-class accuracy by training frequency, head/mid/tail bars, confusion of the most frequent classes).

metrics.json carries each head's chance level (`chance`: k / classes). A cache of a generic clip CSV is reported in
its own terms (the verb head is "label", `schema.head_names`), without the EK-100-only parts (unseen / tail subsets,
head/mid/tail buckets, the challenge-submission note). A cache without labels (the test split) gets the submission
only; metrics.json says so.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import re
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mambavl import __version__, plots
from mambavl import metrics as M
from mambavl.cache import schema
from mambavl.cache.dataset import SegmentDataset
from mambavl.cache.reader import QuestionBank, open_cache, releases_caches, require_complete
from mambavl.data.annotations import file_sha256, find_ek100_file, load_id_list, load_tail_classes
from mambavl.device import Precision, as_precision, autocast, resolve_device, resolve_precision
from mambavl.errors import InputError, check_writable
from mambavl.extract.questions import QuestionSource
from mambavl.fuse.qa import QA_TARGET, scene_targets
from mambavl.progress import Progress, or_none
from mambavl.runtime import hub
from mambavl.runtime import (
    Asker,
    FirstPass,
    Task,
    TaskSpec,
    TrainedModel,
    clip_batches,
    predict_scores,
    qa_logits,
    task_spec,
    view_protocol,
)


STAGES = ("load", "predict", "metrics", "submission", "plots")

ANNOTATION_WARNING = (
    "question_source is 'annotation': the questions were derived from each segment's own narration (the paper's "
    "protocol, other label masked), so they can carry the answer. These numbers are not comparable to label-free "
    "protocols and cannot be produced on the test split; run `mambavl audit-questions` to measure the effect."
)
FILE_NOTE = "question_source is 'file': user-supplied per-segment questions; check them for label leaks."

# Official file names beside the annotation CSVs (epic-kitchens-100-annotations).
TAIL_VERBS_FILE = "EPIC_100_tail_verbs.csv"
TAIL_NOUNS_FILE = "EPIC_100_tail_nouns.csv"
UNSEEN_FILE = "EPIC_100_unseen_participant_ids_{split}.csv"

# Supervision levels of a challenge submission (https://github.com/epic-kitchens/sls): pre-training, training
# labels, training data, each 0-5. They are the submitter's declaration about the whole run, so they have no
# defaults: a submission is written only when all three are given.
SLS_FIELDS = ("sls_pt", "sls_tl", "sls_td")
MISSING_IDS_SHOWN = 10


@dataclass
class EvalConfig:
    """One evaluation run; saved into metrics.json.

    `question_source` / `task` None = what the checkpoint was trained with. Subset files: explicit paths win; else
    they are looked up in `ek100_dir` (tail verbs/nouns, and the unseen-participant list of `split`, which defaults
    to the split named by the cache's annotation file: "validation" or "test"). Missing files only drop the subset
    (reported in metrics.json). `train_cache` gives the training class frequencies for the head/mid/tail analysis
    (default: the checkpoint's recorded train cache when it still exists, else the evaluated split's own labels).
    A submission needs `sls_pt`, `sls_tl`, `sls_td` (the submitter's declaration; without them a labelled split gets
    no submission and a note, an unlabelled one is refused) and every row of the cache (a cache with failed or
    unextracted rows is refused, listing their narration_ids, unless `allow_incomplete`).
    """

    checkpoint: str
    cache: str
    out_dir: str
    question_source: QuestionSource | None = None
    task: Task | None = None
    batch_size: int = 256
    device: str = "auto"
    ek100_dir: str | None = None
    unseen_ids: str | None = None
    tail_verbs: str | None = None
    tail_nouns: str | None = None
    split: str | None = None
    train_cache: str | None = None
    ks: tuple[int, ...] = (1, 5)
    plots: bool = True
    submission: bool = True
    confusion_classes: int = 20
    sls_pt: int | None = None
    sls_tl: int | None = None
    sls_td: int | None = None
    allow_incomplete: bool = False  # evaluate an unfinished cache; write a submission lacking failed / missing rows
    # autocast of the fusion model's forward passes; auto = fp32 (the scores training validated with), on any device
    precision: Precision = Precision.AUTO

    def __post_init__(self) -> None:
        for name in ("checkpoint", "cache", "out_dir"):
            setattr(self, name, str(getattr(self, name)))
        self.precision = as_precision(self.precision, "eval config: precision")
        if self.question_source is not None:
            try:
                self.question_source = QuestionSource(self.question_source)
            except ValueError:
                raise InputError(
                    f"eval config: question_source {self.question_source!r} is not one of "
                    f"{[q.value for q in QuestionSource]}"
                ) from None
        if self.task is not None:
            try:
                self.task = Task(self.task)
            except ValueError:
                raise InputError(f"eval config: task {self.task!r} is not one of {[t.value for t in Task]}") from None
        self.ks = tuple(sorted({int(k) for k in self.ks}))
        if not self.ks or min(self.ks) < 1:
            raise InputError(f"eval config: ks must be positive integers, got {self.ks}")
        if self.batch_size < 1:
            raise InputError(f"eval config: batch_size must be >= 1, got {self.batch_size}")
        for name in SLS_FIELDS:
            if getattr(self, name) is not None and not 0 <= int(getattr(self, name)) <= 5:
                raise InputError(f"eval config: {name} must be in 0..5, got {getattr(self, name)}")
        if self.split is not None and self.split not in ("validation", "test"):
            raise InputError(f"eval config: split must be 'validation' or 'test', got {self.split!r}")


# ----------------------------------------------------------------------------------------------------------------
# inputs: checkpoint + cache, subset files, training frequencies


@dataclass
class Scored:
    """Scores of one protocol on one cache, aligned by row: what metrics and submissions are computed from."""

    verb: np.ndarray  # (N, V) logits
    noun: np.ndarray | None  # (N, Nn) logits, None without a noun head
    action: np.ndarray | None  # (N, A) action-head logits, None without one
    rows: np.ndarray  # (N,) cache rows
    question_fallbacks: int = 0
    candidates: np.ndarray | None = None  # (N, 2, k) first-pass verb / noun candidates (predicted questions)
    first_pass: dict[str, np.ndarray] | None = None  # first-pass probabilities {"verb": (N, V), "noun": (N, Nn)?}


@dataclass
class Loaded:
    """A trained run and a cache that were checked to belong together, and the task it is evaluated for."""

    model: Any
    run: TrainedModel
    cache: Any
    spec: TaskSpec
    labels: dict = field(default_factory=dict)
    first_pass: FirstPass | None = None  # the run's self-questioning first pass (predicted questions)

    @property
    def task(self) -> str:
        return self.spec.task.value

    @property
    def window(self) -> str:
        return self.spec.window


sha256_file = file_sha256  # the checkpoint's sha256 in metrics.json


def load_for_eval(checkpoint: str, cache_path: str, task: str | None, device: str) -> Loaded:
    """Load the checkpoint and open the cache, refusing a cache made with other encoders or another class
    vocabulary (naming the first differing class). `task` None: the run's own task."""
    dev = resolve_device(device)
    run = TrainedModel.load(checkpoint, dev)
    cache = open_cache(cache_path)
    run.check_cache(cache, f"checkpoint {checkpoint}")
    spec = task_spec(task or run.task)
    if not cache.has_window(spec.window):
        raise InputError(f"cache {cache_path} has no anticipation window (extract it with --anticipation)")
    return Loaded(model=run.model(dev), run=run, cache=cache, spec=spec, labels=cache.labels(),
                  first_pass=run.first_pass_models(dev))


def check_question_source(cache: Any, source: str, loaded: Loaded | None = None) -> None:
    """InputError when the cache holds no questions of `source` (templates are always there; `predicted` needs only
    the answers/ tables, which every cache has, and a checkpoint that carries a first pass)."""
    available = list(cache.attrs.get("question_sources") or ["templates"])
    if source == QuestionSource.PREDICTED.value:
        if loaded is not None and loaded.first_pass is None:
            raise InputError("predicted questions need the checkpoint's first pass, and this checkpoint has none "
                             "(train with --questions predicted)")
        return
    if source != "templates" and source not in available:
        raise InputError(
            f"cache {cache.path} has no {source!r} questions (attribute question_sources = {available}); "
            f"choose --questions {' or '.join(available)} or re-extract with that question source"
        )


def score_cache(
    loaded: Loaded,
    source: str,
    batch_size: int,
    device: str,
    bank: QuestionBank | None = None,
    allow_label_keyed: bool = False,
    precision: Precision = Precision.FP32,
) -> Scored:
    """Scores of every valid row of the cache under question protocol `source`. `bank` replaces the cache's question
    table (the audit's shuffled and label-permuted tables). File questions found by a row's own class are refused
    (InputError naming the file) unless `allow_label_keyed` (the audit measures them). `precision`: the autocast of
    the forward passes (`predict_scores`)."""

    frames = loaded.run.train_config.frames
    dev = str(resolve_device(device))
    out = predict_scores(loaded.model, loaded.cache, window=loaded.window, question_source=source, device=dev,
                         batch_size=batch_size, frames=frames, first_pass=loaded.first_pass,
                         allow_label_keyed=allow_label_keyed, bank=bank, precision=precision)
    rows = np.asarray(out["indices"], dtype=np.int64)
    fallbacks = 0
    if source != "templates":
        table = (bank if bank is not None else loaded.cache.questions()).per_segment.get(source)
        if table is not None and len(rows):
            fallbacks = int((np.asarray(table)[rows] < 0).any(axis=1).sum())
    verb = np.asarray(out["verb"], dtype=np.float32)
    noun = None if out.get("noun") is None else np.asarray(out["noun"], dtype=np.float32)
    if noun is not None and noun.shape[1] == 0:
        noun = None
    action = None if out.get("action") is None else np.asarray(out["action"], dtype=np.float32)
    return Scored(verb=verb, noun=noun, action=action, rows=rows, question_fallbacks=fallbacks,
                  candidates=out.get("candidates"), first_pass=out.get("first_pass"))


def answer_cache(loaded: Loaded, batch_size: int, device: str,
                 precision: Precision = Precision.FP32) -> dict[str, np.ndarray]:
    """The QA head's answers to every question kind of the task for every valid row (`qa_logits`): the cache's verb
    and noun answers, and the run's own action answers (the training pairs, in its action vocabulary's order)."""
    dev = resolve_device(device)
    asker = Asker.of_cache(loaded.cache, loaded.spec, action_answers=loaded.run.action_answers)
    rows = np.asarray(loaded.cache.valid_indices(loaded.window), dtype=np.int64)
    clips = clip_batches(SegmentDataset(loaded.cache, window=loaded.window, indices=rows), batch_size,
                         loaded.run.train_config.frames, dev)
    with autocast(resolve_precision(precision, dev), dev):
        return qa_logits(loaded.model.to(dev), clips, asker)


def candidate_report(scored: Scored, labels: dict, first_pass: FirstPass, run: TrainedModel) -> dict[str, Any]:
    """metrics.json's "candidates" block under predicted questions: recall@k (%) of the first pass's verb / noun
    candidates on this split, beside the recall the checkpoint recorded on its training rows (cross-fitted) and its
    validation rows. Close train and evaluation recall mean training saw candidates as wrong as evaluation does."""
    rows = scored.rows
    out: dict[str, Any] = {"k": int(first_pass.k), "first_pass": first_pass.origin, "recall_at_k": {}}
    for h, task in enumerate(("verb", "noun")):
        lab = np.asarray(labels[f"{task}_class"], np.int64)[rows]
        if (lab >= 0).any() and not (task == "noun" and scored.noun is None):
            out["recall_at_k"][task] = _pct(M.recall_at_k(scored.candidates[:, h], lab))
    recorded = run.candidate_recall
    for split in ("train", "val"):
        out[f"{split}_recall_at_k"] = {t: recorded.get(f"{split}_candidate_recall_{t}") for t in ("verb", "noun")
                                       if f"{split}_candidate_recall_{t}" in recorded}
    return out


def _action_index(verb: np.ndarray, noun: np.ndarray, action_pairs: list | None) -> np.ndarray:
    """(N,) int64 index of each (verb, noun) pair in the action vocabulary `action_pairs` (the checkpoint's training
    pairs), -1 for a pair not in it."""
    index = {(int(v), int(n)): i for i, (v, n) in enumerate(action_pairs or [])}
    return np.array([index.get((int(v), int(n)), -1) for v, n in zip(verb, noun)], dtype=np.int64)


def qa_metrics(qa: dict[str, np.ndarray], labels: dict, ks: tuple[int, ...],
               action_pairs: list | None = None) -> dict[str, Any]:
    """QA accuracy per question kind (percent): answer top-k for verb / noun kinds (targets verb_class /
    noun_class) and for the action kind (target: the segment's (verb_class, noun_class) among `action_pairs`, the
    checkpoint's action vocabulary; pairs unseen in training are left out and counted as `unseen_pairs`), mAP over
    nouns for the multi-label scene question (targets all_noun_classes). qa from `answer_cache` (`mambavl.runtime.qa_logits`)."""
    rows = qa["indices"]
    out: dict[str, Any] = {}
    for kind, scores in qa.items():
        if kind == "indices":
            continue
        if QA_TARGET[kind] == "scene":
            multi = scene_targets([labels["all_noun_classes"][r] for r in rows], scores.shape[1]).numpy()
            keep = multi.sum(axis=1) > 0
            res = M.mean_average_precision(scores[keep], multi[keep])
            out[kind] = {"n": int(keep.sum()), "answers": "all_noun_classes", "mAP": _pct(res["mAP"]),
                         "classes": res["classes"]}
            continue
        target = QA_TARGET[kind]
        extra: dict[str, Any] = {}
        if target == "action":
            verb = np.asarray(labels["verb_class"], np.int64)[rows]
            noun = np.asarray(labels["noun_class"], np.int64)[rows]
            lab = np.where((verb >= 0) & (noun >= 0), _action_index(verb, noun, action_pairs), -2)  # -2: unlabelled
            extra = {"unseen_pairs": int((lab == -1).sum())}
            answers = "(verb_class, noun_class) among the training pairs"
        else:
            lab = np.asarray(labels[f"{target}_class"], np.int64)[rows]
            answers = f"{target}_class"
        keep = lab >= 0
        acc = M.topk_accuracy(scores[keep], lab[keep], ks)
        out[kind] = {"n": int(keep.sum()), "answers": answers, **extra, **{f"top{k}": _pct(v) for k, v in acc.items()}}
    return out


def infer_split(annotation_file: str) -> str | None:
    """'validation' / 'test' from an annotation file name (EPIC_100_validation.csv, EPIC_100_test_timestamps.csv)."""
    name = Path(str(annotation_file)).name.lower()
    if "test" in name:
        return "test"
    if "validation" in name or "_val" in name:
        return "validation"
    return None


def locate_subset_files(cfg: EvalConfig, cache_attrs: dict) -> tuple[dict[str, Path | None], list[str]]:
    """Paths of the unseen-participant list and the tail verb/noun lists, and notes on what was not found."""

    notes: list[str] = []
    split = cfg.split or infer_split(cache_attrs.get("annotation_file", ""))
    ek = Path(cfg.ek100_dir) if cfg.ek100_dir else None
    if ek is not None and not ek.is_dir():
        raise InputError(f"--ek100-dir {ek}: not a directory")
    wanted = {
        "unseen_ids": (cfg.unseen_ids, UNSEEN_FILE.format(split=split) if split else None),
        "tail_verbs": (cfg.tail_verbs, TAIL_VERBS_FILE),
        "tail_nouns": (cfg.tail_nouns, TAIL_NOUNS_FILE),
    }
    found: dict[str, Path | None] = {}
    for key, (explicit, default_name) in wanted.items():
        if explicit:
            p = Path(explicit)
            if not p.is_file():
                raise InputError(f"{key.replace('_', '-')} file {p} not found")
            found[key] = p
        elif ek is not None and default_name and find_ek100_file(ek, default_name) is not None:
            found[key] = find_ek100_file(ek, default_name)
        else:
            found[key] = None
            if key == "unseen_ids" and not split:
                notes.append("unseen subset skipped: the split is unknown (pass --split or --unseen-ids)")
            else:
                where = f"in {ek}" if ek else "(pass --ek100-dir or the file)"
                notes.append(f"{key} file {default_name} not found {where}; that subset is skipped")
    return found, notes


def load_subsets(files: dict[str, Path | None]) -> dict[str, Any]:
    """Parse the subset files (`mambavl.data.annotations` readers; errors name the file and row):
    {"unseen_ids": set[str] | None, "tail_verbs": set[int] | None, "tail_nouns": set[int] | None}."""

    return {
        "unseen_ids": load_id_list(files["unseen_ids"]) if files.get("unseen_ids") else None,
        "tail_verbs": load_tail_classes(files["tail_verbs"]) if files.get("tail_verbs") else None,
        "tail_nouns": load_tail_classes(files["tail_nouns"]) if files.get("tail_nouns") else None,
    }


def training_counts(loaded: Loaded, cfg_train_cache: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Training class counts (verb (V,), noun (Nn,)) and where they came from.

    Order of preference: the given / the run's recorded training cache, the evaluated split's own labels (then the
    "head/tail" buckets describe this split, said so in metrics.json).
    """
    nv, nn = len(loaded.cache.verb_keys), len(loaded.cache.noun_keys)
    path = cfg_train_cache or loaded.run.train_config.train_cache
    labels, rows, source = None, None, None
    if path and Path(path).is_file():

        try:
            train = open_cache(path)
            if list(train.verb_keys) == list(loaded.cache.verb_keys):
                labels = train.labels()
                rows = np.asarray(train.valid_indices(loaded.window), dtype=np.int64)
                source = f"training cache {path}"
        except InputError:
            labels = None
    if labels is None:
        labels = loaded.labels
        rows = np.asarray(loaded.cache.valid_indices(loaded.window), dtype=np.int64)
        source = "evaluated split (training cache not available)"
    verb = np.asarray(labels["verb_class"], np.int64)[rows]
    noun = np.asarray(labels["noun_class"], np.int64)[rows]
    vc = np.bincount(verb[(verb >= 0) & (verb < nv)], minlength=nv)
    ncount = np.bincount(noun[(noun >= 0) & (noun < nn)], minlength=nn) if nn else np.zeros(0, np.int64)
    return vc.astype(np.int64), ncount.astype(np.int64), source


# ----------------------------------------------------------------------------------------------------------------
# metrics


def _pct(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x) * 100, 4)


def _pct_tree(tree: Any) -> Any:
    """Fractions -> percent (rounded), NaN -> None (JSON null); counts ("n", "classes") untouched."""
    if isinstance(tree, dict):
        return {k: (v if k in ("n", "classes") else _pct_tree(v)) for k, v in tree.items()}
    if isinstance(tree, float):
        return _pct(tree)
    return tree


def _task_metrics(task: str, vs, ns, vl, nl, ks: tuple[int, ...], subset_args: dict) -> dict[str, Any]:
    """The official metric set of `task` (percent): nested "metrics", flat "official" (and "accuracy")."""
    out: dict[str, Any] = {}
    if task_spec(task).ranking == "class_mean_recall":
        rec = M.ek100_anticipation_metrics(vs, ns, vl, nl, k=5, **subset_args)
        out["metrics"] = _pct_tree(rec)
        out["accuracy"] = _pct_tree(M.ek100_recognition_metrics(vs, ns, vl, nl, ks=ks)["all"])
        out["official"] = {
            f"{subset}_{t}_mean_top5_recall": entry["recall@5"]
            for subset, by_task in out["metrics"].items() for t, entry in by_task.items()
        }
    else:
        rec = M.ek100_recognition_metrics(vs, ns, vl, nl, ks=ks, **subset_args)
        out["metrics"] = _pct_tree(rec)
        out["official"] = {k: (None if math.isnan(v) else round(v, 4))
                           for k, v in M.official_recognition_keys(rec).items()}
    return out


def compute_metrics(
    scored: Scored,
    labels: dict,
    task: str,
    subsets: dict[str, Any],
    ks: tuple[int, ...] = (1, 5),
    action_pairs: list | None = None,
) -> dict[str, Any]:
    """All metrics of one protocol (percent), on the labelled rows of `scored`.

    Returns {"n": labelled rows, "n_unlabelled", "metrics": nested subset/task dict, "official": the official flat
    keys, "accuracy" (anticipation: plain top-k), "action_head" (when the model has an action head),
    "metric_notes" (e.g. no unseen segment: subset omitted)}.
    """
    rows = scored.rows
    verb_l = np.asarray(labels["verb_class"], np.int64)[rows]
    noun_l = np.asarray(labels["noun_class"], np.int64)[rows]
    part = np.asarray(labels["participant_id"]).astype(str)[rows]
    keep = verb_l >= 0
    has_nouns = scored.noun is not None
    if has_nouns:
        keep &= noun_l >= 0
    vs = scored.verb[keep]
    ns = scored.noun[keep] if has_nouns else None
    vl, nl, pid = verb_l[keep], (noun_l[keep] if has_nouns else None), part[keep]
    args = dict(participant_ids=list(pid), unseen_ids=subsets.get("unseen_ids"), tail_verbs=subsets.get("tail_verbs"),
                tail_nouns=subsets.get("tail_nouns") if has_nouns else None)
    if task_spec(task).ranking == "class_mean_recall" and has_nouns and action_pairs:  # headline action recall: the training actions
        args["training_actions"] = np.asarray(action_pairs, dtype=np.int64).reshape(-1, 2)
    out: dict[str, Any] = {"n": int(keep.sum()), "n_unlabelled": int((~keep).sum())}
    # The metrics warn (as the official code does) when a subset is empty; that belongs in metrics.json.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out.update(_task_metrics(task, vs, ns, vl, nl, ks, args))
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if notes:
        out["metric_notes"] = notes
    if scored.action is not None and action_pairs and has_nouns:
        al = _action_index(vl, nl, action_pairs)
        seen = al >= 0
        acc = M.topk_accuracy(scored.action[keep][seen], al[seen], ks)
        out["action_head"] = {"n": int(seen.sum()), "coverage": _pct(seen.mean()) if len(seen) else None,
                              **{f"top{k}": _pct(v) for k, v in acc.items()}}
    return out


def per_class_tables(
    scored: Scored, labels: dict, verb_counts: np.ndarray, noun_counts: np.ndarray, ks: tuple[int, ...],
    buckets: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """{task: {"support", "train_count", "bucket", "top1", "top5", ...}} per verb / noun class (accuracies 0..1);
    no "bucket" without `buckets` (the EK-100 head/mid/tail analysis, made for EK-100 data only)."""
    rows = scored.rows
    out = {}
    for task, s, counts in (("verb", scored.verb, verb_counts), ("noun", scored.noun, noun_counts)):
        if s is None:
            continue
        lab = np.asarray(labels[f"{task}_class"], np.int64)[rows]
        keep = lab >= 0
        table = M.per_class_accuracy(s[keep], lab[keep], num_classes=s.shape[1], ks=ks)
        table["train_count"] = counts
        if buckets:
            table["bucket"] = M.frequency_buckets(counts)
        out[task] = table
    return out


def bucket_metrics(tables: dict, scored: Scored, labels: dict, ks: tuple[int, ...]) -> dict[str, Any]:
    """Accuracy by training-frequency bucket per task (percent); the bucket rule is in metrics.frequency_buckets."""
    out: dict[str, Any] = {}
    for task, table in tables.items():
        s = scored.verb if task == "verb" else scored.noun
        lab = np.asarray(labels[f"{task}_class"], np.int64)[scored.rows]
        keep = lab >= 0
        res = M.bucket_accuracy(s[keep], lab[keep], table["bucket"], ks)
        out[task] = _pct_tree(res)
    return out


def write_per_class_csv(path: Path, tables: dict, names: dict[str, list[str]], ks: tuple[int, ...],
                        display: dict[str, str] | None = None) -> None:
    """per_class.csv; `display` names the heads in the dataset's terms (task column), the bucket column only where
    the tables have buckets (EK-100 data)."""
    display = display or {}
    bucketed = any("bucket" in t for t in tables.values())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["task", "class_id", "class_key", "train_count", *(["bucket"] if bucketed else []), "support"]
               + [f"top{k}" for k in ks])
    for task, table in tables.items():
        for c in range(len(table["support"])):
            accs = [table[f"top{k}"][c] for k in ks]
            w.writerow([display.get(task, task), c, names[task][c], int(table["train_count"][c]),
                        *([table["bucket"][c]] if bucketed else []),
                        int(table["support"][c])] + ["" if math.isnan(a) else f"{a * 100:.4f}" for a in accs])
    atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# submission (official challenge format)


def _number_strings(scores: np.ndarray) -> np.ndarray:
    """(N, C) float -> (N, C) str: the shortest text that reads back as the same float32 (half the size of
    float64 reprs; the challenge server only ranks the scores)."""
    scores = np.asarray(scores, dtype=np.float32)
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity; the model produced non-finite logits")
    return scores.astype(str)


def _scores_object(keys: list[str], values: np.ndarray) -> str:
    return "{" + ", ".join(f'"{k}": {v}' for k, v in zip(keys, values)) + "}"


def submission_text(
    narration_ids: list[str],
    verb: np.ndarray,
    noun: np.ndarray | None,
    challenge: str,
    sls: dict[str, int],
    action_top: int = M.ACTION_TOP_N,
) -> str:
    """The challenge JSON as text.

    action_recognition (C1 ``utils/challenge.py:make_action_recognition_submission``): ``{"version": "0.2",
    "challenge": "action_recognition", "sls_pt", "sls_tl", "sls_td", "results": {narration_id: {"verb": {"0":
    score, ...}, "noun": {...}}}}`` — raw scores of every class; the server derives actions itself.
    action_anticipation (RULSTM ``utils.py:predictions_to_json`` with version "0.2"): the same plus
    ``"action": {"verb,noun": score}`` for the top-100 pairs by p(verb) * p(noun).
    Built as text row by row so a 13k-segment test split does not need a 5M-entry dict in memory.
    """
    if challenge not in ("action_recognition", "action_anticipation"):
        raise ValueError(f"unknown challenge {challenge!r}")
    if len(narration_ids) != len(verb):
        raise ValueError(f"{len(narration_ids)} narration ids for {len(verb)} score rows")
    vkeys = [str(i) for i in range(verb.shape[1])]
    vtext = _number_strings(verb)
    ntext = _number_strings(noun) if noun is not None else None
    nkeys = [str(i) for i in range(noun.shape[1])] if noun is not None else []
    pairs = ascores = None
    if challenge == "action_anticipation" and noun is not None:
        pairs, ascores = M.action_scores_from_verb_noun(verb, noun, action_top)
        ascores = _number_strings(ascores)
    head = {"version": "0.2", "challenge": challenge, **{k: int(v) for k, v in sls.items()}}
    parts = [json.dumps(head)[:-1], ', "results": {']
    for i, nid in enumerate(narration_ids):
        entry = f'"verb": {_scores_object(vkeys, vtext[i])}'
        if ntext is not None:
            entry += f', "noun": {_scores_object(nkeys, ntext[i])}'
        if pairs is not None:
            akeys = [f"{v},{n}" for v, n in pairs[i]]
            entry += f', "action": {_scores_object(akeys, ascores[i])}'
        parts.append(("" if i == 0 else ", ") + json.dumps(str(nid)) + ": {" + entry + "}")
    parts.append("}}")
    return "".join(parts)


def write_submission(out_dir: Path, text: str) -> dict[str, str]:
    """submission.json, and submission.zip with the same JSON as test.json (C1 ``write_submission_file``)."""
    js = out_dir / "submission.json"
    atomic_write_text(js, text)
    zp = out_dir / "submission.zip"
    tmp = zp.with_name(zp.name + ".tmp")
    with zipfile.ZipFile(tmp, mode="w", compression=zipfile.ZIP_DEFLATED, compresslevel=5) as z:
        z.writestr("test.json", text)
    os.replace(tmp, zp)
    return {"submission_json": str(js), "submission_zip": str(zp)}


# ----------------------------------------------------------------------------------------------------------------
# plots


def write_plots(out_dir: Path, tables: dict, buckets: dict, scored: Scored, labels: dict, names: dict,
                top: int, display: dict[str, str] | None = None) -> dict[str, str]:
    """Per-class accuracy, head/mid/tail bars (EK-100 data) and confusion matrices as PNGs; returns {name: path}.
    `display` names the heads in the dataset's terms (file names and titles)."""

    files: dict[str, str] = {}
    for task, table in tables.items():
        shown = (display or {}).get(task, task)
        coloured = " (bars coloured by training-frequency bucket)" if "bucket" in table else ""
        p = plots.per_class_accuracy_plot(
            out_dir / f"{shown}_per_class.png", table["top1"] * 100, table["train_count"], names[task],
            f"{shown} top-1 accuracy per class{coloured}", table.get("bucket"),
        )
        files[f"{shown}_per_class_png"] = str(p)
        s = scored.verb if task == "verb" else scored.noun
        lab = np.asarray(labels[f"{task}_class"], np.int64)[scored.rows]
        keep = lab >= 0
        pred = M.rank_classes(s[keep], 1)[:, 0]
        support = table["support"]
        chosen = [int(c) for c in np.argsort(-support, kind="stable")[:top] if support[c] > 0]
        if chosen:
            # Every class outside the chosen ones is folded into "other", so rows still sum to their support.
            remap = np.full(s.shape[1], len(chosen), dtype=np.int64)
            remap[chosen] = np.arange(len(chosen))
            cm = M.confusion_matrix(remap[pred], remap[lab[keep]], len(chosen) + 1)
            p = plots.confusion_plot(out_dir / f"{shown}_confusion.png", cm,
                                     [names[task][c] for c in chosen] + ["(other)"],
                                     f"{shown} confusion, {len(chosen)} most frequent classes (row-normalised)")
            files[f"{shown}_confusion_png"] = str(p)
    if buckets:
        p = plots.bucket_bars_plot(out_dir / "head_tail.png", buckets,
                                   "top-1 accuracy by training-frequency bucket")
        files["head_tail_png"] = str(p)
    return files


# ----------------------------------------------------------------------------------------------------------------
# the run


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _finite(obj: Any) -> Any:
    """NaN / infinity -> None, recursively: metrics.json stays strict JSON (a missing value is null)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (NaN written as null), atomically."""
    text = json.dumps(_finite(json.loads(json.dumps(obj, default=_json_default))), indent=2, allow_nan=False)
    atomic_write_text(path, text + "\n")


def checkpoint_identity(path: str, run: TrainedModel) -> dict[str, Any]:
    """metrics.json's "checkpoint" block: the file (or model folder, or hf:// reference), its sha256 and what the
    run was."""
    tc = run.train_config
    return {
        **hub.fingerprint(path),
        "epoch": run.progress.epoch,
        "preset": tc.preset,
        "task": tc.task.value,
        "question_source": tc.question_source.value,
        "train_cache": tc.train_cache,
        "best_metric": run.progress.best_metric,
        "best_epoch": run.progress.best_epoch,
        "epochs": tc.epochs,  # the run's budget (a resume may have changed it: `budget_changes`)
        "patience": tc.patience,
        "stopped_early": run.progress.stopped_early,
        "budget_changes": run.progress.changes,
        "package_version": run.package_version,
        "format": run.format_read,
    }


def cache_identity(cache: Any) -> dict[str, Any]:
    return {"path": str(Path(cache.path).resolve()), "segments": int(cache.n), "attrs": cache.attrs}


def submission_plan(cfg: EvalConfig, loaded: Loaded) -> dict[str, Any]:
    """Whether a submission can be written, decided before any scoring: {"write": bool, "note": str,
    "missing": [narration_id of rows the submission lacks]}.

    Raises InputError for an unlabelled split without the sls levels (a submission is all such a split gives), and
    for a cache whose rows are not all valid unless `cfg.allow_incomplete` (the challenge server rejects a
    submission with missing narration_ids)."""
    if not cfg.submission:
        return {"write": False, "note": "", "missing": []}
    labelled = bool(loaded.cache.attrs.get("has_labels", True))
    absent = [name for name in SLS_FIELDS if getattr(cfg, name) is None]
    if absent and labelled and not schema.is_ek100(loaded.cache.attrs):
        return {"write": False, "note": "", "missing": []}  # the EK-100 challenge format: not asked, not mentioned
    if absent:
        flags = ", ".join("--" + name.replace("_", "-") for name in absent)
        if not labelled:
            raise InputError(
                f"cache {cfg.cache} has no labels, so evaluation writes a challenge submission, which needs your "
                f"supervision levels ({flags}, each 0-5; see https://github.com/epic-kitchens/sls); or --no-submission")
        return {"write": False, "missing": [],
                "note": f"no submission written: it needs the supervision levels {flags} (your declaration)"}
    valid = set(loaded.cache.valid_indices(loaded.window).tolist())
    nids = np.asarray(loaded.labels["narration_id"])
    missing = [str(nids[r]) for r in range(loaded.cache.n) if r not in valid]
    if missing and not cfg.allow_incomplete:
        shown = ", ".join(missing[:MISSING_IDS_SHOWN]) + (" ..." if len(missing) > MISSING_IDS_SHOWN else "")
        raise InputError(
            f"cache {cfg.cache}: {len(missing)} of {loaded.cache.n} segments have no features ({loaded.window} "
            f"window: failed or not extracted; `mambavl cache inspect` gives the reasons), so the submission would "
            f"lack them and the challenge server rejects it. Missing narration_ids: {shown}. Re-run the extraction "
            "(it retries failed rows), or pass --allow-incomplete to write it anyway, or --no-submission")
    return {"write": True, "note": "", "missing": missing}


def question_report(source: str, origin: str) -> dict[str, Any]:
    """The question-protocol fields of metrics.json (with the leak warning for the annotation protocol)."""
    rep: dict[str, Any] = {"question_source": source, "question_source_from": origin}
    if source == "annotation":
        rep["question_source_warning"] = ANNOTATION_WARNING
    elif source == "file":
        rep["question_source_warning"] = FILE_NOTE
    return rep


CHANCE_NOTE = ("expected accuracy of a uniform random ranking: top-k = k / classes, also the expected class-mean "
               "top-k recall; action (verb and noun both right): k / (verbs x nouns); action_head: k / its classes")


def chance_report(scored: Scored, action_pairs: list | None, ks: tuple[int, ...]) -> dict[str, Any]:
    """metrics.json's "chance" block: the chance level of every head's top-k (`metrics.chance_levels`)."""
    counts = {"verb": scored.verb.shape[1]}
    if scored.noun is not None:
        counts.update(noun=scored.noun.shape[1], action=scored.verb.shape[1] * scored.noun.shape[1])
    if action_pairs:
        counts["action_head"] = len(action_pairs)
    return {**M.chance_levels(counts, ks), "note": CHANCE_NOTE}


def in_dataset_terms(result: dict[str, Any], display: dict[str, str]) -> dict[str, Any]:
    """`result` with the heads named as the dataset names them (a generic CSV's "label" for the verb head) in the
    per-head blocks of metrics.json ("metrics", "accuracy", "chance", "official")."""
    if all(k == v for k, v in display.items()):
        return result

    def words(text: str) -> str:  # "verb" as a word or between underscores: val_verb_top1, next_verb, verb_class
        return re.sub(r"(?<![A-Za-z])(verb|noun)(?![A-Za-z])", lambda m: display.get(m.group(1), m.group(1)), text)

    def rename(block: Any) -> Any:
        return {words(k): v for k, v in block.items()} if isinstance(block, dict) else block

    out = dict(result)
    if isinstance(out.get("metrics"), dict):  # {subset: {head: ...}}
        out["metrics"] = {subset: rename(by_head) for subset, by_head in out["metrics"].items()}
    for key in ("accuracy", "chance", "official"):  # {head: ...}, official {subset_head_...: value}
        if isinstance(out.get(key), dict):
            out[key] = rename(out[key])
    if isinstance(out.get("qa"), dict):  # {question kind: {..., "answers": "verb_class"}}
        out["qa"] = {words(kind): {**e, "answers": words(str(e.get("answers", "")))} for kind, e in out["qa"].items()}
    return out


def labelled_metrics(cfg: EvalConfig, loaded: Loaded, scored: Scored, result: dict[str, Any]) -> tuple[dict, dict]:
    """The metrics of a labelled split into `result` (EK-100 metrics, QA, candidates, frequency buckets); returns the
    per-class tables and the head/mid/tail buckets (for per_class.csv and the plots)."""
    labels = loaded.labels
    ek100 = schema.is_ek100(loaded.cache.attrs)
    subsets: dict[str, Any] = {"unseen_ids": None, "tail_verbs": None, "tail_nouns": None}
    if ek100:  # the EK-100 subset files (and the notes on missing ones) mean nothing for other data
        found, notes = locate_subset_files(cfg, loaded.cache.attrs)
        subsets = load_subsets(found)
        result["subset_files"] = {k: (str(v) if v else None) for k, v in found.items()}
        if notes:
            result["subset_notes"] = notes
    action_pairs = loaded.run.vocab.action_pairs
    result.update(compute_metrics(scored, labels, loaded.task, subsets, cfg.ks, action_pairs))
    result["chance"] = chance_report(scored, action_pairs if "action_head" in result else None, cfg.ks)
    if loaded.run.trained_with_qa:
        qa = answer_cache(loaded, cfg.batch_size, cfg.device, cfg.precision)
        result["qa"] = qa_metrics(qa, labels, cfg.ks, action_pairs)
    else:  # an untrained QA head would score at chance: say so instead of reporting it
        result["qa"] = {}
        result["qa_note"] = "not measured: the checkpoint was trained without the QA objective (qa_weight 0)"
    if scored.candidates is not None:
        result["candidates"] = candidate_report(scored, labels, loaded.first_pass, loaded.run)
    vcount, ncount, freq_source = training_counts(loaded, cfg.train_cache)
    tables = per_class_tables(scored, labels, vcount, ncount, cfg.ks, buckets=ek100)
    if not ek100:
        return tables, {}
    buckets = bucket_metrics(tables, scored, labels, cfg.ks)
    result["frequency_buckets"] = {
        "source": freq_source,
        "rule": f"classes by descending training count; head = classes before {M.HEAD_SHARE:.0%} of training "
                f"instances, mid = before {M.MID_SHARE:.0%}, tail = the rest",
        **buckets,
    }
    return tables, buckets


@releases_caches
def evaluate(cfg: EvalConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run one evaluation (see the module docstring); returns the metrics.json content (plus "files").

    Over 80 lines on purpose: the stages (load, predict, metrics, submission, plots) follow each other in one
    function, each a call into the helpers above, so the whole evaluation reads in order."""

    # Progress: one unit per stage of STAGES ("load", "predict", "metrics", "submission", "plots"); stages that do
    # not apply (no labels: no metrics; no submission asked) are skipped and counted when the run ends.
    progress = or_none(progress)
    progress.start(len(STAGES))
    reported = 0

    def step(stage: str, **info: Any) -> None:
        nonlocal reported
        index = STAGES.index(stage)
        progress.advance(index - reported, message=stage, stage=stage, **info)
        reported = index

    out_dir = Path(cfg.out_dir)
    check_writable(out_dir, "--out")
    step("load")
    loaded = load_for_eval(cfg.checkpoint, cfg.cache, cfg.task, cfg.device)
    precision = resolve_precision(cfg.precision, resolve_device(cfg.device))  # InputError before any scoring
    completeness = require_complete(loaded.cache, loaded.window, cfg.allow_incomplete, "evaluated")
    trained_source = loaded.run.question_source.value
    source = cfg.question_source.value if cfg.question_source else trained_source
    check_question_source(loaded.cache, source, loaded)
    submit = submission_plan(cfg, loaded)
    out_dir.mkdir(parents=True, exist_ok=True)

    step("predict", question_source=source)
    scored = score_cache(loaded, source, cfg.batch_size, cfg.device, precision=precision)
    labels = loaded.labels
    verb_rows = np.asarray(labels["verb_class"], np.int64)[scored.rows]
    labelled = bool(loaded.cache.attrs.get("has_labels", True)) and bool((verb_rows >= 0).any())

    names = {"verb": list(loaded.cache.verb_keys), "noun": list(loaded.cache.noun_keys)}
    kind = "ek100" if schema.is_ek100(loaded.cache.attrs) else "generic"
    display = schema.head_names(kind)
    result: dict[str, Any] = {
        "dataset": {"kind": kind, "heads": display},
        "mambavl_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "task": loaded.task,
        "window": loaded.window,
        **question_report(source, "override" if cfg.question_source else "checkpoint"),
        "trained_question_source": trained_source,
        "views": view_protocol(loaded.cache, window=loaded.window),
        "precision": precision.value,  # what config.precision (auto: fp32) ran as
        "question_fallbacks": scored.question_fallbacks,
        "checkpoint": checkpoint_identity(cfg.checkpoint, loaded.run),
        "cache": cache_identity(loaded.cache),
        "cache_completeness": completeness,
        "config": asdict(cfg),
        "segments": {"cache": int(loaded.cache.n), "evaluated": int(len(scored.rows)),
                     "invalid_or_failed": int(loaded.cache.n - len(scored.rows))},
        "units": "percent",
    }
    if result["segments"]["invalid_or_failed"]:
        result["segments_warning"] = (
            f"{result['segments']['invalid_or_failed']} cache rows are not valid (failed or not yet extracted) and are "
            "missing from the metrics and the submission; see `mambavl cache inspect`"
        )
    files: dict[str, str] = {}

    step("metrics")
    if labelled:
        tables, buckets = labelled_metrics(cfg, loaded, scored, result)
        write_per_class_csv(out_dir / "per_class.csv", tables, names, cfg.ks, display)
        files["per_class_csv"] = str(out_dir / "per_class.csv")
    else:
        result["metrics"] = None
        result["note"] = "the cache has no labels (test split): no metrics; submission.json holds the scores"
        tables, buckets = {}, {}

    if submit["write"]:
        step("submission")
        nids = [str(x) for x in np.asarray(labels["narration_id"])[scored.rows]]
        challenge = loaded.spec.challenge
        sls = {name: int(getattr(cfg, name)) for name in SLS_FIELDS}
        files.update(write_submission(out_dir, submission_text(nids, scored.verb, scored.noun, challenge, sls)))
        result["submission"] = {"challenge": challenge, "version": "0.2", **sls, "segments": len(nids),
                                "missing_ids": submit["missing"]}
    elif submit["note"]:
        result["submission_note"] = submit["note"]

    if cfg.plots and tables:
        step("plots")
        files.update(write_plots(out_dir, tables, buckets, scored, labels, names, cfg.confusion_classes, display))

    files["metrics_json"] = str(out_dir / "metrics.json")
    result = in_dataset_terms(result, display)
    result["files"] = files
    write_json(out_dir / "metrics.json", result)
    progress.advance(len(STAGES) - reported, message="done")
    progress.finish()
    return result
