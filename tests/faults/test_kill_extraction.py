"""Extraction killed with SIGKILL at several points, resumed each time: the final cache equals an uninterrupted
one bit for bit (same rows, no duplicates, no half rows counted). Kill points are HDF5 dataset writes of the
child process: it performs the write and dies before anything after it (flush, done-flag), so a row can be left
half written — the case the done-flags exist for."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from fault_inputs import write_classes, write_ek100

from mambavl.data.synthetic import make_timestamp_video
from mambavl.extract.decode import SamplingConfig
from mambavl.extract.encoders import EncoderConfig
from mambavl.cache.build import ExtractConfig, run_extraction

# The n-th dataset write of each successive child process. The first dies while the new file is being built
# (it writes one all_noun_classes entry per row there); the others resume and die inside the row phase, where a
# row is 4 writes (features, frame_times, num_frames, valid). The second child also creates (7 writes) first:
# 12 = after the second row's features, before its done-flag.
KILL_POINTS = (3, 12, 10, 16, 5)

CHILD = textwrap.dedent("""
    import os, signal, sys
    import h5py
    from mambavl.extract.decode import SamplingConfig
    from mambavl.extract.encoders import EncoderConfig
    from mambavl.cache.build import ExtractConfig, run_extraction

    ann, videos, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    setitem, count = h5py.Dataset.__setitem__, [0]

    def dying_setitem(self, key, value):
        setitem(self, key, value)
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    h5py.Dataset.__setitem__ = dying_setitem
    run_extraction(ExtractConfig(annotations=ann, videos=videos, out=out, anticipation=True, tau_a=0.5, tau_o=0.5,
                                 encoder=EncoderConfig(model="mambavl-tiny-clip", pretrained="none", device="cpu"),
                                 sampling=SamplingConfig(num_frames=2, size=32), decode_workers=1,
                                 segments_per_batch=2))
""")


def _cfg(root, out):
    return ExtractConfig(annotations=str(root / "ann.csv"), videos=str(root), out=str(out), anticipation=True,
                         tau_a=0.5, tau_o=0.5,
                         encoder=EncoderConfig(model="mambavl-tiny-clip", pretrained="none", device="cpu"),
                         sampling=SamplingConfig(num_frames=2, size=32), decode_workers=1, segments_per_batch=2)


def _contents(path) -> dict:
    """Every dataset and attribute of an HDF5 file (attribute `created` aside), for exact comparison."""
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = {k: v for k, v in f.attrs.items() if k != "created"}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    write_classes(root)
    make_timestamp_video(root / "P04/videos/P04_01.MP4", duration=5.0, fps=25.0)
    rows = [dict(nid=f"P04_01_{i}", vid="P04_01", start=0.6 * i + 1.0, stop=0.6 * i + 1.5, f0=int(15 * i) + 26,
                 f1=int(15 * i) + 38, v=i % 3, n=i % 3) for i in range(6)]
    # no such video: a failure in both windows
    rows.append(dict(nid="P04_02_0", vid="P04_02", start=1.0, stop=1.5, f0=26, f1=38))
    write_ek100(root / "ann.csv", rows)
    return root


def test_sigkill_during_extraction_then_resume_is_bit_identical(clips, tmp_path):
    reference = run_extraction(_cfg(clips, tmp_path / "reference.h5"))
    assert (reference.done, reference.failed) == (6, 2)
    out = tmp_path / "killed.h5"
    kills = 0
    for i, point in enumerate(KILL_POINTS):
        child = subprocess.run([sys.executable, "-c", CHILD, str(clips / "ann.csv"), str(clips), str(out),
                                str(point)], capture_output=True, text=True, timeout=300)
        assert child.returncode in (-9, 0), child.stderr[-2000:]
        kills += child.returncode == -9
        if i == 0:  # killed while creating: no cache under its name, the half-built file under a temporary one
            assert child.returncode == -9 and not out.exists()
            assert len(list(tmp_path.glob("killed.h5.creating-*"))) == 1
            continue
        with h5py.File(out, "r") as f:  # a readable HDF5 file after every kill, rows partly done
            assert not f.attrs["complete"] and 0 < f["valid"][()].sum() + f["anticipation/valid"][()].sum() < 12
    assert kills >= 5
    resumed = run_extraction(_cfg(clips, out))
    assert not list(tmp_path.glob("killed.h5.creating-*"))  # the next run removed the dead one's leftover
    assert (resumed.done, resumed.failed) == (6, 2)
    want, got = _contents(tmp_path / "reference.h5"), _contents(out)
    assert sorted(want) == sorted(got)
    assert {k: str(v) for k, v in want.pop("attrs").items()} == {k: str(v) for k, v in got.pop("attrs").items()}
    for name in want:
        assert np.array_equal(want[name], got[name], equal_nan=want[name].dtype.kind == "f"), name
