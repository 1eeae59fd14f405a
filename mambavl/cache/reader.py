"""Read a feature cache: the only way training and evaluation touch stage-1 output.

`open_cache` validates the root attributes (and, given `expect`, their compatibility with the cache a model was
trained on) and returns a `CacheFile`: a light, picklable handle holding the path, attributes and vocabularies. Its
HDF5 file is opened lazily, once per process, so DataLoader workers never share an h5py handle across `fork`.

Every public entry point that reads caches (training, evaluation, prediction, the analyses) runs under
`releases_caches`: the read handles opened during the call are closed when it returns or raises, so the files can be
rewritten or re-extracted in the same process right after, whatever references (a traceback, a reference cycle)
outlive the call. A CacheFile used again afterwards reopens its file. Lower-level helpers that take or return a
CacheFile (`open_cache`, `mambavl.cache.dataset.SegmentDataset`, `mambavl.evaluate.load_for_eval`, ...) leave closing
to their caller: `with open_cache(path) as cache:` or `with cache_scope():`; `mambavl.runtime.predict_scores` closes a
cache it opened from a path and leaves a given CacheFile's handle open (reopening one walks the whole file).

This module imports no torch (`mambavl cache inspect` and `cache merge` read through it); the torch `Dataset` over a
cache is `mambavl.cache.dataset.SegmentDataset`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mambavl.cache import schema
from mambavl.errors import InputError, available_memory_bytes

# Load a window's features into RAM (one read of the file; epochs then never touch HDF5) when they take at most this
# fraction of the memory available now; above it, read rows lazily from the file. An EK-100 training split at fp16
# (67,217 x 16 x 512) is 1.1 GB: whole on any machine with 2.2 GB free. DataLoader workers forked afterwards share
# the array (copy-on-write, never written), so workers do not multiply it.
IN_MEMORY_FRACTION = 0.5


def fits_in_memory(nbytes: int) -> bool:
    """Whether an array of `nbytes` should be loaded whole: at most IN_MEMORY_FRACTION of the available memory."""
    return nbytes <= IN_MEMORY_FRACTION * available_memory_bytes()


def _reads_cache(method):
    """A CacheFile method whose HDF5 errors become an InputError naming the file (damaged, or what the system said:
    `schema.reading`)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with schema.reading(self.path):
            return method(self, *args, **kwargs)

    return wrapper


class _Scope:
    """The read handles opened inside one active `cache_scope` (compared by identity: h5py File objects of one file
    compare equal, and so would two scopes' lists)."""

    __slots__ = ("handles",)

    def __init__(self) -> None:
        self.handles: list[h5py.File] = []


_LOCAL = threading.local()


def _scopes() -> list[_Scope]:
    """This thread's active scopes, innermost last."""
    stack = getattr(_LOCAL, "scopes", None)
    if stack is None:
        stack = _LOCAL.scopes = []
    return stack


@contextlib.contextmanager
def cache_scope():
    """Close, on the way out (return or exception), every cache read handle that `CacheFile.h5` opened inside the
    block in this thread. Scopes nest: a handle belongs to the innermost scope open when it was opened. Without a
    scope a handle lives as long as its CacheFile (closed when it is garbage-collected). A handle that fails to
    close does not hide the block's own exception, nor keep the other handles open."""
    scope = _Scope()
    stack = _scopes()
    stack.append(scope)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is scope:
                del stack[i]
                break
        errors = []
        for f in scope.handles:
            try:
                f.close()  # a no-op on a handle already closed
            except Exception as e:  # noqa: BLE001 - every handle is closed first; the first error is raised below
                errors.append(e)
        if errors and not failed:
            raise errors[0]


def releases_caches(fn):
    """Run `fn` inside a `cache_scope`: the cache files it opened are closed when it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with cache_scope():
            return fn(*args, **kwargs)

    return wrapper


def _strings(ds: h5py.Dataset) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in ds[()]]


@dataclass
class QuestionBank:
    """Every question text of a cache, embedded once by the text tower.

    tokens (Q, T, Dt) float32, mask (Q, T) bool, pooled (Q, Dt) float32, texts (Q,);
    templates: kind -> (P,) int64 indices into the table (index 0 = the evaluation phrasing);
    per_segment: source -> (N, 2) int64 (verb-question, noun-question) indices, -1 where a row has none;
    label_keyed: source -> (N,) bool, True where the row's question derives from its labels (narration or class key).
    """

    texts: list[str]
    tokens: np.ndarray
    mask: np.ndarray
    pooled: np.ndarray
    templates: dict[str, np.ndarray] = field(default_factory=dict)
    per_segment: dict[str, np.ndarray] = field(default_factory=dict)
    label_keyed: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class AnswerBank:
    """Answer candidates: verb (V, Dt), noun (Nn, Dt), action (A, Dt) float32; action_pairs (A, 2) int64."""

    verb: np.ndarray
    noun: np.ndarray
    action_pairs: np.ndarray
    action: np.ndarray
    verb_text: list[str]
    noun_text: list[str]
    action_text: list[str]


class CacheFile:
    """Handle on one validated cache file. Cheap to pickle: the h5py handle is (re)opened lazily per process."""

    def __init__(self, path: str | os.PathLike, attrs: dict[str, Any], verb_keys: list[str], noun_keys: list[str],
                 n: int):
        self.path = Path(path)
        self.attrs = attrs
        self.verb_keys = verb_keys
        self.noun_keys = noun_keys
        self.n = n
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        self._replaced: dict[str, Any] = {}  # tables of a `view`, served instead of the file's

    def view(self, labels: dict[str, Any] | None = None, questions: QuestionBank | None = None) -> CacheFile:
        """A handle on the same file whose `labels()` / `questions()` return the given tables instead of the file's
        (the audit's label-permuted view: what any reader of labels or questions sees is the permuted split);
        features, validity and attributes are the file's. The file is not touched; the view pickles with its
        tables."""
        other = CacheFile(self.path, self.attrs, self.verb_keys, self.noun_keys, self.n)
        other._replaced = {**self._replaced, **{k: v for k, v in (("labels", labels), ("questions", questions))
                                                if v is not None}}
        return other

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_pid"] = None
        for key in ("_labels", "_questions", "_answers"):
            state.pop(key, None)
        return state

    def h5(self) -> h5py.File:
        """The open file for this process (opened on first use, after a fork/spawn, and after a `close` or the end
        of the `cache_scope` it was opened in)."""
        if self._h5 is None or self._pid != os.getpid() or not self._h5.id.valid:
            self._h5 = schema.open_h5(self.path, "r")
            self._pid = os.getpid()
            stack = _scopes()
            if stack:
                stack[-1].handles.append(self._h5)
        return self._h5

    def close(self) -> None:
        """Close this process's handle now (the next read reopens it)."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None

    def __enter__(self) -> CacheFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has_window(self, window: str) -> bool:
        return (schema.window_prefix(window) + "features") in self.h5()

    @_reads_cache
    def valid_indices(self, window: str = schema.RECOGNITION) -> np.ndarray:
        """(M,) int64 rows whose `valid` done-flag is set in `window`."""
        prefix = schema.window_prefix(window)
        if prefix + "valid" not in self.h5():
            raise InputError(f"cache {self.path} has no {window} window (extract with --anticipation)")
        return np.flatnonzero(self.h5()[prefix + "valid"][()]).astype(np.int64)

    @_reads_cache
    def labels(self) -> dict[str, Any]:
        """Row metadata as numpy arrays / lists: verb_class, noun_class (N,) int64, all_noun_classes (N lists),
        narration_id, video_id, participant_id, narration (N,) str, start_time, stop_time (N,) float64."""
        if "labels" in self._replaced:
            return self._replaced["labels"]
        if getattr(self, "_labels", None) is None:
            f = self.h5()
            out: dict[str, Any] = {}
            for name in schema.ROW_STRING_DATASETS:
                out[name] = np.asarray(_strings(f[name]), dtype=object)
            for name in schema.ROW_INT_DATASETS:
                out[name] = f[name][()].astype(np.int64)
            for name in schema.ROW_FLOAT_DATASETS:
                out[name] = f[name][()].astype(np.float64)
            out[schema.ALL_NOUNS] = [np.asarray(a, dtype=np.int64) for a in f[schema.ALL_NOUNS][()]]
            self._labels = out
        return self._labels

    @_reads_cache
    def questions(self) -> QuestionBank:
        """The question table (see QuestionBank); raises InputError when the cache has none."""
        if "questions" in self._replaced:
            return self._replaced["questions"]
        if getattr(self, "_questions", None) is None:
            f = self.h5()
            if schema.QUESTIONS not in f or "texts" not in f[schema.QUESTIONS]:
                raise InputError(f"cache {self.path} has no questions/ table")
            g = f[schema.QUESTIONS]
            templates = {k: g["templates"][k][()].astype(np.int64) for k in g["templates"]} if "templates" in g else {}
            per_segment = (
                {k: g["per_segment"][k][()].astype(np.int64) for k in g["per_segment"]} if "per_segment" in g else {}
            )
            label_keyed = (
                {k: g["label_keyed"][k][()].astype(bool) for k in g["label_keyed"]} if "label_keyed" in g else {}
            )
            self._questions = QuestionBank(
                texts=_strings(g["texts"]),
                tokens=g["tokens"][()].astype(np.float32),
                mask=g["mask"][()].astype(bool),
                pooled=g["pooled"][()].astype(np.float32),
                templates=templates,
                per_segment=per_segment,
                label_keyed=label_keyed,
            )
        return self._questions

    @_reads_cache
    def answers(self) -> AnswerBank:
        """The answer candidates (see AnswerBank); raises InputError when the cache has none."""
        if getattr(self, "_answers", None) is None:
            f = self.h5()
            if schema.ANSWERS not in f:
                raise InputError(f"cache {self.path} has no answers/ group")
            g = f[schema.ANSWERS]
            self._answers = AnswerBank(
                verb=g["verb"][()].astype(np.float32),
                noun=g["noun"][()].astype(np.float32),
                action_pairs=g["action_pairs"][()].astype(np.int64).reshape(-1, 2),
                action=g["action"][()].astype(np.float32),
                verb_text=_strings(g["verb_text"]) if "verb_text" in g else list(self.verb_keys),
                noun_text=_strings(g["noun_text"]) if "noun_text" in g else list(self.noun_keys),
                action_text=_strings(g["action_text"]),
            )
        return self._answers

    @_reads_cache
    def failures(self) -> list[dict[str, Any]]:
        """Recorded failures: dicts with index, narration_id, window, reason."""
        f = self.h5()
        if schema.FAILURES not in f:
            return []
        g = f[schema.FAILURES]
        index = g["index"][()]
        nid, window, reason = _strings(g["narration_id"]), _strings(g["window"]), _strings(g["reason"])
        return [
            {"index": int(i), "narration_id": a, "window": w, "reason": r}
            for i, a, w, r in zip(index, nid, window, reason)
        ]


def open_cache(path: str | os.PathLike, expect: dict[str, Any] | None = None, what: str = "reference") -> CacheFile:
    """Open and validate a cache. With `expect` (attrs of the cache a model was trained on), refuse a cache whose
    encoder/text-tower attributes differ, naming the attribute."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"cache {path} does not exist")
    with schema.open_h5(path, "r") as f, schema.reading(path):
        attrs = schema.read_attrs(f.attrs)
        schema.validate_attrs(attrs, str(path))
        for name in ("features", "valid", *schema.ROW_STRING_DATASETS, *schema.ROW_INT_DATASETS):
            if name not in f:
                raise InputError(f"cache {path}: dataset {name!r} is missing")
        n = int(f["valid"].shape[0])
        classes = f.get(schema.CLASSES)
        verb_keys = _strings(classes["verb"]) if classes is not None and "verb" in classes else []
        noun_keys = _strings(classes["noun"]) if classes is not None and "noun" in classes else []
    if expect is not None:
        schema.check_compatible(expect, attrs, what, f"cache {path}")
    return CacheFile(path, attrs, verb_keys, noun_keys, n)


def require_complete(cache: CacheFile, window: str = schema.RECOGNITION, allow_incomplete: bool = False,
                     role: str = "") -> dict[str, Any]:
    """Refuse a cache whose extraction did not finish (killed, or still being written where HDF5 file locking is
    off), unless `allow_incomplete`; return what to record in the run / metrics.json.

    A cache is finished when its `complete` attribute is set (every row valid or a recorded failure: a finished
    extraction with failures is finished), or when every row of `window` is valid or has a recorded failure anyway
    (killed after its last row). Otherwise InputError: "<role> cache X is incomplete: 16 of 150 rows extracted
    (recognition window) ...", with how to finish it (re-run the same extract command: it resumes) and the option
    that uses the done rows anyway (`--allow-incomplete`).

    Returns {"complete": bool, "rows_done": int, "rows_total": int, "allow_incomplete": bool} (rows of `window`).
    """
    valid = np.zeros(cache.n, dtype=bool)
    valid[cache.valid_indices(window)] = True
    settled = valid.copy()
    for failure in cache.failures():
        if failure["window"] == window and 0 <= failure["index"] < cache.n:
            settled[failure["index"]] = True
    with schema.reading(cache.path):
        flagged = bool(schema.normalise_attr(cache.h5().attrs.get("complete", False)))
    complete = flagged or bool(settled.all())
    report = {"complete": complete, "rows_done": int(valid.sum()), "rows_total": int(cache.n),
              "allow_incomplete": bool(allow_incomplete)}
    if not complete and not allow_incomplete:
        who = f"{role} cache" if role else "cache"
        raise InputError(
            f"{who} {cache.path} is incomplete: {report['rows_done']} of {cache.n} rows extracted ({window} window) "
            "and its extraction did not finish (it was stopped, or is still running). Finish it first: run the same "
            "`mambavl extract` command again (it resumes and keeps the finished rows), then this command; or pass "
            f"--allow-incomplete to use the {report['rows_done']} finished rows (recorded in the run)"
        )
    return report
