"""Video decoders behind one contract: `mambavl extract --decoder ffmpeg|torchcodec|torchcodec-cuda|auto`.

Every decoder answers the same `mambavl.extract.decode.FrameRequest` (the frames displayed at the requested times,
scaled to square pixels with the short side `size`, centre-cropped to size x size) with a
`mambavl.extract.decode.DecodedFrames` (the frames and their own timestamps), and `decode_video_segment` applies the
same checks to all of them (window range, truncation, the end tolerance, no frame later than its time), so failures
are recorded the same way.

* ``ffmpeg`` — the reference: an ffmpeg process per segment (`FfmpegDecoder`), only the packets the samples need.
* ``torchcodec`` — torchcodec's in-process FFmpeg decoder on the CPU (``seek_mode="exact"``,
  ``get_frames_played_at``: the same "frame displayed at t" rule), then a bicubic antialiased resize and the same
  crop in torch.
* ``torchcodec-cuda`` — the same on the GPU's video decoder (NVDEC); frames stay on the GPU, are resized there and
  handed to the encoder without a trip through host memory.
* ``auto`` — ``torchcodec-cuda`` when CUDA, torchcodec and NVDEC are present *and* a start-up check decodes a
  generated clip to the same frames as ``ffmpeg`` (within the tolerance below); ``ffmpeg`` otherwise.

Tolerance. The frames picked are identical (frame-exact); the pixels differ by the scalers only (ffmpeg scales the
YUV planes with swscale's bicubic, torchcodec converts to RGB first and torch resizes): mean |difference| at most
`PIXEL_TOLERANCE` grey levels of 255 (tests/test_decoders.py; measured ~6 on noisy synthetic test patterns, the
worst case for scaler differences: sharp edges everywhere).

torchcodec needs FFmpeg's shared libraries (versions 4 to 9). Where the system has none, PyAV's bundled copy
(FFmpeg 8) serves: ``python -m mambavl.extract.backends ffmpeg-libs DIR`` links it under standard names into DIR and
prints the ``LD_LIBRARY_PATH`` to start Python with.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import tempfile
import threading
from collections import OrderedDict
from enum import Enum
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mambavl.data.media import ffmpeg_binary
from mambavl.errors import InputError
from mambavl.extract.decode import (
    DecodedFrames, DecodeError, FfmpegDecoder, FrameRequest, SamplingConfig, decode_video_segment,
)

PIXEL_TOLERANCE = 8.0  # mean |difference| in grey levels between decoders' frames for the same request


class DecoderKind(str, Enum):
    FFMPEG = "ffmpeg"
    TORCHCODEC = "torchcodec"
    TORCHCODEC_CUDA = "torchcodec-cuda"
    AUTO = "auto"


def torchcodec_problem(device: str = "cpu") -> str | None:
    """Why torchcodec cannot decode on `device` here (a sentence), or None when it can."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
        from torchcodec._internally_replaced_utils import load_core_libraries

        load_core_libraries()
    except Exception as exc:  # ImportError, or torchcodec's RuntimeError when no FFmpeg shared libraries load
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"torchcodec unusable ({first}); see `python -m mambavl.extract.backends ffmpeg-libs`"
    return None


def crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """ffmpeg's geometry for `_scale_crop`: the scaled size (short side `size`, the other rounded to nearest as
    av_rescale does) and the crop's top-left corner ((in - out) / 2, truncated, as ffmpeg's crop filter computes it;
    measured to match its output best). Returns (scaled_w, scaled_h, x, y)."""
    if width > height:
        sw, sh = int(math.floor(width * size / height + 0.5)), size
    else:
        sw, sh = size, int(math.floor(height * size / width + 0.5))
    x, y = (sw - size) // 2, (sh - size) // 2
    return sw, sh, x, y


def resize_crop(frames: torch.Tensor, size: int, sar: float = 1.0) -> torch.Tensor:
    """uint8 (N, 3, H, W) on any device -> uint8 (N, size, size, 3): ffmpeg's geometry (`crop_box`) on the displayed
    picture (width W * `sar`: non-square pixels are scaled to square ones in the same resize), bicubic antialiased
    resize in float32, on the frames' own device."""
    n, _, h, w = frames.shape
    sw, sh, x, y = crop_box(w * sar if abs(sar - 1.0) >= 1e-9 else w, h, size)
    out = F.interpolate(frames.float(), size=(sh, sw), mode="bicubic", align_corners=False, antialias=True)
    out = out[..., y:y + size, x:x + size].round_().clamp_(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).contiguous()  # (N, S, S, 3)


def frame_sar(probe_sar: float, probe_wh: tuple[int, int], frame_wh: tuple[int, int]) -> float:
    """The pixel aspect ratio of decoded frames of size `frame_wh`: the probed one, inverted when the decoder
    rotated the picture by 90 degrees (the frames' width and height are the stream's swapped)."""
    if frame_wh != probe_wh and frame_wh == probe_wh[::-1]:
        return 1.0 / probe_sar
    return probe_sar


class TorchcodecDecoder:
    """torchcodec on the CPU or on CUDA (NVDEC). Decoders are kept open per thread and file (an exact-seek decoder
    scans the file's packets once when opened), so segments of one video in order share one."""

    def __init__(self, device: str = "cpu", cache_per_thread: int = 2):
        problem = torchcodec_problem(device)
        if problem:
            raise InputError(f"decoder torchcodec on {device}: {problem}")
        self.device = device
        self.name = DecoderKind.TORCHCODEC_CUDA.value if device.startswith("cuda") else DecoderKind.TORCHCODEC.value
        self._local = threading.local()
        self._cache_size = cache_per_thread

    def _decoder(self, path: Path, threads: int):
        from torchcodec.decoders import VideoDecoder

        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = OrderedDict()
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        kwargs = {"num_ffmpeg_threads": int(threads)} if threads and not self.device.startswith("cuda") else {}
        dec = VideoDecoder(key[0], device=self.device, seek_mode="exact", **kwargs)
        cache[key] = dec
        while len(cache) > self._cache_size:
            cache.popitem(last=False)
        return dec

    def frames(self, req: FrameRequest) -> DecodedFrames:
        """uint8 (M, size, size, 3) on this decoder's device, M <= U (fewer when the stream ends first), with the
        timestamps torchcodec reports for the frames it returned (container timeline)."""
        try:
            dec = self._decoder(req.path, req.threads)
            meta = dec.metadata
            begin = float(meta.begin_stream_seconds or 0.0)
            end = float(meta.end_stream_seconds) if meta.end_stream_seconds is not None else math.inf
            # container timeline -> the stream's own timestamps; a frame starting exactly at a requested time is the
            # one displayed then (ffmpeg's fps filter rounds up), which float rounding must not move to the previous
            seconds = req.times - req.probe.start + begin + 1e-6
            seconds = seconds[seconds < end]  # increasing: the decodable ones are a prefix
            if not len(seconds):
                empty = torch.zeros((0, req.size, req.size, 3), dtype=torch.uint8, device=self.device)
                return DecodedFrames(empty, np.zeros(0))
            batch = dec.get_frames_played_at(seconds=seconds.tolist())
        except (RuntimeError, ValueError, IndexError) as exc:
            raise DecodeError(f"{req.path}: {self.name} failed (corrupt or unsupported file): "
                              f"{str(exc).strip()[:300]}") from None
        pts = batch.pts_seconds.double().cpu().numpy() - begin + req.probe.start  # (M,) container timeline
        h, w = batch.data.shape[-2:]
        sar = frame_sar(req.probe.sar, (req.probe.width, req.probe.height), (int(w), int(h)))
        return DecodedFrames(resize_crop(batch.data, req.size, sar), pts)


def build_decoder(kind: DecoderKind | str):
    """The decoder for a --decoder choice (`auto`: see `auto_decoder`). InputError when it cannot work here."""
    try:
        kind = DecoderKind(kind)
    except ValueError:
        raise InputError(f"--decoder {kind!r}: not one of {', '.join(k.value for k in DecoderKind)}") from None
    if kind is DecoderKind.FFMPEG:
        return FfmpegDecoder()
    if kind is DecoderKind.TORCHCODEC:
        return TorchcodecDecoder("cpu")
    if kind is DecoderKind.TORCHCODEC_CUDA:
        return TorchcodecDecoder("cuda")
    return auto_decoder()[0]


@functools.lru_cache(maxsize=1)
def auto_decoder():
    """(decoder, reason): the hardware decoder when present and verified on a generated clip, else ffmpeg."""
    problem = torchcodec_problem("cuda")
    if problem:
        return FfmpegDecoder(), f"ffmpeg (hardware decoder not used: {problem})"
    try:
        gpu = TorchcodecDecoder("cuda")
        with tempfile.TemporaryDirectory() as d:
            diff = verify_decoder(gpu, Path(d))
    except (DecodeError, InputError, RuntimeError, OSError) as exc:
        return FfmpegDecoder(), f"ffmpeg (torchcodec-cuda failed its start-up check: {exc})"
    if diff is None:
        return gpu, "torchcodec-cuda (verified against ffmpeg at start-up)"
    return FfmpegDecoder(), f"ffmpeg (torchcodec-cuda frames differ from ffmpeg's: {diff})"


def verify_decoder(decoder, workdir: Path) -> str | None:
    """Decode a generated H.264 clip (256x144, B-frames) with `decoder` and with ffmpeg; None when they agree within
    PIXEL_TOLERANCE on every request, else what differs."""
    clip = workdir / "verify.mp4"
    subprocess.run([ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=256x144:rate=30:duration=2", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-bf", "2",
                    "-g", "15", str(clip)], check=True, capture_output=True)
    cfg = SamplingConfig(num_frames=8, size=64)
    ref_dec = FfmpegDecoder()
    for start, stop in ((0.0, 2.0), (0.55, 1.35)):
        ref = decode_video_segment(clip, start, stop, cfg, decoder=ref_dec)[0]
        got = decode_video_segment(clip, start, stop, cfg, decoder=decoder)[0]
        got = got.cpu().numpy() if isinstance(got, torch.Tensor) else got
        diff = float(np.abs(ref.astype(np.int16) - got.astype(np.int16)).mean()) if got.shape == ref.shape else math.inf
        if diff > PIXEL_TOLERANCE:
            return f"mean |difference| {diff:.2f} grey levels on [{start}, {stop}] s (tolerance {PIXEL_TOLERANCE})"
    return None


def link_pyav_ffmpeg(directory: str | os.PathLike) -> Path:
    """Link PyAV's bundled FFmpeg libraries into `directory` under their standard names (libavcodec.so.62 ...), so
    that torchcodec finds them with LD_LIBRARY_PATH=`directory`:<PyAV's library folder>. Returns `directory`."""
    import av

    libs = Path(av.__file__).resolve().parent.parent / "av.libs"
    if not libs.is_dir():
        raise InputError(f"no bundled FFmpeg libraries beside PyAV ({libs} missing)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for lib in libs.iterdir():
        stem = lib.name.split("-")[0]  # libavcodec-5e6b81c2.so.62.28.102 -> libavcodec
        if stem in ("libavcodec", "libavformat", "libavutil", "libavfilter", "libavdevice", "libswscale",
                    "libswresample") and ".so." in lib.name:
            major = lib.name.split(".so.")[1].split(".")[0]
            link = out / f"{stem}.so.{major}"
            link.unlink(missing_ok=True)
            link.symlink_to(lib)
    return out


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "ffmpeg-libs":
        import av

        out = link_pyav_ffmpeg(argv[1])
        print(f"{out.resolve()}:{Path(av.__file__).resolve().parent.parent / 'av.libs'}")
        return 0
    print("usage: python -m mambavl.extract.backends ffmpeg-libs DIR   (prints the LD_LIBRARY_PATH for torchcodec)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
