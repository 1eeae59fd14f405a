"""Import features from other extractors (AVION, EgoVLP, TSN, RULSTM...) into a mambavl cache.

Two input forms:

* a folder of per-segment arrays, ``<narration_id>.npy|.pt|.pkl`` (``--key narration_id``) or ``<row>.npy``
  (``--key index``, 0-based annotation row), each (F, D) or (D,). The folder may hold other segments too (users keep
  every split's features in one folder): only the files the annotations name are read, and the others are counted
  in the summary;
* a RULSTM-style LMDB: keys ``<video_id>_frame_<10-digit frame>.jpg``, values one float32 vector per frame. The keys
  number frames at the rate of the video the features were extracted from (`source_fps`, required: RULSTM re-encoded
  EK videos at 30 fps), which is not the annotation CSV's frame numbering (~60 fps); so each segment's window is
  taken from its timestamps, every key of the window must exist (up to END_TOLERANCE_FRAMES missing at the end), and
  `frames` keys are read uniformly over it, at the times `frame_times` records. The window starts at the key displayed
  at the start time, floor(start * fps) + 1; RULSTM's own CSVs start one key earlier, so at 30 fps an imported
  window starts one frame (33 ms) later than RULSTM's in 9,639 of 9,668 EK-100 validation rows (docs/extract.md).

Per-video (dense) features — TIM, TeSTra, ActionFormer, video_features — are cut per segment by time in
`mambavl.cache.dense`, which hands its rows to `import_features` (`rows`); `dense.run_import` chooses the form.

Everything is validated before the output file is created — a missing segment or key, an unreadable file, a shape
that disagrees, or a value the float16 cache cannot hold (NaN, inf, |x| > 65504) raises InputError naming the file
(or key), and nothing is written (a dense import reads video by video while writing: bad input found there removes
the partial file). Question and answer texts still need a text tower, which the text fields of `text` (an
EncoderConfig: `text_encoder`, `text_model`, `text_pretrained`) choose — only that tower is loaded; the cache
records encoder "imported", the source's name and path.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mambavl.cache.build import resolve_question_sources, write_text_tables
from mambavl.cache.schema import nonfinite_report
from mambavl.cache.writer import CacheWriter, RowMeta
from mambavl.data.annotations import frame_at, frame_start, frame_window, load_annotations
from mambavl.errors import InputError
from mambavl.extract.decode import END_TOLERANCE_FRAMES, SamplingConfig, sample_times
from mambavl.extract.encoders import EncoderConfig, TextEncoder
from mambavl.extract.questions import build_question_table
from mambavl.progress import Progress, or_none

SUFFIXES = (".npy", ".pt", ".pth", ".pkl", ".pickle")


@dataclass
class ImportSummary:
    path: Path
    rows: int             # segments imported (= annotation rows)
    unused_files: int     # feature files in the folder that no annotation row names (other splits)
    failures: list[dict] = field(default_factory=list)  # rows/windows not imported (dense features), with reasons

    @property
    def failed(self) -> int:
        return len(self.failures)


@dataclass
class ImportConfig:
    features: str
    annotations: str
    out: str
    name: str
    key: str = "narration_id"  # or "index"
    frames: int = 16  # LMDB: frames read per segment
    source_fps: float | None = None  # LMDB: the frame rate its keys count (RULSTM: 30); required for an LMDB
    text: EncoderConfig = field(default_factory=EncoderConfig)
    questions: tuple[str, ...] = ("templates", "annotation")
    questions_file: str | None = None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numbers, lists, tuples and dicts, nothing else: a pickle names the functions it calls
    while loading, and a crafted one could name any (os.system...), so only numpy's array constructors are found.
    (A pickled torch tensor is refused too: save those with torch.save as .pt, read with weights_only=True.)"""

    ALLOWED = {(m, name) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
               for name in ("_reconstruct", "scalar")} | \
        {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")} | \
        {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a feature .pkl may hold numpy arrays only")


def _load_array(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif path.suffix in (".pt", ".pth"):
            arr = torch.load(path, map_location="cpu", weights_only=True)
            arr = arr.numpy() if hasattr(arr, "numpy") else np.asarray(arr)
        else:
            with open(path, "rb") as f:
                arr = _ArrayUnpickler(f).load()
    except Exception as exc:
        raise InputError(f"{path}: cannot read features ({type(exc).__name__}: {exc})") from exc
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or 0 in arr.shape:
        raise InputError(f"{path}: features of shape {arr.shape}; expected (F, D) or (D,)")
    return arr


def _is_lmdb(path: Path) -> bool:
    return (path.is_dir() and (path / "data.mdb").is_file()) or path.suffix == ".lmdb"


def _from_folder(folder: Path, segments, key: str) -> tuple[list[np.ndarray], int]:
    """The arrays the annotations name, in row order, and the count of other feature files in the folder."""
    if not folder.is_dir():
        raise InputError(f"--features {folder}: not a folder or LMDB")
    files = {p.stem: p for p in folder.iterdir() if p.suffix in SUFFIXES}
    names = [s.narration_id if key == "narration_id" else str(i) for i, s in enumerate(segments)]
    missing = [(s, name) for s, name in zip(segments, names) if name not in files]
    if missing:
        s, name = missing[0]
        raise InputError(f"{folder}: no features for {len(missing)} of {len(segments)} segments, e.g. "
                         f"{s.narration_id} (row {s.row}); expected {name}.npy/.pt/.pkl")
    return [_load_array(files[name]) for name in names], len(set(files) - set(names))


def _lmdb_numbers(s, frames: int, fps: float) -> tuple[int, int, np.ndarray]:
    """Key numbers for segment `s` in an LMDB numbered at `fps`: the window (first, last) and `frames` uniform picks."""
    first, last = frame_window(s.start_time, s.stop_time, fps)
    times = sample_times(s.start_time, s.stop_time, SamplingConfig(num_frames=frames))
    picks = np.clip([frame_at(t, fps) for t in times], first, last).astype(np.int64)  # (F,)
    return first, last, picks


def _from_lmdb(path: Path, segments, frames: int, fps: float | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per segment: features (F, D) and their times (F,) in seconds."""
    import lmdb  # optional extra (mambavl[lmdb]): imported only for an LMDB source

    if fps is None or not (math.isfinite(fps) and fps > 0):
        raise InputError(f"{path}: an LMDB import needs --source-fps, the frame rate its keys count "
                         "(RULSTM's EPIC-KITCHENS features: 30; the annotation CSV's frame numbers are not it)")
    env = lmdb.open(str(path), readonly=True, lock=False, subdir=path.is_dir())
    out, times = [], []
    dim = None
    with env.begin() as txn:
        def key(vid: str, k: int) -> str:
            return f"{vid}_frame_{k:010d}.jpg"

        for s in segments:
            first, last, picks = _lmdb_numbers(s, frames, fps)
            absent = [k for k in range(first, last + 1) if txn.get(key(s.video_id, k).encode()) is None]
            tail = 0
            while tail < len(absent) and absent[-1 - tail] == last - tail:
                tail += 1
            if len(absent) > (tail if tail <= END_TOLERANCE_FRAMES else 0):
                raise InputError(
                    f"{path}: segment {s.narration_id} (row {s.row}, {s.start_time:.2f}-{s.stop_time:.2f}s) needs "
                    f"keys {key(s.video_id, first)}..{key(s.video_id, last)} at {fps:g} fps, but {len(absent)} of "
                    f"them are missing (first: {key(s.video_id, absent[0])})")
            picks = np.minimum(picks, last - tail)
            vecs = []
            for k in picks:
                v = np.frombuffer(txn.get(key(s.video_id, int(k)).encode()), dtype=np.float32)
                if dim is None:
                    dim = v.size
                elif v.size != dim:
                    raise InputError(f"{path}: key {key(s.video_id, int(k))!r} holds {v.size} floats, earlier keys "
                                     f"{dim}")
                vecs.append(v)
            out.append(np.stack(vecs))
            times.append(frame_start(picks, fps))
    env.close()
    return out, times


def _check_finite(src: Path, segments, arrays: list[np.ndarray], key: str) -> None:
    """InputError listing the segments whose features the float16 cache cannot hold."""
    bad = []
    for i, (s, a) in enumerate(zip(segments, arrays)):
        report = nonfinite_report(a)
        if report:
            bad.append(f"{s.narration_id if key == 'narration_id' else i} (row {s.row}): {report}")
    if bad:
        raise InputError(f"{src}: {len(bad)} segment(s) hold values the float16 cache cannot store; normalise or "
                         f"rescale the features, or drop these rows from the annotations: " + "; ".join(bad[:5])
                         + (" ..." if len(bad) > 5 else ""))


def import_features(cfg: ImportConfig, progress: Progress | None = None, rows=None) -> ImportSummary:
    """Write `cfg.out` from external features (see module docstring). `rows`, when given, supplies the rows instead
    (`mambavl.cache.dense.DensePlan`: per-video features cut by time): its `dim`, `frames`, `unused`, `attrs` and
    `write(writer, progress)`."""

    ann = load_annotations(cfg.annotations)
    out = Path(cfg.out)
    if out.exists():
        raise InputError(f"{out} exists; import writes a new cache")
    if cfg.key not in ("narration_id", "index"):
        raise InputError(f"--key {cfg.key!r}: expected narration_id or index")
    src = Path(cfg.features)
    if rows is not None:
        arrays, times, unused = [], [], rows.unused
    elif _is_lmdb(src):
        arrays, times = _from_lmdb(src, ann.segments, cfg.frames, cfg.source_fps)
        unused = 0
    else:
        arrays, unused = _from_folder(src, ann.segments, cfg.key)
        times = [np.linspace(s.start_time, s.stop_time, a.shape[0]) for s, a in zip(ann.segments, arrays)]
    _check_finite(src, ann.segments, arrays, cfg.key)
    dims = {a.shape[1] for a in arrays} if rows is None else {rows.dim}
    if len(dims) != 1:
        raise InputError(f"{src}: feature dimensions disagree across segments: {sorted(dims)}")
    dim = dims.pop()
    frames = max(a.shape[0] for a in arrays) if rows is None else rows.frames
    requested = list(cfg.questions)
    if not any(s.narration for s in ann.segments) and "annotation" in requested:
        requested.remove("annotation")
    sources = resolve_question_sources(requested, cfg.questions_file)
    texts, templates, per_segment, label_keyed = build_question_table(ann.segments, ann.verbs, ann.nouns, sources,
                                                                      cfg.questions_file)
    text = TextEncoder(cfg.text)  # the text tower alone: no image model is loaded
    prov = text.provenance()
    attrs = dict(
        dataset_kind=ann.kind, annotation_file=ann.path.name, annotation_sha256=ann.sha256,
        encoder="imported", model=cfg.name, pretrained="", checkpoint_sha256="", feature_dim=int(dim),
        text_encoder=prov["text_encoder"], text_model=prov["text_model"], text_pretrained=prov["text_pretrained"],
        text_checkpoint_sha256=prov["text_checkpoint_sha256"], text_dim=int(text.text_dim),
        sampling_mode="imported", frames_per_segment=int(frames), frame_size=0, tokens_per_frame_pooling="imported",
        has_labels=bool(ann.has_labels), anticipation=False, question_sources=sources,
        questions_file=Path(cfg.questions_file).name if cfg.questions_file else "",
        source=f"{cfg.name} features from {src}" + (f" (keys at {cfg.source_fps:g} fps)" if _is_lmdb(src) else ""),
    )
    attrs.update(rows.attrs if rows is not None else {})
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        tmp.unlink()
    progress = or_none(progress)
    progress.start(len(ann.segments))  # one unit per segment written (or failed)
    try:
        with CacheWriter(tmp, attrs, RowMeta.from_segments(ann.segments), ann.verbs.keys, ann.nouns.keys) as w:
            for i, (a, t) in enumerate(zip(arrays, times)):
                w.write_row(i, a, t)
                progress.advance(1)
            if rows is not None:
                rows.write(w, progress)
            write_text_tables(w, text, texts, templates, per_segment, ann, ann.segments, label_keyed)
            w.finalize()
            failures = w.failures()
    except BaseException:
        tmp.unlink(missing_ok=True)  # a dense import finds bad input while writing: leave nothing behind
        raise
    tmp.replace(out)  # the cache appears whole or not at all
    imported = len(ann.segments) - len({f["index"] for f in failures if f["window"] == "recognition"})
    return ImportSummary(out, imported, unused, failures)
