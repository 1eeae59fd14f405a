"""Decoding only the packets the samples need (mambavl.extract.packet_plan) gives bit-identical frames to the plain
decode of the whole window, on H.264 streams of several structures; and the plan does leave packets out."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from mambavl.data.media import ffmpeg_binary
from mambavl.extract import packet_plan
from mambavl.extract.decode import FfmpegDecoder, SamplingConfig, SamplingMode, decode_video_segment, probe_video

# x264 settings per stream kind: GOP 60 at 59.94 fps (a keyframe a second, as camera footage has)
KINDS = {
    "bframes_gop60": ["-preset", "superfast", "-bf", "2", "-g", "60", "-keyint_min", "60", "-sc_threshold", "0"],
    "pyramid_3refs": ["-preset", "medium", "-bf", "3", "-b_strategy", "0", "-refs", "3", "-g", "60",
                      "-keyint_min", "60", "-sc_threshold", "0", "-x264-params", "b-pyramid=normal"],
    "all_p": ["-preset", "superfast", "-bf", "0", "-g", "60", "-keyint_min", "60", "-sc_threshold", "0"],
    "open_gop": ["-preset", "superfast", "-bf", "3", "-g", "60", "-keyint_min", "60", "-sc_threshold", "0",
                 "-x264-params", "open-gop=1"],
    "short_gop": ["-preset", "superfast", "-bf", "2", "-g", "12"],
}
SECONDS = 5.0


def make_stream(path, kind: str, vfr: bool = False):
    vf = "noise=alls=8:allf=t"
    if vfr:  # drop every 7th frame and keep the timestamps: a variable frame rate
        vf += ",select='not(eq(mod(n\\,7)\\,3))'"
    cmd = [ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
           f"testsrc2=size=160x90:rate=60000/1001:duration={SECONDS}", "-vf", vf, "-c:v", "libx264",
           "-pix_fmt", "yuv420p", *KINDS[kind], *(["-fps_mode", "vfr"] if vfr else []), str(path)]
    subprocess.run(cmd, check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    out = {k: make_stream(d / f"{k}.mp4", k) for k in KINDS}
    out["vfr_bframes"] = make_stream(d / "vfr.mp4", "bframes_gop60", vfr=True)
    return out


WINDOWS = [(0.0, SECONDS), (0.3, 3.7), (1.02, 1.5), (2.9, 3.15), (0.51, 4.48), (4.2, SECONDS), (2.0, 2.0)]
CONFIGS = [SamplingConfig(num_frames=16, size=32), SamplingConfig(num_frames=4, size=24),
           SamplingConfig(mode=SamplingMode.FPS, fps=4, num_frames=8, size=32)]


@pytest.mark.parametrize("kind", list(KINDS) + ["vfr_bframes"])
def test_planned_decode_is_bit_identical(streams, kind):
    path = streams[kind]
    plain, planned = FfmpegDecoder(skip_unneeded=False), FfmpegDecoder(skip_unneeded=True)
    for start, stop in WINDOWS:
        for cfg in CONFIGS:
            a, ta = decode_video_segment(path, start, stop, cfg, decoder=plain)
            b, tb = decode_video_segment(path, start, stop, cfg, decoder=planned)
            assert a.shape == b.shape and np.array_equal(a, b), (kind, start, stop, cfg)
            assert np.array_equal(ta, tb)


@pytest.mark.parametrize("kind,what", [("bframes_gop60", "eq(pos"), ("all_p", "between(pos"),
                                       ("pyramid_3refs", "(pos,"), ("vfr_bframes", "eq(pos")])
def test_plan_leaves_packets_out(streams, kind, what):
    """Non-reference pictures are left out one by one (eq), runs before a keyframe between samples as ranges."""
    times = np.array([0.5, 1.5, 2.5, 3.5])  # a keyframe (IDR) every second lies between the samples
    expr = packet_plan.drop_expression(streams[kind], 0.4, times)
    assert expr is not None and what in expr


def test_no_plan_for_other_codecs(tmp_path):
    path = tmp_path / "mpeg4.mp4"
    subprocess.run([ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=64x48:rate=25:duration=2", "-c:v", "mpeg4", "-bf", "2", str(path)], check=True)
    assert packet_plan.drop_expression(path, 0.0, np.array([0.5, 1.5])) is None
    cfg = SamplingConfig(num_frames=4, size=16)
    a = decode_video_segment(path, 0.2, 1.8, cfg, decoder=FfmpegDecoder(False))[0]
    assert np.array_equal(a, decode_video_segment(path, 0.2, 1.8, cfg)[0])


def test_sps_bitstream_restriction_is_read(streams):
    import av

    with av.open(str(streams["bframes_gop60"])) as c:
        extradata = bytes(c.streams.video[0].codec_context.extradata)
    config = packet_plan._avc_config(extradata)
    assert config is not None and config.length_size == 4 and config.bitstream_restriction  # x264 writes it
    assert probe_video(streams["bframes_gop60"]).fps == pytest.approx(60000 / 1001)
