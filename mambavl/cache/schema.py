"""The feature-cache contract: dataset names, root attributes, version, validation.

Stage 1 (extraction, import) writes this layout and stage 2 (training, evaluation) reads it; the two stages meet
nowhere else. A cache describes itself: the root attributes carry the encoder, its weights, the sampling and the
hash of the annotation file, so a reader can refuse a cache that does not match the one a model was trained on.

Layout (N segments, F tokens per segment, D feature dim, Dt text dim, T question tokens)::

    features          (N, F, D)  float16   chunk = one segment      recognition window
    num_frames        (N,)       int16     valid tokens per row (< F only in fps sampling; padding is zeros)
    frame_times       (N, F)     float32   absolute seconds in the video
    valid             (N,)       bool      done-flag, written after the row's data
    view_features     (N, V-1, F, D) float16  chunk = one segment  views 1..V-1 of a multi-view cache (optional)
    view_frame_times  (N, V-1, F)    float32                      their frame times (view 0 is features/frame_times)
    narration_id, video_id, participant_id, narration     (N,) utf-8
    verb_class, noun_class (N,) int32 (-1 = unlabelled);  all_noun_classes (N,) vlen int32
    start_time, stop_time  (N,) float64
    anticipation/     features, num_frames, frame_times, valid   observed window before the action (optional)
    failures/         index int64, narration_id, window, reason  (resizable)
    classes/          verb (V,), noun (Nn,) utf-8
    questions/        texts (Q,), tokens (Q, T, Dt) f16, mask (Q, T) bool, pooled (Q, Dt) f16,
                      templates/<kind> (P,) int32, per_segment/<source> (N, 2) int32,
                      label_keyed/<source> (N,) bool (question derived from the row's labels; absent = none)
    answers/          verb (Vv, Dt), noun (Nn, Dt), action_pairs (A, 2) int32, action (A, Dt), action_text (A,)

Views (multi-view testing, `mambavl extract --temporal-views T --spatial-crops S`, `mambavl.extract.views`): the
recognition window may hold V = T x S views of each segment. View 0 (the centre crop of the first temporal clip)
lives where a single-view cache keeps its only view (`features`, `frame_times`), views 1..V-1 in `view_features` /
`view_frame_times`; all views share `num_frames` and `valid` (a row is written whole). The root attributes
`temporal_views`, `spatial_crops` and `view_definition` say what the views are. A cache without them (every cache
written before views existed) is a 1 x 1 cache, and a reader that knows nothing of views reads view 0: that is why
the schema version stayed 1. The anticipation window always has one view.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mambavl.errors import InputError, open_files_limit, os_error_message

SCHEMA_VERSION = 1

# Features are stored as float16: finite values up to this magnitude survive the cast.
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504

# Window names: the recognition window is the segment itself; the anticipation window is the observed
# interval [start - tau_a - tau_o, start - tau_a] that ends tau_a seconds before the action starts.
RECOGNITION = "recognition"
ANTICIPATION = "anticipation"
WINDOWS = (RECOGNITION, ANTICIPATION)

# Per-window datasets live at the root (recognition) or inside the `anticipation/` group.
WINDOW_DATASETS = ("features", "num_frames", "frame_times", "valid")
# Views 1..V-1 of the recognition window of a multi-view cache (see the module docstring).
VIEW_FEATURES = "view_features"
VIEW_FRAME_TIMES = "view_frame_times"
ROW_STRING_DATASETS = ("narration_id", "video_id", "participant_id", "narration")
ROW_INT_DATASETS = ("verb_class", "noun_class")
ROW_FLOAT_DATASETS = ("start_time", "stop_time")
ALL_NOUNS = "all_noun_classes"

FAILURES = "failures"
CLASSES = "classes"
QUESTIONS = "questions"
ANSWERS = "answers"

TEMPLATE_KINDS = ("verb", "noun", "scene", "next_verb", "next_noun", "action")  # "action": caches from 0.x lack it

REQUIRED_ATTRS = (
    "schema_version",
    "package_version",
    "created",
    "dataset_kind",
    "annotation_file",
    "annotation_sha256",
    "encoder",
    "model",
    "pretrained",
    "checkpoint_sha256",
    "feature_dim",
    "text_model",
    "text_pretrained",
    "text_dim",
    "sampling_mode",
    "frames_per_segment",
    "fps",
    "frame_size",
    "tokens_per_frame_pooling",
    "has_labels",
    "anticipation",
    "question_sources",
    "source",
)

# What must agree between the cache a model was trained on and a cache it is evaluated on: the same frozen
# encoder (and weights) and the same text tower, otherwise features and question tokens live in other spaces.
COMPATIBILITY_ATTRS = (
    "schema_version",
    "encoder",
    "model",
    "pretrained",
    "checkpoint_sha256",
    "feature_dim",
    "text_encoder",
    "text_model",
    "text_pretrained",
    "text_checkpoint_sha256",
    "text_dim",
)


def view_counts(attrs: Mapping[str, Any]) -> tuple[int, int]:
    """(temporal_views, spatial_crops) a cache's attributes record; (1, 1) for a cache written before views."""
    return (int(normalise_attr(attrs.get("temporal_views", 1)) or 1),
            int(normalise_attr(attrs.get("spatial_crops", 1)) or 1))


def is_ek100(attrs: Mapping[str, Any]) -> bool:
    """Whether a cache (its attrs) holds EPIC-KITCHENS-100 annotations (`dataset_kind` "ek100", the default of caches
    written before the attribute) rather than a generic clip CSV: EK-100-only outputs (unseen-participant and tail
    subsets, head/mid/tail frequency buckets, the EK-100 subset-file notes) are made for EK-100 data only."""
    return str(normalise_attr(attrs.get("dataset_kind", "ek100")) or "ek100") == "ek100"


def head_names(dataset_kind: str) -> dict[str, str]:
    """What the verb and noun heads are called in the dataset's own terms: EK-100 "verb" / "noun"; a generic clip CSV
    "label" (its `label` column) / "noun" (its optional `noun` column). Internal keys stay "verb" / "noun"."""
    if str(dataset_kind) == "generic":
        return {"verb": "label", "noun": "noun", "action": "action"}
    return {"verb": "verb", "noun": "noun", "action": "action"}


def window_prefix(window: str) -> str:
    """HDF5 path prefix of a window's datasets: '' for recognition, 'anticipation/' for anticipation."""
    if window == RECOGNITION:
        return ""
    if window == ANTICIPATION:
        return ANTICIPATION + "/"
    raise InputError(f"unknown window {window!r}; expected one of {', '.join(WINDOWS)}")


def normalise_attr(value: Any) -> Any:
    """HDF5 hands back numpy scalars and bytes; compare and serialise plain Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def read_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Plain-Python copy of an h5py attribute mapping (question_sources decoded from JSON)."""
    out = {key: normalise_attr(value) for key, value in attrs.items()}
    if isinstance(out.get("question_sources"), str):
        out["question_sources"] = json.loads(out["question_sources"])
    return out


def validate_attrs(attrs: Mapping[str, Any], path: str) -> None:
    """Refuse a file that is not a mambavl cache of this schema version, naming the file and attribute."""
    missing = [key for key in REQUIRED_ATTRS if key not in attrs]
    if missing:
        raise InputError(f"{path}: not a mambavl cache (missing root attribute(s): {', '.join(missing)})")
    version = normalise_attr(attrs["schema_version"])
    if version != SCHEMA_VERSION:
        raise InputError(
            f"{path}: attribute schema_version is {version}, this mambavl reads schema_version {SCHEMA_VERSION}"
        )


def check_compatible(a: Mapping[str, Any], b: Mapping[str, Any], what_a: str, what_b: str) -> None:
    """Raise InputError naming the first attribute of COMPATIBILITY_ATTRS on which `a` and `b` differ."""
    for key in COMPATIBILITY_ATTRS:
        va, vb = normalise_attr(a.get(key)), normalise_attr(b.get(key))
        if va != vb:
            if (va is None) != (vb is None):
                older, newer = (what_a, what_b) if va is None else (what_b, what_a)
                raise InputError(
                    f"{older} was written by an older mambavl (it has no {key!r} attribute, which {newer} records): "
                    "re-extract it with this version so that both describe their features alike"
                )
            raise InputError(
                f"{what_b} does not match {what_a}: attribute {key!r} is {vb!r} there but {va!r} in {what_a}"
            )


def nonfinite_report(features: np.ndarray) -> str:
    """"" when every value of `features` survives the float16 cast finite; else what does not, e.g.
    "1 NaN, 12 values beyond float16's range (|x| up to 3.1e+05)"."""
    a = np.asarray(features, dtype=np.float64)
    nan = int(np.isnan(a).sum())
    big = np.abs(np.where(np.isnan(a), 0.0, a))
    over = int((big > FLOAT16_MAX).sum())
    parts = ([f"{nan} NaN"] if nan else []) + \
        ([f"{over} values beyond float16's range (|x| up to {big.max():.3g}, max {FLOAT16_MAX:g})"] if over else [])
    return ", ".join(parts)


# HDF5 messages of a file whose bytes are not a (whole) HDF5 file: cut short, zero-filled, overwritten.
_DAMAGE_MARKERS = ("truncated file", "signature", "file signature not found", "bad object header", "bad heap",
                   "bad symbol table", "bad local heap", "bad global heap", "unable to load", "checksum",
                   "incorrect metadata", "addr overflow", "address overflow", "wrong b-tree", "bad b-tree",
                   "unable to deserialize", "can't decode", "unable to get group info", "unable to read")


def is_damage(exc: BaseException) -> bool:
    """Whether an HDF5 error says the file's bytes are damaged (truncated, zero-filled, overwritten)."""
    text = str(exc).lower()
    return any(marker in text for marker in _DAMAGE_MARKERS)


def damaged_message(path: str | os.PathLike, exc: BaseException, what: str = "cache") -> str:
    """A damaged file, named, with what to do about it."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (f"{what} {path} is damaged: HDF5 cannot read its structure ({detail}); it was probably cut short or "
            "zero-filled by an interrupted copy or download or a full disk. Copy it again from its source, or "
            "re-extract it (move the damaged file away first)")


@contextmanager
def reading(path: str | os.PathLike, what: str = "cache"):
    """Turn an HDF5 error raised while reading `path` into an InputError naming the file: a damaged file as
    damaged (`damaged_message`), an environment error (`os_error_message`) as what it is."""
    try:
        yield
    except InputError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        if isinstance(exc, OSError):
            message = os_error_message(exc, path, what)
            if message:
                raise InputError(message) from exc
        if isinstance(exc, (OSError, RuntimeError)) or is_damage(exc):
            raise InputError(damaged_message(path, exc, what)) from exc
        raise


def check_contained(f: h5py.File, path: str | os.PathLike, what: str = "cache") -> None:
    """Refuse a file whose data would be read from outside it, and detect a damaged structure.

    Every link is visited (H5Lvisit over the hard-linked groups): an external link or any other link type but
    hard and soft is refused; every dataset's creation properties are read: external raw storage
    (H5Pset_external) and virtual datasets with a source in another file are refused, naming the dataset and the
    target. A chunked dataset's chunk index is walked too, so that a file whose tail is zero-filled or overwritten
    is reported as damaged here (InputError naming the file), not halfway through training.
    Cost: one pass over the file's metadata (about a millisecond per thousand chunks), no raw data read.
    """
    refused: list[str] = []
    errors: list[BaseException] = []

    def visit(name: bytes, info) -> int | None:
        try:
            return look(name, info)
        except Exception as exc:  # an exception must not cross HDF5's C callback: keep it, stop the walk
            errors.append(exc)
            return 1

    def look(name: bytes, info) -> None:
        text = name.decode("utf-8", "replace")
        if info.type == h5py.h5l.TYPE_EXTERNAL:
            target, obj = f.id.links.get_val(name)
            refused.append(f"{text!r} is an external link to {obj.decode('utf-8', 'replace')!r} in "
                           f"{target.decode('utf-8', 'replace')!r}")
            return None
        if info.type == h5py.h5l.TYPE_SOFT:
            return None
        if info.type != h5py.h5l.TYPE_HARD:
            refused.append(f"{text!r} is a user-defined link (type {int(info.type)}), which may point elsewhere")
            return None
        obj = h5py.h5o.open(f.id, name)
        if isinstance(obj, h5py.h5d.DatasetID):
            dcpl = obj.get_create_plist()
            for i in range(dcpl.get_external_count()):
                target = dcpl.get_external(i)[0]
                target = target.decode("utf-8", "replace") if isinstance(target, bytes) else str(target)
                refused.append(f"dataset {text!r} keeps its data in the external file {target!r}")
            if dcpl.get_layout() == h5py.h5d.VIRTUAL:
                for i in range(dcpl.get_virtual_count()):
                    source = dcpl.get_virtual_filename(i)
                    if source != ".":
                        refused.append(f"virtual dataset {text!r} reads {dcpl.get_virtual_dsetname(i)!r} from the "
                                       f"file {source!r}")
            elif dcpl.get_layout() == h5py.h5d.CHUNKED:
                obj.get_num_chunks()  # walks the chunk index: a damaged one raises here
        return None

    with reading(path, what):
        f.id.links.visit(visit, info=True)
        if errors:
            raise errors[0]
    if refused:
        raise InputError(
            f"{what} {path} refers to data outside the file ({'; '.join(refused[:5])}"
            f"{f'; and {len(refused) - 5} more' if len(refused) > 5 else ''}); mambavl reads only what a cache "
            "file holds itself. Refused: rebuild the cache from its source (extract or import)"
        )


def open_h5(path: str | os.PathLike, mode: str, what: str = "cache", need_files: int | None = None) -> h5py.File:
    """h5py.File(path, mode), with an InputError that tells apart a file another process holds (HDF5's file lock,
    errno 11: a running extraction, an open notebook), a place that cannot be written or opened (read-only file
    system, permissions, the open-files limit; `need_files` = descriptors the command needs, for that message) and
    a file that is not a usable HDF5 file (damaged).

    An existing file (modes "r" and "r+") is checked with `check_contained`: a file that points outside itself is
    refused and a damaged structure is reported as such."""
    try:
        f = h5py.File(path, mode)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or "unable to lock file" in str(exc):
            raise InputError(
                f"{what} {path} is in use by another process (it holds the HDF5 file lock: a running extraction, "
                f"training or an open notebook); wait for it to finish or close the file there, then run this again"
            ) from None
        if isinstance(exc, FileExistsError):
            raise
        message = os_error_message(exc, path, what, need_files)
        if message:
            raise InputError(message) from exc
        if is_damage(exc):
            raise InputError(damaged_message(path, exc, what)) from exc
        access = "writable" if mode != "r" else "readable"
        raise InputError(f"{what} {path} is not a {access} HDF5 file ({exc}); if it is damaged or not a cache, "
                         "move it away and run again") from exc
    if mode in ("r", "r+", "a") and f.mode in ("r", "r+"):
        try:
            check_contained(f, path, what)
        except BaseException:
            f.close()
            raise
    return f
