"""Building a cache by extraction (stage 1 end to end): annotations -> decode ‖ encode ‖ write -> HDF5 cache.
Shard caches are joined by `mambavl.cache.merge`.

Three stages overlap so that the slowest sets the pace: decoding runs in a thread pool (each decode is an ffmpeg
subprocess, so threads run truly in parallel), encoding runs in batches on the calling thread (the device), and a
writer thread stores rows and their done-flags. Queues between them are bounded, so memory stays flat.

Resumable: re-running the same command skips rows already flagged valid and retries failed ones. A decode failure
(missing, empty or corrupt video; a window outside the video) is recorded in the cache's failures table with its
reason, and the run goes on.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mambavl.cache import schema
from mambavl.cache.writer import CacheWriter, RowMeta
from mambavl.data.annotations import AnnotationSet, check_frame_times, load_annotations
from mambavl.errors import InputError
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
