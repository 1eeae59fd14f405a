"""Frame number <-> time per source (issue items 1, 3, 4): frame folders numbered at their own rate, partial
folders, and segments past the end of a video. Each asserts the decoded frames or the recorded failure."""

from __future__ import annotations

import numpy as np
import pytest
from fault_inputs import write_classes, write_ek100, write_frame_range, write_video_info

from mambavl.cache.reader import open_cache
from mambavl.data.annotations import load_annotations
from mambavl.data.synthetic import make_timestamp_video, read_timestamp_code
from mambavl.errors import InputError
from mambavl.extract.decode import SamplingConfig, anticipation_window, decode_segment
from mambavl.extract.encoders import EncoderConfig
from mambavl.cache.build import ExtractConfig, run_extraction

TINY = EncoderConfig(model="mambavl-tiny-clip", pretrained="none", device="cpu")
SAMPLING = SamplingConfig(num_frames=4, size=32)


@pytest.fixture(scope="module")
def rgb60(tmp_path_factory):
    """EK-55-style frame folders numbered at 60 frames/s whatever the native fps (29.97 and 59.94 here);
    frame n shows the whole second (n - 1) // 60 (mod 256)."""
    root = tmp_path_factory.mktemp("rgb60")
    write_classes(root)
    second = lambda n: (n - 1) // 60  # noqa: E731
    write_frame_range(root / "P09/rgb_frames/P09_08", 1600, 1870, second)
    write_frame_range(root / "P09/rgb_frames/P09_08", 3400, 3730, second)
    write_frame_range(root / "P01/rgb_frames/P01_01", 107690, 108130, second)
    write_video_info(root, [("P09_08", 126.46, 29.97002997002997), ("P01_01", 1900.0, 59.9400599400599)])
    write_ek100(root / "ann.csv", [dict(nid="P09_08_0", vid="P09_08", start=30.0, stop=31.0, f0=1801, f1=1861),
                                   dict(nid="P09_08_1", vid="P09_08", start=60.0, stop=62.0, f0=3601, f1=3721),
                                   dict(nid="P01_01_0", vid="P01_01", start=1800.0, stop=1802.0, f0=108001,
                                        f1=108121)])
    return root


def test_frame_folder_rate_comes_from_the_rows_not_the_native_fps(rgb60):
    ann = load_annotations(rgb60 / "ann.csv")
    assert ann.frame_rate("P09_08") == pytest.approx(60, abs=0.05)
    assert ann.frame_rate("P01_01") == pytest.approx(60, abs=0.05)
    for seg in ann.segments:
        # the anticipation window (tau_a 1 s, tau_o 2 s) is computed from seconds: it must show those seconds
        start, stop = anticipation_window(seg, 1.0, 2.0)
        frames, times = decode_segment(rgb60, seg, start, stop, SAMPLING, ann.frame_rate(seg.video_id))
        assert np.all((times >= start - 0.02) & (times < stop))
        seconds = [read_timestamp_code(f) for f in frames]
        assert seconds == [int(t) % 256 for t in times], (seg.narration_id, seconds, times)
        frames, times = decode_segment(rgb60, seg, seg.start_time, seg.stop_time, SAMPLING,
                                       ann.frame_rate(seg.video_id))
        assert np.all((times >= seg.start_time - 0.02) & (times < seg.stop_time))
        assert [read_timestamp_code(f) for f in frames] == [int(t) % 256 for t in times]


def test_extraction_stores_true_times_for_both_windows(rgb60, tmp_path):
    cfg = ExtractConfig(annotations=str(rgb60 / "ann.csv"), videos=str(rgb60), out=str(tmp_path / "c.h5"),
                        encoder=TINY, sampling=SAMPLING, anticipation=True, tau_a=1.0, tau_o=2.0)
    summary = run_extraction(cfg)
    assert (summary.done, summary.failed) == (3, 0), summary.failures
    f = open_cache(tmp_path / "c.h5").h5()
    times, ant = f["frame_times"][()], f["anticipation/frame_times"][()]
    for row, (start, stop) in enumerate([(30, 31), (60, 62), (1800, 1802)]):
        assert np.all((times[row] >= start - 0.02) & (times[row] < stop)), times[row]
        assert np.all((ant[row] >= start - 3.02) & (ant[row] < start - 1)), ant[row]


def test_given_frame_rate_is_checked_against_the_rows(rgb60, tmp_path):
    cfg = ExtractConfig(annotations=str(rgb60 / "ann.csv"), videos=str(rgb60), out=str(tmp_path / "c.h5"),
                        encoder=TINY, sampling=SAMPLING, frame_rate=29.97)
    with pytest.raises(InputError, match=r"row 1, fields 'start_frame' / 'start_timestamp'.*--frame-rate"):
        run_extraction(cfg)
    assert not (tmp_path / "c.h5").exists()


def test_row_whose_frame_and_timestamp_disagree_is_refused(tmp_path):
    write_classes(tmp_path)
    rows = [dict(nid=f"P02_01_{i}", vid="P02_01", start=10.0 * i + 5, stop=10.0 * i + 7, f0=600 * i + 301,
                 f1=600 * i + 420) for i in range(6)]
    rows[4] = dict(rows[4], f0=rows[4]["f0"] + 90)  # 1.5 s off: a row from another export
    write_ek100(tmp_path / "ann.csv", rows)
    with pytest.raises(InputError, match=r"ann.csv: row 5, fields 'start_frame' / 'start_timestamp': frame 2791 "
                                         r"and 45.00s disagree by \+90.0 frames"):
        load_annotations(tmp_path / "ann.csv")
    rows[4] = dict(rows[4], f0=rows[4]["f0"] - 88)  # within a frame or two: accepted
    write_ek100(tmp_path / "ann.csv", rows)
    assert load_annotations(tmp_path / "ann.csv").frame_rate("P02_01") == pytest.approx(60, abs=0.05)


def test_partial_frame_folder_is_a_failure_with_the_missing_count(tmp_path):
    write_classes(tmp_path)
    write_frame_range(tmp_path / "P08/rgb_frames/P08_05", 1, 100, lambda n: n)
    write_video_info(tmp_path, [("P08_05", 10.0, 50.0)])
    write_ek100(tmp_path / "ann.csv", [dict(nid="P08_05_0", vid="P08_05", start=1.2, stop=6.0, f0=61, f1=300),
                                       dict(nid="P08_05_1", vid="P08_05", start=1.0, stop=2.04, f0=51, f1=102)])
    cfg = ExtractConfig(annotations=str(tmp_path / "ann.csv"), videos=str(tmp_path), out=str(tmp_path / "c.h5"),
                        encoder=TINY, sampling=SAMPLING)
    summary = run_extraction(cfg)
    assert (summary.done, summary.failed) == (1, 1)
    (failure,) = summary.failures
    assert failure["narration_id"] == "P08_05_0"
    assert "200 of the segment's 240 frames (101..300) are missing" in failure["reason"]
    # two frames short of the annotated stop frame is annotation rounding: decoded, clamped to frame 100
    ann = load_annotations(tmp_path / "ann.csv")
    frames, _ = decode_segment(tmp_path, ann.segments[1], ann.segments[1].start_time, ann.segments[1].stop_time,
                               SAMPLING, ann.frame_rate("P08_05"))
    assert [read_timestamp_code(f) for f in frames][-1] <= 100


def test_segment_past_the_video_end_is_a_failure(tmp_path):
    write_classes(tmp_path)
    make_timestamp_video(tmp_path / "P07/videos/P07_18.MP4", duration=4.0, fps=25.0)  # frame k codes k
    write_ek100(tmp_path / "ann.csv", [dict(nid="P07_18_A", vid="P07_18", start=3.5, stop=4.08, f0=88, f1=102),
                                       dict(nid="P07_18_B", vid="P07_18", start=3.0, stop=8.0, f0=76, f1=200),
                                       dict(nid="P07_18_C", vid="P07_18", start=4.5, stop=6.0, f0=113, f1=150)])
    cfg = ExtractConfig(annotations=str(tmp_path / "ann.csv"), videos=str(tmp_path), out=str(tmp_path / "c.h5"),
                        encoder=TINY, sampling=SAMPLING)
    summary = run_extraction(cfg)
    assert (summary.done, summary.failed) == (1, 2)
    reasons = {f["narration_id"]: f["reason"] for f in summary.failures}
    assert "ends 4.000s (100 frames) past the end of the video at 4.000s" in reasons["P07_18_B"]
    assert "starts at 4.500s, the video ends at 4.000s" in reasons["P07_18_C"]
    cache = open_cache(tmp_path / "c.h5")
    assert cache.valid_indices().tolist() == [0]
    times = cache.h5()["frame_times"][0]
    assert np.all((times >= 3.5 - 0.04) & (times < 4.0))
