"""Decode the frames of one segment with ffmpeg (through ffmpeg-python), frame-exactly.

Which frames: the requested times (uniform bins or a fixed rate) are mapped to frame numbers — the frame shown at
time t is number floor(t * fps) (0-based; the frame whose display interval contains t) — and ffmpeg itself picks
those frames with a `select` filter, scales the short side and centre-crops, and pipes raw RGB. Python never sees
a full-resolution frame. The input is seeked (`-ss` before `-i`, which ffmpeg makes frame-accurate when
transcoding) to half a frame before the first wanted frame, so frame counting after the seek is exact.

Two EK-100 layouts are read: ``ROOT/P01/videos/P01_01.MP4`` and ``ROOT/P01/rgb_frames/P01_01/frame_0000000001.jpg``
(1-based frame numbers, fps from EPIC_100_video_info.csv). Videos are probed with PyAV, never by parsing logs.
Frame times assume a constant frame rate starting at 0 (true of EK-100 and of ffmpeg-written files).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import ffmpeg
import numpy as np


class DecodeError(RuntimeError):
    """A segment could not be decoded; the message names the file and the reason."""


class SamplingMode(str, Enum):
    UNIFORM = "uniform"
    FPS = "fps"


@dataclass
class SamplingConfig:
    """UNIFORM: `num_frames` frames at the centres of equal bins. FPS: frames every 1/fps s, at most `num_frames`
    (uniformly sub-selected when the segment is longer). Output frames are size x size RGB."""

    mode: SamplingMode = SamplingMode.UNIFORM
    num_frames: int = 16
    fps: float = 4.0
    size: int = 224

    def __post_init__(self) -> None:
        self.mode = SamplingMode(self.mode)
        if self.num_frames < 1 or self.size < 8 or self.fps <= 0:
            raise ValueError("sampling needs num_frames >= 1, size >= 8 and fps > 0")


@dataclass(frozen=True)
class VideoProbe:
    duration: float
    fps: float
    width: int
    height: int


@functools.lru_cache(maxsize=1)
def ffmpeg_binary() -> str:
    """The system ffmpeg when on PATH, else the static binary shipped in the imageio-ffmpeg wheel."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@functools.lru_cache(maxsize=256)
def _probe_cached(path: str, mtime: float, size: int) -> VideoProbe:
    import av

    if size == 0:
        raise DecodeError(f"{path}: empty file (0 bytes)")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate:
                raise DecodeError(f"{path}: unknown frame rate")
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            else:
                duration = float("nan")
            return VideoProbe(duration, float(rate), int(stream.codec_context.width),
                              int(stream.codec_context.height))
    except DecodeError:
        raise
    except Exception as exc:  # PyAV raises its own error family for corrupt/truncated files
        raise DecodeError(f"{path}: cannot open video ({type(exc).__name__}: {exc})") from exc


def probe_video(path: str | os.PathLike) -> VideoProbe:
    """Duration (s), frame rate, width and height of the first video stream (PyAV)."""
    path = Path(path)
    if not path.is_file():
        raise DecodeError(f"{path}: video file not found")
    st = path.stat()
    return _probe_cached(str(path), st.st_mtime, st.st_size)


def sample_times(start: float, stop: float, cfg: SamplingConfig) -> np.ndarray:
    """(F,) times in seconds to sample from [start, stop] (see SamplingConfig)."""
    length = max(stop - start, 0.0)
    if cfg.mode == SamplingMode.UNIFORM:
        n = cfg.num_frames
        return start + (np.arange(n) + 0.5) * (length / n)
    count = max(1, int(math.floor(length * cfg.fps)))
    times = start + (np.arange(count) + 0.5) / cfg.fps
    if count > cfg.num_frames:  # cap: keep num_frames of them, uniformly spread
        keep = np.floor((np.arange(cfg.num_frames) + 0.5) * count / cfg.num_frames).astype(int)
        times = times[keep]
    return times


def anticipation_window(start: float, tau_a: float = 1.0, tau_o: float = 2.0) -> tuple[float, float]:
    """The observed window [start - tau_a - tau_o, start - tau_a] that ends tau_a s before the action starts
    (EK-100 anticipation), clipped at 0. Raises DecodeError when nothing of it lies inside the video."""
    stop = start - tau_a
    if stop <= 0:
        raise DecodeError(f"anticipation window ends at {stop:.2f}s, before the video starts (action at {start:.2f}s)")
    return max(0.0, stop - tau_o), stop


def _scale_crop(stream, size: int):
    # scale the short side to `size` (even long side), then centre-crop a square
    stream = stream.filter("scale", f"if(gt(iw,ih),-2,{size})", f"if(gt(iw,ih),{size},-2)", flags="bicubic")
    return stream.filter("crop", size, size)


def _run_select(make_input, frame_numbers: np.ndarray, first: int, size: int, source: str) -> np.ndarray:
    """Run ffmpeg picking frames `frame_numbers` (sorted unique, counted from the first decoded frame `first`)."""
    expr = "+".join(f"eq(n,{int(k - first)})" for k in frame_numbers)
    stream = make_input().video.filter("select", expr)
    stream = _scale_crop(stream, size)
    cmd = (
        stream.output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough",
                      frames=len(frame_numbers))
        .global_args("-nostdin", "-loglevel", "error")
        .compile(cmd=ffmpeg_binary())
    )
    proc = subprocess.run(cmd, capture_output=True)
    frame_bytes = size * size * 3
    got = len(proc.stdout) // frame_bytes
    if proc.returncode != 0 and got == 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise DecodeError(f"{source}: ffmpeg failed ({'; '.join(tail) or f'exit {proc.returncode}'})")
    if got == 0:
        raise DecodeError(f"{source}: no frames decoded in the requested range")
    return np.frombuffer(proc.stdout[: got * frame_bytes], dtype=np.uint8).reshape(got, size, size, 3)


def _gather(frames: np.ndarray, unique: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    # frames[j] is unique[j] (fewer when the video ended early: later requests reuse the last decoded frame)
    pos = np.searchsorted(unique, wanted)
    return frames[np.minimum(pos, len(frames) - 1)]


def decode_video_segment(path: str | os.PathLike, start: float, stop: float,
                         cfg: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Frames (F, size, size, 3) uint8 RGB and their times (F,) float64 for [start, stop] of a video file."""
    path = Path(path)
    probe = probe_video(path)
    times = sample_times(start, stop, cfg)
    last = int(math.floor(probe.duration * probe.fps)) - 1 if math.isfinite(probe.duration) else None
    wanted = np.floor(times * probe.fps + 1e-6).astype(np.int64)  # frame shown at t
    if last is not None:
        if wanted[0] > last:
            raise DecodeError(f"{path}: segment starts at {start:.2f}s, after the video's end ({probe.duration:.2f}s)")
        wanted = np.minimum(wanted, last)
    unique = np.unique(wanted)
    first = int(unique[0])
    seek = max(0.0, (first - 0.5) / probe.fps)
    make_input = lambda: ffmpeg.input(str(path), ss=f"{seek:.6f}")  # noqa: E731
    frames = _run_select(make_input, unique, first, cfg.size, str(path))
    out = _gather(frames, unique, wanted)
    return out, _gather(unique / probe.fps, unique, wanted).astype(np.float64)


def frame_path(frame_dir: str | os.PathLike, number: int) -> Path:
    """EK-100 rgb_frames file name of 1-based frame `number`."""
    return Path(frame_dir) / f"frame_{number:010d}.jpg"


def decode_frame_dir_segment(frame_dir: str | os.PathLike, start_frame: int, stop_frame: int, fps: float,
                             cfg: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """The same for a folder of JPEG frames: frames of [start_frame, stop_frame] (1-based), times = (k-1)/fps."""
    frame_dir = Path(frame_dir)
    if not frame_dir.is_dir():
        raise DecodeError(f"{frame_dir}: frame folder not found")
    start, stop = (start_frame - 1) / fps, stop_frame / fps
    times = sample_times(start, stop, cfg)
    wanted = np.clip(np.floor(times * fps + 1e-6).astype(np.int64) + 1, start_frame, stop_frame)  # 1-based
    unique = np.unique(wanted)
    missing = [int(k) for k in unique if not frame_path(frame_dir, int(k)).is_file()]
    if missing:
        raise DecodeError(f"{frame_path(frame_dir, missing[0])}: frame file not found")
    first = int(unique[0])
    pattern = str(frame_dir / "frame_%010d.jpg")
    make_input = lambda: ffmpeg.input(pattern, format="image2", start_number=first, framerate=fps)  # noqa: E731
    frames = _run_select(make_input, unique, first, cfg.size, str(frame_dir))
    return _gather(frames, unique, wanted), _gather((unique - 1) / fps, unique, wanted).astype(np.float64)


def locate_source(root: str | os.PathLike, video_id: str, participant_id: str = "") -> tuple[str, Path]:
    """("video", file) or ("frames", folder) for a segment's video under `root`.

    Looks for ROOT/P01/videos/P01_01.MP4 (any case of the extension), ROOT/P01/rgb_frames/P01_01/,
    ROOT/P01_01.MP4, and ROOT/<video_id> as a relative path (generic clip CSVs)."""
    root = Path(root)
    pid = participant_id or video_id.split("_")[0]
    candidates = []
    for ext in ("MP4", "mp4", "mkv", "avi", "webm", "mov"):
        candidates.append(root / pid / "videos" / f"{video_id}.{ext}")
        candidates.append(root / f"{video_id}.{ext}")
    for c in candidates:
        if c.is_file():
            return "video", c
    for d in (root / pid / "rgb_frames" / video_id, root / "rgb_frames" / video_id):
        if d.is_dir():
            return "frames", d
    direct = root / video_id
    if direct.is_file():
        return "video", direct
    if direct.is_dir():
        return "frames", direct
    raise DecodeError(f"video {video_id!r} not found under {root} (looked for {pid}/videos/{video_id}.MP4, "
                      f"{pid}/rgb_frames/{video_id}/ and {video_id})")


def decode_segment(root: str | os.PathLike, segment, start: float, stop: float, cfg: SamplingConfig,
                   video_info: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode [start, stop] seconds of `segment`'s video (either layout). Frame folders need the fps: from
    `video_info` (EPIC_100_video_info.csv) when listed there, else the EK-100 default of 50 fps is NOT assumed —
    a missing fps is an error."""
    kind, where = locate_source(root, segment.video_id, segment.participant_id)
    if kind == "video":
        return decode_video_segment(where, start, stop, cfg)
    info = (video_info or {}).get(segment.video_id)
    if info is None:
        raise DecodeError(f"{where}: frame folder needs the video's fps (add it to EPIC_100_video_info.csv)")
    first = max(1, int(math.floor(start * info.fps)) + 1)
    last = max(first, int(math.ceil(stop * info.fps)))
    n_avail = len(list(Path(where).glob("frame_*.jpg")))
    last = min(last, n_avail) if n_avail else last
    if first > last:
        raise DecodeError(f"{where}: segment starts after the last frame ({n_avail} frames)")
    return decode_frame_dir_segment(where, first, last, info.fps, cfg)
