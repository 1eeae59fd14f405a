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
never trimmed away, whatever its distance to the tick. The H.264 pictures no sampled frame needs are not decoded
(`mambavl.extract.packet_plan`): left out by a bitstream filter, or, where reference pictures are replaced by
stand-ins, sent to ffmpeg through a pipe from the same keyframe with the timestamps ``-ss`` gives them (``-copyts``),
so the filters see the same frames at the same times either way.

Times are seconds on the video's own timeline (0 = the container start, as ffmpeg's ``-ss``). The times returned
with the frames are the presentation timestamps of the frames returned, as the decoder reports them (ffmpeg: a
``showinfo`` filter before the ``fps`` filter logs every decoded frame; torchcodec: the frames' own pts), so
variable-frame-rate files get their true times.

Damaged data. A frame is stored only if it is the one displayed at its time: a decoder error reported while the
window is decoded (from the keyframe before it; missing-reference reports at an open-GOP start excepted), or a
returned frame that starts after its requested time (ffmpeg fills ticks it could not decode with the next frame
it can), is a DecodeError naming the file, the time and the decoder's messages — a recorded failure, never a row.

Non-square pixels. A stream whose sample aspect ratio (SAR) is not 1 (DV, DVD, broadcast captures) is scaled to
square pixels in the same step that scales the short side, so the centre crop covers what a player shows; square
pixels keep the original filter chain (bit-identical frames).

Windows at the ends. A window inside the video, however short (zero length, inside the last frame), yields the
frames displayed at its times: ffmpeg's ``fps`` filter rounds the end of the stream onto its tick grid and can
drop a tick inside the last frame, so such ticks are asked again one at a time at a fine rate.

Layouts: EK-100 ``ROOT/P01/videos/P01_01.MP4`` or ``ROOT/P01/rgb_frames/P01_01/frame_0000000001.jpg`` (1-based);
also ``ROOT/P01_01.MP4`` and, for generic CSVs, ``ROOT/<video>``; and chunked videos as AVION / LaViLa re-encode
them, ``ROOT/P01/P01_01.MP4/0.MP4, 15.MP4, …`` (or ``ROOT/P01_01.MP4/…``, ``ROOT/<video>/…``): a folder named like
the video file holding consecutive chunks, each named by its start second (see `ChunkedVideo`).
Annotation fields that build these paths (video / video_id, participant / participant_id) may not leave ROOT:
absolute paths and ``..`` components are refused (`check_source_paths`); symbolic links the user placed under ROOT
are followed. Frame number <-> time: a video file by its own
timestamps; a frame folder by its *numbering rate* (frames/s), which for EK-100 is not the native fps of
``EPIC_100_video_info.csv`` but the rate the annotation rows imply (~60 for EK-55 videos, 50 for the extension;
see `mambavl.data.annotations`), or one given explicitly.

Windows past the end. A window may reach at most `END_TOLERANCE_FRAMES` frames past the last frame (annotations
round their stop times); further, or a frame folder missing more than that many frames of its window, is a
DecodeError naming the file, the window and how much is missing, recorded as a failure by extraction.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import subprocess
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
from mambavl.extract.sampling import SamplingConfig, SamplingMode

VIDEO_EXTENSIONS = (".MP4", ".mp4")
FRAME_PATTERN = "frame_{:010d}.jpg"  # EK-100 rgb_frames naming, 1-based
_STDERR_TAIL = 600                   # characters of ffmpeg's stderr kept in a DecodeError
# Frames a window may reach past the end of its source (the annotations' rounding of stop times); beyond: failure.
END_TOLERANCE_FRAMES = 3


class DecodeError(RuntimeError):
    """A segment could not be decoded; the message names the file and the reason (missing, corrupt, range)."""


class SourceKind(str, Enum):
    VIDEO = "video"
    FRAMES = "frames"
    CHUNKS = "chunked"  # a folder of fixed-length chunks of one video (AVION / LaViLa), see `ChunkedVideo`


@dataclass(frozen=True)
class VideoProbe:
    duration: float       # seconds of the video stream
    fps: float            # nominal frame rate
    width: int
    height: int
    start: float = 0.0    # first frame's time on the container timeline (usually 0)
    sar: float = 1.0      # sample (pixel) aspect ratio, width / height of one stored pixel (2.0: anamorphic 2:1)

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
            sar = _sample_aspect_ratio(stream)
    except av.FFmpegError as exc:
        raise DecodeError(f"{path}: corrupt or truncated video, cannot be opened ({exc})") from None
    if duration <= 0 or width <= 0 or height <= 0:
        raise DecodeError(f"{path}: corrupt video (duration {duration:.3f}s, size {width}x{height})")
    return VideoProbe(duration=duration, fps=fps, width=width, height=height, start=first - container_start, sar=sar)


def _sample_aspect_ratio(stream) -> float:
    """The stream's pixel aspect ratio as ffmpeg applies it (av_guess_sample_aspect_ratio: the container's value when
    set, else the codec's); 1.0 when unknown or invalid."""
    for value in (stream.sample_aspect_ratio, stream.codec_context.sample_aspect_ratio):
        try:
            sar = float(value) if value is not None else 0.0
        except (TypeError, ZeroDivisionError):
            sar = 0.0
        if math.isfinite(sar) and sar > 0:
            return sar
    return 1.0


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


def _scale_crop(stream: ffmpeg.nodes.FilterableStream, size: int, sar: float = 1.0,
                crops: int = 1) -> ffmpeg.nodes.FilterableStream:
    """Scale the short side to `size` (aspect kept), then take the centre size x size square; with `crops` = 3 also
    the squares at the start and the end of the long side (left/right, top/bottom: `mambavl.extract.views`).

    `sar` != 1 (non-square pixels, as probed): the picture is scaled to square pixels in the same step, from the
    filter's own `sar` (rotation already applied), so the crop keeps the part of the picture a player shows.
    Square pixels keep the original expression, so their frames stay bit-identical."""
    if abs(sar - 1.0) < 1e-9:
        stream = stream.filter("scale", w=f"if(gt(iw,ih),-1,{size})", h=f"if(gt(iw,ih),{size},-1)")
    else:  # the display size rounded as `crop_box` does (mambavl.extract.backends)
        stream = stream.filter("scale", w=f"if(gt(iw*sar,ih),floor(iw*sar*{size}/ih+0.5),{size})",
                               h=f"if(gt(iw*sar,ih),{size},floor(ih*{size}/(iw*sar)+0.5))")
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


def _run(stream: ffmpeg.nodes.OutputStream, path: Path, stdin: bytes | None = None,
         loglevel: str = "error") -> tuple[bytes, str]:
    """Run ffmpeg; (stdout, stderr text). DecodeError naming `path` when it fails."""
    try:
        out, err = stream.global_args("-nostdin", "-hide_banner", "-loglevel", loglevel).run(
            cmd=ffmpeg_binary(), input=stdin, capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as exc:
        text = (exc.stderr or b"").decode("utf-8", "replace")
        tail = decoder_errors(text) or text.strip()[-_STDERR_TAIL:]  # level-tagged logs: the error lines only
        raise DecodeError(f"{path}: ffmpeg failed (corrupt or unsupported file): {tail}") from None
    return out, (err or b"").decode("utf-8", "replace")


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


@dataclass(frozen=True)
class DecodedFrames:
    """What a decoder returns for a `FrameRequest`: M <= U frames (fewer when the stream ends first) for the first M
    requested times, and the presentation timestamp of each (seconds, container timeline: when the decoded frame
    it is starts being displayed; NaN where the decoder cannot tell)."""

    frames: np.ndarray  # uint8 (M, size, size, 3): numpy, or a torch tensor on the decoder's device
    pts: np.ndarray     # (M,) float64


_SHOWINFO_OPTIONS = {"checksum": 0}  # no per-frame checksums: they would cost as much as decoding
_SHOWINFO = re.compile(r"Parsed_showinfo.*\bn:\s*\d+\s+pts:\s*(-?\d+)\s+pts_time:\s*(\S+)")
_TIME_BASE = re.compile(r"Parsed_showinfo.*config in time_base:\s*(\d+)/(\d+)")
_LOG_ERROR = re.compile(r"\[(?:error|fatal|panic)\]\s*(.*)")
# Messages about the pictures decoding starts with, before the first frame reaches showinfo: see `decoder_errors`.
_SEEK_START_ERRORS = re.compile(r"mmco: |reference picture|POCs unavailable|non-intra slice in an IDR", re.IGNORECASE)
_PICK_EPS = 1e-6  # seconds: a frame starting this close after a requested time is the one displayed then
# seconds (~1 us, exact in binary): the fps filter's tick spacing for a single requested time (a zero-length window)
SINGLE_TICK_STEP = 2.0 ** -20


@functools.lru_cache(maxsize=4)
def _ffmpeg_help(binary: str) -> str:
    """The showinfo filter's help as `binary` prints it with ``-loglevel level+error`` ("" when that fails)."""
    try:
        proc = subprocess.run([binary, "-hide_banner", "-loglevel", "level+error", "-h", "filter=showinfo"],
                              capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.decode("utf-8", "replace") if proc.returncode == 0 else ""


def _showinfo_checksum_option() -> bool:
    return "checksum" in _ffmpeg_help(ffmpeg_binary())


def _video_loglevel() -> str:
    """``level+info``: showinfo's lines are info, decoder errors tagged ``[error]``. An ffmpeg too old for the
    ``level`` flag (before 4.3) is refused: without it decoder errors could not be told apart."""
    if not _ffmpeg_help(ffmpeg_binary()):
        raise InputError(f"{ffmpeg_binary()}: this ffmpeg does not support `-loglevel level+error` or the showinfo "
                         "filter (ffmpeg 4.3 or newer is needed); put a newer ffmpeg first on PATH, or remove it "
                         "from PATH to use the one imageio-ffmpeg ships")
    return "level+info"


def parse_showinfo(log: str, offset: float) -> np.ndarray:
    """Timestamps (seconds, (D,) float64, in output order) of the frames showinfo saw, put back onto the container
    timeline: ffmpeg subtracted the input's ``-ss`` `offset` after rescaling it (in microseconds) to the stream's time
    base, rounding half away from zero, so the same integer is added back (exact when the container starts at 0)."""
    tb: tuple[int, int] | None = None
    pts = []
    for line in log.splitlines():
        m = _TIME_BASE.search(line)
        if m and tb is None and int(m.group(1)) > 0 and int(m.group(2)) > 0:
            tb = int(m.group(1)), int(m.group(2))
            continue
        m = _SHOWINFO.search(line)
        if m:
            pts.append(int(m.group(1)) if tb else float(m.group(2)))
    if not tb:
        return np.asarray(pts, dtype=np.float64) + offset
    num, den = tb
    offset_us = int(round(offset * 1e6))
    shift = (2 * offset_us * den + 10**6 * num) // (2 * 10**6 * num)  # av_rescale_q, AV_ROUND_NEAR_INF (offset >= 0)
    return (np.asarray(pts, dtype=np.int64) + shift).astype(np.float64) * num / den


def decoder_errors(log: str, most: int = 3) -> str:
    """The distinct error messages in an ffmpeg log written with ``-loglevel level+...`` ("" when none), at most
    `most` of them and how many there were.

    Not counted, before the first decoded frame reaches showinfo: missing-reference messages (decoding starts at the
    keyframe before the window, and in an open GOP (a keyframe that is not an IDR picture) the pictures around it
    refer to the previous GOP; the decoder reports them and does not output them, and they lie before the window),
    and H.264's "A non-intra slice in an IDR NAL unit" (an extra slice some encoders write into a stream's first IDR
    picture, e.g. OpenCV's sample clip box.mp4; the decoder drops that slice and the picture decodes whole from the
    others, so players show the video as intact)."""
    seen: list[str] = []
    total = 0
    started = False
    for line in log.splitlines():
        if not started and _SHOWINFO.search(line):
            started = True
        m = _LOG_ERROR.search(line)
        if not m or (not started and _SEEK_START_ERRORS.search(m.group(1))):
            continue
        total += 1
        where = re.sub(r" @ 0x[0-9a-fA-F]+", "", line[:m.start()].strip())
        text = f"{where} {m.group(1).strip()}".strip()
        if text not in seen:
            seen.append(text)
    if not seen:
        return ""
    shown = "; ".join(seen[:most])
    return shown + (f" (and {total - min(most, len(seen))} more error lines)" if total > most else "")


def fps_filter_picks(decoded: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Which decoded frame ffmpeg's ``fps`` filter (round=up) returned for each of `times` (M,): the last one starting
    at or before the time, or the first one when none does (the filter fills ticks before its first frame with it).
    `decoded`: (D,) timestamps of the frames the filter saw. Returns their timestamps (M,); NaN when none was seen."""
    pts = np.sort(decoded)
    if not len(pts):
        return np.full(len(times), np.nan)
    k = np.searchsorted(pts, np.asarray(times, dtype=np.float64) + _PICK_EPS, side="right") - 1  # (M,)
    return pts[np.maximum(k, 0)]


class FfmpegDecoder:
    """The reference decoder: one ffmpeg process per request (seek, ``fps`` filter picking the frames, scale + crop,
    raw RGB over a pipe). `skip_unneeded`: decode only the pictures the requested frames need, the reference
    pictures nothing needed reads as stand-ins (`mambavl.extract.packet_plan`; bit-identical frames, less CPU);
    False decodes the whole window."""

    name = "ffmpeg"
    device = "cpu"

    def __init__(self, skip_unneeded: bool = True):
        self.skip_unneeded = skip_unneeded

    def frames(self, req: FrameRequest) -> DecodedFrames:
        """The frames at req.times in order (M <= U: fewer when the stream ends first) with the timestamps of the
        decoded frames the fps filter picked. DecodeError when ffmpeg fails or its decoder reports an error.

        At the end of the stream the fps filter rounds its end-of-stream time onto its own tick grid and may drop a
        tick that lies inside the last frame; such ticks are asked again one by one at a fine rate, which puts the
        end of the stream at least one tick after them."""
        got = self._decode(req)
        for margin in (0.5, 2.0, 8.0):
            # the first frame decoded is after the first requested time: the seek landed on a keyframe presented
            # after it (an open-GOP keyframe, decoded before the frames it precedes): seek further back
            landed = float(got.pts[0]) if len(got.pts) else math.nan
            if not landed > max(req.times[0], req.probe.start) + _TIME_EPS or req.first - 1.0 / req.probe.fps <= 0:
                break
            got = self._decode(req, ss=max(0.0, min(landed, req.first) - margin))
        while len(got.frames) < len(req.ticks):
            t = float(req.times[len(got.frames)])
            one = self._decode(dataclasses.replace(req, first=t, step=SINGLE_TICK_STEP, ticks=np.zeros(1, np.int64)))
            if not len(one.frames):
                break
            got = DecodedFrames(np.concatenate([got.frames, one.frames[:1]]), np.append(got.pts, one.pts[:1]))
        return got

    def _decode(self, req: FrameRequest, ss: float | None = None) -> DecodedFrames:
        path, probe = req.path, req.probe
        # One nominal frame of margin: some demuxers land a little after the requested seek point.
        ss = round(max(0.0, req.first - 1.0 / probe.fps) if ss is None else ss, 6)  # ffmpeg parses -ss to us
        options = {"threads": int(req.threads)} if req.threads else {}
        planned = packet_plan.plan(path, ss, req.times, stand_ins=True) if self.skip_unneeded else None
        stdin, copyts = None, False
        if planned and planned.stand_ins:  # the packets go through a pipe, with stand-ins (packet_plan)
            stdin, whole = packet_plan.stand_in_stream(path, planned, ss)
            stream = ffmpeg.input("pipe:", format="nut", itsoffset=f"-{whole}", nofind_stream_info=None, **options)
            copyts = True
        else:
            if planned:
                options["bsf:v"] = f"noise=drop='{planned.expression}'"
            stream = ffmpeg.input(str(path.resolve()), ss=f"{ss:.6f}", noaccurate_seek=None, **options)
        # showinfo logs the timestamp of every decoded frame: which frames the fps filter could pick
        stream = stream.filter("showinfo", **_SHOWINFO_OPTIONS) if _showinfo_checksum_option() else \
            stream.filter("showinfo")
        stream = stream.filter("fps", fps=repr(float(1.0 / req.step)), start_time=repr(float(req.first - ss)),
                               round="up")  # float(): numpy scalars repr as np.float64(...)
        if not np.array_equal(req.ticks, np.arange(len(req.ticks))):
            stream = stream.filter("select", "+".join(f"eq(n,{int(k)})" for k in req.ticks))
        if req.step == SINGLE_TICK_STEP:  # the fine rate repeats a frame many times: end the stream after the tick
            stream = stream.filter("trim", end_frame=1)
        stream = _scale_crop(stream, req.size, probe.sar, req.crops)
        out = stream.output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough",
                            **{"frames:v": len(req.ticks)})
        raw, log = _run(out.global_args("-copyts") if copyts else out, path, stdin=stdin, loglevel=_video_loglevel())
        frames = _frames(raw, req.size, req.crops)  # (M, S, S, 3) or (M, C, S, S, 3), M <= U
        decoded = parse_showinfo(log, ss)
        errors = decoder_errors(log)
        if errors:
            raise DecodeError(f"{path}: damaged video data: the decoder reported errors while decoding the window "
                              f"[{req.times[0]:.3f}, {req.times[-1]:.3f}] s (from the keyframe before it): {errors}")
        return DecodedFrames(frames, fps_filter_picks(decoded, req.times[:len(frames)]))


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
    start, stop = _check_window(path, start, stop, probe, "video")
    return _decode_grid(path, probe, _window_grid(start, stop, cfg), cfg.size, threads, decoder, cfg.spatial_crops)


def _check_window(path: Path, start: float, stop: float, probe: VideoProbe, what: str) -> tuple[float, float]:
    """[start, stop] clamped to the source (`probe`: its end and frame rate); DecodeError when the window is invalid,
    starts at or after the end, or reaches more than END_TOLERANCE_FRAMES frames past it."""
    if not (math.isfinite(start) and math.isfinite(stop)) or stop < start:
        raise DecodeError(f"{path}: invalid window [{start}, {stop}] s")
    if start >= probe.end:
        raise DecodeError(f"{path}: out of range: segment starts at {start:.3f}s, the {what} ends at "
                          f"{probe.end:.3f}s")
    if stop > probe.end + END_TOLERANCE_FRAMES / probe.fps:
        raise DecodeError(f"{path}: out of range: segment [{start:.3f}, {stop:.3f}]s ends {stop - probe.end:.3f}s "
                          f"({(stop - probe.end) * probe.fps:.0f} frames) past the end of the {what} at "
                          f"{probe.end:.3f}s (tolerance {END_TOLERANCE_FRAMES} frames)")
    return max(start, 0.0), min(stop, probe.end)


def _window_grid(start: float, stop: float, cfg: SamplingConfig) -> _Grid:
    """The sample grid of a window already clamped to its source."""
    grid = _grid(start, stop, cfg)
    if grid.step <= 1e-9:
        # a zero-length window: one tick, repeated (the fps filter needs a finite rate; a fine one, so that a tick
        # inside the last frame still lies a whole tick before the end of the stream)
        grid = _Grid(grid.first, SINGLE_TICK_STEP, 1, np.zeros(len(grid.picks), dtype=np.int64))
    return grid


def _decode_grid(path: Path, probe: VideoProbe, grid: _Grid, size: int, threads: int = 0,
                 decoder=None, crops: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The frames displayed at `grid.times` (seconds on the file's own timeline) of the video file `path`, and their
    start times: frames (F, size, size, 3) — (F, crops, size, size, 3) with 3 spatial crops — and times (F,). The
    window has been checked against `probe`."""
    ticks, inverse = np.unique(grid.picks, return_inverse=True)  # ticks (U,) sorted; picks = ticks[inverse]
    request = FrameRequest(path, probe, grid.first, grid.step, ticks, size, threads, crops)
    decoded = (decoder or DEFAULT_DECODER).frames(request)
    got = decoded.frames  # (M, S, S, 3) or (M, C, S, S, 3), M <= U
    tick_times = request.times  # (U,)
    pts = check_displayed(path, tick_times, decoded, probe)  # (M,)

    if len(got) < len(ticks):
        missing_t = float(tick_times[len(got)])
        if len(got) == 0:
            raise DecodeError(f"{path}: truncated or corrupt: decoding stopped after 0 of {len(ticks)} frames, "
                              f"before t={missing_t:.3f}s although the video is {probe.end:.3f}s long")
        # the fps filter stops at the end of the stream; a tick within the last frame is rounding, not damage
        if missing_t < probe.end - 1.5 / probe.fps:
            raise DecodeError(
                f"{path}: truncated or corrupt: decoding stopped after {len(got)} of {len(ticks)} frames, "
                f"before t={missing_t:.3f}s although the video is {probe.end:.3f}s long")
        inverse = np.minimum(inverse, len(got) - 1)  # the missing tail ticks show the last frame decoded
        pts = np.concatenate([pts, np.full(len(ticks) - len(got), pts[-1])])
    if not isinstance(got, np.ndarray):  # a torch tensor on the decoder's device
        frames = got[_as_index(inverse, got)]
    else:
        frames = got[inverse]  # (F, S, S, 3), a copy (fancy indexing), so writable
    times = np.where(np.isfinite(pts[inverse]), pts[inverse], _displayed_frame_start(grid.times, probe))  # (F,)
    return frames, times


_TIME_EPS = 1e-4  # seconds: timestamp comparisons (far below any frame's duration, above timebase rounding)


def check_displayed(path: Path, times: np.ndarray, decoded: DecodedFrames, probe: VideoProbe) -> np.ndarray:
    """The decoded frames' timestamps (M,), after checking that no returned frame starts after its requested time
    (a later frame standing in for frames that could not be decoded: ffmpeg's fps filter fills the ticks before the
    first frame it gets with that frame). DecodeError naming the time and the frame; NaN timestamps (unknown) are
    not checked, nor times before the video's first frame (which shows it). An earlier frame standing in for a lost
    one is caught by the decoder's own error report."""
    m = len(decoded.frames)
    pts = np.asarray(decoded.pts, dtype=np.float64)[:m]
    t = np.asarray(times, dtype=np.float64)[:m]
    later = np.flatnonzero((pts > t + _TIME_EPS) & (pts > probe.start + _TIME_EPS))
    if len(later):
        i = int(later[0])
        raise DecodeError(f"{path}: damaged video data: the frame decoded for t={t[i]:.3f}s is the frame of "
                          f"{pts[i]:.3f}s (a later one): the frames displayed at {t[i]:.3f}s could not be decoded")
    return pts


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
    out = _scale_crop(stream, cfg.size, crops=cfg.spatial_crops).output("pipe:", format="rawvideo", pix_fmt="rgb24",
                                                                        fps_mode="passthrough")
    got = _frames(_run(out, frame_dir, stdin=b"".join(blobs))[0], cfg.size, cfg.spatial_crops)  # (U, [C,] S, S, 3)
    if len(got) != len(unique):
        raise DecodeError(f"{frame_dir}: corrupt JPEG among frames {unique.tolist()}: ffmpeg returned "
                          f"{len(got)} of {len(unique)} frames")
    return got[inverse], frame_start(unique[inverse], rate)


# ------------------------------------------------------------------------------------------------ chunked videos
_CHUNK_NAME = re.compile(r"(\d+)(\.mp4)", re.IGNORECASE)  # <start second>.MP4


@dataclass(frozen=True)
class ChunkedVideo:
    """One video stored as consecutive chunks, the layout AVION and LaViLa re-encode EK-100 and Ego4D into:
    ``P01_01.MP4/0.MP4, 15.MP4, 30.MP4 …``, a folder named like the original file, each chunk named by the second of
    the original timeline it starts at (all but the last `chunk_seconds` long). Time t of the video lies in the chunk
    starting at s = floor(t / chunk_seconds) * chunk_seconds, t - s after the chunk's first frame (whose timestamp is
    usually 0). Any resolution and frame rate: each chunk is probed on its own."""

    folder: Path
    chunk_seconds: int | None   # None: a single chunk (0.MP4), whose length one name cannot tell
    starts: tuple[int, ...]     # start seconds of the chunks present, increasing
    names: tuple[str, ...]      # their file names, in the same order

    def describe(self) -> str:
        length = f"{self.chunk_seconds} s chunks" if self.chunk_seconds else "a single chunk"
        return f"chunked video {self.folder} ({length}, {len(self.starts)} present)"

    def chunk_start(self, times: np.ndarray) -> np.ndarray:
        """Start second of the chunk each time (seconds, original timeline) lies in. (F,) -> (F,) int"""
        if not self.chunk_seconds:
            return np.zeros(len(times), dtype=np.int64)
        # a time on a chunk boundary (up to float rounding) is the first frame of the later chunk
        return (np.floor(np.asarray(times, dtype=np.float64) / self.chunk_seconds + 1e-9).astype(np.int64)
                * self.chunk_seconds)

    def path(self, start: int) -> Path:
        """The chunk starting at `start` seconds; DecodeError naming the file when it is missing."""
        if start in self.starts:
            return self.folder / self.names[self.starts.index(start)]
        ext = Path(self.names[-1]).suffix
        raise DecodeError(f"{self.folder / f'{start}{ext}'}: missing chunk (the {self.describe()} has no chunk "
                          f"starting at {start}s; chunks present start at {_list_seconds(self.starts)})")


def _list_seconds(starts: tuple[int, ...], most: int = 8) -> str:
    shown = ", ".join(f"{s}s" for s in starts[:most])
    return shown + (f" … {starts[-1]}s" if len(starts) > most else "")


def scan_chunks(folder: str | os.PathLike, chunk_seconds: int | None = None) -> ChunkedVideo:
    """The chunks of a chunked video folder and their length: `chunk_seconds` when given, else read from the names
    (the smallest gap between start seconds). InputError naming the folder when the names are irregular (a start
    that is not a multiple of the chunk length) or disagree with `chunk_seconds`; DecodeError when the folder is
    missing or holds no chunk (a recorded failure). Cached per folder version."""
    folder = Path(folder)
    try:
        mtime = folder.stat().st_mtime_ns
    except OSError as exc:
        raise DecodeError(f"{folder}: missing chunked video folder ({exc.strerror})") from None
    return _scan_cached(str(folder), mtime, chunk_seconds)


@functools.lru_cache(maxsize=1024)
def _scan_cached(folder: str, mtime_ns: int, chunk_seconds: int | None) -> ChunkedVideo:
    found: dict[int, str] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            m = _CHUNK_NAME.fullmatch(entry.name)
            if m and entry.is_file():
                start = int(m.group(1))
                if start in found:
                    raise InputError(f"{folder}: two chunks start at {start}s ({found[start]}, {entry.name})")
                found[start] = entry.name
    if not found:
        raise DecodeError(f"{folder}: chunked video folder without chunks (no files named <start second>.MP4)")
    starts = tuple(sorted(found))
    named = int(min(np.diff(starts))) if len(starts) > 1 else None
    length = chunk_seconds if chunk_seconds is not None else named
    if length is not None and (length <= 0 or any(s % length for s in starts) or (named and named != length)):
        given = f"--chunk-seconds {chunk_seconds}" if chunk_seconds is not None else "chunk length"
        raise InputError(f"{folder}: chunk names (starting at {_list_seconds(starts)}) do not fit {given}"
                         + (f"; the names imply {named} s chunks" if named else "")
                         + ": chunks must be named by their start second, every chunk_seconds seconds")
    return ChunkedVideo(Path(folder), length, starts, tuple(found[s] for s in starts))


def decode_chunked_segment(folder: str | os.PathLike, start: float, stop: float, cfg: SamplingConfig,
                           chunk_seconds: int | None = None, threads: int = 0,
                           decoder=None) -> tuple[np.ndarray, np.ndarray]:
    """Frames of [start, stop] (seconds of the original video) of a chunked video folder (`ChunkedVideo`).

    The sample times are those of the whole window (as for one file); they are split by chunk, each part is decoded
    from its chunk at local times (same grid, shifted by the chunk's start) and the parts are joined in order, so a
    window across a boundary gets the same frames as from the original timeline. The video ends where the last chunk
    ends; a window past it (beyond END_TOLERANCE_FRAMES), a missing chunk, or a chunk ending before a time asked of
    it is a DecodeError naming the chunk. Returns frames (F, size, size, 3) and times (F,) on the original timeline.
    """
    video = scan_chunks(folder, chunk_seconds)
    last = video.path(video.starts[-1])
    last_probe = probe_video(last)
    whole = dataclasses.replace(last_probe, start=0.0, duration=video.starts[-1] + last_probe.duration)
    start, stop = _check_window(video.folder, start, stop, whole, f"last chunk ({last.name})")
    grid = _window_grid(start, stop, cfg)
    owner = video.chunk_start(grid.times)  # (F,) non-decreasing, as the picks are
    parts, times = [], []
    for chunk_start in np.unique(owner):
        chunk_start = int(chunk_start)
        path = video.path(chunk_start)
        probe = probe_video(path)
        # the chunk's first frame is shown at its start second (as AVION reads chunks, by frame index); its own
        # timestamps may start a little later (the B-frame delay of a first chunk cut without an edit list)
        shift = probe.start - chunk_start
        sub = _Grid(grid.first + shift, grid.step, grid.count, grid.picks[owner == chunk_start])
        if sub.times[-1] > probe.end + END_TOLERANCE_FRAMES / probe.fps:
            raise DecodeError(f"{path}: chunk is {probe.duration:.3f}s long, but the frame at "
                              f"{sub.times[-1] - shift:.3f}s of the video lies {sub.times[-1] - probe.start:.3f}s "
                              f"into it: {video.describe()} with a short chunk (or the wrong chunk length)")
        try:
            frames, local = _decode_grid(path, probe, sub, cfg.size, threads, decoder, cfg.spatial_crops)
        except DecodeError as exc:
            raise DecodeError(f"{exc} [chunk at {chunk_start}s of the {video.describe()}]") from None
        parts.append(frames)
        times.append(local - shift)
    if len(parts) == 1:
        return parts[0], times[0]
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts), np.concatenate(times)
    import torch

    return torch.cat(parts), np.concatenate(times)


def check_chunked_sources(root: str | os.PathLike, segments, chunk_seconds: int | None = None) -> None:
    """Read the chunk names of every chunked video the segments use, before anything is decoded: names that are
    irregular or disagree with `chunk_seconds` are an InputError naming the folder (bad input, not a row's failure).
    Missing videos are left to the rows' own recorded failures."""
    seen: set[str] = set()
    for s in segments:
        if s.video_id in seen:
            continue
        seen.add(s.video_id)
        try:
            kind, path = locate_source(root, s)
            if kind is SourceKind.CHUNKS:
                scan_chunks(path, chunk_seconds)
        except DecodeError:
            continue


# The annotation fields each layout builds source paths from, by annotation kind: (Segment attribute, CSV column).
PATH_FIELDS = {"ek100": (("video_id", "video_id"), ("participant_id", "participant_id")),
               "generic": (("video_id", "video"), ("participant_id", "participant"))}


def path_fragment_problem(value: str) -> str | None:
    """Why a path fragment from an annotation field could lead outside the video root (None: it cannot).

    Checked on the text, so nothing on the disk is touched: an absolute path, a ``..`` component, a NUL. Both ``/``
    and ``\\`` count as separators. Symbolic links under the root are not looked at (see `check_source_paths`)."""
    if "\0" in value:
        return "it holds a NUL character"
    parts = value.replace("\\", "/").split("/")
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        return "it is an absolute path"
    if ".." in parts:
        return "it has a '..' component"
    return None


def check_source_paths(annotations: str | os.PathLike, segments, kind: str, root: str | os.PathLike) -> None:
    """Refuse (InputError, naming file, row and field) any segment whose path fields could name a file outside
    `root`: absolute paths, ``..`` components. Run before anything is decoded or written.

    The rule is on the names the annotation file gives, not on where the file system leads: a symbolic link the
    user placed under the root (videos spread over several disks) is followed wherever it points."""
    for s in segments:
        for attr, column in PATH_FIELDS.get(kind, PATH_FIELDS["generic"]):
            value = getattr(s, attr)
            problem = path_fragment_problem(value) if value else None
            if problem:
                raise InputError(f"{annotations}: row {s.row}, field {column!r}: {value!r} would be read from outside "
                                 f"--videos {root} ({problem}); paths in an annotation file must stay under the "
                                 "video root")


def locate_source(root: str | os.PathLike, segment: Segment) -> tuple[SourceKind, Path]:
    """Where a segment's pixels live under `root`; the first existing of:

    ``root/P01/videos/P01_01.MP4`` (or .mp4), ``root/P01/rgb_frames/P01_01/``, ``root/P01_01.MP4`` (or .mp4),
    the chunk folders ``root/P01/P01_01.MP4/`` and ``root/P01_01.MP4/`` (AVION / LaViLa, `ChunkedVideo`),
    ``root/<video_id>`` (a file: video; a folder named like a video file: chunks; another folder: JPEG frames) —
    the last one is how generic CSVs name videos.
    A video_id or participant_id that could lead outside `root` (`path_fragment_problem`) is an InputError.
    """
    root = Path(root)
    vid = segment.video_id
    for name, value in (("video_id", vid), ("participant_id", segment.participant_id)):
        problem = path_fragment_problem(value) if value else None
        if problem:
            raise InputError(f"{segment.narration_id}: {name} {value!r} would be read from outside {root} "
                             f"({problem})")
    candidates: list[tuple[SourceKind, Path]] = []
    if "/" not in vid and os.sep not in vid:
        participant = segment.participant_id or vid.split("_")[0]
        candidates += [(SourceKind.VIDEO, root / participant / "videos" / f"{vid}{ext}") for ext in VIDEO_EXTENSIONS]
        candidates.append((SourceKind.FRAMES, root / participant / "rgb_frames" / vid))
        candidates += [(SourceKind.VIDEO, root / f"{vid}{ext}") for ext in VIDEO_EXTENSIONS]
        candidates += [(SourceKind.CHUNKS, root / participant / f"{vid}{ext}") for ext in VIDEO_EXTENSIONS]
        candidates += [(SourceKind.CHUNKS, root / f"{vid}{ext}") for ext in VIDEO_EXTENSIONS]
    direct = root / vid
    if not direct.is_dir():
        candidates.append((SourceKind.VIDEO, direct))
    else:  # a folder named like a video file holds its chunks; any other folder, JPEG frames
        chunked = direct.suffix.lower() in {e.lower() for e in VIDEO_EXTENSIONS}
        candidates.append((SourceKind.CHUNKS if chunked else SourceKind.FRAMES, direct))
    for kind, path in candidates:
        if (kind is SourceKind.VIDEO and path.is_file()) or (kind is not SourceKind.VIDEO and path.is_dir()):
            return kind, path
    tried = ", ".join(str(p) for _, p in candidates)
    raise DecodeError(f"{direct}: missing: no video or frame folder for {vid!r} (looked for {tried})")


def decode_segment(root: str | os.PathLike, segment: Segment, start: float, stop: float, cfg: SamplingConfig,
                   frame_rate: float | None = None, threads: int = 0, decoder=None,
                   chunk_seconds: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frames of [start, stop] seconds of `segment`'s video, from whichever layout `root` holds.

    A video file is decoded by its own timestamps. A JPEG folder needs its numbering rate `frame_rate` (frames/s;
    `AnnotationSet.frame_rate` gives it): the annotated start/stop frames are used as they are when the window is
    the segment itself, other windows (anticipation) map seconds to frames at that rate. Returns frames uint8
    (F, size, size, 3) and times float64 (F,) in seconds. `threads`: ffmpeg's decoder threads for video files (0 =
    ffmpeg's default). `decoder`: the video decoder (`decode_video_segment`); frame folders are always read by
    ffmpeg on the CPU. A chunk folder is read by `decode_chunked_segment`, with chunks `chunk_seconds` long (None:
    read from the chunk names).
    """
    kind, path = locate_source(root, segment)
    if kind is SourceKind.VIDEO:
        return decode_video_segment(path, start, stop, cfg, threads, decoder)
    if kind is SourceKind.CHUNKS:
        return decode_chunked_segment(path, start, stop, cfg, chunk_seconds, threads, decoder)
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
