"""One contract for every video decoder (mambavl.extract.backends): the same frames for the same request, the same
failures. Each case runs against every decoder; those this machine cannot run skip with the reason.

torchcodec needs FFmpeg shared libraries: run with
LD_LIBRARY_PATH=$(python -m mambavl.extract.backends ffmpeg-libs /tmp/ffmpeg-libs) to exercise it where the system
has none. The CUDA decoder is marked `gpu` (scripts/gpu-check.sh runs those tests).
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from mambavl.data.media import ffmpeg_binary
from mambavl.data.synthetic import make_timestamp_video, read_timestamp_code
from mambavl.extract.backends import (
    PIXEL_TOLERANCE, DecoderKind, build_decoder, crop_box, resize_crop,
)
from mambavl.extract.decode import DecodeError, SamplingConfig, SamplingMode, decode_video_segment, sample_times

FPS = 25.0
def as_numpy(frames):
    return frames.cpu().numpy() if isinstance(frames, torch.Tensor) else frames


@pytest.fixture(scope="module")
def ts_video(tmp_path_factory):
    return make_timestamp_video(tmp_path_factory.mktemp("dec") / "ts.mp4", duration=4.0, fps=FPS)


@pytest.mark.parametrize("cfg", [SamplingConfig(num_frames=8, size=32),
                                 SamplingConfig(mode=SamplingMode.FPS, fps=10, num_frames=12, size=32)])
@pytest.mark.parametrize("start,stop", [(1.03, 2.71), (0.0, 0.3), (3.5, 3.99), (0.0, 4.0), (2.0, 2.02)])
def test_frame_exact(decoder, ts_video, cfg, start, stop):
    frames, times = decode_video_segment(ts_video, start, stop, cfg, decoder=decoder)
    frames = as_numpy(frames)
    requested = sample_times(start, stop, cfg)
    assert frames.shape == (len(requested), cfg.size, cfg.size, 3) and frames.dtype == np.uint8
    codes = np.array([read_timestamp_code(f) for f in frames])
    assert np.array_equal(codes, np.floor(requested * FPS + 1e-6).astype(int))


def _clip(path, extra_in=(), extra_vf="", extra_out=(), size="160x96", seconds=3):
    vf = "noise=alls=4:allf=t" + extra_vf
    subprocess.run([ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-y", *extra_in, "-f", "lavfi", "-i",
                    f"testsrc2=size={size}:rate=30:duration={seconds}", "-vf", vf, "-c:v", "libx264", "-pix_fmt",
                    "yuv420p", "-bf", "2", "-g", "30", *extra_out, str(path)], check=True, capture_output=True)
    return path


@pytest.mark.parametrize("kind", ["plain", "vfr", "rotated", "portrait"])
def test_same_pixels_as_ffmpeg_within_tolerance(decoder, tmp_path, kind):
    if kind == "vfr":
        path = _clip(tmp_path / "vfr.mp4", extra_vf=",select='not(eq(mod(n\\,5)\\,2))'", extra_out=("-fps_mode", "vfr"))
    elif kind == "rotated":  # a display matrix: ffmpeg rotates on decode
        path = _clip(tmp_path / "r.mp4")
        rotated = tmp_path / "rot.mp4"
        subprocess.run([ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-y", "-display_rotation", "90", "-i",
                        str(path), "-c", "copy", str(rotated)], check=True, capture_output=True)
        path = rotated
    elif kind == "portrait":
        path = _clip(tmp_path / "p.mp4", size="96x160")
    else:
        path = _clip(tmp_path / "plain.mp4")
    cfg = SamplingConfig(num_frames=6, size=48)
    ref_dec = build_decoder("ffmpeg")
    for start, stop in ((0.0, 3.0), (0.41, 1.77)):
        ref = decode_video_segment(path, start, stop, cfg, decoder=ref_dec)[0]
        got = as_numpy(decode_video_segment(path, start, stop, cfg, decoder=decoder)[0])
        assert got.shape == ref.shape
        assert np.abs(got.astype(np.int16) - ref.astype(np.int16)).mean() <= PIXEL_TOLERANCE, (kind, start, stop)


def test_failures_are_the_same(decoder, tmp_path, ts_video):
    truncated = tmp_path / "trunc.mp4"
    truncated.write_bytes(ts_video.read_bytes()[: 3000])
    with pytest.raises(DecodeError, match="trunc.mp4"):
        decode_video_segment(truncated, 0, 1, SamplingConfig(num_frames=4, size=16), decoder=decoder)
    with pytest.raises(DecodeError, match="out of range"):
        decode_video_segment(ts_video, 10.0, 11.0, SamplingConfig(num_frames=4, size=16), decoder=decoder)
    with pytest.raises(DecodeError, match="past the end"):
        decode_video_segment(ts_video, 3.0, 5.0, SamplingConfig(num_frames=4, size=16), decoder=decoder)
    # within the end tolerance: clamped, not a failure
    frames, _ = decode_video_segment(ts_video, 3.5, 4.05, SamplingConfig(num_frames=4, size=16), decoder=decoder)
    assert len(frames) == 4


def test_crop_geometry_matches_ffmpeg():
    assert crop_box(1920, 1080, 224) == (398, 224, 87, 0)
    assert crop_box(1080, 1920, 224) == (224, 398, 0, 87)
    x = torch.zeros(2, 3, 90, 160, dtype=torch.uint8)
    assert resize_crop(x, 32).shape == (2, 32, 32, 3)


def test_unknown_decoder_is_an_input_error():
    from mambavl.errors import InputError

    with pytest.raises(InputError, match="--decoder 'nvdec'"):
        build_decoder("nvdec")
    assert DecoderKind("auto") is DecoderKind.AUTO


def test_extraction_records_its_decoder(decoder, tmp_path):
    """Extraction through each decoder: every segment stored, the decoder named in the cache attrs, features of the
    decoders close (the same frames; pixels within tolerance)."""
    import h5py

    from mambavl.cache.build import ExtractConfig, run_extraction
    from mambavl.data.synthetic import make_kitchen_dataset
    from mambavl.extract.encoders import EncoderConfig, build_encoder

    kit = make_kitchen_dataset(tmp_path / "k", n_train=4, n_val=0, n_test=0, segments_per_video=4)
    enc = build_encoder(EncoderConfig(model="mambavl-tiny-clip", pretrained="none", device="cpu"))
    summary = run_extraction(ExtractConfig(annotations=str(kit.train_csv), videos=str(kit.videos),
                                           out=str(tmp_path / "c.h5"), encoder=enc.cfg,
                                           sampling=SamplingConfig(num_frames=4, size=64), decoder=decoder.name),
                             encoder=enc)
    assert summary.done == 4 and summary.failed == 0
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert f.attrs["decoder"] == decoder.name
