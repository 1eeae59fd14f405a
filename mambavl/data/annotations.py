"""Annotation files: EPIC-KITCHENS-100 CSVs and a generic clip CSV, parsed into one `AnnotationSet`.

EK-100 layout (epic-kitchens-100-annotations): ``narration_id, participant_id, video_id, narration_timestamp,
start_timestamp, stop_timestamp, start_frame, stop_frame[, narration, verb, verb_class, noun, noun_class, all_nouns,
all_noun_classes]`` — the test split (``EPIC_100_test_timestamps.csv``) has no label columns. Timestamps are
``HH:MM:SS.ff``; ``all_nouns`` / ``all_noun_classes`` are Python list literals. Class CSVs: ``id, key, instances,
category``; ``EPIC_100_video_info.csv``: ``video_id, duration, fps, resolution``.

Generic clip CSV: ``video, start, stop, label`` (+ optional ``id``, ``noun``, ``participant``): any label set, so
Something-Something- or Kinetics-style datasets go through the same pipeline. Labels become the verb vocabulary
(sorted unique); nouns are empty unless a ``noun`` column exists.

Every error names the file, the 1-based data row (header not counted) and the field.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mambavl.errors import InputError

EK100_REQUIRED = ("narration_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp",
                  "start_frame", "stop_frame")
EK100_LABELS = ("narration", "verb", "verb_class", "noun", "noun_class", "all_noun_classes")
GENERIC_REQUIRED = ("video", "start", "stop", "label")

VERB_CLASSES = "EPIC_100_verb_classes.csv"
NOUN_CLASSES = "EPIC_100_noun_classes.csv"
VIDEO_INFO = "EPIC_100_video_info.csv"

_TS = re.compile(r"^(\d+):([0-5]?\d):([0-5]?\d(?:\.\d+)?)$")


@dataclass(frozen=True)
class Segment:
    """One annotated segment (see module docstring for where each field comes from)."""

    narration_id: str
    participant_id: str
    video_id: str
    start_time: float
    stop_time: float
    start_frame: int | None
    stop_frame: int | None
    narration: str
    verb: str
    noun: str
    verb_class: int
    noun_class: int
    all_noun_classes: tuple[int, ...]
    row: int


@dataclass(frozen=True)
class ClassVocab:
    """Class vocabulary: index = class id."""

    keys: tuple[str, ...] = ()
    instances: tuple[tuple[str, ...], ...] = ()
    categories: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class VideoInfo:
    duration: float
    fps: float
    resolution: str


@dataclass
class AnnotationSet:
    segments: list[Segment]
    verbs: ClassVocab
    nouns: ClassVocab
    video_info: dict[str, VideoInfo] = field(default_factory=dict)
    path: Path = Path()
    sha256: str = ""
    kind: str = "ek100"
    has_labels: bool = True


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_timestamp(text: str) -> float:
    """``HH:MM:SS.ff`` (or ``MM:SS``, or plain seconds) -> seconds. Raises ValueError on anything else."""
    text = text.strip()
    m = _TS.match(text)
    if m:
        return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    parts = text.split(":")
    if len(parts) == 2 and all(p.replace(".", "", 1).isdigit() for p in parts):
        return int(parts[0]) * 60 + float(parts[1])
    value = float(text)  # plain seconds; raises ValueError otherwise
    if value != value or value < 0:
        raise ValueError(f"invalid time {text!r}")
    return value


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = list(reader)
    if not header:
        raise InputError(f"{path}: empty file (no header row)")
    return header, rows


def _require(path: Path, header: list[str], needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (header has: {', '.join(header)})")


def _field(path: Path, i: int, row: dict[str, str], name: str, parse, what: str):
    raw = row.get(name)
    try:
        if raw is None:
            raise ValueError("empty")
        return parse(raw)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise InputError(f"{path}: row {i}, field {name!r}: cannot parse {raw!r} as {what} ({exc})") from None


def _int_list(text: str) -> tuple[int, ...]:
    value = ast.literal_eval(text.strip())
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
        raise ValueError("not a list of integers")
    return tuple(int(v) for v in value)


def load_segments(path: str | os.PathLike) -> tuple[list[Segment], str]:
    """Parse an annotation CSV; returns (segments, kind) with kind "ek100" or "generic" (from the header)."""
    path = Path(path)
    header, rows = _read_csv(path)
    if "narration_id" in header or "start_timestamp" in header:
        return _ek100_segments(path, header, rows), "ek100"
    if all(c in header for c in ("video", "start", "stop")):
        return _generic_segments(path, header, rows), "generic"
    raise InputError(
        f"{path}: unrecognised annotation header; expected EK-100 columns ({', '.join(EK100_REQUIRED)}) "
        f"or a generic clip CSV ({', '.join(GENERIC_REQUIRED)})"
    )


def _check_times(path: Path, i: int, start: float, stop: float) -> None:
    if stop < start:
        raise InputError(f"{path}: row {i}, field 'stop_timestamp': stop {stop:.3f}s is before start {start:.3f}s")


def _ek100_segments(path: Path, header: list[str], rows: list[dict[str, str]]) -> list[Segment]:
    _require(path, header, EK100_REQUIRED)
    labelled = "verb_class" in header
    if labelled:
        _require(path, header, EK100_LABELS)
    out = []
    for i, r in enumerate(rows, start=1):
        start = _field(path, i, r, "start_timestamp", parse_timestamp, "HH:MM:SS.ff")
        stop = _field(path, i, r, "stop_timestamp", parse_timestamp, "HH:MM:SS.ff")
        _check_times(path, i, start, stop)
        f0 = _field(path, i, r, "start_frame", int, "an integer frame number")
        f1 = _field(path, i, r, "stop_frame", int, "an integer frame number")
        if f1 < f0:
            raise InputError(f"{path}: row {i}, field 'stop_frame': {f1} is before start_frame {f0}")
        nid = (r.get("narration_id") or "").strip()
        if not nid:
            raise InputError(f"{path}: row {i}, field 'narration_id': empty")
        if labelled:
            verb_class = _field(path, i, r, "verb_class", int, "an integer class id")
            noun_class = _field(path, i, r, "noun_class", int, "an integer class id")
            all_nouns = _field(path, i, r, "all_noun_classes", _int_list, "a list of class ids")
        else:
            verb_class, noun_class, all_nouns = -1, -1, ()
        out.append(Segment(
            narration_id=nid, participant_id=r["participant_id"].strip(), video_id=r["video_id"].strip(),
            start_time=start, stop_time=stop, start_frame=f0, stop_frame=f1,
            narration=(r.get("narration") or "").strip(), verb=(r.get("verb") or "").strip(),
            noun=(r.get("noun") or "").strip(), verb_class=verb_class, noun_class=noun_class,
            all_noun_classes=all_nouns, row=i,
        ))
    return out


def _generic_segments(path: Path, header: list[str], rows: list[dict[str, str]]) -> list[Segment]:
    _require(path, header, GENERIC_REQUIRED)
    labels = sorted({(r.get("label") or "").strip() for r in rows} - {""})
    nouns = sorted({(r.get("noun") or "").strip() for r in rows} - {""}) if "noun" in header else []
    lid = {k: j for j, k in enumerate(labels)}
    nid_of = {k: j for j, k in enumerate(nouns)}
    out = []
    for i, r in enumerate(rows, start=1):
        video = (r.get("video") or "").strip()
        if not video:
            raise InputError(f"{path}: row {i}, field 'video': empty")
        start = _field(path, i, r, "start", parse_timestamp, "seconds or HH:MM:SS.ff")
        stop = _field(path, i, r, "stop", parse_timestamp, "seconds or HH:MM:SS.ff")
        if stop < start:
            raise InputError(f"{path}: row {i}, field 'stop': stop {stop:.3f}s is before start {start:.3f}s")
        label = (r.get("label") or "").strip()
        noun = (r.get("noun") or "").strip()
        out.append(Segment(
            narration_id=(r.get("id") or "").strip() or f"{Path(video).stem}_{i}",
            participant_id=(r.get("participant") or "").strip(), video_id=video, start_time=start, stop_time=stop,
            start_frame=None, stop_frame=None, narration=" ".join(x for x in (label, noun) if x), verb=label,
            noun=noun, verb_class=lid.get(label, -1), noun_class=nid_of.get(noun, -1),
            all_noun_classes=(nid_of[noun],) if noun else (), row=i,
        ))
    return out


def load_classes(path: str | os.PathLike) -> ClassVocab:
    """An EK-100 class CSV (id, key, instances, category); ids must be 0..K-1."""
    path = Path(path)
    header, rows = _read_csv(path)
    _require(path, header, ("id", "key"))
    entries = {}
    for i, r in enumerate(rows, start=1):
        cid = _field(path, i, r, "id", int, "an integer class id")
        inst = ()
        if r.get("instances"):
            value = _field(path, i, r, "instances", ast.literal_eval, "a list of strings")
            inst = tuple(str(v) for v in value)
        entries[cid] = (r["key"].strip(), inst or (r["key"].strip(),), (r.get("category") or "").strip())
    if sorted(entries) != list(range(len(entries))):
        raise InputError(f"{path}: class ids must be 0..{len(entries) - 1} without gaps")
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
        if fps <= 0:
            raise InputError(f"{path}: row {i}, field 'fps': must be positive, got {fps}")
        out[r["video_id"].strip()] = VideoInfo(_field(path, i, r, "duration", float, "seconds"), fps,
                                              (r.get("resolution") or "").strip())
    return out


def load_id_list(path: str | os.PathLike) -> set[str]:
    """A one-column CSV of ids (e.g. EPIC_100_unseen_participant_ids_validation.csv)."""
    path = Path(path)
    header, rows = _read_csv(path)
    col = header[0]
    return {r[col].strip() for r in rows if r.get(col, "").strip()}


def load_tail_classes(path: str | os.PathLike) -> set[int]:
    """EPIC_100_tail_verbs.csv / EPIC_100_tail_nouns.csv -> set of class ids."""
    path = Path(path)
    header, rows = _read_csv(path)
    col = header[0]
    return {_field(path, i, r, col, int, "an integer class id") for i, r in enumerate(rows, start=1)}


def find_ek100_file(directory: str | os.PathLike, name: str) -> Path | None:
    """`directory/name` if it exists, else None."""
    p = Path(directory) / name
    return p if p.is_file() else None


def load_annotations(csv_path: str | os.PathLike, verb_classes: str | os.PathLike | None = None,
                     noun_classes: str | os.PathLike | None = None,
                     video_info: str | os.PathLike | None = None) -> AnnotationSet:
    """Parse an annotation CSV with its vocabularies.

    EK-100: class CSVs and video_info are looked up beside the annotation file unless given; a labelled file
    without class CSVs is refused (ids would have no names). Class ids outside the vocabulary are refused, naming
    the row. Generic: vocabularies come from the labels themselves.
    """
    path = Path(csv_path)
    segments, kind = load_segments(path)
    here = path.parent
    info_path = Path(video_info) if video_info else find_ek100_file(here, VIDEO_INFO)
    info = load_video_info(info_path) if info_path else {}
    if kind == "generic":
        labels = sorted({s.verb for s in segments if s.verb})
        nouns = sorted({s.noun for s in segments if s.noun})
        verbs_v = ClassVocab(tuple(labels), tuple((k,) for k in labels), ("",) * len(labels))
        nouns_v = ClassVocab(tuple(nouns), tuple((k,) for k in nouns), ("",) * len(nouns))
        return AnnotationSet(segments, verbs_v, nouns_v, info, path, file_sha256(path), kind,
                             has_labels=bool(labels))
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
        if s.verb_class >= len(verbs_v) or s.verb_class < -1:
            raise InputError(f"{path}: row {s.row}, field 'verb_class': {s.verb_class} is not a class of {vpath}")
        if s.noun_class >= len(nouns_v) or s.noun_class < -1:
            raise InputError(f"{path}: row {s.row}, field 'noun_class': {s.noun_class} is not a class of {npath}")
        bad = [c for c in s.all_noun_classes if not 0 <= c < len(nouns_v)]
        if bad:
            raise InputError(f"{path}: row {s.row}, field 'all_noun_classes': {bad} not classes of {npath}")
    return AnnotationSet(segments, verbs_v, nouns_v, info, path, file_sha256(path), kind, has_labels)
