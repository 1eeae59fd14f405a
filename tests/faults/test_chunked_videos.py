"""Chunked videos (the AVION / LaViLa layout ``ROOT/P01/P01_01.MP4/0.MP4, 2.MP4, …``): frames at the sampled times of
the original timeline inside a chunk, across chunk boundaries and at the very end; failures for windows past the end
and missing chunks; chunk names that disagree with --chunk-seconds refused. Chunks are 2 s here for speed."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
from fault_inputs import write_classes, write_ek100
from typer.testing import CliRunner

from mambavl.cli import app
from mambavl.data.annotations import Segment
from mambavl.data.synthetic import cut_into_chunks, make_timestamp_video, read_timestamp_code
from mambavl.errors import InputError
from mambavl.extract.decode import (
    DecodeError, SamplingConfig, SamplingMode, SourceKind, decode_chunked_segment, decode_segment, locate_source,
    sample_times, scan_chunks,
)

FPS = 25.0
CHUNK = 2
DURATION = 7.0  # chunks 0, 2, 4 (2 s each) and 6 (1 s)
CONFIGS = [SamplingConfig(num_frames=8, size=16), SamplingConfig(mode=SamplingMode.FPS, fps=10, num_frames=12, size=16)]


def codes(frames) -> list[int]:
    frames = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else frames
    return [read_timestamp_code(f) for f in frames]


def make_chunked(d, lossless: bool):
    """ROOT/P01/P01_01.MP4/{0,2,4,6}.MP4 cut from a 7 s clip whose frame k codes k (frame k shown [k/25, (k+1)/25)).
    Not lossless: x264's B-frames, whose delay makes the first chunk's timestamps start 2 frames after 0."""
    original = make_timestamp_video(d / "original.mp4", duration=DURATION, fps=FPS)
    cut_into_chunks(original, d / "root" / "P01" / "P01_01.MP4", CHUNK, lossless=lossless)
    return d / "root"


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    return make_chunked(tmp_path_factory.mktemp("chunked"), lossless=False)


@pytest.fixture(scope="module", params=[False, True], ids=["crf18", "lossless"])
def any_chunked(request, tmp_path_factory):
    return make_chunked(tmp_path_factory.mktemp("chunked"), lossless=request.param)


def seg(start: float = 0.0, stop: float = 1.0) -> Segment:
    return Segment("P01_01_0", "P01", "P01_01", start, stop, None, None, "", "", "", -1, -1, (), 1)


def expected(start, stop, cfg):
    return np.floor(sample_times(start, stop, cfg) * FPS + 1e-6).astype(int)


def test_layout_is_found_and_read(chunked):
    kind, path = locate_source(chunked, seg())
    assert kind is SourceKind.CHUNKS and path == chunked / "P01" / "P01_01.MP4"
    video = scan_chunks(path)
    assert video.chunk_seconds == CHUNK and video.starts == (0, 2, 4, 6)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["uniform", "fps"])
@pytest.mark.parametrize("start,stop", [(0.3, 1.7), (2.0, 2.0), (1.5, 4.5), (0.0, 7.0), (1.99, 2.01), (6.5, 7.0),
                                        (6.96, 6.96), (5.9, 6.1)],
                         ids=["inside", "boundary-instant", "across-two-boundaries", "whole", "around-boundary",
                              "last-half-second", "inside-last-frame", "into-last-chunk"])
def test_frames_are_those_of_the_original_timeline(any_chunked, decoder, cfg, start, stop):
    frames, times = decode_segment(any_chunked, seg(), start, stop, cfg, decoder=decoder)
    want = expected(start, stop, cfg)
    assert codes(frames) == list(want)
    assert np.allclose(times, want / FPS, atol=1e-4)  # start times of the frames shown, on the original timeline


def test_chunks_at_another_rate_and_size(tmp_path):
    """As AVION re-encodes: a 50-fps original cut into 25-fps chunks with the short side scaled (B-frames, crf).
    The chunk frame shown at t is its frame floor(25 t), which ffmpeg's fps filter took from original frame
    2 floor(25 t)."""
    original = make_timestamp_video(tmp_path / "original.mp4", duration=5.0, fps=50.0, width=128, height=96)
    cut_into_chunks(original, tmp_path / "root" / "P01_01.MP4", CHUNK, lossless=False, fps=25, short_side=64)
    assert scan_chunks(tmp_path / "root" / "P01_01.MP4").starts == (0, 2, 4)
    for start, stop in [(0.0, 5.0), (1.7, 2.3), (3.9, 4.1), (4.8, 5.0)]:
        frames, times = decode_segment(tmp_path / "root", seg(), start, stop, CONFIGS[0])
        assert codes(frames) == [2 * k for k in expected(start, stop, CONFIGS[0])], (start, stop)
        assert np.allclose(times, expected(start, stop, CONFIGS[0]) / FPS, atol=1e-4)


def test_window_past_the_end_is_a_failure_naming_the_last_chunk(chunked):
    with pytest.raises(DecodeError, match=r"P01_01\.MP4: out of range: .*past the end of the last chunk \(6\.MP4\)"):
        decode_segment(chunked, seg(), 6.5, 7.5, CONFIGS[0])
    with pytest.raises(DecodeError, match="out of range: segment starts at 7.200s"):
        decode_segment(chunked, seg(), 7.2, 7.3, CONFIGS[0])


def test_missing_middle_chunk_is_a_failure_naming_the_file(chunked, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(chunked, root)
    (root / "P01" / "P01_01.MP4" / "2.MP4").unlink()
    with pytest.raises(DecodeError, match=r"P01_01\.MP4/2\.MP4: missing chunk"):
        decode_segment(root, seg(), 1.5, 2.5, CONFIGS[0])
    frames, _ = decode_segment(root, seg(), 4.5, 5.5, CONFIGS[0])  # the chunks that are there still decode
    assert codes(frames) == list(expected(4.5, 5.5, CONFIGS[0]))


def test_chunk_seconds_given_and_names_disagreeing_are_refused(chunked):
    folder = chunked / "P01" / "P01_01.MP4"
    assert scan_chunks(folder, CHUNK).chunk_seconds == CHUNK
    with pytest.raises(InputError, match=r"P01_01\.MP4: chunk names .* do not fit --chunk-seconds 3.*imply 2 s"):
        decode_chunked_segment(folder, 0.0, 1.0, CONFIGS[0], chunk_seconds=3)


def test_extract_from_a_chunked_root(chunked, tmp_path):
    """End to end from EK-100 annotations: rows inside a chunk, across a boundary, at the end, and one past the end
    (a recorded failure naming the chunked video); a --chunk-seconds the names contradict is exit 2 naming the
    folder, before anything is written."""
    write_classes(tmp_path)
    ann = write_ek100(tmp_path / "EPIC_100_train.csv", [
        dict(nid="inside", vid="P01_01", start=0.5, stop=1.5, f0=26, f1=75),
        dict(nid="across", vid="P01_01", start=3.0, stop=5.0, f0=151, f1=250),
        dict(nid="end", vid="P01_01", start=6.0, stop=7.0, f0=301, f1=350),
        dict(nid="past", vid="P01_01", start=6.5, stop=8.0, f0=326, f1=400)])
    out = tmp_path / "c.h5"
    args = ["--videos", str(chunked), "--model", "mambavl-tiny-clip", "--pretrained", "none", "--frames", "4",
            "--size", "16", "--device", "cpu", "--quiet"]
    r = CliRunner().invoke(app, ["extract", str(ann), "--out", str(out), *args])
    assert r.exit_code == 3, r.output  # finished, with one recorded failure
    assert "past" in r.output and "P01_01.MP4" in r.output and "out of range" in r.output
    with h5py.File(out, "r") as f:
        assert f["valid"][()].tolist() == [True, True, True, False]
        cfg = SamplingConfig(num_frames=4, size=16)
        for row, (start, stop) in enumerate([(0.5, 1.5), (3.0, 5.0), (6.0, 7.0)]):
            assert np.allclose(f["frame_times"][row], expected(start, stop, cfg) / FPS, atol=1e-4)
        assert int(f.attrs["chunk_seconds"]) == 0
    bad = tmp_path / "bad.h5"
    r = CliRunner().invoke(app, ["extract", str(ann), "--out", str(bad), "--chunk-seconds", "3", *args])
    assert r.exit_code == 2 and "P01_01.MP4" in r.output and "--chunk-seconds 3" in r.output, r.output
    assert not bad.exists()


def test_a_short_middle_chunk_is_a_failure_where_a_time_falls_in_the_gap(chunked, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(chunked, root)
    folder = root / "P01" / "P01_01.MP4"
    shutil.copy(folder / "6.MP4", folder / "2.MP4")  # a 1 s chunk where a 2 s one belongs
    decode_segment(root, seg(), 2.2, 2.8, CONFIGS[0])  # inside the part that is there
    with pytest.raises(DecodeError, match=r"P01_01\.MP4/2\.MP4: chunk is 1\.000s long, but the frame at 3\.\d+s"):
        decode_segment(root, seg(), 2.5, 3.9, CONFIGS[0])


def test_generic_csv_names_the_chunk_folder(chunked, tmp_path):
    """A generic CSV's `video` may name the folder itself (as Ego4D's ``<uid>.mp4/0.mp4``)."""
    generic = Segment("g", "", "P01/P01_01.MP4", 1.5, 2.5, None, None, "", "", "", -1, -1, (), 1)
    kind, path = locate_source(chunked, generic)
    assert kind is SourceKind.CHUNKS and path == chunked / "P01" / "P01_01.MP4"
    frames, _ = decode_segment(chunked, generic, 1.5, 2.5, CONFIGS[0])
    assert codes(frames) == list(expected(1.5, 2.5, CONFIGS[0]))
