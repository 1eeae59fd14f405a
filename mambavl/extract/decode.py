"""Segment decoding: one ffmpeg process per segment seeks, picks the frames, scales and centre-crops them, and
sends raw RGB back over a pipe.

Frame exactness. A frame is *displayed* from its timestamp until the next frame's; the frame returned for a
requested time t is the one displayed at t. ffmpeg's ``fps`` filter with ``round=up`` implements exactly that:
for each output tick it emits the last input frame whose timestamp is <= the tick (a frame with pts p maps to tick
ceil(p * rate), and the filter keeps a frame until the next one's tick has come). The requested times always lie
on a regular grid (UNIFORM: the centres of N equal bins; FPS: a fixed-rate grid), so the grid becomes the
filter's rate and start time, and in FPS mode a ``select`` on the tick number keeps the capped uniform subset.
Only the picked frames reach ``scale``/``crop`` and the pipe, so the cost is the decoding of the window itself —
what a bare ``ffmpeg -ss … -t … -f rawvideo`` of the same segment pays, without converting every full-size frame.
This also holds for variable-frame-rate files: ticks are compared with real timestamps, not frame counts.

Seeking uses input ``-ss`` with ``-noaccurate_seek``: ffmpeg jumps to the keyframe before the seek point and hands
*every* frame from there to the filter (with negative timestamps), so the frame displayed at the first tick is
never trimmed away, whatever its distance to the tick.

Times are seconds on the video's own timeline (0 = the container start, as ffmpeg's ``-ss``). The times returned
with the frames are the start times of the displayed frames on the nominal frame grid (exact for constant frame
rate, the nearest grid point for variable rate).

Layouts: EK-100 ``ROOT/P01/videos/P01_01.MP4`` or ``ROOT/P01/rgb_frames/P01_01/frame_0000000001.jpg`` (1-based);
also ``ROOT/P01_01.MP4`` and, for generic CSVs, ``ROOT/<video>``. Frame number <-> time: a video file by its own
timestamps; a frame folder by its *numbering rate* (frames/s), which for EK-100 is not the native fps of
``EPIC_100_video_info.csv`` but the rate the annotation rows imply (~60 for EK-55 videos, 50 for the extension;
see `mambavl.data.annotations`), or one given explicitly.

Windows past the end. A window may reach at most `END_TOLERANCE_FRAMES` frames past the last frame (annotations
round their stop times); further, or a frame folder missing more than that many frames of its window, is a
DecodeError naming the file, the window and how much is missing, recorded as a failure by extraction.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import av
import ffmpeg
import numpy as np

from mambavl.data.annotations import Segment, frame_start, frame_window
from mambavl.data.media import ffmpeg_binary
from mambavl.errors import InputError
from mambavl.extract import packet_plan

VIDEO_EXTENSIONS = (".MP4", ".mp4")
FRAME_PATTERN = "frame_{:010d}.jpg"  # EK-100 rgb_frames naming, 1-based
_STDERR_TAIL = 600                   # characters of ffmpeg's stderr kept in a DecodeError
# Frames a window may reach past the end of its source (the annotations' rounding of stop times); beyond: failure.
END_TOLERANCE_FRAMES = 3


class DecodeError(RuntimeError):
    """A segment could not be decoded; the message names the file and the reason (missing, corrupt, range)."""


class SamplingMode(str, Enum):
    UNIFORM = "uniform"   # num_frames frames at the centres of num_frames equal bins of the segment
    FPS = "fps"           # a fixed rate, capped at num_frames by uniform sub-selection


class SourceKind(str, Enum):
    VIDEO = "video"
    FRAMES = "frames"


@dataclass
class SamplingConfig:
    mode: SamplingMode = SamplingMode.UNIFORM
    num_frames: int = 16    # UNIFORM: frames per segment. FPS: the cap (most frames stored)
    fps: float = 4.0        # FPS mode only
    size: int = 224         # output H = W = size: ffmpeg scales the short side to `size`, then centre-crops
    spatial_crops: int = 1  # 3: centre, left/top, right/bottom squares, frames (F, 3, S, S, 3) (mambavl.extract.views)

    def __post_init__(self) -> None:
        try:
            self.mode = SamplingMode(self.mode)
        except ValueError:
            raise InputError(f"sampling mode: {self.mode!r} is not one of "
                             f"{', '.join(m.value for m in SamplingMode)}") from None
        if int(self.num_frames) < 1:
            raise InputError(f"sampling num_frames: must be >= 1, got {self.num_frames}")
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise InputError(f"sampling fps: must be > 0, got {self.fps}")
        if int(self.size) < 1:
            raise InputError(f"sampling size: must be >= 1, got {self.size}")
        if int(self.spatial_crops) not in (1, 3):
            raise InputError(f"sampling spatial_crops: must be 1 or 3, got {self.spatial_crops}")
        self.num_frames, self.size, self.fps = int(self.num_frames), int(self.size), float(self.fps)
        self.spatial_crops = int(self.spatial_crops)


@dataclass(frozen=True)
class VideoProbe:
    duration: float       # seconds of the video stream
    fps: float            # nominal frame rate
    width: int
    height: int
    start: float = 0.0    # first frame's time on the container timeline (usually 0)

    @property
    def end(self) -> float:
        """Time at which the last frame stops being displayed."""
        return self.start + self.duration

    @property
    def num_frames(self) -> int:
        return max(1, int(round(self.duration * self.fps)))


@functools.lru_cache(maxsize=1)
def probe_video(path: str | os.PathLike) -> VideoProbe:
    """Duration, nominal fps, size and start time of the first video stream (PyAV; cached per file version)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DecodeError(f"{path}: missing (no such file)") from None
    except OSError as exc:
        raise DecodeError(f"{path}: cannot stat ({exc})") from None
    if not path.is_file():
        raise DecodeError(f"{path}: not a file")
    if st.st_size == 0:
        raise DecodeError(f"{path}: empty file (0 bytes)")
    # keyed on mtime and size so that a rewritten file is probed again
    return _probe_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4096)
def _probe_cached(path: str, mtime_ns: int, size: int) -> VideoProbe:
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DecodeError(f"{path}: corrupt or not a video (no video stream)")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate or float(rate) <= 0:
                raise DecodeError(f"{path}: corrupt or unsupported video (no frame rate)")
            fps = float(rate)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = stream.frames / fps if stream.frames else 0.0
            container_start = (container.start_time or 0) / av.time_base
            first = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            width, height = stream.codec_context.width, stream.codec_context.height
    except av.FFmpegError as exc:
        raise DecodeError(f"{path}: corrupt or truncated video, cannot be opened ({exc})") from None
    if duration <= 0 or width <= 0 or height <= 0:
        raise DecodeError(f"{path}: corrupt video (duration {duration:.3f}s, size {width}x{height})")
    return VideoProbe(duration=duration, fps=fps, width=width, height=height, start=first - container_start)


@dataclass(frozen=True)
class _Grid:
    """Sample times as a regular grid: tick k at first + k * step (k < count); `picks` are the kept ticks."""

    first: float
    step: float
    count: int
    picks: np.ndarray  # (F,) int, non-decreasing tick numbers

    @property
    def times(self) -> np.ndarray:
        return self.first + self.step * self.picks.astype(np.float64)  # (F,)


def _grid(start: float, stop: float, cfg: SamplingConfig) -> _Grid:
    length = max(0.0, stop - start)
    if cfg.mode is SamplingMode.UNIFORM:
        step = length / cfg.num_frames
        return _Grid(start + step / 2, step, cfg.num_frames, np.arange(cfg.num_frames))
    step = 1.0 / cfg.fps
    count = max(1, int(math.floor(length * cfg.fps + 1e-6)))
    # centre the grid in the segment so both ends lose the same fraction of a step
    first = start + (length - count * step) / 2 + step / 2
    picks = np.arange(count)
    if count > cfg.num_frames:
        picks = np.floor((np.arange(cfg.num_frames) + 0.5) * count / cfg.num_frames).astype(np.int64)
    return _Grid(first, step, count, picks)


def sample_times(start: float, stop: float, cfg: SamplingConfig) -> np.ndarray:
    """Requested sample times in seconds, (F,) float64.

    UNIFORM: the centres of `num_frames` equal bins of [start, stop] (F = num_frames). FPS: a grid at `cfg.fps`
    centred in the segment (at least one sample), sub-selected uniformly down to `num_frames` when longer.
    """
    return _grid(start, stop, cfg).times


def _scale_crop(stream: ffmpeg.nodes.FilterableStream, size: int, crops: int = 1) -> ffmpeg.nodes.FilterableStream:
    """Scale the short side to `size` (aspect kept), then take the centre size x size square; with `crops` = 3 also
    the squares at the start and the end of the long side (left/right, top/bottom: `mambavl.extract.views`)."""
    stream = stream.filter("scale", w=f"if(gt(iw,ih),-1,{size})", h=f"if(gt(iw,ih),{size},-1)")
    if crops == 1:
        return stream.filter("crop", size, size)
    # the centre square exactly as above (crop's default x, y), then the long side's start and end; the scaled frame
    # is landscape when in_w > in_h (the scale's own test). Side by side in one (size, crops * size) frame.
    along = (("if(gt(in_w,in_h),0,(in_w-out_w)/2)", "if(gt(in_w,in_h),(in_h-out_h)/2,0)"),
             ("if(gt(in_w,in_h),in_w-out_w,(in_w-out_w)/2)", "if(gt(in_w,in_h),(in_h-out_h)/2,in_h-out_h)"))
    branches = stream.filter_multi_output("split", crops)
    parts = [branches[0].filter("crop", size, size)] + [branches[s].filter("crop", size, size, *along[s - 1])
                                                         for s in range(1, crops)]
    return ffmpeg.filter(parts, "hstack", inputs=crops)


def _run(stream: ffmpeg.nodes.OutputStream, path: Path, stdin: bytes | None = None) -> bytes:
    try:
        out, _ = stream.global_args("-nostdin", "-loglevel", "error").run(
            cmd=ffmpeg_binary(), input=stdin, capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as exc:
        tail = (exc.stderr or b"").decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
        raise DecodeError(f"{path}: ffmpeg failed (corrupt or unsupported file): {tail}") from None
    return out


def _frames(raw: bytes, size: int, crops: int = 1) -> np.ndarray:
    per = size * size * 3 * crops
    n = len(raw) // per
    frames = np.frombuffer(raw, dtype=np.uint8, count=n * per)
    if crops == 1:
        return frames.reshape(n, size, size, 3)  # (n, S, S, 3)
    return frames.reshape(n, size, crops, size, 3).transpose(0, 2, 1, 3, 4)  # crops side by side -> (n, C, S, S, 3)


@dataclass(frozen=True)
class FrameRequest:
    """What a video decoder is asked for, the same for every decoder (`mambavl.extract.backends`): the frames
    displayed at times `first + step * ticks` of the file `path`, scaled (short side to `size`) and centre-cropped
    to size x size. The window has been checked against `probe` already; `threads`: decoder threads (0: default)."""

    path: Path
    probe: VideoProbe
    first: float        # seconds, container timeline
    step: float         # seconds between ticks (> 0)
    ticks: np.ndarray   # (U,) int, strictly increasing tick numbers
    size: int
    threads: int = 0
    crops: int = 1      # 3: also the squares at both ends of the long side; frames (U, 3, size, size, 3)

    @property
    def times(self) -> np.ndarray:
        return self.first + self.step * self.ticks.astype(np.float64)  # (U,)


class FfmpegDecoder:
    """The reference decoder: one ffmpeg process per request (seek, ``fps`` filter picking the frames, scale + crop,
    raw RGB over a pipe). `skip_unneeded`: leave out the packets no requested frame needs
    (`mambavl.extract.packet_plan`; bit-identical frames, less CPU); False decodes the whole window."""

    name = "ffmpeg"
    device = "cpu"

    def __init__(self, skip_unneeded: bool = True):
        self.skip_unneeded = skip_unneeded

    def frames(self, req: FrameRequest) -> np.ndarray:
        """uint8 (M, size, size, 3) RGB, M <= U: the frames at req.times in order, fewer when the stream ends first.
        DecodeError when ffmpeg fails."""
        path, probe = req.path, req.probe
        # One nominal frame of margin: some demuxers land a little after the requested seek point.
        ss = round(max(0.0, req.first - 1.0 / probe.fps), 6)  # ffmpeg parses -ss to microseconds
        options = {"threads": int(req.threads)} if req.threads else {}
        drop = packet_plan.drop_expression(path, ss, req.times) if self.skip_unneeded else None
        if drop:
            options["bsf:v"] = f"noise=drop='{drop}'"
        stream = ffmpeg.input(str(path.resolve()), ss=f"{ss:.6f}", noaccurate_seek=None, **options)
        stream = stream.filter("fps", fps=repr(float(1.0 / req.step)), start_time=repr(float(req.first - ss)),
                               round="up")  # float(): numpy scalars repr as np.float64(...)
        if not np.array_equal(req.ticks, np.arange(len(req.ticks))):
            stream = stream.filter("select", "+".join(f"eq(n,{int(k)})" for k in req.ticks))
        stream = _scale_crop(stream, req.size, req.crops)
        out = stream.output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough",
                            **{"frames:v": len(req.ticks)})
        return _frames(_run(out, path), req.size, req.crops)  # (M, S, S, 3) or (M, C, S, S, 3), M <= U


DEFAULT_DECODER = FfmpegDecoder()


def decode_video_segment(path: str | os.PathLike, start: float, stop: float,
                         cfg: SamplingConfig, threads: int = 0, decoder=None) -> tuple[np.ndarray, np.ndarray]:
    """Frames of [start, stop] (seconds) of a video file.

    `threads`: ffmpeg's decoder threads (``-threads``); 0 leaves ffmpeg's default (one per core). Several decodes
    running side by side (the extraction's thread pool) fill the cores anyway; see benchmarks/decode_1080p.py.
    `decoder`: who decodes the frames of a `FrameRequest` (`FfmpegDecoder` by default; see
    `mambavl.extract.backends` for the others); every check here applies to all of them.

    Returns frames uint8 (F, size, size, 3) RGB — a numpy array, or a torch tensor on the decoder's device for
    decoders that keep frames there — and times float64 (F,): the start times of the returned frames.
    A window reaching at most END_TOLERANCE_FRAMES frames past the end of the video is clamped to it; one reaching
    further or starting after the end, a missing, empty, truncated or corrupt file raise DecodeError naming the
    file and the reason.
    """
    path = Path(path)
    probe = probe_video(path)
    if not (math.isfinite(start) and math.isfinite(stop)) or stop < start:
        raise DecodeError(f"{path}: invalid window [{start}, {stop}] s")
    if start >= probe.end:
        raise DecodeError(f"{path}: out of range: segment starts at {start:.3f}s, the video ends at "
                          f"{probe.end:.3f}s")
    if stop > probe.end + END_TOLERANCE_FRAMES / probe.fps:
        raise DecodeError(f"{path}: out of range: segment [{start:.3f}, {stop:.3f}]s ends {stop - probe.end:.3f}s "
                          f"({(stop - probe.end) * probe.fps:.0f} frames) past the end of the video at "
                          f"{probe.end:.3f}s (tolerance {END_TOLERANCE_FRAMES} frames)")
    start, stop = max(start, 0.0), min(stop, probe.end)
    grid = _grid(start, stop, cfg)
    if grid.step <= 1e-9:
        # a zero-length window: one tick, repeated (the fps filter needs a finite rate)
        grid = _Grid(grid.first, 1.0, 1, np.zeros(len(grid.picks), dtype=np.int64))
    ticks, inverse = np.unique(grid.picks, return_inverse=True)  # ticks (U,) sorted; picks = ticks[inverse]
    request = FrameRequest(path, probe, grid.first, grid.step, ticks, cfg.size, threads, cfg.spatial_crops)
    got = (decoder or DEFAULT_DECODER).frames(request)  # (M, S, S, 3), M <= U

    if len(got) < len(ticks):
        missing_t = grid.first + grid.step * float(ticks[len(got)])
        # the fps filter stops at the end of the stream; a tick within the last frame is rounding, not damage
        if len(got) == 0 or missing_t < probe.end - 1.5 / probe.fps:
            raise DecodeError(
                f"{path}: truncated or corrupt: decoding stopped after {len(got)} of {len(ticks)} frames, "
                f"before t={missing_t:.3f}s although the video is {probe.end:.3f}s long")
        inverse = np.minimum(inverse, len(got) - 1)  # the missing tail ticks show the last frame decoded
    if not isinstance(got, np.ndarray):  # a torch tensor on the decoder's device
        inverse = _as_index(inverse, got)
    frames = got[inverse]  # (F, S, S, 3), a copy (fancy indexing), so writable
    return frames, _displayed_frame_start(grid.times, probe)


def _as_index(index: np.ndarray, like):
    import torch

    return torch.as_tensor(index, dtype=torch.long, device=like.device)


def _displayed_frame_start(times: np.ndarray, probe: VideoProbe) -> np.ndarray:
    """Start time of the frame displayed at each time, on the nominal frame grid. (F,) -> (F,)"""
    index = np.floor((times - probe.start) * probe.fps + 1e-6)
    index = np.clip(index, 0, probe.num_frames - 1)
    return probe.start + index / probe.fps


def _last_present(frame_dir: Path, first: int, last: int) -> int:
    """The highest frame number in first..last whose file exists, assuming the folder holds a contiguous run from
    `first` (binary search: O(log n) stats however long the segment); first - 1 when frame `first` is missing."""
    if not frame_path(frame_dir, first).is_file():
        return first - 1
    lo, hi = first, last  # frame lo exists; the answer is in lo..hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if frame_path(frame_dir, mid).is_file():
            lo = mid
        else:
            hi = mid - 1
    return lo


def frame_path(frame_dir: str | os.PathLike, number: int) -> Path:
    """Path of 1-based frame `number` in an EK-100 rgb_frames folder."""
    return Path(frame_dir) / FRAME_PATTERN.format(number)


def decode_frame_dir_segment(frame_dir: str | os.PathLike, start_frame: int, stop_frame: int, rate: float,
                             cfg: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Frames start_frame..stop_frame (1-based, inclusive) of a JPEG folder (``frame_0000000001.jpg``) numbered at
    `rate` frames/s.

    The segment covers the display intervals of its frames, [(start_frame - 1) / rate, stop_frame / rate); sample
    times are taken as for a video and each maps to the frame displayed then. Up to END_TOLERANCE_FRAMES frames
    missing at the tail (folders often stop a frame or two before the last annotated frame) are replaced by the
    last one present; more missing frames, a missing folder, a hole inside the segment or an undecodable JPEG raise
    DecodeError (with the count of missing frames).
    Returns frames uint8 (F, size, size, 3) RGB and times float64 (F,) = (frame - 1) / rate.
    """
    frame_dir = Path(frame_dir)
    if not frame_dir.is_dir():
        raise DecodeError(f"{frame_dir}: missing frame folder")
    if not (rate > 0 and math.isfinite(rate)):
        raise DecodeError(f"{frame_dir}: invalid frame numbering rate {rate}")
    start_frame, stop_frame = int(start_frame), int(stop_frame)
    if start_frame < 1 or stop_frame < start_frame:
        raise DecodeError(f"{frame_dir}: invalid frame range {start_frame}..{stop_frame}")
    times = sample_times(frame_start(start_frame, rate), frame_start(stop_frame + 1, rate), cfg)
    numbers = np.clip(np.floor(times * rate + 1e-6).astype(np.int64) + 1, start_frame, stop_frame)  # (F,)
    last = _last_present(frame_dir, start_frame, stop_frame)
    if last < start_frame:
        raise DecodeError(f"{frame_path(frame_dir, start_frame)}: missing (no frames {start_frame}..{stop_frame} "
                          f"in {frame_dir})")
    if stop_frame - last > END_TOLERANCE_FRAMES:
        raise DecodeError(f"{frame_dir}: incomplete frame folder: {stop_frame - last} of the segment's "
                          f"{stop_frame - start_frame + 1} frames ({last + 1}..{stop_frame}) are missing "
                          f"(tolerance {END_TOLERANCE_FRAMES}); the last frame present is {last}")
    numbers = np.minimum(numbers, last)
    unique, inverse = np.unique(numbers, return_inverse=True)
    blobs = []
    for number in unique:
        p = frame_path(frame_dir, int(number))
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise DecodeError(f"{p}: missing frame inside the segment ({exc.strerror})") from None
        if not data:
            raise DecodeError(f"{p}: empty frame file (0 bytes)")
        blobs.append(data)
    # The JPEGs go to ffmpeg concatenated on stdin (image2pipe), so only the picked files are read and decoded.
    stream = ffmpeg.input("pipe:", format="image2pipe", vcodec="mjpeg")
    out = _scale_crop(stream, cfg.size, cfg.spatial_crops).output("pipe:", format="rawvideo", pix_fmt="rgb24",
                                                                  fps_mode="passthrough")
    got = _frames(_run(out, frame_dir, stdin=b"".join(blobs)), cfg.size, cfg.spatial_crops)  # (U, [C,] S, S, 3)
    if len(got) != len(unique):
        raise DecodeError(f"{frame_dir}: corrupt JPEG among frames {unique.tolist()}: ffmpeg returned "
                          f"{len(got)} of {len(unique)} frames")
    return got[inverse], frame_start(unique[inverse], rate)


def locate_source(root: str | os.PathLike, segment: Segment) -> tuple[SourceKind, Path]:
    """Where a segment's pixels live under `root`; the first existing of:

    ``root/P01/videos/P01_01.MP4`` (or .mp4), ``root/P01/rgb_frames/P01_01/``, ``root/P01_01.MP4`` (or .mp4),
    ``root/<video_id>`` (a file: video; a folder: JPEG frames) — the last one is how generic CSVs name videos.
    """
    root = Path(root)
    vid = segment.video_id
    candidates: list[tuple[SourceKind, Path]] = []
    if "/" not in vid and os.sep not in vid:
        participant = segment.participant_id or vid.split("_")[0]
        candidates += [(SourceKind.VIDEO, root / participant / "videos" / f"{vid}{ext}") for ext in VIDEO_EXTENSIONS]
        candidates.append((SourceKind.FRAMES, root / participant / "rgb_frames" / vid))
        candidates += [(SourceKind.VIDEO, root / f"{vid}{ext}") for ext in VIDEO_EXTENSIONS]
    direct = root / vid
    candidates.append((SourceKind.FRAMES if direct.is_dir() else SourceKind.VIDEO, direct))
    for kind, path in candidates:
        if (kind is SourceKind.FRAMES and path.is_dir()) or (kind is SourceKind.VIDEO and path.is_file()):
            return kind, path
    tried = ", ".join(str(p) for _, p in candidates)
    raise DecodeError(f"{direct}: missing: no video or frame folder for {vid!r} (looked for {tried})")


def decode_segment(root: str | os.PathLike, segment: Segment, start: float, stop: float, cfg: SamplingConfig,
                   frame_rate: float | None = None, threads: int = 0, decoder=None) -> tuple[np.ndarray, np.ndarray]:
    """Frames of [start, stop] seconds of `segment`'s video, from whichever layout `root` holds.

    A video file is decoded by its own timestamps. A JPEG folder needs its numbering rate `frame_rate` (frames/s;
    `AnnotationSet.frame_rate` gives it): the annotated start/stop frames are used as they are when the window is
    the segment itself, other windows (anticipation) map seconds to frames at that rate. Returns frames uint8
    (F, size, size, 3) and times float64 (F,) in seconds. `threads`: ffmpeg's decoder threads for video files (0 =
    ffmpeg's default). `decoder`: the video decoder (`decode_video_segment`); frame folders are always read by
    ffmpeg on the CPU.
    """
    kind, path = locate_source(root, segment)
    if kind is SourceKind.VIDEO:
        return decode_video_segment(path, start, stop, cfg, threads, decoder)
    if frame_rate is None:
        raise DecodeError(f"{path}: frame folder needs its frame numbering rate, but none is known for "
                          f"{segment.video_id!r} (no frame/timestamp pairs in the annotations; pass --frame-rate)")
    if segment.start_frame is not None and segment.stop_frame is not None and \
            (start, stop) == (segment.start_time, segment.stop_time):
        first, last = segment.start_frame, segment.stop_frame
    else:
        if stop < start:
            raise DecodeError(f"{path}: invalid window [{start}, {stop}] s")
        first, last = frame_window(start, stop, frame_rate)
    return decode_frame_dir_segment(path, first, last, frame_rate, cfg)


def anticipation_window(segment: Segment | float, tau_a: float = 1.0, tau_o: float = 2.0) -> tuple[float, float]:
    """The observed window for anticipation, (start, stop) in seconds: it ends `tau_a` s before the action starts
    and lasts `tau_o` s, clipped at the video start. `segment` is a Segment or its start time.

    Raises DecodeError when nothing of the window lies inside the video (the action starts within tau_a of 0).
    """
    if not (tau_a >= 0 and tau_o > 0):
        raise InputError(f"anticipation: need tau_a >= 0 and tau_o > 0, got tau_a={tau_a}, tau_o={tau_o}")
    action_start = segment.start_time if isinstance(segment, Segment) else float(segment)
    what = f"{segment.video_id} ({segment.narration_id}): " if isinstance(segment, Segment) else ""
    stop = action_start - tau_a
    if stop <= 0:
        raise DecodeError(f"{what}empty anticipation window: it would end at {stop:.2f}s, before the video starts "
                          f"(the action starts at {action_start:.2f}s, tau_a={tau_a:g}s)")
    return max(0.0, stop - tau_o), stop
