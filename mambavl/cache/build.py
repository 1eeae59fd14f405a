"""Building a cache by extraction (stage 1 end to end): annotations -> decode ‖ encode ‖ write -> HDF5 cache;
merging shard caches.

Three stages overlap so that the slowest sets the pace: decoding runs in a thread pool (each decode is an ffmpeg
subprocess, so threads run truly in parallel), encoding runs in batches on the calling thread (the device), and a
writer thread stores rows and their done-flags. Queues between them are bounded, so memory stays flat.

Resumable: re-running the same command skips rows already flagged valid and retries failed ones. A decode failure
(missing, empty or corrupt video; a window outside the video) is recorded in the cache's failures table with its
reason, and the run goes on.
"""

from __future__ import annotations

import errno
import math
import os
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from mambavl.cache import schema
from mambavl.cache.reader import open_cache, releases_caches
from mambavl.cache.writer import CacheWriter, RowMeta
from mambavl.data.annotations import AnnotationSet, check_frame_times, load_annotations
from mambavl.errors import InputError, check_writable
from mambavl.extract.backends import DecoderKind, build_decoder
from mambavl.extract.decode import (
    DecodeError, SamplingConfig, SamplingMode, anticipation_window, check_chunked_sources, check_source_paths,
    decode_segment,
)
from mambavl.extract.encoders import EncoderConfig, FrozenEncoder, TextEncoder, build_encoder
from mambavl.extract.questions import QuestionSource, answer_texts, build_question_table
from mambavl.extract.shards import segment_costs, shard_rows
from mambavl.extract.views import ViewConfig, decode_views
from mambavl.progress import Progress, or_none



@dataclass
class ExtractConfig:
    """Everything one extraction run needs (saved, in effect, as the cache's root attributes)."""

    annotations: str
    videos: str
    out: str
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    anticipation: bool = False
    tau_a: float = 1.0
    tau_o: float = 2.0
    questions: tuple[str, ...] = ("templates", "annotation")
    questions_file: str | None = None
    verb_classes: str | None = None
    noun_classes: str | None = None
    video_info: str | None = None
    frame_rate: float | None = None  # numbering rate of rgb_frames folders (frames/s); None: from the annotations
    chunk_seconds: int | None = None  # length of chunked videos' chunks (s); None: read from the chunk names
    limit: int | None = None
    shard: tuple[int, int] | None = None
    decode_workers: int = 2
    decode_threads: int = 0  # ffmpeg's -threads per decode; 0 = its default (one per core)
    segments_per_batch: int = 8
    decoder: str = DecoderKind.FFMPEG.value  # ffmpeg | torchcodec | torchcodec-cuda | auto (mambavl.extract.backends)
    views: ViewConfig = field(default_factory=ViewConfig)  # T temporal x S spatial views (mambavl.extract.views)


@dataclass
class ExtractSummary:
    path: Path
    total: int
    done: int
    skipped: int
    failed: int
    failures: list[dict]
    seconds: float


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """"i/N" -> (i, N) with 0 <= i < N."""
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise InputError(f"--shard {text!r}: need 0 <= i < N")
    return i, n


def select_rows(n: int, shard: tuple[int, int] | None, limit: int | None,
                costs: np.ndarray | None = None) -> np.ndarray:
    """Annotation rows this run extracts, increasing: shard (i, N)'s rows of the longest-processing-time-first plan
    over the rows' decoding `costs` (mambavl.extract.shards; equal costs when None), then the first `limit`."""
    rows = np.arange(n)
    if shard:
        rows = shard_rows(np.ones(n) if costs is None else costs, shard)
    if limit is not None:
        rows = rows[:limit]
    return rows


def _stored_shard_rows(out: str, shard: tuple[int, int], n: int) -> np.ndarray | None:
    """The rows an existing shard file of the same shard was started with, so that a resumed shard keeps its plan
    even if the costs changed since (a missing video restored, a video_info file added). None when there is none."""
    path = Path(out)
    if not path.is_file():
        return None
    try:
        with schema.open_h5(path, "r") as f:
            if schema.normalise_attr(f.attrs.get("shard")) != f"{shard[0]}/{shard[1]}" or "source_row" not in f:
                return None
            if schema.normalise_attr(f.attrs.get("annotation_rows", -1)) != n:
                return None
            rows = f["source_row"][()].astype(np.int64)
    except (OSError, InputError):
        return None  # not a usable HDF5 file: the writer refuses it with a clear message
    return rows if len(rows) and rows.min() >= 0 and rows.max() < n else None


def resolve_question_sources(requested, questions_file: str | None) -> list[str]:
    """The sources to embed: templates always, plus those requested, plus `file` when a questions file is given."""
    sources = [QuestionSource(s).value for s in requested]
    if QuestionSource.TEMPLATES.value not in sources:
        sources.insert(0, QuestionSource.TEMPLATES.value)
    if questions_file and QuestionSource.FILE.value not in sources:
        sources.append(QuestionSource.FILE.value)
    return sources


def _token_times(times: np.ndarray, tokens: int) -> np.ndarray:
    """Times of F' tokens made from F frames (VideoMAE tubelets): the mean time of each group of frames."""
    if len(times) == tokens:
        return times
    pick = np.floor((np.arange(tokens * (len(times) // tokens or 1)) + 0.5) * len(times) /
                    (tokens * (len(times) // tokens or 1))).astype(int)
    return times[pick].reshape(tokens, -1).mean(1)


def run_extraction(cfg: ExtractConfig, progress: Progress | None = None,
                   encoder: FrozenEncoder | None = None) -> ExtractSummary:
    """Extract (or resume) the cache `cfg.out`. `encoder` reuses an already built encoder (same config).

    Progress: one unit per segment (extracted, failed, or skipped as done before), fields `done` and `failed`.
    """
    t0 = time.perf_counter()
    ann = load_annotations(cfg.annotations, cfg.verb_classes, cfg.noun_classes, cfg.video_info)
    videos = Path(cfg.videos)
    if not videos.is_dir():
        raise InputError(f"--videos {videos}: not a directory")
    # every row, before anything is probed, decoded or written: a row naming a file outside --videos stops the run
    check_source_paths(ann.path, ann.segments, ann.kind, videos)
    if cfg.frame_rate is not None:
        if not (math.isfinite(cfg.frame_rate) and cfg.frame_rate > 0):
            raise InputError(f"--frame-rate {cfg.frame_rate}: must be a positive number of frames/s")
        # the given rate must agree with the rows' own frame numbers and timestamps
        check_frame_times(ann.path, ann.segments, {s.video_id: cfg.frame_rate for s in ann.segments},
                          origin="--frame-rate")
    if cfg.chunk_seconds is not None and cfg.chunk_seconds < 1:
        raise InputError(f"--chunk-seconds {cfg.chunk_seconds}: must be a positive whole number of seconds")
    check_chunked_sources(videos, ann.segments, cfg.chunk_seconds)  # chunk names that disagree: bad input, exit 2
    rows = _stored_shard_rows(cfg.out, cfg.shard, len(ann.segments)) if cfg.shard else None
    if rows is None:
        costs = segment_costs(videos, ann.segments, cfg.sampling, ann.video_info, cfg.anticipation, cfg.tau_a,
                              cfg.tau_o) if cfg.shard else None
        rows = select_rows(len(ann.segments), cfg.shard, cfg.limit, costs)
    segments = [ann.segments[i] for i in rows]
    if not segments:
        raise InputError(f"{cfg.annotations}: no segments to extract (after --shard/--limit)")
    requested = list(cfg.questions)
    if not ann.has_labels or not any(s.narration for s in segments):
        if QuestionSource.ANNOTATION.value in requested and tuple(requested) == ExtractConfig.questions:
            requested.remove(QuestionSource.ANNOTATION.value)  # the default on a split without narrations
    sources = resolve_question_sources(requested, cfg.questions_file)
    texts, templates, per_segment, label_keyed = build_question_table(segments, ann.verbs, ann.nouns, sources,
                                                                      cfg.questions_file)

    decoder = build_decoder(cfg.decoder)
    cfg.views.check(cfg.sampling, decoder.name)
    enc = encoder or build_encoder(cfg.encoder)
    frames_per_segment = cfg.sampling.num_frames
    tokens = enc.tokens_per_segment(frames_per_segment)
    attrs = dict(
        dataset_kind=ann.kind,
        annotation_file=ann.path.name,
        annotation_sha256=ann.sha256,
        **enc.provenance(),
        sampling_mode=cfg.sampling.mode.value,
        frames_per_segment=int(tokens),
        decoded_frames=int(frames_per_segment),
        fps=float(cfg.sampling.fps) if cfg.sampling.mode == SamplingMode.FPS else 0.0,
        frame_size=int(cfg.sampling.size),
        has_labels=bool(ann.has_labels),
        anticipation=bool(cfg.anticipation),
        tau_a=float(cfg.tau_a),
        tau_o=float(cfg.tau_o),
        question_sources=sources,
        questions_file=Path(cfg.questions_file).name if cfg.questions_file else "",
        source=str(videos),
        shard=f"{cfg.shard[0]}/{cfg.shard[1]}" if cfg.shard else "",
        annotation_rows=len(ann.segments),
        limit=int(cfg.limit) if cfg.limit is not None else -1,
        decoder=decoder.name,
        **cfg.views.attrs(),
        chunk_seconds=int(cfg.chunk_seconds or 0),  # chunked videos' chunk length as given; 0: from the names
    )
    meta = RowMeta.from_segments(segments)

    def tables(w: CacheWriter) -> None:
        if "source_row" not in w.f:
            w.f.create_dataset("source_row", data=rows.astype(np.int64))
        if schema.QUESTIONS not in w.f or schema.ANSWERS not in w.f:
            write_text_tables(w, enc, texts, templates, per_segment, ann, segments, label_keyed)

    with CacheWriter(cfg.out, attrs, meta, ann.verbs.keys, ann.nouns.keys, on_create=tables) as w:
        tables(w)  # a no-op unless the file predates them
        pending = w.pending_rows()
        skipped = len(segments) - len(pending)
        done_before = skipped
        stats = {"total": len(segments), "done": done_before, "skipped": skipped, "failed": 0, "stage": "extract"}
        progress = or_none(progress)
        progress.start(len(segments))  # one unit per segment: extracted, skipped (done before) or failed
        progress.advance(skipped, skipped=skipped, failed=0)
        _overlap(cfg, enc, w, segments, pending, ann, stats, progress, decoder)
        w.finalize()
        failures = w.failures()
        progress.finish()
    return ExtractSummary(Path(cfg.out), len(segments), stats["done"], skipped, len(failures), failures,
                          time.perf_counter() - t0)


def write_text_tables(w: CacheWriter, enc: FrozenEncoder | TextEncoder, texts, templates, per_segment, ann,
                      segments, label_keyed=None) -> None:
    """Encode the question texts and the answer candidates (verb, noun and seen (verb, noun) pair names) with the
    text tower `enc` and write the cache's questions/ and answers/ tables (used by extraction and by import);
    `label_keyed` source -> (N,) bool marks questions derived from a row's labels (`build_question_table`)."""
    tok, mask, pooled = enc.encode_text(texts)  # (Q, T, Dt), (Q, T), (Q, Dt)
    w.write_questions(texts, tok.numpy(), mask.numpy(), pooled.numpy(), templates, per_segment, label_keyed)
    pairs = sorted({(s.verb_class, s.noun_class) for s in segments if s.verb_class >= 0 and s.noun_class >= 0})
    vt, nt, at = answer_texts(ann.verbs, ann.nouns, pairs)
    dt = enc.text_dim
    emb = lambda xs: enc.encode_text(xs)[2].numpy() if xs else np.zeros((0, dt), np.float32)  # noqa: E731
    w.write_answers(emb(vt), emb(nt), np.asarray(pairs, dtype=np.int32).reshape(-1, 2), emb(at), vt, nt, at)


def _overlap(cfg: ExtractConfig, enc: FrozenEncoder, w: CacheWriter, segments, pending: list[int],
             ann: AnnotationSet, stats: dict, progress: Progress, decoder=None) -> None:
    """decode (thread pool) -> encode (this thread) -> write (writer thread). A GPU decoder's frames stay on the
    GPU (resized there) and reach the encoder without a host copy."""
    windows = [schema.RECOGNITION] + ([schema.ANTICIPATION] if cfg.anticipation else [])
    tasks = [(row, window) for row in pending for window in windows if not w.done(window)[row]]
    done_rows = {window: w.done(window).copy() for window in windows}
    videos = Path(cfg.videos)

    def decode(row: int, window: str):
        seg = segments[row]
        try:
            if window == schema.RECOGNITION:
                start, stop = seg.start_time, seg.stop_time
            else:
                start, stop = anticipation_window(seg.start_time, cfg.tau_a, cfg.tau_o)
            if window == schema.RECOGNITION and cfg.views.count > 1:  # frames (V, F, H, W, 3), times (V, F)
                return decode_views(videos, seg, start, stop, cfg.sampling, cfg.views,
                                    ann.frame_rate(seg.video_id, cfg.frame_rate), cfg.decode_threads, decoder,
                                    cfg.chunk_seconds)
            return decode_segment(videos, seg, start, stop, cfg.sampling, ann.frame_rate(seg.video_id, cfg.frame_rate),
                                  cfg.decode_threads, decoder, cfg.chunk_seconds)
        except DecodeError as exc:
            return exc

    out_q: queue.Queue = queue.Queue(maxsize=4)
    writer_error: list[BaseException] = []

    def write_loop() -> None:
        while True:
            item = out_q.get()
            if item is None:
                return
            try:
                kind, row, window, payload = item
                finished = 0
                if kind == "row":
                    feats, times = payload
                    w.write_row(row, feats, times, window)
                    done_rows[window][row] = True
                else:
                    w.record_failure(row, window, payload)
                    stats["failed"] += 1
                    finished = 1
                if all(done_rows[win][row] for win in windows) and kind == "row":
                    stats["done"] += 1
                    finished = 1
                progress.advance(finished, done=stats["done"], failed=stats["failed"])
            except BaseException as exc:  # surface in the main thread; keep draining so it never blocks
                writer_error.append(exc)

    writer = threading.Thread(target=write_loop, name="mambavl-cache-writer", daemon=True)
    writer.start()
    ahead = max(2, cfg.decode_workers * 2 + cfg.segments_per_batch)
    try:
        with ThreadPoolExecutor(max_workers=max(1, cfg.decode_workers), thread_name_prefix="mambavl-decode") as pool:
            futures: list[tuple[int, str, Future]] = []
            next_task = 0
            batch: list[tuple[int, str, np.ndarray, np.ndarray]] = []
            while next_task < len(tasks) or futures or batch:
                while next_task < len(tasks) and len(futures) < ahead:
                    row, window = tasks[next_task]
                    futures.append((row, window, pool.submit(decode, row, window)))
                    next_task += 1
                if futures:
                    row, window, fut = futures.pop(0)
                    result = fut.result()
                    if isinstance(result, Exception):
                        out_q.put(("fail", row, window, str(result)))
                    else:
                        batch.append((row, window, *result))
                if batch and (len(batch) >= cfg.segments_per_batch or not futures):
                    for row, window, feats, times in _encode_batch(enc, batch):
                        bad = schema.nonfinite_report(feats)
                        if bad:  # an encoder overflow: recorded, never stored as inf/NaN
                            out_q.put(("fail", row, window, f"non-finite features from the encoder: {bad}"))
                        else:
                            out_q.put(("row", row, window, (feats, times)))
                    batch = []
                if writer_error:
                    raise writer_error[0]
    finally:
        out_q.put(None)
        writer.join()
    if writer_error:
        raise writer_error[0]


def _encode_batch(enc: FrozenEncoder, batch):
    """Encode decoded segments together: frames of equal count (and views) share one call; others go one by one.
    Multi-view frames (V, F, H, W, 3) are encoded as V clips and yield features (V, F', D), times (V, F')."""
    by_len: dict[tuple, list] = {}
    for item in batch:
        by_len.setdefault(tuple(item[2].shape[:-3]), []).append(item)
    for key, items in by_len.items():
        frames = [it[2] for it in items]
        stacked = np.stack(frames) if isinstance(frames[0], np.ndarray) else _stack_tensors(frames)
        views = key[0] if len(key) == 2 else 0
        if views:
            stacked = stacked.reshape(len(items) * views, *stacked.shape[2:])  # (B * V, F, H, W, 3)
        feats = enc.encode_segments(stacked).numpy()  # (B [* V], F', D)
        if views:
            feats = feats.reshape(len(items), views, *feats.shape[1:])  # (B, V, F', D)
        for (row, window, _frames, times), f in zip(items, feats):
            if views:
                yield row, window, f, np.stack([_token_times(np.asarray(t), f.shape[1]) for t in times])
            else:
                yield row, window, f, _token_times(np.asarray(times), f.shape[0])


def _stack_tensors(frames):
    """Frames as torch tensors (a GPU decoder's; frame folders still come as numpy) -> one (S, F, H, W, 3) tensor on
    the first one's device."""
    dev = next((f.device for f in frames if isinstance(f, torch.Tensor)), torch.device("cpu"))
    return torch.stack([torch.as_tensor(f).to(dev) for f in frames])


# Attributes that may differ between the shards of one extraction (everything else must agree).
_SHARD_FREE_ATTRS = {"created", "shard", "source", "limit", "complete"}
_MERGE_BLOCK_ROWS = 2048  # rows copied per HDF5 read/write in a merge


def _parse_shard_attr(value, path) -> tuple[int, int] | None:
    text = schema.normalise_attr(value) or ""
    if not text:
        return None
    try:
        return parse_shard(text)
    except InputError:
        raise InputError(f"shard {path}: attribute 'shard' is {text!r}, expected i/N") from None


def check_shards(caches, expected_rows: np.ndarray | None = None) -> np.ndarray:
    """Refuse a set of shard caches that would not merge into one whole cache; return their source rows, concatenated
    in the order given.

    Checked, each failure naming the shard file: every shard is complete (each row valid or a recorded failure);
    the attributes agree (except creation time, shard, source, limit); shards written with ``--shard i/N`` are all
    of one N and each i appears once; no annotation row or narration_id is in two shards; the rows add up to the
    annotation file's rows (without ``--limit``) or to `expected_rows` when given.
    """
    first = caches[0]
    for c in caches:
        with schema.open_h5(c.path, "r", "shard") as f:
            if not bool(f.attrs.get("complete", False)):
                windows = [schema.RECOGNITION] + ([schema.ANTICIPATION] if c.attrs.get("anticipation") else [])
                counts = ", ".join(f"{w}: {int(f[schema.window_prefix(w) + 'valid'][()].sum())}/{c.n} valid"
                                   for w in windows)
                raise InputError(f"shard {c.path} is incomplete ({counts}, {len(c.failures())} recorded failures): "
                                 "re-run its extraction (it resumes) before merging")
    for c in caches[1:]:
        for key in sorted(set(first.attrs) | set(c.attrs)):
            if key in _SHARD_FREE_ATTRS:
                continue
            if schema.normalise_attr(first.attrs.get(key)) != schema.normalise_attr(c.attrs.get(key)):
                raise InputError(f"shard {c.path} differs from {first.path} in attribute {key!r}: "
                                 f"{c.attrs.get(key)!r} vs {first.attrs.get(key)!r}")
    plan = [_parse_shard_attr(c.attrs.get("shard"), c.path) for c in caches]
    if any(plan):
        if not all(plan):
            unsharded = next(c.path for c, s in zip(caches, plan) if s is None)
            raise InputError(f"{unsharded} was not written with --shard i/N, the other caches were")
        sizes = {s[1] for s in plan}
        if len(sizes) > 1:
            raise InputError(f"shards of different plans: --shard .../N with N in {sorted(sizes)}")
        n = sizes.pop()
        seen: dict[int, object] = {}
        for c, (i, _) in zip(caches, plan):
            if i in seen:
                raise InputError(f"shard {i}/{n} given twice: {seen[i]} and {c.path}")
            seen[i] = c.path
        missing = [f"{i}/{n}" for i in range(n) if i not in seen]
        if missing:
            raise InputError(f"shard(s) {', '.join(missing)} missing from the merge (got {len(seen)} of {n})")
    rows = []
    for c in caches:
        with schema.open_h5(c.path, "r", "shard") as f:
            rows.append(f["source_row"][()].astype(np.int64) if "source_row" in f else np.arange(c.n))
    allrows = np.concatenate(rows)
    uniq, counts = np.unique(allrows, return_counts=True)
    if (counts > 1).any():
        row = int(uniq[counts > 1][0])
        holders = [str(c.path) for c, r in zip(caches, rows) if row in set(r.tolist())]
        raise InputError(f"shards overlap: annotation row {row} is in {', '.join(holders)}")
    ids = np.concatenate([np.asarray(_closed_after(c, c.labels)["narration_id"]) for c in caches])
    ids_u, ids_c = np.unique(ids, return_counts=True)
    if (ids_c > 1).any():
        raise InputError(f"shards overlap: narration_id {ids_u[ids_c > 1][0]!r} is in more than one shard")
    if expected_rows is not None:
        expected = np.sort(np.asarray(expected_rows, dtype=np.int64))
        if not np.array_equal(np.sort(allrows), expected):
            lost = np.setdiff1d(expected, allrows)
            raise InputError(f"shards hold {len(allrows)} rows, {len(expected)} were planned"
                             + (f" (row {int(lost[0])} is in none)" if len(lost) else ""))
    total = schema.normalise_attr(first.attrs.get("annotation_rows", -1))
    if any(plan) and int(schema.normalise_attr(first.attrs.get("limit", -1))) < 0 and total >= 0 \
            and len(allrows) != total:
        lost = np.setdiff1d(np.arange(total), allrows)
        raise InputError(f"shards hold {len(allrows)} rows but the annotation file has {total}"
                         + (f" (row {int(lost[0])} is in none)" if len(lost) else ""))
    return allrows


def _closed_after(cache, read):
    """`read()` (a method of `cache` that opens its file), then close the file: a merge of many shards keeps at most
    one shard open for its tables (the open-files limit, `ulimit -n`, is often 1024 or less)."""
    try:
        return read()
    finally:
        cache.close()


class _ShardFiles:
    """The shards' HDF5 files, opened on demand and kept open while the open-files limit (`ulimit -n`) allows.

    At most `max_open` at once (from the limit, less the descriptors already in use and a reserve); when opening one
    fails with "too many open files" anyway, the least recently used is closed and the open retried. Only when not
    even one shard can be opened is it an error, naming the limit."""

    RESERVE = 16  # descriptors left for the output file, HDF5, Python's own imports and the progress display

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        self.open: OrderedDict[int, h5py.File] = OrderedDict()
        limit = schema.open_files_limit()
        try:
            in_use = len(os.listdir("/proc/self/fd"))
        except OSError:
            in_use = 32
        self.max_open = max(1, limit - in_use - self.RESERVE) if limit > 0 else len(self.paths)

    def get(self, s: int) -> h5py.File:
        if s in self.open:
            self.open.move_to_end(s)
            return self.open[s]
        while len(self.open) >= self.max_open:
            self.open.popitem(last=False)[1].close()
        while True:
            try:
                f = h5py.File(self.paths[s], "r")  # validated by open_cache (check_contained) before the merge
                break
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self.open:
                    self.open.popitem(last=False)[1].close()
                    self.max_open = max(1, len(self.open))
                    continue
                raise InputError(schema.os_error_message(exc, self.paths[s], "shard", need=len(self.paths) + 20)
                                 or schema.damaged_message(self.paths[s], exc, "shard")) from exc
        self.open[s] = f
        return f

    def close(self) -> None:
        while self.open:
            self.open.popitem(last=False)[1].close()


@releases_caches
def merge_caches(paths: list[str], out: str, expected_rows: np.ndarray | None = None) -> Path:
    """Join shard caches (from --shard i/N) into one cache `out` in annotation row order, after `check_shards`.

    The merged file is written under a temporary name and renamed when whole; `out` must not exist.
    """
    if not paths:
        raise InputError("cache merge needs at least one shard")
    out_path = Path(out)
    if out_path.exists():
        raise InputError(f"{out_path} exists; merge writes a new file")
    check_writable(out_path, "merged cache")
    caches = [open_cache(p) for p in paths]
    first = caches[0]
    allrows = check_shards(caches, expected_rows)
    order = np.argsort(allrows, kind="stable")
    windows = [schema.RECOGNITION] + ([schema.ANTICIPATION] if first.attrs.get("anticipation") else [])
    # row metadata in merged order
    labels = [c.labels() for c in caches]

    def cat(key):
        return np.concatenate([np.asarray(lab[key]) for lab in labels])[order]

    nouns_all = [a for lab in labels for a in lab[schema.ALL_NOUNS]]
    meta = RowMeta(
        narration_id=list(cat("narration_id")), video_id=list(cat("video_id")),
        participant_id=list(cat("participant_id")), narration=list(cat("narration")),
        verb_class=cat("verb_class").astype(np.int32), noun_class=cat("noun_class").astype(np.int32),
        all_noun_classes=[tuple(nouns_all[i]) for i in order], start_time=cat("start_time"),
        stop_time=cat("stop_time"),
    )
    attrs = {k: v for k, v in first.attrs.items() if k not in ("shard", "complete")}
    attrs["source"] = "merged: " + ", ".join(str(Path(p).name) for p in paths)
    tmp = out_path.with_name(out_path.name + ".partial")
    if tmp.exists():
        tmp.unlink()
    try:
        _write_merged(tmp, attrs, meta, caches, allrows, order, windows)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed merge (a full disk) leaves nothing behind; the shards are untouched
        raise
    for c in caches:
        c.close()
    tmp.replace(out_path)
    return out_path


def _merge_views(w: CacheWriter, files, which: np.ndarray, local: np.ndarray, lo: int) -> None:
    """Views 1..V-1 of merged rows lo.. (shard `which`, row `local` in it), written before the block's done-flags."""
    k = len(which)
    feats = np.zeros((k, w.extra_views, w.frames, w.dim), dtype=np.float16)
    times = np.full((k, w.extra_views, w.frames), np.nan, dtype=np.float32)
    for s in np.unique(which):
        sel = which == s
        rows = local[sel]
        src = slice(int(rows[0]), int(rows[-1]) + 1)
        feats[sel] = files.get(int(s))[schema.VIEW_FEATURES][src]
        times[sel] = files.get(int(s))[schema.VIEW_FRAME_TIMES][src]
    w.write_view_block(lo, feats, times)


def _write_merged(tmp: Path, attrs: dict, meta: RowMeta, caches, allrows: np.ndarray, order: np.ndarray,
                  windows: list[str]) -> None:
    """Write the merged cache `tmp`: rows block by block in merged order, failures, question and answer tables."""
    first = caches[0]
    with CacheWriter(tmp, attrs, meta, first.verb_keys, first.noun_keys) as w:
        w.f.create_dataset("source_row", data=allrows[order].astype(np.int64))
        # merged position -> (shard, row in the shard); a shard's rows keep their order, so the rows of one shard
        # that land in a block of merged positions are one slice of that shard
        which = np.concatenate([np.full(c.n, s, dtype=np.int64) for s, c in enumerate(caches)])[order]
        local = np.concatenate([np.arange(c.n) for c in caches])[order]
        files = _ShardFiles([c.path for c in caches])
        try:
            for window in windows:
                p = schema.window_prefix(window)
                for lo in range(0, len(order), _MERGE_BLOCK_ROWS):
                    hi = min(len(order), lo + _MERGE_BLOCK_ROWS)
                    feats = np.zeros((hi - lo, w.frames, w.dim), dtype=np.float16)
                    times = np.full((hi - lo, w.frames), np.nan, dtype=np.float32)
                    nf = np.zeros(hi - lo, dtype=np.int16)
                    valid = np.zeros(hi - lo, dtype=bool)
                    for s in range(len(caches)):
                        sel = which[lo:hi] == s
                        if not sel.any():
                            continue
                        f = files.get(s)
                        rows = local[lo:hi][sel]
                        src = slice(int(rows[0]), int(rows[-1]) + 1)  # contiguous: rows == arange(start, stop)
                        feats[sel] = f[p + "features"][src]
                        times[sel] = f[p + "frame_times"][src]
                        nf[sel] = f[p + "num_frames"][src]
                        valid[sel] = f[p + "valid"][src]
                    if w.extra_views and window == schema.RECOGNITION:
                        _merge_views(w, files, which[lo:hi], local[lo:hi], lo)
                    w.write_block(lo, feats, times, nf, valid, window)
        finally:
            files.close()
        position = np.empty(len(allrows), dtype=np.int64)
        position[order] = np.arange(len(allrows))
        offset = 0
        for c in caches:
            for fail in _closed_after(c, c.failures):
                w.record_failure(int(position[offset + fail["index"]]), fail["window"], fail["reason"])
            offset += c.n
        _copy_text_tables(caches, w, order, allrows)
        w.finalize()


def _copy_text_tables(caches, w: CacheWriter, order: np.ndarray, allrows: np.ndarray) -> None:
    """Questions: the union of the shards' tables; per-segment indices remapped. Answers: the union of pairs."""
    texts: list[str] = []
    index: dict[str, int] = {}
    tok_rows, mask_rows, pooled_rows = [], [], []
    per_segment_parts: dict[str, list[np.ndarray]] = {}
    keyed_parts: dict[str, list[np.ndarray]] = {}
    templates = None
    pairs: dict[tuple[int, int], np.ndarray] = {}
    for c in caches:
        bank = _closed_after(c, c.questions)
        remap = np.empty(len(bank.texts), dtype=np.int64)
        for j, t in enumerate(bank.texts):
            if t not in index:
                index[t] = len(texts)
                texts.append(t)
                tok_rows.append(bank.tokens[j])
                mask_rows.append(bank.mask[j])
                pooled_rows.append(bank.pooled[j])
            remap[j] = index[t]
        if templates is None:
            templates = {k: remap[v] for k, v in bank.templates.items()}
        for source, table in bank.per_segment.items():
            per_segment_parts.setdefault(source, []).append(np.where(table >= 0, remap[np.maximum(table, 0)], -1))
            keyed_parts.setdefault(source, []).append(
                bank.label_keyed.get(source, np.zeros(len(table), dtype=bool)))
        answers = _closed_after(c, c.answers)
        for (v, n), e in zip(answers.action_pairs, answers.action):
            pairs.setdefault((int(v), int(n)), e)
    per_segment = {s: np.concatenate(parts)[order] for s, parts in per_segment_parts.items()
                   if len(parts) == len(caches)}
    # Renumber the union in the order one unsharded run would have made it (`build_question_table`: the template
    # texts as the first shard lists them, then each per-segment source's questions in row order), so a merged cache
    # equals the single-process one table for table.
    first_bank = caches[0].questions()
    template_idx = sorted({int(i) for v in first_bank.templates.values() for i in v})
    visit = [index[first_bank.texts[i]] for i in template_idx]
    for source in [q.value for q in QuestionSource if q.value in per_segment]:
        visit.extend(int(i) for i in per_segment[source].ravel() if i >= 0)
    visit.extend(range(len(texts)))  # anything not reached above keeps its place at the end
    new_of = np.full(len(texts), -1, dtype=np.int64)
    order_q: list[int] = []
    for i in visit:
        if new_of[i] < 0:
            new_of[i] = len(order_q)
            order_q.append(i)
    texts = [texts[i] for i in order_q]
    tok_rows, mask_rows, pooled_rows = ([rows_[i] for i in order_q] for rows_ in (tok_rows, mask_rows, pooled_rows))
    templates = {k: new_of[v] for k, v in templates.items()}
    per_segment = {s: np.where(t >= 0, new_of[np.maximum(t, 0)], -1) for s, t in per_segment.items()}
    label_keyed = {s: np.concatenate(keyed_parts[s])[order] for s in per_segment}
    w.write_questions(texts, np.stack(tok_rows), np.stack(mask_rows), np.stack(pooled_rows), templates, per_segment,
                      label_keyed)
    keys = sorted(pairs)
    all_text = {}
    for c in caches:
        a = c.answers()
        all_text.update(dict(zip(map(tuple, a.action_pairs.tolist()), a.action_text)))
    dt = answers.verb.shape[1]
    w.write_answers(answers.verb, answers.noun, np.asarray(keys).reshape(-1, 2),
                    np.stack([pairs[k] for k in keys]) if keys else np.zeros((0, dt)), answers.verb_text,
                    answers.noun_text, [all_text[k] for k in keys])
