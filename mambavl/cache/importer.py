"""Import features from other extractors (AVION, EgoVLP, TSN, RULSTM...) into a mambavl cache.

Two input forms:

* a folder of per-segment arrays, ``<narration_id>.npy|.pt|.pkl`` (``--key narration_id``) or ``<row>.npy``
  (``--key index``, 0-based annotation row), each (F, D) or (D,);
* a RULSTM-style LMDB: keys ``<video_id>_frame_<10-digit frame>.jpg``, values one float32 vector per frame;
  `frames` frames are read per segment, uniformly over start_frame..stop_frame.

Everything is validated before the output file is created — a missing segment, an unreadable file or a shape that
disagrees raises InputError naming the file (or key), and nothing is written. Question and answer texts still need a
text tower, which `text` (an EncoderConfig) chooses; the cache records encoder "imported", the source's name and path.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mambavl.cache.build import resolve_question_sources, write_text_tables
from mambavl.cache.writer import CacheWriter, RowMeta
from mambavl.data.annotations import load_annotations
from mambavl.errors import InputError
from mambavl.extract.encoders import EncoderConfig, build_encoder
from mambavl.extract.questions import build_question_table
from mambavl.progress import Progress, or_none

SUFFIXES = (".npy", ".pt", ".pth", ".pkl", ".pickle")


@dataclass
class ImportConfig:
    features: str
    annotations: str
    out: str
    name: str
    key: str = "narration_id"  # or "index"
    frames: int = 16  # LMDB: frames read per segment
    text: EncoderConfig = field(default_factory=EncoderConfig)
    questions: tuple[str, ...] = ("templates", "annotation")
    questions_file: str | None = None


def _load_array(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif path.suffix in (".pt", ".pth"):
            arr = torch.load(path, map_location="cpu", weights_only=True)
            arr = arr.numpy() if hasattr(arr, "numpy") else np.asarray(arr)
        else:
            with open(path, "rb") as f:
                arr = pickle.load(f)  # noqa: S301 - the user's own feature files
            arr = arr.numpy() if hasattr(arr, "numpy") else np.asarray(arr)
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


def _from_folder(folder: Path, segments, key: str) -> list[np.ndarray]:
    if not folder.is_dir():
        raise InputError(f"--features {folder}: not a folder or LMDB")
    files = {p.stem: p for p in folder.iterdir() if p.suffix in SUFFIXES}
    out = []
    for i, s in enumerate(segments):
        name = s.narration_id if key == "narration_id" else str(i)
        if name not in files:
            raise InputError(f"{folder}: no features for segment {s.narration_id} (row {s.row}); expected "
                             f"{name}.npy/.pt/.pkl")
        out.append(_load_array(files[name]))
    if len(files) != len(segments):
        extra = sorted(set(files) - {s.narration_id if key == "narration_id" else str(i)
                                     for i, s in enumerate(segments)})
        raise InputError(f"{folder}: {len(files)} feature files for {len(segments)} segments "
                         f"(not in the annotations: {', '.join(extra[:5])})")
    return out


def _from_lmdb(path: Path, segments, frames: int) -> list[np.ndarray]:
    import lmdb  # optional extra (mambavl[lmdb]): imported only for an LMDB source

    env = lmdb.open(str(path), readonly=True, lock=False, subdir=path.is_dir())
    out = []
    dim = None
    with env.begin() as txn:
        for s in segments:
            if s.start_frame is None:
                raise InputError(f"row {s.row}: LMDB import needs start_frame/stop_frame (EK-100 annotations)")
            numbers = np.floor(s.start_frame + (np.arange(frames) + 0.5) * (s.stop_frame - s.start_frame + 1)
                               / frames).astype(int)
            vecs = []
            for k in numbers:
                key = f"{s.video_id}_frame_{k:010d}.jpg"
                value = txn.get(key.encode())
                if value is None:
                    raise InputError(f"{path}: key {key!r} (segment {s.narration_id}, row {s.row}) not found")
                v = np.frombuffer(value, dtype=np.float32)
                if dim is None:
                    dim = v.size
                elif v.size != dim:
                    raise InputError(f"{path}: key {key!r} holds {v.size} floats, earlier keys {dim}")
                vecs.append(v)
            out.append(np.stack(vecs))
    env.close()
    return out


def import_features(cfg: ImportConfig, progress: Progress | None = None) -> Path:
    """Write `cfg.out` from external features (see module docstring). Returns the path."""

    ann = load_annotations(cfg.annotations)
    out = Path(cfg.out)
    if out.exists():
        raise InputError(f"{out} exists; import writes a new cache")
    if cfg.key not in ("narration_id", "index"):
        raise InputError(f"--key {cfg.key!r}: expected narration_id or index")
    src = Path(cfg.features)
    arrays = _from_lmdb(src, ann.segments, cfg.frames) if _is_lmdb(src) else _from_folder(src, ann.segments, cfg.key)
    dims = {a.shape[1] for a in arrays}
    if len(dims) != 1:
        raise InputError(f"{src}: feature dimensions disagree across segments: {sorted(dims)}")
    dim = dims.pop()
    frames = max(a.shape[0] for a in arrays)
    requested = list(cfg.questions)
    if not any(s.narration for s in ann.segments) and "annotation" in requested:
        requested.remove("annotation")
    sources = resolve_question_sources(requested, cfg.questions_file)
    texts, templates, per_segment, label_keyed = build_question_table(ann.segments, ann.verbs, ann.nouns, sources,
                                                                      cfg.questions_file)
    text = build_encoder(cfg.text)
    prov = text.provenance()
    attrs = dict(
        dataset_kind=ann.kind, annotation_file=ann.path.name, annotation_sha256=ann.sha256,
        encoder="imported", model=cfg.name, pretrained="", checkpoint_sha256="", feature_dim=int(dim),
        text_encoder=prov["text_encoder"], text_model=prov["text_model"], text_pretrained=prov["text_pretrained"],
        text_checkpoint_sha256=prov["text_checkpoint_sha256"], text_dim=int(text.text_dim),
        sampling_mode="imported", frames_per_segment=int(frames), frame_size=0, tokens_per_frame_pooling="imported",
        has_labels=bool(ann.has_labels), anticipation=False, question_sources=sources,
        questions_file=Path(cfg.questions_file).name if cfg.questions_file else "",
        source=f"{cfg.name} features from {src}",
    )
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        tmp.unlink()
    progress = or_none(progress)
    progress.start(len(arrays))  # one unit per segment written
    with CacheWriter(tmp, attrs, RowMeta.from_segments(ann.segments), ann.verbs.keys, ann.nouns.keys) as w:
        for i, (s, a) in enumerate(zip(ann.segments, arrays)):
            times = np.linspace(s.start_time, s.stop_time, a.shape[0])
            w.write_row(i, a, times)
            progress.advance(1)
        write_text_tables(w, text, texts, templates, per_segment, ann, ann.segments, label_keyed)
        w.finalize()
    tmp.replace(out)  # the cache appears whole or not at all
    return out
