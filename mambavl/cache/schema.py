"""The feature-cache contract: dataset names, root attributes, version, validation.

Stage 1 (extraction, import) writes this layout and stage 2 (training, evaluation) reads it; the two stages meet
nowhere else. A cache describes itself: the root attributes carry the encoder, its weights, the sampling and the
hash of the annotation file, so a reader can refuse a cache that does not match the one a model was trained on.

Layout (N segments, F tokens per segment, D feature dim, Dt text dim, T question tokens)::

    features          (N, F, D)  float16   chunk = one segment      recognition window
    num_frames        (N,)       int16     valid tokens per row (< F only in fps sampling; padding is zeros)
    frame_times       (N, F)     float32   absolute seconds in the video
    valid             (N,)       bool      done-flag, written after the row's data
    narration_id, video_id, participant_id, narration     (N,) utf-8
    verb_class, noun_class (N,) int32 (-1 = unlabelled);  all_noun_classes (N,) vlen int32
    start_time, stop_time  (N,) float64
    anticipation/     features, num_frames, frame_times, valid   observed window before the action (optional)
    failures/         index int64, narration_id, window, reason  (resizable)
    classes/          verb (V,), noun (Nn,) utf-8
    questions/        texts (Q,), tokens (Q, T, Dt) f16, mask (Q, T) bool, pooled (Q, Dt) f16,
                      templates/<kind> (P,) int32, per_segment/<source> (N, 2) int32,
                      label_keyed/<source> (N,) bool (question derived from the row's labels; absent = none)
    answers/          verb (V, Dt), noun (Nn, Dt), action_pairs (A, 2) int32, action (A, Dt), action_text (A,)
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

from mambavl.errors import InputError

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


def open_h5(path: str | os.PathLike, mode: str, what: str = "cache") -> h5py.File:
    """h5py.File(path, mode), with an InputError that tells apart a file another process holds (HDF5's file lock,
    errno 11: a running extraction, an open notebook) from one that is not a usable HDF5 file."""
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or "unable to lock file" in str(exc):
            raise InputError(
                f"{what} {path} is in use by another process (it holds the HDF5 file lock: a running extraction, "
                f"training or an open notebook); wait for it to finish or close the file there, then run this again"
            ) from None
        if isinstance(exc, FileExistsError):
            raise
        access = "writable" if mode != "r" else "readable"
        raise InputError(f"{what} {path} is not a {access} HDF5 file ({exc}); if it is damaged, move it away and "
                         "run again") from exc
