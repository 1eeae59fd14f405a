"""Which annotation rows each extraction shard takes: deterministic, balanced by decoding cost.

Decoding 1080p H.264, not the encoder, is what limits extraction, and decoding cost grows with the frames ffmpeg must
decode (every frame of the window, from the keyframe before it) times their pixels. EK-100 segments last from under
a second to minutes, and a few videos are 1920x1440 or 90 fps, so splitting by row count (``row % N``) leaves some
shards with several times the work of others. Instead each row gets a cost and the rows are spread over the N shards
by longest-processing-time first (LPT: the most expensive row goes to the least loaded shard, ties broken by row and
shard index), which is within 4/3 of the best possible makespan (Graham 1969) and deterministic: every process that
computes the plan from the same inputs gets the same shards, so torchrun ranks and Slurm array tasks need no
coordination to agree on it.

Cost of a row (arbitrary units, only ratios matter):

* video file: seconds decoded (the window; plus the anticipation window with ``--anticipation``) x fps x width x
  height. fps and resolution come from the video info (``EPIC_100_video_info.csv``) when it names the video, else
  from probing the file (PyAV); a video that cannot be probed (missing, corrupt: it will land in the failures table
  at once) costs its seconds x the median rate of the others.
* chunked video folder (AVION / LaViLa): as a video file, at the rate and size of its first chunk.
* JPEG frame folder (``rgb_frames``): only the sampled frames are read and decoded, so frames per segment x pixels.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import numpy as np

from mambavl.data.annotations import Segment, VideoInfo
from mambavl.errors import InputError
from mambavl.extract.decode import (
    DecodeError,
    SamplingConfig,
    SourceKind,
    anticipation_window,
    locate_source,
    probe_video,
    scan_chunks,
)

__all__ = ["imbalance", "lpt_assign", "plan_shards", "segment_costs", "shard_rows"]


def _resolution(text: str) -> tuple[int, int] | None:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except (ValueError, AttributeError):
        return None
    return (w, h) if w > 0 and h > 0 else None


def _rate(root, segment: Segment, video_info: dict[str, VideoInfo]) -> tuple[SourceKind, float | None]:
    """(layout, rate) of a segment's source: decoded pixels per second of video for a video file, pixels per frame for
    a JPEG folder; rate None when it cannot be known."""
    try:
        kind, path = locate_source(root, segment)
    except DecodeError:
        return SourceKind.VIDEO, None
    info = video_info.get(segment.video_id)
    res = _resolution(info.resolution) if info is not None else None
    if kind is SourceKind.FRAMES:  # pixels of one JPEG; the frame count comes from the sampling
        return kind, float(res[0] * res[1]) if res else None
    if info is not None and res is not None and info.fps > 0:
        return kind, float(info.fps) * res[0] * res[1]
    try:
        if kind is SourceKind.CHUNKS:  # chunks share one encoding: the first stands for all
            chunks = scan_chunks(path)
            path = chunks.path(chunks.starts[0])
        p = probe_video(path)
    except (DecodeError, InputError):
        return kind, None
    return kind, p.fps * p.width * p.height


def segment_costs(root, segments: Sequence[Segment], sampling: SamplingConfig,
                  video_info: dict[str, VideoInfo] | None = None, anticipation: bool = False,
                  tau_a: float = 1.0, tau_o: float = 2.0) -> np.ndarray:
    """Decoding cost of each segment, (N,) float64 >= 0 (see the module docstring for the model)."""
    video_info = video_info or {}
    rates: dict[str, tuple[SourceKind, float | None]] = {}
    for s in segments:
        if s.video_id not in rates:
            rates[s.video_id] = _rate(root, s, video_info)
    known = [r for kind, r in rates.values() if r is not None and kind is SourceKind.VIDEO]
    fallback = float(np.median(known)) if known else 1.0
    known_px = [r for kind, r in rates.values() if r is not None and kind is SourceKind.FRAMES]
    fallback_px = float(np.median(known_px)) if known_px else 1.0
    costs = np.empty(len(segments), dtype=np.float64)
    for i, s in enumerate(segments):
        kind, rate = rates[s.video_id]
        if kind is SourceKind.FRAMES:
            windows = 2 if anticipation else 1
            costs[i] = windows * sampling.num_frames * (rate if rate is not None else fallback_px)
            continue
        seconds = max(0.0, s.stop_time - s.start_time)
        if anticipation:
            try:
                a0, a1 = anticipation_window(s.start_time, tau_a, tau_o)
                seconds += a1 - a0
            except DecodeError:
                pass  # no anticipation window: a failure row, nothing decoded
        # at least one frame's worth: a zero-length window still decodes from its keyframe
        costs[i] = max(seconds, 1e-3) * (rate if rate is not None else fallback)
    return costs


def lpt_assign(costs: np.ndarray, n: int) -> np.ndarray:
    """Longest-processing-time-first assignment of jobs to `n` bins: (J,) costs -> (J,) int bin index.

    Jobs are taken by decreasing cost (ties: lower index first) and each goes to the bin with the least load so far
    (ties: lower bin index). Deterministic for the same inputs.
    """
    if n < 1:
        raise ValueError(f"need at least one shard, got {n}")
    costs = np.asarray(costs, dtype=np.float64)
    order = np.lexsort((np.arange(len(costs)), -costs))  # by -cost, then by index
    heap = [(0.0, b) for b in range(n)]
    out = np.empty(len(costs), dtype=np.int64)
    for j in order:
        load, b = heapq.heappop(heap)
        out[j] = b
        heapq.heappush(heap, (load + float(costs[j]), b))
    return out


def plan_shards(costs: np.ndarray, n: int) -> list[np.ndarray]:
    """The rows of each of `n` shards, each in increasing row order: a partition of range(len(costs))."""
    assign = lpt_assign(costs, n)
    return [np.flatnonzero(assign == b) for b in range(n)]


def shard_rows(costs: np.ndarray, shard: tuple[int, int]) -> np.ndarray:
    """Rows of shard (i, N), increasing."""
    i, n = shard
    return plan_shards(costs, n)[i]


def imbalance(costs: np.ndarray, plan: list[np.ndarray]) -> float:
    """max shard load / mean shard load (1.0 = perfectly balanced)."""
    loads = np.asarray([float(costs[rows].sum()) for rows in plan])
    mean = loads.mean() if len(loads) else 0.0
    return float(loads.max() / mean) if mean > 0 and math.isfinite(mean) else 1.0
