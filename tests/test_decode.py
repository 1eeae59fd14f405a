"""Frame-exact segment decoding (MP4 and JPEG folders, both sampling modes) and decode failures."""

from __future__ import annotations

import numpy as np
import pytest

from mambavl.data.annotations import Segment
from mambavl.data.synthetic import make_frame_dir, make_timestamp_video, read_timestamp_code
from mambavl.extract.decode import (
    DecodeError, SamplingConfig, SamplingMode, anticipation_window, decode_frame_dir_segment, decode_segment,
    decode_video_segment, ffmpeg_binary, probe_video, sample_times,
)

FPS = 25.0


@pytest.fixture(scope="module")
def ts_video(tmp_path_factory):
    return make_timestamp_video(tmp_path_factory.mktemp("v") / "ts.mp4", duration=4.0, fps=FPS)


def test_binary_and_probe(ts_video):
    assert ffmpeg_binary()
    p = probe_video(ts_video)
    assert p.fps == pytest.approx(FPS) and p.duration == pytest.approx(4.0, abs=0.05) and (p.width, p.height) == (64, 48)


@pytest.mark.parametrize("cfg", [SamplingConfig(num_frames=8, size=32),
                                 SamplingConfig(mode=SamplingMode.FPS, fps=10, num_frames=12, size=32),
                                 SamplingConfig(num_frames=5, size=24)])
@pytest.mark.parametrize("start,stop", [(1.03, 2.71), (0.0, 0.3), (3.5, 3.99), (0.0, 4.0), (2.0, 2.02)])
def test_video_frames_are_the_frames_at_the_requested_times(ts_video, cfg, start, stop):
    frames, times = decode_video_segment(ts_video, start, stop, cfg)
    requested = sample_times(start, stop, cfg)
    assert frames.shape == (len(requested), cfg.size, cfg.size, 3) and frames.dtype == np.uint8
    codes = np.array([read_timestamp_code(f) for f in frames])
    # the frame shown at time t is frame floor(t * fps): exact, which is within one frame
    assert np.array_equal(codes, np.floor(requested * FPS + 1e-6).astype(int))
    assert np.all(np.abs(times - requested) < 1.0 / FPS)


def test_fps_mode_caps_frames():
    cfg = SamplingConfig(mode=SamplingMode.FPS, fps=4, num_frames=6)
    assert len(sample_times(0, 1.0, cfg)) == 4
    t = sample_times(0, 10.0, cfg)
    assert len(t) == 6 and np.all(np.diff(t) > 0)


def test_frame_folder_layout(tmp_path):
    frame_dir = make_frame_dir(tmp_path / "P01" / "rgb_frames" / "P01_01", 80)
    cfg = SamplingConfig(num_frames=6, size=32)
    frames, times = decode_frame_dir_segment(frame_dir, 5, 40, FPS, cfg)
    codes = [read_timestamp_code(f) for f in frames]  # file k (1-based) shows code k - 1
    assert codes == list(np.round(times * FPS).astype(int))
    assert codes[0] >= 4 and codes[-1] <= 39
    seg = Segment("P01_01_0", "P01", "P01_01", 1.0, 2.0, 26, 50, "", "", "", -1, -1, (), 1)
    frames, times = decode_segment(tmp_path, seg, 1.0, 2.0, cfg, FPS)
    expect = np.floor(sample_times(1.0, 2.0, cfg) * FPS + 1e-6).astype(int)
    assert [read_timestamp_code(f) for f in frames] == list(expect)


def test_layout_lookup(tmp_path, ts_video):
    dest = tmp_path / "P02" / "videos" / "P02_03.MP4"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(ts_video.read_bytes())
    seg = Segment("P02_03_1", "P02", "P02_03", 1.0, 2.0, None, None, "", "", "", -1, -1, (), 1)
    frames, _ = decode_segment(tmp_path, seg, 1.0, 2.0, SamplingConfig(num_frames=3, size=16))
    assert frames.shape == (3, 16, 16, 3)
    with pytest.raises(DecodeError, match="missing: no video or frame folder"):
        decode_segment(tmp_path, Segment("P09_01_1", "P09", "P09_01", 0, 1, None, None, "", "", "", -1, -1, (), 1),
                       0, 1, SamplingConfig())


def test_broken_files_raise_decode_errors(tmp_path, ts_video):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(DecodeError, match="empty.mp4.*empty file \\(0 bytes\\)"):
        decode_video_segment(empty, 0, 1, SamplingConfig())
    truncated = tmp_path / "trunc.mp4"
    truncated.write_bytes(ts_video.read_bytes()[: 3000])
    with pytest.raises(DecodeError, match="trunc.mp4"):
        decode_video_segment(truncated, 0, 1, SamplingConfig(num_frames=4, size=16))
    with pytest.raises(DecodeError, match="out of range: segment starts at 10.000s, the video ends at 4.000s"):
        decode_video_segment(ts_video, 10.0, 11.0, SamplingConfig(num_frames=4, size=16))


def test_anticipation_window():
    assert anticipation_window(5.0, tau_a=1.0, tau_o=2.0) == (2.0, 4.0)
    assert anticipation_window(1.5, tau_a=1.0, tau_o=2.0) == (0.0, 0.5)
    with pytest.raises(DecodeError, match="before the video starts"):
        anticipation_window(0.8, tau_a=1.0)
