"""Faults of real video collections at decode time: damaged bytes inside a video, non-square pixels, windows at the
very ends of an intact video, and annotation rows naming files outside --videos. Every decoder this machine can run
is checked (torchcodec skips with its reason where FFmpeg's shared libraries are missing; see tests/test_decoders.py).
"""

from __future__ import annotations

import csv

import av
import h5py
import numpy as np
import pytest
import torch
from fault_inputs import HEADER, hms, write_classes, write_ek100
from typer.testing import CliRunner

from mambavl.cache.build import ExtractConfig, run_extraction
from mambavl.cli import app
from mambavl.data.annotations import Segment, frame_start
from mambavl.data.synthetic import (
    encode_frames, make_frame_dir, make_timestamp_video, read_timestamp_code, timestamp_frames,
)
from mambavl.errors import InputError
from mambavl.extract.decode import (
    DecodedFrames, DecodeError, SamplingConfig, SamplingMode, decode_segment, decode_video_segment, decoder_errors,
    probe_video, sample_times,
)
from mambavl.extract.encoders import EncoderConfig

FPS = 25.0
TINY = EncoderConfig(model="mambavl-tiny-clip", pretrained="none", device="cpu")
def as_numpy(frames):
    return frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)


def codes_of(frames) -> list[int]:
    return [read_timestamp_code(f) for f in as_numpy(frames)]


def expected_codes(start, stop, cfg) -> list[int]:
    """Frame k codes k % 256 and is displayed during [k/FPS, (k+1)/FPS)."""
    return [int(k) % 256 for k in np.floor(sample_times(start, stop, cfg) * FPS + 1e-6)]


# ---------------------------------------------------------------------------------------------- damaged video data
SECONDS = 6
CFG = SamplingConfig(num_frames=4, size=32)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A 6 s timestamp-coded H.264 clip (noise, so it has real residuals; a keyframe a second) and damaged copies:
    4 KB of random bytes over the middle of the media data (a bad sector, a download resumed at the wrong offset);
    4 flipped bytes at the start of the packet shown at 3.4 s (its NAL length); the same packet's bytes zeroed."""
    d = tmp_path_factory.mktemp("damaged")
    n = int(SECONDS * FPS)
    frames = timestamp_frames(256, 64, 48)[np.arange(n) % 256]
    noise = np.random.default_rng(0).integers(0, 6, size=frames.shape, dtype=np.uint8)
    clean = encode_frames(d / "clean.mp4", np.clip(frames.astype(int) + noise, 0, 255).astype(np.uint8), FPS,
                          gop=25)
    data = bytes(clean.read_bytes())
    mdat = data.find(b"mdat")
    mid = mdat + (len(data) - mdat) // 2
    out = {"clean": clean}
    rnd = bytearray(data)
    rnd[mid:mid + 4096] = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (d / "random.mp4").write_bytes(bytes(rnd))
    out["random"] = d / "random.mp4"
    with av.open(str(clean)) as c:
        s = c.streams.video[0]
        pkt = next(p for p in c.demux(s) if p.pts is not None and abs(float(p.pts * s.time_base) - 3.4) < 0.01)
        pos, size = int(pkt.pos), int(pkt.size)
    flipped = bytearray(data)
    flipped[pos:pos + 4] = bytes(b ^ 0xFF for b in flipped[pos:pos + 4])
    (d / "flipped.mp4").write_bytes(bytes(flipped))
    out["flipped"] = d / "flipped.mp4"
    zeroed = bytearray(data)
    zeroed[pos:pos + size] = bytes(size)
    (d / "zeroed.mp4").write_bytes(bytes(zeroed))
    out["zeroed"] = d / "zeroed.mp4"
    return out


@pytest.mark.parametrize("kind", ["random", "flipped", "zeroed"])
def test_damaged_windows_fail_and_the_others_hold_the_requested_frames(decoder, damaged, kind):
    """Every 1-second window of a damaged copy either fails naming the damage, or returns exactly the frames
    displayed at the requested times, with those frames' own timestamps. The window holding the damaged packet
    fails (before: stored with frames of other times, or concealed garbage, and no failure)."""
    failed = {}
    for s in range(SECONDS):
        try:
            frames, times = decode_video_segment(damaged[kind], s, s + 1, CFG, decoder=decoder)
        except DecodeError as exc:
            failed[s] = str(exc)
            continue
        assert codes_of(frames) == expected_codes(s, s + 1, CFG), (kind, s)
        assert [int(k) % 256 for k in np.round(times * FPS)] == codes_of(frames), (kind, s)
    assert failed, f"{kind}: no window failed"
    if kind != "random":  # the damaged packet is shown at 3.4 s
        assert 3 in failed, failed
    for reason in failed.values():
        assert str(damaged[kind]) in reason and ("damaged video data" in reason or "corrupt" in reason), reason


def test_clean_copy_decodes_every_window(decoder, damaged):
    for s in range(SECONDS):
        frames, times = decode_video_segment(damaged["clean"], s, s + 1, CFG, decoder=decoder)
        assert codes_of(frames) == expected_codes(s, s + 1, CFG)
        assert np.allclose(times, np.floor(sample_times(s, s + 1, CFG) * FPS + 1e-6) / FPS, atol=1e-6)


def test_extraction_records_damaged_rows_as_failures(damaged, tmp_path, tiny_encoder):
    rows = [[f"{kind}.mp4", s, s + 1, "a", f"{kind}_{s}"] for kind in ("clean", "flipped") for s in range(SECONDS)]
    with open(tmp_path / "clips.csv", "w", newline="") as f:
        csv.writer(f).writerows([["video", "start", "stop", "label", "id"], *rows])
    summary = run_extraction(ExtractConfig(annotations=str(tmp_path / "clips.csv"), videos=str(damaged["clean"].parent),
                                           out=str(tmp_path / "c.h5"), encoder=TINY, sampling=CFG),
                             encoder=tiny_encoder)
    reasons = {f["narration_id"]: f["reason"] for f in summary.failures}
    assert "flipped_3" in reasons and "damaged video data" in reasons["flipped_3"], reasons
    assert not any(k.startswith("clean") for k in reasons)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        valid, times = f["valid"][()], f["frame_times"][()]
    for i, (video, s, *_rest) in enumerate(rows):
        if valid[i]:  # stored rows hold the frames displayed at their times
            assert np.allclose(times[i], np.floor(sample_times(s, s + 1, CFG) * FPS + 1e-6) / FPS, atol=1e-5)


class _LaterFrameDecoder:
    """A decoder that answers every request with frames whose timestamps are 0.2 s after the requested times."""

    name, device = "fake", "cpu"

    def frames(self, req):
        frames = np.zeros((len(req.ticks), req.size, req.size, 3), np.uint8)
        return DecodedFrames(frames, req.times + 0.2)


def test_a_frame_later_than_its_time_is_a_failure_for_any_decoder(damaged):
    with pytest.raises(DecodeError, match=r"damaged video data: the frame decoded for t=1\.125s is the frame of "
                                          r"1\.325s \(a later one\)"):
        decode_video_segment(damaged["clean"], 1.0, 2.0, CFG, decoder=_LaterFrameDecoder())


def test_decoder_error_lines_are_read_from_the_log():
    log = "\n".join([
        "[h264 @ 0x55] [error] mmco: unref short failure",  # open GOP, before the first frame: not damage
        "[Parsed_showinfo_0 @ 0x7f] [info] n:   0 pts:    512 pts_time:0.04 duration: 512",
        "[h264 @ 0x56] [error] Invalid NAL unit size (-5 > 205).",
        "[h264 @ 0x57] [error] Invalid NAL unit size (-5 > 205).",
        "[h264 @ 0x58] [error] mmco: unref short failure",  # after decoding started: counted
        "[h264 @ 0x59] [warning] something harmless",
    ])
    assert decoder_errors(log) == "[h264] Invalid NAL unit size (-5 > 205).; [h264] mmco: unref short failure"
    assert decoder_errors(log.splitlines()[0]) == ""


# ---------------------------------------------------------------------------------------------- non-square pixels
def _bands(width: int, height: int = 48) -> np.ndarray:
    """8 vertical grey bands 16, 48, ..., 240 across `width` columns: (50, H, W, 3) uint8."""
    img = np.zeros((height, width, 3), np.uint8)
    for b in range(8):
        img[:, b * width // 8:(b + 1) * width // 8] = 16 + 32 * b
    return np.repeat(img[None], 50, axis=0)


@pytest.mark.parametrize("sar,square_width", [("2/1", 128), ("1/2", 32)])
def test_non_square_pixels_are_scaled_to_square_before_the_crop(decoder, tmp_path, sar, square_width):
    """A 64x48 clip with pixel aspect ratio 2:1 (displayed 128x48, like DV/broadcast captures) or 1:2 (displayed
    32x48): the centre crop holds the same part of the picture as the square-pixel clip a player shows."""
    anamorphic = encode_frames(tmp_path / "anamorphic.mp4", _bands(64), FPS, lossless=True,
                               extra_args=["-vf", f"setsar={sar}"])
    square = encode_frames(tmp_path / "square.mp4", _bands(square_width), FPS, lossless=True)
    num, den = (int(x) for x in sar.split("/"))
    assert probe_video(anamorphic).sar == pytest.approx(num / den)
    cfg = SamplingConfig(num_frames=2, size=32)
    got = as_numpy(decode_video_segment(anamorphic, 0.5, 1.5, cfg, decoder=decoder)[0]).astype(np.int16)
    ref = as_numpy(decode_video_segment(square, 0.5, 1.5, cfg, decoder=decoder)[0]).astype(np.int16)
    assert np.abs(got - ref).mean() <= 4.0
    if sar == "2/1":  # the centre square of 128x48 holds bands 2..5 (grey 80 .. 176), not 1..6 squeezed
        assert abs(got[0, 16, 0, 0] - 80) <= 8 and abs(got[0, 16, -1, 0] - 176) <= 8


# ---------------------------------------------------------------------------------------------- windows at the ends
@pytest.fixture(scope="module")
def ts_video(tmp_path_factory):
    return make_timestamp_video(tmp_path_factory.mktemp("ends") / "ts.mp4", duration=4.0, fps=FPS)


EDGE_WINDOWS = [(0.0, 0.0), (0.0, 0.01), (0.01, 0.03), (2.0, 2.0), (2.02, 2.02), (2.03, 2.05), (3.96, 3.96),
                (3.97, 3.97), (3.97, 3.98), (3.99, 4.0), (3.999, 3.999), (3.96, 4.0), (3.9, 4.0)]
EDGE_CONFIGS = [SamplingConfig(num_frames=1, size=16), SamplingConfig(num_frames=4, size=16),
                SamplingConfig(mode=SamplingMode.FPS, fps=100, num_frames=4, size=16)]


@pytest.mark.parametrize("cfg", EDGE_CONFIGS, ids=["1frame", "4frames", "fps100"])
def test_windows_inside_the_first_and_last_frames_yield_those_frames(decoder, ts_video, cfg):
    """Zero-length and shorter-than-a-frame windows at the start, between frames and inside the last frame of an
    intact 4.00 s clip give the frames displayed then (before: "decoding stopped after 0 of 1 frames" at the end)."""
    for start, stop in EDGE_WINDOWS:
        frames, times = decode_video_segment(ts_video, start, stop, cfg, decoder=decoder)
        assert codes_of(frames) == expected_codes(start, stop, cfg), (start, stop)
        assert np.allclose(times, np.floor(sample_times(start, stop, cfg) * FPS + 1e-6) / FPS, atol=1e-6)


@pytest.mark.parametrize("cfg", EDGE_CONFIGS, ids=["1frame", "4frames", "fps100"])
def test_frame_folder_windows_at_both_ends(tmp_path, cfg):
    """The same windows on an rgb_frames folder of 100 frames (seconds mapped at 25 frames/s), and segments of one
    annotated frame: the first and the last."""
    make_frame_dir(tmp_path / "P01" / "rgb_frames" / "P01_01", 100)
    for start, stop in EDGE_WINDOWS:
        seg = Segment("P01_01_x", "P01", "P01_01", 0.0, 4.0, 1, 100, "", "", "", -1, -1, (), 1)
        frames, times = decode_segment(tmp_path, seg, start, stop, cfg, FPS)
        first, last = int(np.floor(start * FPS + 1e-6)), max(int(np.floor(start * FPS + 1e-6)),
                                                            int(np.ceil(stop * FPS - 1e-6)) - 1)
        assert codes_of(frames) == list(np.round(times * FPS).astype(int)), (start, stop)
        assert all(first <= c <= last for c in codes_of(frames)), (start, stop)
    for number in (1, 100):
        seg = Segment("P01_01_y", "P01", "P01_01", frame_start(number, FPS), frame_start(number + 1, FPS), number,
                      number, "", "", "", -1, -1, (), 1)
        frames, _ = decode_segment(tmp_path, seg, seg.start_time, seg.stop_time, cfg, FPS)
        assert set(codes_of(frames)) == {number - 1}


def test_extraction_keeps_rows_inside_the_last_frame(ts_video, tmp_path, tiny_encoder):
    with open(tmp_path / "clips.csv", "w", newline="") as f:
        csv.writer(f).writerows([["video", "start", "stop", "label", "id"], ["ts.mp4", 3.97, 3.97, "a", "end"],
                                 ["ts.mp4", 0.0, 0.0, "a", "start"], ["ts.mp4", 3.99, 4.0, "a", "tail"]])
    summary = run_extraction(ExtractConfig(annotations=str(tmp_path / "clips.csv"), videos=str(ts_video.parent),
                                           out=str(tmp_path / "c.h5"), encoder=TINY, sampling=CFG),
                             encoder=tiny_encoder)
    assert (summary.done, summary.failed) == (3, 0), summary.failures
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert np.allclose(f["frame_times"][()][:, 0], [3.96, 0.0, 3.96], atol=1e-5)


# ---------------------------------------------------------------------------------------------- paths outside --videos
@pytest.fixture
def escape(tmp_path):
    """--videos is data/videos with one clip; a 'private' clip lies beside it, outside the root."""
    root = tmp_path / "data" / "videos"
    make_timestamp_video(root / "clip.mp4", duration=2.0, fps=FPS)
    make_timestamp_video(tmp_path / "data" / "private" / "secret.mp4", duration=2.0, fps=FPS)
    return root


def _generic(path, rows, participant=None):
    header = ["video", "start", "stop", "label", "id"] + (["participant"] if participant else [])
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + [r + ([participant[i]] if participant else []) for i, r in enumerate(rows)])
    return path


def _run(csv_path, root, out):
    return run_extraction(ExtractConfig(annotations=str(csv_path), videos=str(root), out=str(out), encoder=TINY,
                                        sampling=SamplingConfig(num_frames=2, size=16)))


@pytest.mark.parametrize("value,problem", [("../private/secret.mp4", "'..' component"),
                                           ("sub/../../private/secret.mp4", "'..' component"),
                                           ("..\\private\\secret.mp4", "'..' component"),
                                           ("ABSOLUTE", "absolute path")])
def test_generic_video_outside_the_root_is_refused_before_anything_is_written(escape, tmp_path, value, problem):
    if value == "ABSOLUTE":
        value = str(tmp_path / "data" / "private" / "secret.mp4")
    csv_path = _generic(tmp_path / "clips.csv", [["clip.mp4", "0.5", "1.0", "a", "inside"],
                                                 [value, "0.5", "1.0", "a", "escape"]])
    with pytest.raises(InputError, match=rf"clips.csv: row 2, field 'video': .* would be read from outside --videos "
                                         rf".*\(it .*{problem}\)"):
        _run(csv_path, escape, tmp_path / "c.h5")
    assert not (tmp_path / "c.h5").exists()


def test_generic_participant_outside_the_root_is_refused(escape, tmp_path):
    csv_path = _generic(tmp_path / "clips.csv", [["secret", "0.5", "1.0", "a", "x"]], participant=["../private"])
    with pytest.raises(InputError, match=r"row 1, field 'participant': '\.\./private'"):
        _run(csv_path, escape, tmp_path / "c.h5")


def test_ek100_ids_outside_the_root_are_refused_and_a_finished_cache_is_kept(escape, tmp_path):
    """video_id and participant_id build EK-100 paths (ROOT/P01/videos/P01_01.MP4); either with '..' stops the run
    with exit 2 before the cache is opened, so a cache finished earlier is left as it was."""
    write_classes(tmp_path)
    good = write_ek100(tmp_path / "EPIC_100_train.csv", [dict(nid="ok", vid="clip", start=0.5, stop=1.0, f0=13,
                                                              f1=25)])
    out = tmp_path / "c.h5"
    args = ["--videos", str(escape), "--out", str(out), "--model", "mambavl-tiny-clip", "--pretrained", "none",
            "--frames", "2", "--size", "16", "--device", "cpu", "--quiet"]
    r = CliRunner().invoke(app, ["extract", str(good), *args])
    assert r.exit_code == 0, r.output
    before = out.read_bytes()
    bad = write_ek100(tmp_path / "EPIC_100_train.csv", [dict(nid="ok", vid="clip", start=0.5, stop=1.0, f0=13, f1=25),
                                                        dict(nid="esc", vid="../private/secret", start=0.5, stop=1.0,
                                                             f0=13, f1=25)])
    r = CliRunner().invoke(app, ["extract", str(bad), *args])
    assert r.exit_code == 2 and "row 2, field 'video_id': '../private/secret'" in r.output, r.output
    with open(bad, "w", newline="") as f:  # participant_id with '..', video_id harmless
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerow(["p", "../../private", "secret", hms(0.5), hms(0.5), hms(1.0), 13, 25, "take plate", "take", 0,
                    "plate", 0, "['plate']", "[0]"])
    r = CliRunner().invoke(app, ["extract", str(bad), *args])
    assert r.exit_code == 2 and "row 1, field 'participant_id': '../../private'" in r.output, r.output
    assert out.read_bytes() == before


def test_a_symlink_the_user_put_under_the_root_is_followed(escape, tmp_path):
    """The rule is on the names an annotation file gives, not on where links lead: videos spread over disks and
    linked into one root stay usable (docs/extract.md, "Paths")."""
    (escape / "linked.mp4").symlink_to(tmp_path / "data" / "private" / "secret.mp4")
    csv_path = _generic(tmp_path / "clips.csv", [["linked.mp4", "0.5", "1.0", "a", "linked"]])
    summary = _run(csv_path, escape, tmp_path / "c.h5")
    assert (summary.done, summary.failed) == (1, 0)
