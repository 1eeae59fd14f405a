"""Decoding only the packets the samples need (mambavl.extract.packet_plan) gives bit-identical frames to the plain
decode of the whole window, on H.264 streams of several structures; and the plan does leave packets out."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from mambavl.data.media import ffmpeg_binary
from mambavl.extract import h264_refs, packet_plan
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
    out["rotated_bframes"] = d / "rotated.mp4"  # a display matrix, which the piped stand-in stream would lose
    subprocess.run([ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-y", "-display_rotation", "90", "-i",
                    str(out["bframes_gop60"]), "-c", "copy", str(out["rotated_bframes"])], check=True)
    return out


WINDOWS = [(0.0, SECONDS), (0.3, 3.7), (1.02, 1.5), (2.9, 3.15), (0.51, 4.48), (4.2, SECONDS), (2.0, 2.0)]
CONFIGS = [SamplingConfig(num_frames=16, size=32), SamplingConfig(num_frames=4, size=24),
           SamplingConfig(mode=SamplingMode.FPS, fps=4, num_frames=8, size=32)]


@pytest.mark.parametrize("kind", list(KINDS) + ["vfr_bframes", "rotated_bframes"])
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


def _packet_kinds(path, until):
    """(nal_ref_idc > 0, IDR, byte position, seconds presented) per video packet decoded up to `until` seconds,
    decoding order."""
    import av

    out = []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        for pkt in c.demux(s):
            if pkt.size == 0 or pkt.dts * s.time_base > until:
                continue
            data, i, ref, idr = bytes(pkt), 0, False, False
            while i + 4 < len(data):
                n = int.from_bytes(data[i:i + 4], "big")
                if data[i + 4] & 0x1F in (1, 5):
                    ref |= bool(data[i + 4] >> 5 & 3)
                    idr |= data[i + 4] & 0x1F == 5
                i += 4 + n
            out.append((ref, idr, pkt.pos, float(pkt.pts * s.time_base)))
    return out


def test_plan_stands_in_for_reference_pictures(streams):
    """x264's B-pyramid: the middle B of each group is a reference only its group's non-reference B reads; with the
    samples on other pictures those references are decoded as all-skip stand-ins (same frame_num, POC and marking),
    and the frames stay bit-identical (test_planned_decode_is_bit_identical runs the same streams)."""
    path = streams["bframes_gop60"]
    kinds = _packet_kinds(path, 2.5)
    # anchors (P pictures: presented after everything decoded before them): two in the first GOP, one in the second
    anchors = [t for k, (ref, idr, _, t) in enumerate(kinds) if ref and not idr and t > max(x[3] for x in kinds[:k])]
    times = np.array([min(anchors, key=lambda t: abs(t - x)) for x in (0.4, 0.8, 1.3)]) + 0.005
    planned = packet_plan.plan(path, 0.0, times, stand_ins=True)
    assert planned is not None and planned.stand_ins
    refs = {pos for ref, _, pos, _ in kinds if ref}
    assert set(planned.stand_ins) <= refs and not set(planned.stand_ins) & planned.left_out
    rotated = packet_plan.plan(streams["rotated_bframes"], 0.0, times, stand_ins=True)
    assert rotated is not None and not rotated.stand_ins and rotated.expression  # decoded from the file
    data, whole = packet_plan.stand_in_stream(path, planned, 0.0)
    assert data[:3] == b"nut" and whole >= 1
    cfg = SamplingConfig(num_frames=3, size=32)
    a = decode_video_segment(path, 0.0, 1.5, cfg, decoder=FfmpegDecoder(skip_unneeded=False))[0]
    assert np.array_equal(a, decode_video_segment(path, 0.0, 1.5, cfg, decoder=FfmpegDecoder())[0])


def test_plan_skips_through_a_keyframe_between_samples(streams):
    """Two samples a GOP apart: everything between the first and the keyframe before the second is left out (a seek
    per sample, in the same decode), whatever kind of stream."""
    for kind in ("all_p", "bframes_gop60"):
        path = streams[kind]
        kinds = _packet_kinds(path, 3.0)
        idr = [i for i, (_, k, _, _) in enumerate(kinds) if k]
        assert len(idr) >= 3
        times = np.array([0.1, 2.2])  # GOP 0 and GOP 2: GOP 1 feeds nothing
        planned = packet_plan.plan(path, 0.0, times)
        assert planned is not None and planned.dropped >= idr[2] - idr[1], kind
        with_stand_ins = packet_plan.plan(path, 0.0, times, stand_ins=True)  # GOP 1 is not sent at all
        assert with_stand_ins is not None and len(with_stand_ins.left_out) >= idr[2] - idr[1], kind


def _pictures(spec):
    """Pictures for `h264_refs` from (ref, frame_num, poc_lsb, kind, mods, mmco) rows, an x264-like stream: one SPS
    (4 reference frames, POC type 0), one slice per picture with one reference per list."""
    sps = h264_refs.Sps(0, 1, False, 4, 0, 6, 4, False, True, True, mbs=8160)
    out = []
    for ref, frame_num, lsb, kind, mods, mmco in spec:
        num = {"I": (0, 0), "P": (1, 0), "B": (1, 1)}[kind]
        out.append(h264_refs.Picture(kind == "I", ref, frame_num, lsb, 0, sps,
                                     (h264_refs.Slice(kind, num, (mods, ())),), mmco))
    return out


# I P Bref b P Bref b P (decoding order): the stream the benchmark's x264 writes (POC = 2 x display index)
PYRAMID = [(True, 0, 0, "I", (), None), (True, 1, 6, "P", (), None), (True, 2, 2, "B", (), None),
           (False, 3, 4, "B", (), None), (True, 3, 12, "P", ((0, 1),), None), (True, 4, 8, "B", (), None),
           (False, 5, 10, "B", (), None), (True, 5, 18, "P", ((0, 1),), None)]


def test_reference_simulation_follows_the_lists():
    pics = _pictures(PYRAMID)
    assert [r for _, r in h264_refs.simulate(pics)] == [(), (0,), (0, 1), (1, 2), (1,), (1, 4), (4, 5), (4,)]
    # samples on P pictures: the B references are decoded as stand-ins, the non-reference Bs left out
    assert h264_refs.stand_in_plan(pics, [i in (4, 7) for i in range(8)], tail=8) == \
        ["keep", "keep", "stand-in", "drop", "keep", "stand-in", "drop", "keep"]
    # a sample on the second B reference: it reads pictures 1 and 4; nothing after it is decoded
    assert h264_refs.stand_in_plan(pics, [i == 5 for i in range(8)], tail=8) == \
        ["keep", "keep", "stand-in", "drop", "keep", "keep", "drop", "drop"]
    # ... unless it is to be followed by pictures (for the frame-rate filter): the references as stand-ins
    assert h264_refs.stand_in_plan(pics, [i == 5 for i in range(8)], tail=6) == \
        ["keep", "keep", "stand-in", "drop", "keep", "keep", "drop", "stand-in"]
    assert h264_refs.stand_in_plan(pics[1:], [True] * 7, tail=7) is None  # no IDR first: not modelled


def test_stand_in_slice_keeps_the_picture_fields():
    """The stand-in slice parses back with the picture's frame_num, POC and marking commands, as a P slice of one
    reference; its PPS is CAVLC without weighting."""
    sps = h264_refs.Sps(0, 1, False, 4, 0, 6, 4, False, True, True, mbs=8160)
    pic = h264_refs.Picture(False, True, 9, 22, 0, sps, (), ((1, 4), (1, 1)))
    pps = h264_refs.parse_pps(h264_refs.skip_pps(sps, 7))
    assert (pps.pps_id, pps.sps_id, pps.num_ref_default, pps.weighted_pred, pps.weighted_bipred_idc) == \
        (7, 0, (1, 1), False, 0)
    s, back = h264_refs.parse_slice(h264_refs.skip_slice(pic, 2, 7), {7: pps}, {0: sps})
    assert (s.kind, s.num_ref, back.frame_num, back.poc_lsb, back.mmco, back.ref) == ("P", (1, 0), 9, 22,
                                                                                      ((1, 4), (1, 1)), True)
    writer = h264_refs.BitWriter()
    writer.u(24, 0)
    assert writer.nal(0x01)[1:5] == b"\x00\x00\x03\x00"  # emulation prevention
