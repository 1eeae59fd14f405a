"""Write a feature cache row by row, resumably, surviving SIGKILL at any point.

Crash safety. HDF5 updates its metadata (object headers, chunk indices, the superblock) in place, so a process
killed while metadata is half written leaves a file HDF5 cannot open. The writer therefore changes metadata only
where a kill cannot hurt:

* creation: the whole file (row metadata, every per-window dataset, the caller's `on_create` tables) is built under
  a temporary name, flushed and closed, then published under its final name with an exclusive hard link (a second
  run creating the same cache at the same moment finds the name taken and resumes instead). A kill during creation
  leaves only the temporary file, which the next run removes;
* rows: the per-window datasets are allocated at creation (`ALLOC_TIME_EARLY`), so writing a row changes raw data
  only. Its data are written and flushed first and its `valid` done-flag after them (then flushed), so a kill can
  leave a half-written row but never a counted one;
* failures are kept in memory and written (with the `complete` attribute) by `finalize` / `close`: a kill loses at
  most those records, and the resumed run retries failed rows anyway, recording them again.

Re-opening an existing cache with the same attributes resumes: rows already flagged valid are skipped by the caller
(`pending_rows`), failed rows are retried. An existing cache made with other attributes (annotation file, encoder,
weights, sampling) is refused, naming the attribute, and left untouched. A cache another process has open for
writing is refused as "in use" (HDF5's file lock).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mambavl import __version__
from mambavl.cache import schema
from mambavl.errors import InputError, check_writable

STR = h5py.string_dtype("utf-8")
VLEN_INT = h5py.vlen_dtype(np.int32)

# Attributes that must agree for a run to resume into an existing file (everything that changes a row's content).
RESUME_ATTRS = (
    "annotation_sha256",
    *schema.COMPATIBILITY_ATTRS,
    "sampling_mode",
    "frames_per_segment",
    "fps",
    "frame_size",
    "tokens_per_frame_pooling",
    "anticipation",
    "shard",
    "temporal_views",
    "spatial_crops",
)


@dataclass
class RowMeta:
    """Per-row metadata, in annotation row order (all length N)."""

    narration_id: list[str]
    video_id: list[str]
    participant_id: list[str]
    narration: list[str]
    verb_class: np.ndarray  # (N,) int, -1 unlabelled
    noun_class: np.ndarray  # (N,) int, -1 unlabelled / no nouns
    all_noun_classes: list[Sequence[int]]
    start_time: np.ndarray  # (N,) float seconds
    stop_time: np.ndarray  # (N,) float seconds

    def __len__(self) -> int:
        return len(self.narration_id)

    @classmethod
    def from_segments(cls, segments: Sequence[Any]) -> "RowMeta":
        """From annotation segments (anything with the `Segment` fields of mambavl.data.annotations)."""
        return cls(
            narration_id=[s.narration_id for s in segments],
            video_id=[s.video_id for s in segments],
            participant_id=[s.participant_id for s in segments],
            narration=[s.narration for s in segments],
            verb_class=np.asarray([s.verb_class for s in segments], dtype=np.int32),
            noun_class=np.asarray([s.noun_class for s in segments], dtype=np.int32),
            all_noun_classes=[tuple(s.all_noun_classes) for s in segments],
            start_time=np.asarray([s.start_time for s in segments], dtype=np.float64),
            stop_time=np.asarray([s.stop_time for s in segments], dtype=np.float64),
        )

    def subset(self, rows: Sequence[int]) -> "RowMeta":
        rows = list(rows)
        return RowMeta(
            narration_id=[self.narration_id[i] for i in rows],
            video_id=[self.video_id[i] for i in rows],
            participant_id=[self.participant_id[i] for i in rows],
            narration=[self.narration[i] for i in rows],
            verb_class=self.verb_class[rows],
            noun_class=self.noun_class[rows],
            all_noun_classes=[self.all_noun_classes[i] for i in rows],
            start_time=self.start_time[rows],
            stop_time=self.stop_time[rows],
        )


def base_attrs(**values: Any) -> dict[str, Any]:
    """Root attributes with defaults for everything `values` does not set (schema_version, package, time...)."""
    attrs: dict[str, Any] = {
        "schema_version": schema.SCHEMA_VERSION,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset_kind": "ek100",
        "annotation_file": "",
        "annotation_sha256": "",
        "encoder": "",
        "model": "",
        "pretrained": "",
        "checkpoint_sha256": "",
        "feature_dim": 0,
        "text_model": "",
        "text_pretrained": "",
        "text_dim": 0,
        "sampling_mode": "uniform",
        "frames_per_segment": 0,
        "fps": 0.0,
        "frame_size": 0,
        "tokens_per_frame_pooling": "cls",
        "has_labels": True,
        "anticipation": False,
        "question_sources": ["templates"],
        "questions_file": "",
        "source": "",
        "shard": "",
    }
    attrs.update(values)
    return attrs


def _pid_alive(text: str) -> bool:
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def allocate_early(f: h5py.File, name: str, shape: tuple, dtype: Any, fill: Any,
                   chunks: tuple | None = None) -> None:
    """A dataset whose file space is allocated (and filled with `fill`) at creation (H5D_ALLOC_TIME_EARLY)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, fillvalue=fill, dcpl=dcpl)


def is_no_space(exc: BaseException) -> bool:
    """Whether an error (OSError, or HDF5's RuntimeError around one) says the disk or quota is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc) or "errno = 28" in str(exc)


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the file system that holds `path` (an existing file or folder)."""
    p = Path(os.path.abspath(path))
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def no_space_message(path: Path, need: int, free: int) -> str:
    """'no space left on DEVICE (need ~N MB, M MB free)' for the cache `path`, and what to do."""
    mb = lambda b: f"{b / 1e6:.1f}" if b < 1e7 else f"{b / 1e6:.0f}"  # noqa: E731
    need_text = f"need ~{mb(need)} MB, " if need > 0 else ""
    return (f"no space left on {mount_point(path.parent)} for cache {path} ({need_text}{mb(free)} MB free); free "
            "space or choose another --out, then run the same command again (it resumes: finished rows are kept, "
            "no temporary file is left)")


def _h5_attr(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return value


class CacheWriter:
    """Create or resume a cache file. Use as a context manager; call `finalize()` when the run is over.

    `on_create(writer)` runs once, when the file is new, before it is published under its final name: tables
    written there (question and answer tables, source rows) are in the file whenever the file exists.
    """

    def __init__(self, path: str | os.PathLike, attrs: dict[str, Any], rows: RowMeta, verb_keys: Sequence[str],
                 noun_keys: Sequence[str], on_create: Callable[["CacheWriter"], None] | None = None):
        self.path = Path(path)
        self.attrs = base_attrs(**attrs)
        self.n = len(rows)
        self.frames = int(self.attrs["frames_per_segment"])
        self.dim = int(self.attrs["feature_dim"])
        if self.frames <= 0 or self.dim <= 0:
            raise InputError("cache attributes frames_per_segment and feature_dim must be positive")
        self.windows = [schema.RECOGNITION] + ([schema.ANTICIPATION] if self.attrs["anticipation"] else [])
        temporal, spatial = schema.view_counts(self.attrs)
        self.extra_views = temporal * spatial - 1  # views 1..V-1 of the recognition window
        check_writable(self.path, "cache")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._failures: dict[tuple[int, str], dict[str, Any]] = {}
        self._failures_dirty = False
        self._no_space = False
        if self.path.exists() or not self._create(rows, verb_keys, noun_keys, on_create):
            self.f = self._resume(rows)
            self.resumed = True
        else:
            self.f = schema.open_h5(self.path, "r+")
            self.resumed = False
        self._failures = {(r["index"], r["window"]): r for r in self._read_failures()}

    # ---------------------------------------------------------------- creation / resume
    def _create(self, rows: RowMeta, verb_keys: Sequence[str], noun_keys: Sequence[str],
                on_create: Callable[["CacheWriter"], None] | None) -> bool:
        """Build the file under a temporary name, then link it to `self.path`. False if another run published
        `self.path` first."""
        prefix = self.path.name + ".creating-"
        for stale in self.path.parent.glob(prefix + "*"):  # left by a run killed while creating
            if not _pid_alive(stale.name[len(prefix):]):
                stale.unlink(missing_ok=True)
        tmp = self.path.with_name(f"{prefix}{os.getpid()}")
        tmp.unlink(missing_ok=True)
        need = self.estimated_bytes(rows)
        free = shutil.disk_usage(self.path.parent).free
        if free < need:
            raise InputError(no_space_message(self.path, need, free))
        f = self.f = schema.open_h5(tmp, "x")
        try:
            self._build(f, rows, verb_keys, noun_keys, on_create)
        except BaseException as exc:
            if not is_no_space(exc):
                f.close()
                tmp.unlink(missing_ok=True)
                raise
            # The disk filled up under HDF5 (another writer took the space after the check above). HDF5 cannot
            # flush its metadata and may crash on close; empty the temporary file first so that the close has room,
            # then remove it: nothing is left behind filling the disk.
            with contextlib.suppress(OSError):
                os.truncate(tmp, 0)
            with contextlib.suppress(Exception):
                f.close()
            tmp.unlink(missing_ok=True)
            raise InputError(no_space_message(self.path, need, shutil.disk_usage(self.path.parent).free)) from exc
        try:
            os.link(tmp, self.path)  # exclusive: fails when the name exists
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def estimated_bytes(self, rows: RowMeta) -> int:
        """Bytes the new file takes before its first row (the row datasets are allocated at creation): features,
        frame times, counts and flags of every window, row metadata, plus 1 MiB for the question/answer tables."""
        per_row = self.frames * self.dim * 2 + self.frames * 4 + 2 + 1
        meta = sum(len(getattr(rows, name)[i]) + 16 for name in schema.ROW_STRING_DATASETS for i in range(self.n))
        views = self.extra_views * self.frames * (self.dim * 2 + 4)
        return int(self.n * (per_row * len(self.windows) + views) + meta + self.n * 64 + (1 << 20))

    def _build(self, f: h5py.File, rows: RowMeta, verb_keys: Sequence[str], noun_keys: Sequence[str],
               on_create: Callable[["CacheWriter"], None] | None) -> None:
        """Write every table of a new cache into the open temporary file `f` and close it."""
        for key, value in self.attrs.items():
            f.attrs[key] = _h5_attr(value)
        f.attrs["complete"] = False
        n, F, D = self.n, self.frames, self.dim
        for window in self.windows:
            p = schema.window_prefix(window)
            # allocated now (and filled), so that writing a row later touches raw data only, never metadata
            allocate_early(f, p + "features", (n, F, D), np.float16, 0, chunks=(1, F, D) if n else None)
            allocate_early(f, p + "num_frames", (n,), np.int16, 0)
            allocate_early(f, p + "frame_times", (n, F), np.float32, np.nan)
            allocate_early(f, p + "valid", (n,), bool, False)
        if self.extra_views:
            k = self.extra_views
            allocate_early(f, schema.VIEW_FEATURES, (n, k, F, D), np.float16, 0, chunks=(1, k, F, D) if n else None)
            allocate_early(f, schema.VIEW_FRAME_TIMES, (n, k, F), np.float32, np.nan)
        for name in schema.ROW_STRING_DATASETS:
            f.create_dataset(name, data=np.asarray(getattr(rows, name), dtype=object), dtype=STR)
        for name in schema.ROW_INT_DATASETS:
            f.create_dataset(name, data=np.asarray(getattr(rows, name), dtype=np.int32))
        for name in schema.ROW_FLOAT_DATASETS:
            f.create_dataset(name, data=np.asarray(getattr(rows, name), dtype=np.float64))
        nouns = f.create_dataset(schema.ALL_NOUNS, shape=(n,), dtype=VLEN_INT)
        for i, ids in enumerate(rows.all_noun_classes):
            nouns[i] = np.asarray(ids, dtype=np.int32)
        g = f.create_group(schema.CLASSES)
        g.create_dataset("verb", data=np.asarray(list(verb_keys), dtype=object), dtype=STR)
        g.create_dataset("noun", data=np.asarray(list(noun_keys), dtype=object), dtype=STR)
        self._write_failures()
        if on_create is not None:
            on_create(self)
        f.flush()
        f.close()

    def _resume(self, rows: RowMeta) -> h5py.File:
        f = schema.open_h5(self.path, "r+")
        old = schema.read_attrs(f.attrs)
        try:
            schema.validate_attrs(old, str(self.path))
            for key in RESUME_ATTRS:
                a, b = schema.normalise_attr(old.get(key)), schema.normalise_attr(_h5_attr(self.attrs.get(key)))
                if key == "anticipation":
                    a, b = bool(a), bool(b)
                if key in ("temporal_views", "spatial_crops"):  # absent: a cache from before views, 1 x 1
                    a, b = int(a or 1), int(b or 1)
                if a != b:
                    raise InputError(
                        f"{self.path} exists with attribute {key!r} = {a!r}, this run has {b!r}; "
                        "use another --out or remove the file to start over"
                    )
            if int(f["valid"].shape[0]) != self.n:
                raise InputError(f"{self.path} exists with {f['valid'].shape[0]} rows, this run has {self.n}")
            stored = [s.decode() if isinstance(s, bytes) else s for s in f["narration_id"][()]]
            if stored != list(rows.narration_id):
                raise InputError(f"{self.path} exists with other narration_id rows than this run")
        except InputError:
            f.close()
            raise
        return f

    # ---------------------------------------------------------------- rows
    def done(self, window: str = schema.RECOGNITION) -> np.ndarray:
        """(N,) bool done-flags of `window`."""
        return self.f[schema.window_prefix(window) + "valid"][()]

    def pending_rows(self) -> list[int]:
        """Rows that still need work in some window (not yet valid)."""
        todo = np.zeros(self.n, dtype=bool)
        for window in self.windows:
            todo |= ~self.done(window)
        return np.flatnonzero(todo).tolist()

    def write_row(self, row: int, features: np.ndarray, frame_times: np.ndarray,
                  window: str = schema.RECOGNITION) -> None:
        """Store one row: features (F', D) with F' <= F (zero-padded), frame_times (F',); then its done-flag. In a
        multi-view cache the recognition window takes every view at once: features (V, F', D), frame_times (V, F').

        ValueError for a wrong shape or values float16 cannot hold finite (NaN, inf, |x| > 65504)."""
        p = schema.window_prefix(window)
        features = np.asarray(features)
        views = self.extra_views + 1 if window == schema.RECOGNITION else 1
        want = (views,) if views > 1 else ()
        if features.shape[:-2] != want or features.shape[-1] != self.dim or features.shape[-2] > self.frames:
            raise ValueError(f"row {row}: features of shape {features.shape}, expected "
                             f"({', '.join(map(str, want + (f'<= {self.frames}', self.dim)))})")
        bad = schema.nonfinite_report(features)
        if bad:
            raise ValueError(f"row {row} ({window}): features the float16 cache cannot hold: {bad}")
        k = features.shape[-2]
        padded = np.zeros((*want, self.frames, self.dim), dtype=np.float16)  # ([V,] F, D)
        padded[..., :k, :] = features.astype(np.float16)
        times = np.full((*want, self.frames), np.nan, dtype=np.float32)
        times[..., :k] = np.asarray(frame_times, dtype=np.float32)[..., :k]
        with self._space_checked():
            if views > 1:
                self.f[schema.VIEW_FEATURES][row] = padded[1:]
                self.f[schema.VIEW_FRAME_TIMES][row] = times[1:]
                padded, times = padded[0], times[0]
            self.f[p + "features"][row] = padded
            self.f[p + "frame_times"][row] = times
            self.f[p + "num_frames"][row] = k
            self.f.flush()
            # the done-flag goes last: a crash before this line leaves the row uncounted, to be redone on resume
            self.f[p + "valid"][row] = True
            self.f.flush()
        if self._failures.pop((row, window), None) is not None:
            self._failures_dirty = True

    @contextlib.contextmanager
    def _space_checked(self):
        """A full disk while rows are written (the rows are allocated at creation, so only a file system that
        copies on write, or a quota, can do this): InputError with `no_space_message`; finished rows stay valid."""
        try:
            yield
        except (OSError, RuntimeError) as exc:
            if not is_no_space(exc):
                raise
            self._no_space = True
            raise InputError(no_space_message(self.path, 0, shutil.disk_usage(self.path.parent).free)) from exc

    def write_block(self, start: int, features: np.ndarray, frame_times: np.ndarray, num_frames: np.ndarray,
                    valid: np.ndarray, window: str = schema.RECOGNITION) -> None:
        """Store rows start .. start+K-1 at once (a merge, a bulk import): features (K, F, D), frame_times (K, F),
        num_frames (K,), valid (K,) bool in this cache's layout. Rows not valid get the empty-row fill (zeros, NaN
        times) and stay unflagged; the done-flags go last. Slices only: h5py point selections are far slower."""
        p = schema.window_prefix(window)
        valid = np.asarray(valid, dtype=bool)
        k = len(valid)
        if features.shape != (k, self.frames, self.dim) or start < 0 or start + k > self.n:
            raise ValueError(f"block of {features.shape} at row {start}: expected (K, {self.frames}, {self.dim}) "
                             f"inside {self.n} rows")
        features = np.where(valid[:, None, None], features, 0).astype(np.float16)
        frame_times = np.where(valid[:, None], np.asarray(frame_times, dtype=np.float32), np.nan)
        num_frames = np.where(valid, num_frames, 0).astype(np.int16)
        sl = slice(int(start), int(start) + k)
        self.f[p + "features"][sl] = features
        self.f[p + "frame_times"][sl] = frame_times
        self.f[p + "num_frames"][sl] = num_frames
        self.f.flush()
        self.f[p + "valid"][sl] = valid
        stale = [(int(start) + int(i), window) for i in np.flatnonzero(valid)
                 if (int(start) + int(i), window) in self._failures]
        for key in stale:
            del self._failures[key]
        if stale:
            self._failures_dirty = True  # written by finalize / close, as for single rows
        self.f.flush()

    def write_view_block(self, start: int, features: np.ndarray, frame_times: np.ndarray) -> None:
        """Store views 1..V-1 of rows start .. start+K-1 (a merge): features (K, V-1, F, D), frame_times
        (K, V-1, F). Call before `write_block` of the same rows, which sets their done-flags."""
        sl = slice(int(start), int(start) + len(features))
        self.f[schema.VIEW_FEATURES][sl] = np.asarray(features, dtype=np.float16)
        self.f[schema.VIEW_FRAME_TIMES][sl] = np.asarray(frame_times, dtype=np.float32)

    def record_failure(self, row: int, window: str, reason: str) -> None:
        """Record why a row could not be written (it stays invalid; a resumed run retries it). Kept in memory and
        written by `finalize` / `close` (see the module docstring)."""
        nid = self.f["narration_id"][row]
        nid = nid.decode() if isinstance(nid, bytes) else str(nid)
        self._failures[(row, window)] = {"index": int(row), "narration_id": nid, "window": window,
                                         "reason": str(reason)}
        self._failures_dirty = True

    def failures(self) -> list[dict[str, Any]]:
        return [self._failures[k] for k in sorted(self._failures)]

    def _read_failures(self) -> list[dict[str, Any]]:
        if schema.FAILURES not in self.f:
            return []
        g = self.f[schema.FAILURES]
        dec = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
        return [
            {"index": int(i), "narration_id": dec(a), "window": dec(w), "reason": dec(r)}
            for i, a, w, r in zip(g["index"][()], g["narration_id"][()], g["window"][()], g["reason"][()])
        ]

    def _write_failures(self) -> None:
        self._failures_dirty = False
        if schema.FAILURES in self.f:
            del self.f[schema.FAILURES]
        g = self.f.create_group(schema.FAILURES)
        rows = self.failures()
        g.create_dataset("index", data=np.asarray([r["index"] for r in rows], dtype=np.int64), maxshape=(None,))
        for key in ("narration_id", "window", "reason"):
            g.create_dataset(key, data=np.asarray([r[key] for r in rows], dtype=object), dtype=STR, maxshape=(None,))

    # ---------------------------------------------------------------- questions / answers
    def write_questions(self, texts: Sequence[str], tokens: np.ndarray, mask: np.ndarray, pooled: np.ndarray,
                        templates: dict[str, Sequence[int]], per_segment: dict[str, np.ndarray] | None = None,
                        label_keyed: dict[str, np.ndarray] | None = None) -> None:
        """The question table: texts (Q,), tokens (Q, T, Dt), mask (Q, T), pooled (Q, Dt); templates kind -> (P,)
        indices; per_segment source -> (N, 2) indices (-1 = none); label_keyed source -> (N,) bool, True where the
        row's question was derived from its labels (see `mambavl.extract.questions`). Replaces an existing table."""
        q = len(texts)
        if tokens.shape[0] != q or mask.shape[:2] != tokens.shape[:2] or pooled.shape[0] != q:
            raise ValueError("question texts, tokens, mask and pooled disagree in length")
        if schema.QUESTIONS in self.f:
            del self.f[schema.QUESTIONS]
        g = self.f.create_group(schema.QUESTIONS)
        g.create_dataset("texts", data=np.asarray(list(texts), dtype=object), dtype=STR)
        g.create_dataset("tokens", data=np.asarray(tokens, dtype=np.float16))
        g.create_dataset("mask", data=np.asarray(mask, dtype=bool))
        g.create_dataset("pooled", data=np.asarray(pooled, dtype=np.float16))
        t = g.create_group("templates")
        for kind, idx in templates.items():
            t.create_dataset(kind, data=np.asarray(idx, dtype=np.int32))
        s = g.create_group("per_segment")
        for source, table in (per_segment or {}).items():
            table = np.asarray(table, dtype=np.int32)
            if table.shape != (self.n, 2):
                raise ValueError(f"per-segment {source} questions have shape {table.shape}, expected ({self.n}, 2)")
            s.create_dataset(source, data=table)
        k = g.create_group("label_keyed")
        for source, flags in (label_keyed or {}).items():
            flags = np.asarray(flags, dtype=bool)
            if flags.shape != (self.n,):
                raise ValueError(f"label_keyed {source} has shape {flags.shape}, expected ({self.n},)")
            k.create_dataset(source, data=flags)
        self.f.flush()

    def write_answers(self, verb: np.ndarray, noun: np.ndarray, action_pairs: np.ndarray, action: np.ndarray,
                      verb_text: Sequence[str], noun_text: Sequence[str], action_text: Sequence[str]) -> None:
        """Answer candidates: verb (V, Dt), noun (Nn, Dt), action_pairs (A, 2), action (A, Dt) + their texts."""
        if schema.ANSWERS in self.f:
            del self.f[schema.ANSWERS]
        g = self.f.create_group(schema.ANSWERS)
        dt = int(self.attrs["text_dim"])
        g.create_dataset("verb", data=np.asarray(verb, dtype=np.float16).reshape(-1, dt))
        g.create_dataset("noun", data=np.asarray(noun, dtype=np.float16).reshape(-1, dt))
        g.create_dataset("action_pairs", data=np.asarray(action_pairs, dtype=np.int32).reshape(-1, 2))
        g.create_dataset("action", data=np.asarray(action, dtype=np.float16).reshape(-1, dt))
        for key, texts in (("verb_text", verb_text), ("noun_text", noun_text), ("action_text", action_text)):
            g.create_dataset(key, data=np.asarray(list(texts), dtype=object), dtype=STR)
        self.f.flush()

    # ---------------------------------------------------------------- end
    def finalize(self) -> bool:
        """Mark the cache complete when every row of every window is valid or has a recorded failure."""
        settled = np.ones(self.n, dtype=bool)
        for window in self.windows:
            ok = self.done(window).copy()
            for row, w in self._failures:
                if w == window:
                    ok[row] = True
            settled &= ok
        complete = bool(settled.all())
        with self._space_checked():
            self._write_failures()
            self.f.attrs["complete"] = complete
            self.f.flush()
        return complete

    def close(self) -> None:
        if self.f.id.valid:
            if self._failures_dirty and self.f.mode == "r+" and not self._no_space:
                self._write_failures()  # a run stopped by an exception keeps its failure records
            if self._no_space:  # the failure records are retried anyway; a close that cannot flush must not crash
                with contextlib.suppress(Exception):
                    self.f.close()
            else:
                self.f.close()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
