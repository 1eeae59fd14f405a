"""`cache import` of dense per-video features (TIM, TeSTra / ActionFormer fixed-rate, video_features): every feature
holds its own index, so a test sees exactly which rows each segment's window received, and at which times."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from faults.fault_inputs import write_classes, write_ek100
from typer.testing import CliRunner

from mambavl.cache.dense import Timeline, cut_window, fixed_rate_timeline
from mambavl.cache.reader import open_cache
from mambavl.cli import app

TEXT = ["--text-model", "mambavl-tiny-clip", "--text-pretrained", "none"]
D = 4


def _feats(n: int, times: np.ndarray) -> np.ndarray:
    """(n, D): column 0 the feature's index (exact in float16), column 1 its time."""
    out = np.zeros((n, D), np.float32)
    out[:, 0] = np.arange(n)
    out[:, 1] = times
    return out


def _case(tmp_path, rows):
    write_classes(tmp_path)
    write_ek100(tmp_path / "ann.csv", [dict(nid=f"{vid}_{i}", vid=vid, start=a, stop=b, f0=int(a * 60) + 1,
                                            f1=int(b * 60) + 1) for i, (vid, a, b) in enumerate(rows)])
    (tmp_path / "feats").mkdir()
    return tmp_path / "feats"


def _import(tmp_path, *extra, frames=4):
    return CliRunner().invoke(app, ["cache", "import", "--features", str(tmp_path / "feats"), "--annotations",
                                    str(tmp_path / "ann.csv"), "--out", str(tmp_path / "imp.h5"), "--name", "dense",
                                    "--frames", str(frames), *TEXT, *extra])


def _rows(tmp_path, window="recognition"):
    """Per row: the feature indices received (None for a failed row), frame_times; and the failures."""
    cache = open_cache(tmp_path / "imp.h5")
    f = cache.h5()
    p = "" if window == "recognition" else "anticipation/"
    valid = f[p + "valid"][()]
    idx = [f[p + "features"][i, :, 0].astype(int).tolist() if valid[i] else None for i in range(len(valid))]
    return idx, f[p + "frame_times"][()], cache.failures(), dict(cache.attrs)


# ActionFormer's EPIC-KITCHENS SlowFast grid: 30 fps, feature every 16 frames, each sees 32; a 20 s video has
# floor((600 - 32) / 16) + 1 = 36 features, the last covering [560, 592) frames = [18.667, 19.733) s.
AF = dict(fps=30.0, stride=16, window=32, n=36)
AF_ROWS = [("P01_01", 2.0, 4.0),    # centres (16i + 16)/30 in [2, 4]: i = 3..6
           ("P01_01", 5.0, 5.1),    # no centre inside: the feature covering 5.05 with the nearest centre, i = 8
           ("P01_01", 19.0, 19.9),  # past the last interval's end (19.733) by less than one hop: i = 35 only
           ("P01_01", 21.0, 23.0),  # the video is shorter than its annotations: failure
           ("P01_02", 1.0, 2.0)]    # no feature file: failure naming it


def test_fixed_rate_actionformer_grid_cuts_exact_rows(tmp_path):
    src = _case(tmp_path, AF_ROWS)
    tl = fixed_rate_timeline(AF["n"], AF["fps"], AF["stride"], AF["window"])
    np.save(src / "P01_01.npy", _feats(AF["n"], tl.centres))
    r = _import(tmp_path, "--feature-fps", "30", "--stride", "16", "--window", "32")
    assert r.exit_code == 3, r.output
    idx, times, failures, attrs = _rows(tmp_path)
    assert idx[:3] == [[3, 4, 5, 6], [8] * 4, [35] * 4] and idx[3] is None and idx[4] is None
    for row in range(3):
        assert np.allclose(times[row], (16 * np.asarray(idx[row]) + 16) / 30, atol=1e-5)
    reasons = {f["index"]: f["reason"] for f in failures}
    assert set(reasons) == {3, 4}
    assert "reaches outside the features" in reasons[3] and "19.733" in reasons[3]
    assert "P01_02" in reasons[4] and "P01_02.npy" in reasons[4]
    assert attrs["import_format"] == "fixed-rate" and "stride=16" in attrs["feature_times"]
    assert attrs["frames_per_segment"] == 4 and "P01_02_4" in r.output
    r = CliRunner().invoke(app, ["cache", "inspect", str(tmp_path / "imp.h5"), "--json"])
    assert r.exit_code == 0 and '"failed": 2' in r.output and "reaches outside the features" in r.output


def test_fixed_rate_testra_rate_and_anticipation(tmp_path):
    """TeSTra-style: one feature per step at 4 fps, feature i at (i + 0.5)/4; with --anticipation the observed
    window [start - 1 - 2, start - 1] is cut as well, and a window before the video start is a failure."""
    src = _case(tmp_path, [("P02_01", 5.0, 5.9), ("P02_01", 0.5, 1.4)])
    n = 40  # 10 s
    np.save(src / "P02_01.npy", _feats(n, (np.arange(n) + 0.5) / 4))
    r = _import(tmp_path, "--format", "fixed-rate", "--feature-fps", "4", "--anticipation", "--tau-o", "1.9",
                frames=2)
    assert r.exit_code == 3, r.output
    idx, times, _, attrs = _rows(tmp_path)
    # [5, 5.9]: centres 5.125 .. 5.875 (i = 20..23), samples 5.225, 5.675; [0.5, 1.4]: samples 0.725, 1.175
    assert idx == [[20, 22], [2, 4]]
    assert np.allclose(times, [[5.125, 5.625], [0.625, 1.125]])
    aidx, atimes, failures, _ = _rows(tmp_path, "anticipation")
    assert aidx == [[10, 14], None]  # [2.1, 4.0]: samples 2.575, 3.525; row 1's window would end before 0 s
    assert np.allclose(atimes[0], [2.625, 3.625])
    assert [(f["index"], f["window"]) for f in failures] == [(1, "anticipation")]
    assert attrs["anticipation"] and attrs["tau_a"] == 1.0


def test_tim_intervals_sorted_and_odd_last_interval(tmp_path):
    """TIM: 1 s intervals every 0.5 s, listed out of order in the times CSV, the last one shorter; (L, 1, D)."""
    src = _case(tmp_path, [("P03_01", 2.0, 3.0), ("P03_01", 9.4, 9.9), ("P03_01", 9.0, 11.0)])
    starts = np.arange(0, 9.5 + 1e-9, 0.5)
    stops = np.minimum(starts + 1.0, 10.2)  # the last interval [9.5, 10.2]
    centres = (starts + stops) / 2
    np.save(src / "P03_01.npy", _feats(len(starts), centres)[:, None, :])
    order = np.random.default_rng(0).permutation(len(starts))
    (tmp_path / "times.csv").write_text("narration_id,video_id,start_sec,stop_sec,narration_sec\n" + "".join(
        f"P03_01_{k},P03_01,{starts[k]},{stops[k]},0\n" for k in order))
    r = _import(tmp_path, "--times", str(tmp_path / "times.csv"), frames=3)
    assert r.exit_code == 3, r.output
    idx, times, failures, attrs = _rows(tmp_path)
    assert idx[0] == [3, 4, 5]  # centres 2.0, 2.5, 3.0; samples 2.17, 2.5, 2.83
    assert idx[1] == [18, 18, 19]  # centres 9.5, 9.85 (the short last interval); samples 9.48, 9.65, 9.82
    assert np.allclose(times[1], centres[[18, 18, 19]])
    assert idx[2] is None and failures[0]["index"] == 2 and "10.200" in failures[0]["reason"]
    assert attrs["import_format"] == "tim" and "times.csv" in attrs["feature_times"]


def test_video_features_stored_timestamps(tmp_path):
    """video_features: the tool's split files (<vid>_clip.npy, <vid>_timestamps_ms.npy, <vid>_fps.npy) and one
    .npz dict; the stored times are used as they are."""
    src = _case(tmp_path, [("P04_01", 1.0, 2.0), ("P04_02", 0.0, 0.5)])
    t1 = np.arange(0, 5000, 250.0)  # 4 per s
    np.save(src / "P04_01_clip.npy", _feats(len(t1), t1 / 1000))
    np.save(src / "P04_01_timestamps_ms.npy", t1)
    np.save(src / "P04_01_fps.npy", np.array(4.0))
    t2 = np.array([0.0, 100.0, 300.0, 700.0])  # irregular
    np.savez(src / "P04_02.npz", clip=_feats(4, t2 / 1000), timestamps_ms=t2, fps=np.array(10.0))
    r = _import(tmp_path, frames=2)
    assert r.exit_code == 0, r.output
    idx, times, failures, attrs = _rows(tmp_path)
    assert idx == [[5, 7], [1, 2]] and not failures  # samples 1.25, 1.75 -> 1.25, 1.75; 0.125, 0.375 -> 0.1, 0.3
    assert np.allclose(times, [[1.25, 1.75], [0.1, 0.3]])
    assert attrs["import_format"] == "video-features"


def test_format_detection_refuses_what_it_cannot_tell(tmp_path):
    src = _case(tmp_path, [("P05_01", 1.0, 2.0)])
    np.save(src / "P05_01.npy", np.zeros((30, D), np.float32))
    r = _import(tmp_path)
    assert r.exit_code == 2 and "P05_01.npy" in r.output and "--feature-fps" in r.output
    np.save(src / "P05_01_timestamps_ms.npy", np.arange(30) * 100.0)
    r = _import(tmp_path, "--feature-fps", "10")
    assert r.exit_code == 2 and "several formats" in r.output and "--format" in r.output
    r = _import(tmp_path, "--format", "dense")
    assert r.exit_code == 2 and "fixed-rate" in r.output
    r = _import(tmp_path, "--format", "fixed-rate", "--feature-fps", "10")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "imp.h5.partial").exists()


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_unsafe_pickles_are_refused(tmp_path):
    src = _case(tmp_path, [("P06_01", 1.0, 2.0)])
    with open(src / "P06_01.pkl", "wb") as f:
        pickle.dump(_Exploit(), f)
    r = _import(tmp_path, "--feature-fps", "10")
    assert r.exit_code == 2 and "P06_01.pkl" in r.output and "refusing to load" in r.output
    assert not (tmp_path / "imp.h5").exists() and not (tmp_path / "imp.h5.partial").exists()
    (src / "P06_01.pkl").unlink()
    np.save(src / "P06_01.npy", np.zeros((30, D), np.float32))
    (tmp_path / "ft.pkl").write_bytes(b"\x80\x02cpandas.core.frame\nDataFrame\n)\x81.")  # TIM's DataFrame pickle
    r = _import(tmp_path, "--times", str(tmp_path / "ft.pkl"))
    assert r.exit_code == 2 and "pandas" in r.output and "to_csv" in r.output


def test_cut_window_uses_nearest_feature_in_window():
    tl = Timeline(np.array([0.5, 1.5, 2.5]), np.array([0.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0]))
    assert cut_window(tl, 0.0, 3.0, 3).tolist() == [0, 1, 2]
    assert cut_window(tl, 1.2, 1.3, 2).tolist() == [1, 1]
    with pytest.raises(ValueError, match="reaches outside"):
        cut_window(tl, 2.9, 4.5, 2)


@pytest.mark.parametrize("container", ["npz", "pt", "pkl", "h5"])
def test_per_video_containers(tmp_path, container):
    """The same fixed-rate features in each container give the same rows (.pt: weights_only; .pkl: arrays only)."""
    import h5py
    import torch

    src = _case(tmp_path, [("P07_01", 1.0, 2.0)])
    a = _feats(40, (np.arange(40) + 0.5) / 10)
    if container == "npz":
        np.savez(src / "P07_01.npz", feats=a)
    elif container == "pt":
        torch.save(torch.from_numpy(a), src / "P07_01.pt")
    elif container == "pkl":
        with open(src / "P07_01.pkl", "wb") as f:
            pickle.dump(a, f)
    else:
        with h5py.File(src / "P07_01.h5", "w") as f:
            f["features"] = a
    r = _import(tmp_path, "--feature-fps", "10")
    assert r.exit_code == 0, r.output
    idx, times, _, _ = _rows(tmp_path)
    assert idx == [[11, 13, 16, 18]]  # samples 1.125, 1.375, 1.625, 1.875 over centres 1.05 .. 1.95
