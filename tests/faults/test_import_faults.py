"""Feature import and extraction refuse what they cannot store truly (issue items 2, 5, 9): RULSTM LMDB keys at
their own frame rate, values float16 cannot hold, feature folders holding other splits too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fault_inputs import write_classes, write_ek100, write_video_info
from typer.testing import CliRunner

from mambavl.cache.reader import open_cache
from mambavl.cli import app
from mambavl.extract.decode import SamplingConfig
from mambavl.extract.encoders import EncoderConfig, build_encoder
from mambavl.cache.build import ExtractConfig, run_extraction

TEXT = ["--text-model", "mambavl-tiny-clip", "--text-pretrained", "none"]


def _rulstm_lmdb(path, seconds: float, fps: float = 30.0, video: str = "P01_01"):
    """Keys VIDEO_frame_%010d.jpg counting `fps` frames; each vector holds its frame's start time in seconds."""
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for n in range(1, int(seconds * fps) + 1):
            txn.put(f"{video}_frame_{n:010d}.jpg".encode(), np.full(8, (n - 1) / fps, np.float32).tobytes())
    env.close()


@pytest.fixture()
def lmdb_case(tmp_path):
    write_classes(tmp_path)
    write_video_info(tmp_path, [("P01_01", 40.0, 59.9400599400599)])
    # action 10-12 s: EK-100 frames 601..721 (numbered at 60), RULSTM keys 301..360 (30 fps)
    write_ek100(tmp_path / "ann.csv", [dict(nid="P01_01_0", vid="P01_01", start=10.0, stop=12.0, f0=601, f1=721),
                                       dict(nid="P01_01_1", vid="P01_01", start=30.0, stop=31.5, f0=1801, f1=1891)])
    return tmp_path


def _import(case, src, *extra):
    return CliRunner().invoke(app, ["cache", "import", "--features", str(src), "--annotations", str(case / "ann.csv"),
                                    "--out", str(case / "imp.h5"), "--name", "rulstm", *TEXT, *extra])


def test_rulstm_lmdb_is_read_at_its_own_frame_rate(lmdb_case):
    _rulstm_lmdb(lmdb_case / "rgb_lmdb", 40.0)
    r = _import(lmdb_case, lmdb_case / "rgb_lmdb", "--frames", "4")
    assert r.exit_code == 2 and "--source-fps" in r.output and not (lmdb_case / "imp.h5").exists()
    r = _import(lmdb_case, lmdb_case / "rgb_lmdb", "--frames", "4", "--source-fps", "30")
    assert r.exit_code == 0, r.output
    f = open_cache(lmdb_case / "imp.h5").h5()
    for row, (start, stop) in enumerate([(10.0, 12.0), (30.0, 31.5)]):
        key_times = f["features"][row, :, 0].astype(np.float64)  # each vector holds its key's time
        assert np.all((key_times >= start - 0.05) & (key_times < stop)), key_times
        assert np.allclose(f["frame_times"][row], key_times, atol=0.02)  # the times stored are the keys' times


def test_lmdb_window_must_be_covered(lmdb_case):
    _rulstm_lmdb(lmdb_case / "rgb_lmdb", 31.0)  # ends inside the second segment
    r = _import(lmdb_case, lmdb_case / "rgb_lmdb", "--source-fps", "30")
    assert r.exit_code == 2
    assert "segment P01_01_1 (row 2, 30.00-31.50s)" in r.output and "15 of them are missing" in r.output
    assert not (lmdb_case / "imp.h5").exists()


def _feature_folder(tmp_path, n=12, extra=0):
    write_classes(tmp_path)
    rows = [dict(nid=f"P09_01_{i}", vid="P09_01", start=1.0 * i, stop=1.0 * i + 0.8, f0=25 * i + 1, f1=25 * i + 20,
                 v=i % 3, n=(i + 1) % 3) for i in range(n)]
    write_ek100(tmp_path / "ann.csv", rows)
    feats = tmp_path / "feats"
    feats.mkdir()
    rng = np.random.default_rng(0)
    arrays = [rng.normal(0, 1, (4, 16)).astype(np.float32) for _ in range(n + extra)]
    for i, a in enumerate(arrays):  # the extra files belong to another split's segments
        np.save(feats / (f"P09_01_{i}.npy" if i < n else f"P09_99_{i}.npy"), a)
    return feats, arrays


def test_values_float16_cannot_hold_are_refused(tmp_path):
    feats, arrays = _feature_folder(tmp_path)
    np.save(feats / "P09_01_3.npy", arrays[3] * 1e5)  # un-normalised: beyond float16's 65504
    arrays[7][2, 5] = np.nan
    np.save(feats / "P09_01_7.npy", arrays[7])
    r = _import(tmp_path, feats)
    assert r.exit_code == 2, r.output
    assert "2 segment(s) hold values the float16 cache cannot store" in r.output
    assert "P09_01_3 (row 4):" in r.output and "beyond float16's range" in r.output
    assert "P09_01_7 (row 8): 1 NaN" in r.output
    assert not (tmp_path / "imp.h5").exists() and not (tmp_path / "imp.h5.partial").exists()


def test_folder_holding_other_splits_imports_what_the_annotations_name(tmp_path):
    feats, arrays = _feature_folder(tmp_path, n=6, extra=4)
    r = _import(tmp_path, feats)
    assert r.exit_code == 0, r.output
    assert "imported 6 segments" in r.output and "4 feature files" in r.output and "not used" in r.output
    stored = open_cache(tmp_path / "imp.h5").h5()["features"][()]
    assert np.allclose(stored, np.stack(arrays[:6]), atol=1e-2)
    (feats / "P09_01_5.npy").unlink()
    (tmp_path / "imp.h5").unlink()
    r = _import(tmp_path, feats)
    assert r.exit_code == 2 and "no features for 1 of 6 segments, e.g. P09_01_5 (row 6)" in r.output


class _Overflowing:
    """The tiny encoder, except that its `poison`-th segment comes out as inf (an fp16 overflow)."""

    def __init__(self, poison: int):
        self.inner, self.poison, self.calls = build_encoder(EncoderConfig(model="mambavl-tiny-clip",
                                                                          pretrained="none", device="cpu")), poison, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_segments(self, frames):
        out = self.inner.encode_segments(frames)
        self.calls += 1
        return torch.full_like(out, float("inf")) if self.calls == self.poison else out


def test_extraction_records_nonfinite_encoder_output(tmp_path):
    from mambavl.data.synthetic import make_timestamp_video

    write_classes(tmp_path)
    make_timestamp_video(tmp_path / "P03/videos/P03_01.MP4", duration=4.0, fps=25.0)
    write_ek100(tmp_path / "ann.csv", [dict(nid=f"P03_01_{i}", vid="P03_01", start=1.0 * i, stop=1.0 * i + 0.8,
                                            f0=25 * i + 1, f1=25 * i + 20) for i in range(3)])
    cfg = ExtractConfig(annotations=str(tmp_path / "ann.csv"), videos=str(tmp_path), out=str(tmp_path / "c.h5"),
                        encoder=EncoderConfig(model="mambavl-tiny-clip", pretrained="none", device="cpu"),
                        sampling=SamplingConfig(num_frames=2, size=32), segments_per_batch=1, decode_workers=1)
    summary = run_extraction(cfg, encoder=_Overflowing(poison=2))
    assert (summary.done, summary.failed) == (2, 1)
    assert summary.failures[0]["narration_id"] == "P03_01_1"
    assert "non-finite features from the encoder" in summary.failures[0]["reason"]
    cache = open_cache(tmp_path / "c.h5")
    assert cache.valid_indices().tolist() == [0, 2]
    assert np.isfinite(cache.h5()["features"][()]).all()
