"""Annotation files: EPIC-KITCHENS-100 CSVs and a generic clip CSV, parsed into one `AnnotationSet`.

EK-100 layout (epic-kitchens-100-annotations): ``narration_id, participant_id, video_id, narration_timestamp,
start_timestamp, stop_timestamp, start_frame, stop_frame[, narration, verb, verb_class, noun, noun_class, all_nouns,
all_noun_classes]`` — the test split (``EPIC_100_test_timestamps.csv``) has no label columns. Timestamps are
``HH:MM:SS.ff``; frames are numbered from 1; ``all_nouns`` / ``all_noun_classes`` are Python list literals. Class
CSVs: ``id, key, instances, category``; ``EPIC_100_video_info.csv``: ``video_id, duration, fps, resolution``.

Generic clip CSV: ``video, start, stop, label`` (+ optional ``id``, ``noun``, ``participant``, ``narration``): any
label set, so Something-Something- or Kinetics-style datasets go through the same pipeline. Labels become the verb
vocabulary (sorted unique); nouns are empty unless a ``noun`` column exists. ``video`` is a path relative to the
video root; ``start`` / ``stop`` are seconds or ``[HH:]MM:SS(.ff)``.

Every error is an `InputError` naming the file, the 1-based data row (header not counted) and the field.

Frame numbers and times. EK-100's ``start_frame`` / ``stop_frame`` number the frames of the released
``rgb_frames`` folders, which were extracted at a fixed rate, not at the video's native rate: EK-55 videos
(native 59.94, 29.97, 47.95 or 90 fps in ``EPIC_100_video_info.csv``) are numbered at ~60 frames/s, the EK-100
extension (50 fps) at 50. So a frame folder's numbering rate is inferred per video from the CSV's own
(frame, timestamp) pairs (`infer_frame_rates`), and every row is checked against it (`check_frame_times`): a row
whose start_frame and start_timestamp (or stop_frame and stop_timestamp) disagree by more than `FRAME_TOLERANCE`
frames plus the timestamps' 10 ms resolution is refused, naming file, row and fields. `frame_at` / `frame_start`
/ `frame_window` are the one definition of frame number <-> time for a numbered source (frame folders, RULSTM LMDB
keys); video files use their own timestamps.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mambavl.errors import InputError

EK100_REQUIRED = ("narration_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp",
                  "start_frame", "stop_frame")
EK100_LABELS = ("narration", "verb", "verb_class", "noun", "noun_class", "all_noun_classes")
GENERIC_REQUIRED = ("video", "start", "stop", "label")

VERB_CLASSES = "EPIC_100_verb_classes.csv"
NOUN_CLASSES = "EPIC_100_noun_classes.csv"
VIDEO_INFO = "EPIC_100_video_info.csv"

# [HH:]MM:SS[.ff]; minutes and seconds below 60 so that a swapped or garbled field is refused, not misread.
_TS = re.compile(r"^(?:(\d+):)?([0-5]?\d):([0-5]?\d(?:\.\d*)?)$")


@dataclass(frozen=True)
class Segment:
    """One annotated segment (see the module docstring for where each field comes from)."""

    narration_id: str
    participant_id: str          # "" for generic CSVs without a participant column
    video_id: str                # EK-100 video id, or the generic CSV's `video` value (relative path)
    start_time: float            # seconds from the video start
    stop_time: float
    start_frame: int | None      # EK-100, 1-based; None for generic CSVs
    stop_frame: int | None
    narration: str               # "" when absent (test split, generic CSV without a narration column)
    verb: str                    # raw verb text ("" when absent)
    noun: str
    verb_class: int              # -1 when unlabelled
    noun_class: int              # -1 when unlabelled or the dataset has no nouns
    all_noun_classes: tuple[int, ...]
    row: int                     # 1-based data row in its file, for error messages
    all_nouns: tuple[str, ...] = ()  # EK-100 ``all_nouns`` (raw words, parallel to all_noun_classes)


@dataclass(frozen=True)
class ClassVocab:
    """Class vocabulary: index = class id."""

    keys: tuple[str, ...] = ()
    instances: tuple[tuple[str, ...], ...] = ()   # EK-100 `instances` (synonyms); (key,) for generic labels
    categories: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class VideoInfo:
    duration: float    # seconds
    fps: float
    resolution: str    # "1920x1080" ("" when unknown)


# How far (in frames) a row's frame number may lie from its timestamp at the video's numbering rate: EK-100's
# frames come from one extraction and its timestamps from another, and they differ by up to ~2 frames.
FRAME_TOLERANCE = 2.0
TIMESTAMP_RESOLUTION = 0.01  # seconds: HH:MM:SS.ff


@dataclass
class AnnotationSet:
    segments: list[Segment]
    verbs: ClassVocab            # for generic CSVs: the label set (sorted unique labels)
    nouns: ClassVocab            # empty for generic CSVs without a noun column
    video_info: dict[str, VideoInfo] = field(default_factory=dict)
    path: Path = Path()
    sha256: str = ""             # of the annotation CSV bytes
    kind: str = "ek100"          # "ek100" | "generic"
    has_labels: bool = True      # False for test_timestamps-style files
    # EK-100: video_id -> frame numbering rate (frames/s) inferred from the rows' frame/timestamp pairs
    frame_rates: dict[str, float] = field(default_factory=dict)

    def frame_rate(self, video_id: str, given: float | None = None) -> float | None:
        """Numbering rate (frames/s) of `video_id`'s frame folder: `given` when set, else the rate the EK-100 rows
        imply, else (generic CSVs, which carry no frame numbers) the video_info fps; None when unknown."""
        if given is not None:
            return float(given)
        if video_id in self.frame_rates:
            return self.frame_rates[video_id]
        if self.kind == "generic" and video_id in self.video_info:
            return self.video_info[video_id].fps
        return None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_timestamp(text: str) -> float:
    """``HH:MM:SS.ff`` (also ``MM:SS(.ff)`` or plain non-negative seconds) -> seconds; ValueError otherwise."""
    text = text.strip()
    m = _TS.match(text)
    if m:
        return int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    if ":" in text:
        raise ValueError(f"invalid time {text!r}")
    value = float(text)  # plain seconds; raises ValueError on anything else
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid time {text!r}")
    return value


def frame_at(t: float, rate: float) -> int:
    """1-based number of the frame displayed at time `t` (seconds) in a source numbered at `rate` frames/s:
    frame n is displayed during [(n - 1) / rate, n / rate)."""
    return int(math.floor(max(float(t), 0.0) * rate + 1e-6)) + 1


def frame_start(number: int | np.ndarray, rate: float) -> float | np.ndarray:
    """Time (seconds) at which 1-based frame `number` starts being displayed: (number - 1) / rate."""
    return (np.asarray(number, dtype=np.float64) - 1) / rate if isinstance(number, np.ndarray) \
        else (int(number) - 1) / rate


def frame_window(start: float, stop: float, rate: float) -> tuple[int, int]:
    """The frames displayed during [start, stop) seconds: (first, last), 1-based inclusive, last >= first."""
    first = frame_at(start, rate)
    return first, max(first, int(math.ceil(float(stop) * rate - 1e-6)))


def _fit_rate(t: np.ndarray, f: np.ndarray) -> float | None:
    """Slope through the origin of frame offsets `f` against times `t` (both (P,)), robust to a few bad rows: each of
    the (up to 256) latest points proposes the rate f/t; the proposal most points agree with (within the check's
    tolerance) wins, and least squares over the points near it (twice, then once the tolerance) refines it."""
    keep = t > 0
    t, f = t[keep], f[keep]
    if not len(t):
        return None
    late = np.argsort(-t, kind="stable")[:256]  # latest first: their ratios are the most precise
    proposals = f[late] / t[late]  # (C,)
    tol = FRAME_TOLERANCE + TIMESTAMP_RESOLUTION * proposals[:, None]  # (C, 1)
    agree = (np.abs(f[None, :] - proposals[:, None] * t[None, :]) <= tol).sum(axis=1)  # (C,)
    rate = float(proposals[int(np.argmax(agree))])
    for band in (2.0, 1.0):  # a proposal may sit at one edge of the band: refit on a wider band, then the band
        inside = np.abs(f - rate * t) <= band * (FRAME_TOLERANCE + TIMESTAMP_RESOLUTION * rate)
        if inside.any():
            rate = float((t[inside] * f[inside]).sum() / (t[inside] ** 2).sum())
    return rate if math.isfinite(rate) and rate > 0 else None


def infer_frame_rates(segments: list[Segment]) -> dict[str, float]:
    """video_id -> frame numbering rate (frames/s) implied by the rows' (start_frame - 1, start_timestamp) and
    (stop_frame, stop_timestamp) pairs. Videos whose rows carry no usable pair (all times 0) are left out."""
    points: dict[str, tuple[list[float], list[float]]] = {}
    for s in segments:
        if s.start_frame is None or s.stop_frame is None:
            continue
        ts, fs = points.setdefault(s.video_id, ([], []))
        ts += [s.start_time, s.stop_time]
        fs += [s.start_frame - 1, s.stop_frame]
    out = {}
    for vid, (ts, fs) in points.items():
        rate = _fit_rate(np.asarray(ts), np.asarray(fs, dtype=np.float64))
        if rate is not None:
            out[vid] = rate
    return out


def check_frame_times(path: str | os.PathLike, segments: list[Segment], rates: dict[str, float],
                      origin: str = "the file's rows of this video") -> None:
    """InputError naming file, row and fields when a row's frame number and timestamp disagree at its video's
    numbering rate by more than FRAME_TOLERANCE frames (+ the timestamps' 10 ms resolution)."""
    for s in segments:
        rate = rates.get(s.video_id)
        if rate is None or s.start_frame is None or s.stop_frame is None:
            continue
        tol = FRAME_TOLERANCE + TIMESTAMP_RESOLUTION * rate
        for frame, offset, t, fname, tname in ((s.start_frame, 1, s.start_time, "start_frame", "start_timestamp"),
                                               (s.stop_frame, 0, s.stop_time, "stop_frame", "stop_timestamp")):
            off = frame - offset - t * rate
            if abs(off) > tol:
                raise InputError(
                    f"{path}: row {s.row}, fields {fname!r} / {tname!r}: frame {frame} and {t:.2f}s disagree by "
                    f"{off:+.1f} frames at {s.video_id}'s frame numbering rate {rate:.3f} frames/s (from {origin}); "
                    f"frame {frame} would be at {frame_start(frame + 1 - offset, rate):.2f}s")


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a readable UTF-8 CSV ({exc})") from None
    if not header:
        raise InputError(f"{path}: empty file (no header row)")
    return header, rows


def _require(path: Path, header: list[str], needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (header has: {', '.join(header)})")


def _field(path: Path, i: int, row: dict[str, str], name: str, parse: Callable[[str], Any], what: str) -> Any:
    """Parse one cell; any failure becomes an InputError naming file, row and field."""
    raw = row.get(name)
    try:
        if raw is None or not raw.strip():
            raise ValueError("empty")
        return parse(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise InputError(f"{path}: row {i}, field {name!r}: cannot parse {raw!r} as {what} ({exc})") from None


def _text(row: dict[str, str], name: str) -> str:
    return (row.get(name) or "").strip()


def _literal_list(text: str, kind: type) -> tuple:
    # ast.literal_eval, not eval: the cells are Python list literals and must never execute code
    value = ast.literal_eval(text.strip())
    if isinstance(value, kind):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, kind) for v in value):
        raise ValueError(f"not a list of {kind.__name__}")
    return tuple(value)


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in _literal_list(text, int))


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(str(v) for v in _literal_list(text, str))


def load_segments(path: str | os.PathLike) -> tuple[list[Segment], str]:
    """Parse an annotation CSV; returns (segments, kind) with kind "ek100" or "generic" (from the header)."""
    path = Path(path)
    header, rows = _read_csv(path)
    if "narration_id" in header or "start_timestamp" in header:
        segments, kind = _ek100_segments(path, header, rows), "ek100"
    elif all(c in header for c in ("video", "start", "stop")):
        segments, kind = _generic_segments(path, header, rows), "generic"
    else:
        raise InputError(
            f"{path}: unrecognised annotation header; expected EK-100 columns ({', '.join(EK100_REQUIRED)}) "
            f"or a generic clip CSV ({', '.join(GENERIC_REQUIRED)})"
        )
    if not segments:
        raise InputError(f"{path}: no data rows")
    seen: dict[str, int] = {}
    id_field = "narration_id" if kind == "ek100" else "id"
    for s in segments:
        if s.narration_id in seen:
            # ids key the cache rows and question files, so a duplicate would silently merge two segments
            raise InputError(f"{path}: row {s.row}, field {id_field!r}: duplicate id {s.narration_id!r} "
                             f"(first in row {seen[s.narration_id]})")
        seen[s.narration_id] = s.row
    return segments, kind


def _ek100_segments(path: Path, header: list[str], rows: list[dict[str, str]]) -> list[Segment]:
    _require(path, header, EK100_REQUIRED)
    labelled = "verb_class" in header
    if labelled:
        _require(path, header, EK100_LABELS)
    has_all_nouns = "all_nouns" in header
    out = []
    for i, r in enumerate(rows, start=1):
        nid = _text(r, "narration_id")
        if not nid:
            raise InputError(f"{path}: row {i}, field 'narration_id': empty")
        for name in ("participant_id", "video_id"):
            if not _text(r, name):
                raise InputError(f"{path}: row {i}, field {name!r}: empty")
        start = _field(path, i, r, "start_timestamp", parse_timestamp, "HH:MM:SS.ff")
        stop = _field(path, i, r, "stop_timestamp", parse_timestamp, "HH:MM:SS.ff")
        if stop < start:
            raise InputError(f"{path}: row {i}, field 'stop_timestamp': stop {stop:.3f}s is before start "
                             f"{start:.3f}s")
        f0 = _field(path, i, r, "start_frame", int, "an integer frame number")
        f1 = _field(path, i, r, "stop_frame", int, "an integer frame number")
        if f0 < 1:
            raise InputError(f"{path}: row {i}, field 'start_frame': {f0} (frames are numbered from 1)")
        if f1 < f0:
            raise InputError(f"{path}: row {i}, field 'stop_frame': {f1} is before start_frame {f0}")
        all_words: tuple[str, ...] = ()
        if labelled:
            verb_class = _field(path, i, r, "verb_class", int, "an integer class id")
            noun_class = _field(path, i, r, "noun_class", int, "an integer class id")
            all_nouns = _field(path, i, r, "all_noun_classes", _int_list, "a list of class ids")
            if has_all_nouns:
                all_words = _field(path, i, r, "all_nouns", _str_list, "a list of nouns")
                if len(all_words) != len(all_nouns):
                    raise InputError(f"{path}: row {i}, field 'all_nouns': {len(all_words)} nouns but "
                                     f"{len(all_nouns)} all_noun_classes")
        else:
            verb_class, noun_class, all_nouns = -1, -1, ()
        out.append(Segment(
            narration_id=nid, participant_id=_text(r, "participant_id"), video_id=_text(r, "video_id"),
            start_time=start, stop_time=stop, start_frame=f0, stop_frame=f1,
            narration=_text(r, "narration"), verb=_text(r, "verb"), noun=_text(r, "noun"),
            verb_class=verb_class, noun_class=noun_class, all_noun_classes=all_nouns, row=i, all_nouns=all_words,
        ))
    return out


def _generic_segments(path: Path, header: list[str], rows: list[dict[str, str]]) -> list[Segment]:
    _require(path, header, GENERIC_REQUIRED)
    labels = sorted({_text(r, "label") for r in rows} - {""})
    nouns = sorted({_text(r, "noun") for r in rows} - {""}) if "noun" in header else []
    label_id = {k: j for j, k in enumerate(labels)}
    noun_id = {k: j for j, k in enumerate(nouns)}
    out = []
    for i, r in enumerate(rows, start=1):
        video = _text(r, "video")
        if not video:
            raise InputError(f"{path}: row {i}, field 'video': empty")
        start = _field(path, i, r, "start", parse_timestamp, "seconds or HH:MM:SS.ff")
        stop = _field(path, i, r, "stop", parse_timestamp, "seconds or HH:MM:SS.ff")
        if stop < start:
            raise InputError(f"{path}: row {i}, field 'stop': stop {stop:.3f}s is before start {start:.3f}s")
        label, noun = _text(r, "label"), _text(r, "noun")
        if labels and not label:
            # a half-labelled file is almost always a broken export; unlabelled files leave every label empty
            raise InputError(f"{path}: row {i}, field 'label': empty, but other rows are labelled")
        out.append(Segment(
            narration_id=_text(r, "id") or f"{Path(video).stem}_{i}",
            participant_id=_text(r, "participant"), video_id=video, start_time=start, stop_time=stop,
            start_frame=None, stop_frame=None, narration=_text(r, "narration"), verb=label, noun=noun,
            verb_class=label_id.get(label, -1), noun_class=noun_id.get(noun, -1),
            all_noun_classes=(noun_id[noun],) if noun else (), row=i,
        ))
    return out


def load_classes(path: str | os.PathLike) -> ClassVocab:
    """An EK-100 class CSV (id, key, instances, category); ids must be exactly 0..K-1."""
    path = Path(path)
    header, rows = _read_csv(path)
    _require(path, header, ("id", "key"))
    entries: dict[int, tuple[str, tuple[str, ...], str]] = {}
    for i, r in enumerate(rows, start=1):
        cid = _field(path, i, r, "id", int, "an integer class id")
        if cid in entries:
            raise InputError(f"{path}: row {i}, field 'id': duplicate class id {cid}")
        key = _text(r, "key")
        if not key:
            raise InputError(f"{path}: row {i}, field 'key': empty")
        inst: tuple[str, ...] = ()
        if _text(r, "instances"):
            inst = _field(path, i, r, "instances", _str_list, "a list of strings")
        entries[cid] = (key, inst or (key,), _text(r, "category"))
    if sorted(entries) != list(range(len(entries))):
        raise InputError(f"{path}: field 'id': class ids must be 0..{len(entries) - 1} without gaps")
    ordered = [entries[k] for k in range(len(entries))]
    return ClassVocab(tuple(e[0] for e in ordered), tuple(e[1] for e in ordered), tuple(e[2] for e in ordered))


def load_video_info(path: str | os.PathLike) -> dict[str, VideoInfo]:
    """EPIC_100_video_info.csv -> {video_id: VideoInfo(duration, fps, resolution)}."""
    path = Path(path)
    header, rows = _read_csv(path)
    _require(path, header, ("video_id", "duration", "fps"))
    out = {}
    for i, r in enumerate(rows, start=1):
        fps = _field(path, i, r, "fps", float, "a frame rate")
        if not math.isfinite(fps) or fps <= 0:
            raise InputError(f"{path}: row {i}, field 'fps': must be positive, got {fps}")
        duration = _field(path, i, r, "duration", float, "seconds")
        if not math.isfinite(duration) or duration < 0:
            raise InputError(f"{path}: row {i}, field 'duration': must be >= 0, got {duration}")
        out[_text(r, "video_id")] = VideoInfo(duration, fps, _text(r, "resolution"))
    return out


def load_id_list(path: str | os.PathLike) -> set[str]:
    """A one-column CSV of ids with a header (e.g. EPIC_100_unseen_participant_ids_validation.csv)."""
    path = Path(path)
    header, rows = _read_csv(path)
    col = header[0]
    return {_text(r, col) for r in rows} - {""}


def load_tail_classes(path: str | os.PathLike) -> set[int]:
    """EPIC_100_tail_verbs.csv / EPIC_100_tail_nouns.csv (one column of class ids) -> set of class ids."""
    path = Path(path)
    header, rows = _read_csv(path)
    col = header[0]
    return {_field(path, i, r, col, int, "an integer class id") for i, r in enumerate(rows, start=1)}


def find_ek100_file(directory: str | os.PathLike, pattern: str) -> Path | None:
    """The file `pattern` (a name or a glob such as ``EPIC_100_unseen_participant_ids_*validation*.csv``) in
    `directory`; None if nothing matches. Several glob matches -> the first in sorted order."""
    directory = Path(directory)
    exact = directory / pattern
    if exact.is_file():
        return exact
    matches = sorted(p for p in directory.glob(pattern) if p.is_file()) if directory.is_dir() else []
    return matches[0] if matches else None


def load_label_list(path: str | os.PathLike) -> ClassVocab:
    """The label set of a generic dataset: an EK-100-style class CSV (id,key,...) or a text file, one label per
    line (class id = line order). Duplicates and empty files are refused."""
    path = Path(path)
    try:
        first = path.read_text(encoding="utf-8").splitlines()[:1]
    except OSError as exc:
        raise InputError(f"{path}: cannot read the label list ({exc.strerror})") from None
    if first and [c.strip() for c in first[0].split(",")][:2] == ["id", "key"]:
        return load_classes(path)
    keys = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not keys:
        raise InputError(f"{path}: the label list is empty")
    seen: dict[str, int] = {}
    for i, k in enumerate(keys, start=1):
        if k in seen:
            raise InputError(f"{path}: line {i}: duplicate label {k!r} (first on line {seen[k]})")
        seen[k] = i
    return ClassVocab(tuple(keys), tuple((k,) for k in keys), ("",) * len(keys))


def _generic_set(path: Path, segments: list[Segment], info: dict, verb_classes, noun_classes) -> AnnotationSet:
    """Generic clip CSV: the label sets come from `verb_classes` / `noun_classes` when given (so that train, val and
    test files share one vocabulary), else from the file's own labels (sorted)."""
    def vocab(given, written: list[str]) -> ClassVocab:
        if given is None:
            keys = sorted(set(written) - {""})
            return ClassVocab(tuple(keys), tuple((k,) for k in keys), ("",) * len(keys))
        return load_label_list(given)

    verbs_v = vocab(verb_classes, [s.verb for s in segments])
    nouns_v = vocab(noun_classes, [s.noun for s in segments])
    vid = {k: j for j, k in enumerate(verbs_v.keys)}
    nid = {k: j for j, k in enumerate(nouns_v.keys)}
    out = []
    for s in segments:
        if s.verb and s.verb not in vid:
            raise InputError(f"{path}: row {s.row}, field 'label': {s.verb!r} is not in the label list {verb_classes}")
        if s.noun and s.noun not in nid:
            raise InputError(f"{path}: row {s.row}, field 'noun': {s.noun!r} is not in the label list {noun_classes}")
        n = nid.get(s.noun, -1)
        out.append(dataclasses.replace(s, verb_class=vid.get(s.verb, -1), noun_class=n,
                                       all_noun_classes=(n,) if n >= 0 else ()))
    return AnnotationSet(out, verbs_v, nouns_v, info, path, file_sha256(path), "generic",
                         has_labels=any(s.verb for s in out))


def load_annotations(csv_path: str | os.PathLike, verb_classes: str | os.PathLike | None = None,
                     noun_classes: str | os.PathLike | None = None,
                     video_info: str | os.PathLike | None = None) -> AnnotationSet:
    """Parse an annotation CSV with its vocabularies.

    EK-100: class CSVs and video_info are looked up beside the annotation file unless given; a labelled file
    without class CSVs is refused (ids would have no names). Class ids outside the vocabulary are refused, naming
    the row. Generic: vocabularies come from `verb_classes` / `noun_classes` label lists when given (a class CSV or
    one label per line; use the same list for every split), else from the file's labels; video_info is optional.
    """
    path = Path(csv_path)
    segments, kind = load_segments(path)
    here = path.parent
    info_path = Path(video_info) if video_info else find_ek100_file(here, VIDEO_INFO)
    info = load_video_info(info_path) if info_path else {}
    if kind == "generic":
        return _generic_set(path, segments, info, verb_classes, noun_classes)
    has_labels = any(s.verb_class >= 0 for s in segments)
    vpath = Path(verb_classes) if verb_classes else find_ek100_file(here, VERB_CLASSES)
    npath = Path(noun_classes) if noun_classes else find_ek100_file(here, NOUN_CLASSES)
    if has_labels and (vpath is None or npath is None):
        raise InputError(
            f"{path}: labelled EK-100 annotations need the class CSVs; put {VERB_CLASSES} and {NOUN_CLASSES} "
            "beside it or pass --verb-classes/--noun-classes"
        )
    verbs_v = load_classes(vpath) if vpath else ClassVocab()
    nouns_v = load_classes(npath) if npath else ClassVocab()
    for s in segments:
        if not -1 <= s.verb_class < len(verbs_v) or (has_labels and s.verb_class < 0):
            raise InputError(f"{path}: row {s.row}, field 'verb_class': {s.verb_class} is not a class of {vpath} "
                             f"(0..{len(verbs_v) - 1})")
        if not -1 <= s.noun_class < len(nouns_v) or (has_labels and s.noun_class < 0):
            raise InputError(f"{path}: row {s.row}, field 'noun_class': {s.noun_class} is not a class of {npath} "
                             f"(0..{len(nouns_v) - 1})")
        bad = [c for c in s.all_noun_classes if not 0 <= c < len(nouns_v)]
        if bad:
            raise InputError(f"{path}: row {s.row}, field 'all_noun_classes': {bad} not classes of {npath}")
    rates = infer_frame_rates(segments)
    check_frame_times(path, segments, rates)
    return AnnotationSet(segments, verbs_v, nouns_v, info, path, file_sha256(path), kind, has_labels, rates)
