"""Import dense per-video features (one array per video, one feature per time step) by cutting each segment's window.

Most EK-100 users start from features the field's tools wrote per video, not from the videos. Each format says where
a feature sits in time; the importer turns that into one time per feature (its *centre*) and one interval per feature
(what it covers), then cuts every annotation window by time:

* ``fixed-rate`` (TeSTra / video-mamba-suite, ActionFormer): ``<video_id>.npy|.npz`` (L, D); feature i covers
  [i*stride/fps, (i*stride + window)/fps) and sits at its centre, (i*stride + window/2)/fps;
* ``tim`` (Time Interval Machine): ``<video_id>.npy`` (L, D) or (L, A, D) and a feature-times table; feature i covers
  [start_sec_i, stop_sec_i] and sits at its centre;
* ``video-features`` (v-iashin/video_features): ``<video_id>_<type>.npy|.pkl`` with ``<video_id>_timestamps_ms.*``
  (the tool's own file names), or one ``<video_id>.npz|.pkl|.h5`` dict holding the array and ``timestamps_ms``;
  feature i sits at timestamps_ms_i / 1000 and covers half a hop either side.

The conventions and where they come from:

* fixed-rate: ``--feature-fps`` (frames/s the stride and window count), ``--stride`` (frames between features,
  default 1) and ``--window`` (frames a feature sees, default the stride). ActionFormer's EPIC-KITCHENS loader
  (libs/datasets/epic_kitchens.py) maps a time t to the feature grid as (t*fps - 0.5*num_frames) / feat_stride, i.e.
  feature i is centred at (i*feat_stride + num_frames/2)/fps (its SlowFast features, ``<video_id>.npz`` key
  ``feats``: fps 30, feat_stride 16, num_frames 32, configs/epic_slowfast_verb.yaml). TeSTra's EK-100
  features (converted from RULSTM's, per its README) run at 4 per second (its data/data_info.json, "fps": 4), and
  its loaders map a time t to step int(t * 4) (start_f / 30 * FPS): step i covers [i/4, (i+1)/4), i.e.
  --feature-fps 4 with stride 1 and window 1, time (i + 0.5)/4.
* tim: TIM's loader sorts a video's rows of the feature-times table by start_sec and pairs them with the rows of
  ``<video_id>.npy`` in that order; so does this importer. A (L, A, D) array holds A augmented views per interval
  (TIM's test features have A = 1): view 0 is taken. TIM ships the times as a pandas DataFrame pickle, which cannot
  be read without running pandas' code; give them as a CSV (video_id, start_sec, stop_sec; other columns ignored),
  as ``{video_id: (L, 2) array}`` in a .pkl/.npz, or convert the DataFrame once (docs/extract.md).
* video-features: ``timestamps_ms`` is what the tool stores: for frame-wise extractors (CLIP, ResNet...) the frame's
  time; for stack extractors (I3D, R(2+1)D, S3D) the time at which the stack's last frame begins (the tool's own
  comment), so those features sit up to one stack late; the importer takes the stored times as they are.

Cutting a window [a, b] (recognition: the segment; anticipation: `anticipation_window`, ending tau_a before the
start): the features whose times fall in [a, b], read at `frames` uniform sample times (`sample_times`, the centres
of `frames` equal bins, as extraction samples frames), each sample taking the nearest of them (so rows repeat when
the window holds fewer features than `frames`). The rows and their times are stored as `features` / `frame_times`.
A window holding no feature time (shorter than one hop) gets the feature whose interval covers its midpoint. A
window that starts before the first feature's interval, whose midpoint lies past the last interval, or that ends
more than one hop past it (a dense extractor drops at most the frames of one incomplete stride at the end of a
video), and a video with no feature file, are recorded failures (`cache inspect`, exit 3), never clamped.
"""

from __future__ import annotations

import csv
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import h5py
import numpy as np
import torch

from mambavl.cache import schema
from mambavl.cache.importer import ImportConfig, ImportSummary, _ArrayUnpickler, _is_lmdb, import_features
from mambavl.cache.writer import CacheWriter
from mambavl.errors import InputError
from mambavl.extract.decode import DecodeError, SamplingConfig, anticipation_window, sample_times
from mambavl.progress import Progress

DENSE_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".pkl", ".pickle", ".h5", ".hdf5")
STAMPS, FPS_KEY = "timestamps_ms", "fps"
EPS = 1e-6  # seconds: float slack when comparing times


class ImportFormat(str, Enum):
    PER_SEGMENT = "per-segment"        # one file per segment (<narration_id>.npy ...)
    LMDB = "lmdb"                      # RULSTM LMDB
    TIM = "tim"                        # per-video array + feature-times table of intervals
    FIXED_RATE = "fixed-rate"          # per-video array at --feature-fps / --stride / --window
    VIDEO_FEATURES = "video-features"  # per-video array + stored timestamps_ms


DENSE_FORMATS = (ImportFormat.TIM, ImportFormat.FIXED_RATE, ImportFormat.VIDEO_FEATURES)


@dataclass
class DenseConfig:
    """How per-video features are laid out in time (see the module docstring)."""

    format: ImportFormat | None = None  # None: detected from the folder (refused when ambiguous)
    times: str | None = None            # TIM: feature-times file (.csv / .pkl / .npz)
    feature_fps: float | None = None    # fixed-rate: frames/s that stride and window count
    stride: float = 1.0                 # fixed-rate: frames between consecutive features
    window: float | None = None         # fixed-rate: frames one feature sees (default: the stride)
    anticipation: bool = False          # also cut the observed window before each action
    tau_a: float = 1.0
    tau_o: float = 2.0

    def __post_init__(self) -> None:
        if self.format is not None:
            try:
                self.format = ImportFormat(self.format)
            except ValueError:
                raise InputError(f"--format {self.format!r}: expected one of "
                                 f"{', '.join(f.value for f in ImportFormat)}") from None


@dataclass
class Timeline:
    """Where one video's L features sit: centres, starts, stops (L,) in seconds."""

    centres: np.ndarray
    starts: np.ndarray
    stops: np.ndarray

    @property
    def hop(self) -> float:
        """Seconds between consecutive features (median), or the one interval's length."""
        if len(self.centres) > 1:
            return float(np.median(np.diff(self.centres)))
        return float(self.stops[0] - self.starts[0])


def fixed_rate_timeline(n: int, fps: float, stride: float, window: float) -> Timeline:
    """Feature i covers [i*stride/fps, (i*stride + window)/fps); its time is the centre."""
    starts = np.arange(n, dtype=np.float64) * stride / fps
    stops = starts + window / fps
    return Timeline((starts + stops) / 2, starts, stops)


def interval_timeline(intervals: np.ndarray) -> Timeline:
    """TIM: (L, 2) [start_sec, stop_sec] rows, already in the order of the feature rows."""
    starts, stops = intervals[:, 0].astype(np.float64), intervals[:, 1].astype(np.float64)
    return Timeline((starts + stops) / 2, starts, stops)


def stamp_timeline(seconds: np.ndarray, fps: float | None = None) -> Timeline:
    """video_features: one stored time per feature; each covers half a hop either side."""
    t = np.asarray(seconds, dtype=np.float64).reshape(-1)
    hop = float(np.median(np.diff(t))) if len(t) > 1 else (1.0 / fps if fps else 0.0)
    return Timeline(t, t - hop / 2, t + hop / 2)


class WindowError(ValueError):
    """A window the features do not cover; the message says which and why."""


def cut_window(tl: Timeline, start: float, stop: float, frames: int) -> np.ndarray:
    """Indices (frames,) of the features a window [start, stop] receives (module docstring); WindowError if the
    features do not cover it."""
    first, last, hop = float(tl.starts[0]), float(tl.stops[-1]), tl.hop
    mid = (start + stop) / 2
    if start < first - EPS or mid > last + EPS or stop > last + hop + EPS:
        raise WindowError(f"window [{start:.3f}, {stop:.3f}]s reaches outside the features, which cover "
                          f"[{first:.3f}, {last:.3f}]s (+{hop:.3f}s tolerance at the end)")
    inside = np.flatnonzero((tl.centres >= start - EPS) & (tl.centres <= stop + EPS))
    if len(inside) == 0:  # shorter than one hop: the feature covering the window
        cover = np.flatnonzero((tl.starts <= mid + EPS) & (mid < tl.stops + EPS))
        if len(cover) == 0:
            raise WindowError(f"window [{start:.3f}, {stop:.3f}]s falls between feature intervals")
        inside = cover[[int(np.argmin(np.abs(tl.centres[cover] - mid)))]]
    want = sample_times(start, stop, SamplingConfig(num_frames=frames))  # (F,)
    nearest = np.argmin(np.abs(tl.centres[inside][None, :] - want[:, None]), axis=1)  # ties: the earlier feature
    return inside[nearest]


# ---------------------------------------------------------------- reading files
def _load_any(path: Path):
    """An array or a dict of arrays from .npy/.npz/.pt/.pkl/.h5, without running code stored in the file."""
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if path.suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                return {str(k): (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in obj.items()}
            return obj.numpy() if hasattr(obj, "numpy") else np.asarray(obj)
        if path.suffix in (".h5", ".hdf5"):
            with h5py.File(path, "r") as f:
                return {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset)}
        with open(path, "rb") as fh:
            obj = _ArrayUnpickler(fh).load()
        return {str(k): np.asarray(v) for k, v in obj.items()} if isinstance(obj, dict) else np.asarray(obj)
    except Exception as exc:
        raise InputError(f"{path}: cannot read features ({type(exc).__name__}: {exc})") from exc


def _split_dict(obj, path: Path) -> tuple[np.ndarray, np.ndarray | None, float | None]:
    """(features, timestamps_ms or None, fps or None) of what `_load_any` read."""
    if not isinstance(obj, dict):
        return np.asarray(obj), None, None
    stamps = obj.get(STAMPS)
    fps = float(np.asarray(obj[FPS_KEY]).reshape(-1)[0]) if FPS_KEY in obj else None
    arrays = [k for k, v in obj.items() if k not in (STAMPS, FPS_KEY) and np.asarray(v).ndim >= 2]
    if len(arrays) != 1:
        raise InputError(f"{path}: expected one feature array, found {len(arrays)} ({', '.join(arrays) or 'none'}; "
                         f"keys: {', '.join(obj)})")
    return np.asarray(obj[arrays[0]]), (None if stamps is None else np.asarray(stamps, np.float64)), fps


def _as_features(arr: np.ndarray, path: Path) -> np.ndarray:
    """(L, D) float32; (L, A, D) -> view 0 (TIM's augmented views); refuses other shapes and non-finite values."""
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[:, 0]
    if arr.ndim != 2 or 0 in arr.shape:
        raise InputError(f"{path}: per-video features of shape {arr.shape}; expected (L, D) or (L, A, D)")
    bad = schema.nonfinite_report(arr)
    if bad:
        raise InputError(f"{path}: features the float16 cache cannot hold ({bad}); normalise or rescale them")
    return arr


def read_times_file(path: Path) -> dict[str, np.ndarray]:
    """TIM feature times: video_id -> (L, 2) [start_sec, stop_sec], sorted by start (as TIM's loader sorts)."""
    if not path.is_file():
        raise InputError(f"--times {path}: no such file")
    out: dict[str, list] = {}
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            need = {"video_id", "start_sec", "stop_sec"}
            if not need <= set(reader.fieldnames or ()):
                raise InputError(f"{path}: a feature-times CSV needs columns video_id, start_sec, stop_sec; it has "
                                 f"{', '.join(reader.fieldnames or ())}")
            for i, row in enumerate(reader, start=2):
                try:
                    out.setdefault(row["video_id"], []).append((float(row["start_sec"]), float(row["stop_sec"])))
                except ValueError:
                    raise InputError(f"{path}: line {i}: start_sec/stop_sec are not numbers") from None
        table = {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
    else:
        try:
            obj = _load_any(path)
        except InputError as exc:
            if isinstance(exc.__cause__, pickle.UnpicklingError) and "pandas" in str(exc.__cause__):
                raise InputError(
                    f"{path}: a pandas DataFrame pickle (TIM's feature-times file) cannot be read without running "
                    "pandas' code; convert it once to CSV: python -c \"import pandas as pd; "
                    f"pd.read_pickle('{path.name}').to_csv('{path.stem}.csv')\" and pass --times {path.stem}.csv"
                ) from None
            raise
        if not isinstance(obj, dict):
            raise InputError(f"{path}: expected {{video_id: (L, 2) array}}, found an array of shape {obj.shape}")
        table = {k: np.asarray(v, dtype=np.float64).reshape(-1, 2) for k, v in obj.items()}
    return {k: v[np.argsort(v[:, 0], kind="stable")] for k, v in table.items()}


# ---------------------------------------------------------------- finding files
def _index(folder: Path) -> dict[str, Path]:
    """stem -> file for the feature files in `folder` and its immediate subfolders (P01/P01_01.npy)."""
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            files.update({q.stem: q for q in sorted(p.iterdir()) if q.suffix in DENSE_SUFFIXES and q.stem not in files})
        elif p.suffix in DENSE_SUFFIXES:
            files.setdefault(p.stem, p)
    return files


def _vf_feature_stems(files: dict[str, Path], vid: str) -> list[str]:
    """video_features' split files of `vid`: <vid>_<type> stems other than timestamps_ms / fps."""
    return [s for s in files if s.startswith(vid + "_") and s[len(vid) + 1:] not in (STAMPS, FPS_KEY)
            and "_" not in s[len(vid) + 1:] and not s[len(vid) + 1:].isdigit()]


def _has_stamps(path: Path) -> bool:
    """Whether a per-video dict file (.npz/.h5/.pkl/.pt) stores timestamps_ms."""
    if path.suffix == ".npy":
        return False
    obj = _load_any(path)
    return isinstance(obj, dict) and STAMPS in obj


def resolve_format(src: Path, segments: Sequence, dcfg: DenseConfig, key: str) -> ImportFormat:
    """The format named, or the one the folder's files show; InputError (naming a file) when several fit or none."""
    if dcfg.format is not None:
        return ImportFormat(dcfg.format)
    if _is_lmdb(src):
        return ImportFormat.LMDB
    if not src.is_dir():
        raise InputError(f"--features {src}: not a folder or LMDB")
    if key == "index":
        return ImportFormat.PER_SEGMENT
    files = _index(src)
    vids = list(dict.fromkeys(s.video_id for s in segments))
    fits: dict[ImportFormat, Path] = {}
    seg = next((files[s.narration_id] for s in segments if s.narration_id in files), None)
    if seg is not None:
        fits[ImportFormat.PER_SEGMENT] = seg
    per_video = next((files[v] for v in vids if v in files), None)
    stamped = next((files[f"{v}_{STAMPS}"] for v in vids if f"{v}_{STAMPS}" in files), None)
    if stamped is None and per_video is not None and _has_stamps(per_video):
        stamped = per_video
    if stamped is not None:
        fits[ImportFormat.VIDEO_FEATURES] = stamped
    if per_video is not None and (dcfg.times or _times_beside(src)):
        fits[ImportFormat.TIM] = per_video
    if per_video is not None and dcfg.feature_fps is not None:
        fits[ImportFormat.FIXED_RATE] = per_video
    if len(fits) > 1:
        raise InputError(f"--features {src}: the files fit several formats ("
                         + "; ".join(f"{f.value}: {p}" for f, p in fits.items()) + "); name one with --format")
    if fits:
        return next(iter(fits))
    if per_video is not None:
        raise InputError(f"{per_video}: per-video features with no time axis: give --feature-fps (with --stride/"
                         "--window: TeSTra, ActionFormer), --times (TIM's feature times), or --format")
    raise InputError(f"--features {src}: no file named after a segment (<narration_id>.npy) or a video "
                     f"(<video_id>.npy ...) of the annotations, e.g. {segments[0].narration_id} / {vids[0]}")


def _times_beside(src: Path) -> Path | None:
    """The one *feature_times* file in the features folder, if exactly one is there."""
    found = [p for p in src.iterdir() if "feature_times" in p.name and p.suffix in (".csv", ".pkl", ".npz")]
    return found[0] if len(found) == 1 else None


# ---------------------------------------------------------------- the import
class DensePlan:
    """Rows of a dense import, cut video by video while the cache is written (the `rows` hook of
    `import_features`): `dim`, `frames`, `unused`, `attrs`, and `write(writer, progress)`."""

    def __init__(self, src: Path, segments: Sequence, fmt: ImportFormat, dcfg: DenseConfig, frames: int):
        self.src, self.segments, self.fmt, self.cfg, self.frames = src, segments, fmt, dcfg, int(frames)
        self.files = _index(src)
        self.times: dict[str, np.ndarray] | None = None
        self.times_path: Path | None = None
        if fmt is ImportFormat.TIM:
            self.times_path = Path(dcfg.times) if dcfg.times else _times_beside(src)
            if self.times_path is None:
                raise InputError(f"--format tim needs --times, the feature-times file of {src}")
            self.times = read_times_file(self.times_path)
        if fmt is ImportFormat.FIXED_RATE:
            fps, stride, window = dcfg.feature_fps, dcfg.stride, dcfg.window or dcfg.stride
            if not all(v is not None and math.isfinite(v) and v > 0 for v in (fps, stride, window)):
                raise InputError(f"--format fixed-rate needs --feature-fps > 0 (given {fps}), --stride > 0 "
                                 f"({stride}) and --window > 0 ({window})")
        vids = list(dict.fromkeys(s.video_id for s in segments))
        found = [v for v in vids if self._locate(v)[0] is not None]
        if not found:
            raise InputError(f"--features {src}: no {fmt.value} feature file for any video of the annotations "
                             f"(expected e.g. {self._expected(vids[0])})")
        self.dim = self._load(found[0])[0].shape[1]
        wanted = set(vids)
        self.unused = sum(1 for stem in self.files if stem not in wanted and "feature_times" not in stem
                          and not any(stem.startswith(v + "_") for v in wanted))
        self.windows = [schema.RECOGNITION] + ([schema.ANTICIPATION] if dcfg.anticipation else [])

    @property
    def convention(self) -> str:
        c = self.cfg
        if self.fmt is ImportFormat.FIXED_RATE:
            return (f"feature i covers [i*stride/fps, (i*stride+window)/fps) with fps={c.feature_fps:g}, "
                    f"stride={c.stride:g}, window={c.window or c.stride:g} frames; its time is the centre")
        if self.fmt is ImportFormat.TIM:
            return f"feature i covers [start_sec, stop_sec] of row i of {self.times_path.name} sorted by start_sec; " \
                   "its time is the centre"
        return "feature i is at timestamps_ms[i] / 1000 as stored; it covers half a hop either side"

    @property
    def attrs(self) -> dict:
        a = dict(import_format=self.fmt.value, feature_times=self.convention, frames_per_segment=self.frames,
                 anticipation=bool(self.cfg.anticipation),
                 source=f"{self.fmt.value} per-video features from {self.src}")
        if self.cfg.anticipation:
            a.update(tau_a=float(self.cfg.tau_a), tau_o=float(self.cfg.tau_o))
        return a

    def _expected(self, vid: str) -> str:
        if self.fmt is ImportFormat.VIDEO_FEATURES:
            return f"{self.src / vid}_<type>.npy with {vid}_{STAMPS}.npy, or {self.src / vid}.npz/.pkl/.h5 holding " \
                   f"{STAMPS}"
        return f"{self.src / vid}.npy (or .npz, .pt, .pkl, .h5)"

    def _locate(self, vid: str) -> tuple[Path | None, Path | None]:
        """(feature file, separate timestamps file or None) of `vid`."""
        if self.fmt is ImportFormat.VIDEO_FEATURES and f"{vid}_{STAMPS}" in self.files:
            stems = _vf_feature_stems(self.files, vid)
            if len(stems) > 1:
                raise InputError(f"{self.src}: several feature files for video {vid} "
                                 f"({', '.join(self.files[s].name for s in stems)}); keep one per folder")
            return (self.files[stems[0]] if stems else None), self.files[f"{vid}_{STAMPS}"]
        return self.files.get(vid), None

    def _load(self, vid: str) -> tuple[np.ndarray, Timeline, Path]:
        """Features (L, D) and their timeline for video `vid` (which has a file)."""
        path, stamps_path = self._locate(vid)
        feats, stamps, fps = _split_dict(_load_any(path), path)
        feats = _as_features(feats, path)
        n = feats.shape[0]
        if self.fmt is ImportFormat.FIXED_RATE:
            c = self.cfg
            return feats, fixed_rate_timeline(n, c.feature_fps, c.stride, c.window or c.stride), path
        if self.fmt is ImportFormat.TIM:
            intervals = self.times.get(vid)
            if intervals is None or len(intervals) != n:
                raise InputError(f"{path}: {n} features, but {self.times_path} lists "
                                 f"{0 if intervals is None else len(intervals)} intervals for video {vid}")
            return feats, interval_timeline(intervals), path
        if stamps_path is not None:
            loaded = _load_any(stamps_path)
            if isinstance(loaded, dict):
                raise InputError(f"{stamps_path}: expected an array of {STAMPS}, found keys {', '.join(loaded)}")
            stamps = np.asarray(loaded, dtype=np.float64).reshape(-1)
            if fps is None and f"{vid}_{FPS_KEY}" in self.files:  # the tool's <vid>_fps file: one feature's hop
                fps_file = self.files[f"{vid}_{FPS_KEY}"]
                fps = float(np.asarray(_load_any(fps_file), dtype=np.float64).reshape(-1)[0])
        if stamps is None or len(stamps) != n or not np.all(np.isfinite(stamps)) or np.any(np.diff(stamps) < 0):
            raise InputError(f"{stamps_path or path}: {STAMPS} must hold {n} finite, non-decreasing times (one per "
                             f"feature), found {None if stamps is None else stamps.shape}")
        return feats, stamp_timeline(stamps / 1000.0, fps), path

    def _window(self, s, window: str) -> tuple[float, float]:
        if window == schema.RECOGNITION:
            return s.start_time, s.stop_time
        return anticipation_window(s, self.cfg.tau_a, self.cfg.tau_o)

    def write(self, w: CacheWriter, progress: Progress) -> None:
        """Cut and write every row, video by video; windows the features do not cover are recorded failures."""
        rows_of: dict[str, list[int]] = {}
        for i, s in enumerate(self.segments):
            rows_of.setdefault(s.video_id, []).append(i)
        for vid, rows in rows_of.items():
            if self._locate(vid)[0] is None:
                for i in rows:
                    for window in self.windows:
                        w.record_failure(i, window, f"no feature file for video {vid}: expected {self._expected(vid)}")
                progress.advance(len(rows))
                continue
            feats, tl, path = self._load(vid)
            if feats.shape[1] != self.dim:
                raise InputError(f"{path}: features of dimension {feats.shape[1]}, earlier videos {self.dim}")
            for i in rows:
                for window in self.windows:
                    try:
                        start, stop = self._window(self.segments[i], window)
                        pick = cut_window(tl, start, stop, self.frames)
                    except (WindowError, DecodeError) as exc:
                        w.record_failure(i, window, f"{path.name}: {exc}")
                        continue
                    w.write_row(i, feats[pick], tl.centres[pick], window)
                progress.advance(1)


def run_import(cfg: ImportConfig, dcfg: DenseConfig | None = None, progress: Progress | None = None) -> ImportSummary:
    """`cache import`: per-segment files and LMDBs as `import_features` reads them, dense per-video features cut
    by time (module docstring). The format is `dcfg.format` or detected."""
    from mambavl.data.annotations import load_annotations

    dcfg = dcfg or DenseConfig()
    ann = load_annotations(cfg.annotations)
    src = Path(cfg.features)
    fmt = resolve_format(src, ann.segments, dcfg, cfg.key)
    if fmt not in DENSE_FORMATS:
        if dcfg.anticipation:
            raise InputError(f"--anticipation needs per-video features (a time axis to cut); {src} is {fmt.value}")
        if (fmt is ImportFormat.LMDB) != _is_lmdb(src):
            raise InputError(f"--format {fmt.value}: {src} is {'' if _is_lmdb(src) else 'not '}an LMDB")
        return import_features(cfg, progress)
    if Path(cfg.out).exists():
        raise InputError(f"{cfg.out} exists; import writes a new cache")
    return import_features(cfg, progress, rows=DensePlan(src, ann.segments, fmt, dcfg, cfg.frames))
