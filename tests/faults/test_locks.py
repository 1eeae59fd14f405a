"""A cache held by another process (issue item 6, and the fault suite's "two extractions writing one cache"): the
second process is told the file is in use (exit 2), and the holder's cache is not damaged."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
from fault_inputs import write_classes, write_ek100
from typer.testing import CliRunner

from mambavl.cache.reader import open_cache
from mambavl.cli import app
from mambavl.data.synthetic import make_timestamp_video

ARGS = ["--model", "mambavl-tiny-clip", "--pretrained", "none", "--frames", "2", "--size", "32", "--quiet",
        "--decode-workers", "1"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    write_classes(root)
    make_timestamp_video(root / "P04/videos/P04_01.MP4", duration=4.0, fps=25.0)
    write_ek100(root / "ann.csv", [dict(nid=f"P04_01_{i}", vid="P04_01", start=0.5 * i, stop=0.5 * i + 0.8,
                                        f0=int(12.5 * i) + 1, f1=int(12.5 * i) + 20, v=i % 3, n=i % 3)
                                   for i in range(5)])
    return root


@pytest.fixture(scope="module")
def built(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "c.h5"
    r = CliRunner().invoke(app, ["extract", str(clips / "ann.csv"), "--videos", str(clips), "--out", str(out), *ARGS])
    assert r.exit_code == 0, r.output
    return out


def _wait_for(path, proc, timeout=120.0):
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "the other process did not start"
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_cache_held_by_another_process_is_reported_as_in_use(clips, built, tmp_path, mode):
    out = tmp_path / "c.h5"
    shutil.copy(built, out)
    before = h5py.File(out, "r")["features"][()].copy()
    ready = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, time, h5py
        f = h5py.File({str(out)!r}, {mode!r}); pathlib.Path({str(ready)!r}).touch(); time.sleep(60)
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(ready, holder)
        r = CliRunner().invoke(app, ["extract", str(clips / "ann.csv"), "--videos", str(clips), "--out", str(out),
                                     *ARGS])
        assert r.exit_code == 2, r.output
        assert "in use by another process" in r.output and "move it away" not in r.output
        if mode == "r+":  # a writer blocks readers too
            r = CliRunner().invoke(app, ["cache", "inspect", str(out)])
            assert r.exit_code == 2 and "in use by another process" in r.output
    finally:
        holder.kill()
        holder.wait()
    assert np.array_equal(open_cache(out).h5()["features"][()], before)


def test_second_extraction_into_the_same_cache_refuses(clips, tmp_path):
    out, started, go = tmp_path / "c.h5", tmp_path / "started", tmp_path / "go"
    # the first extraction pauses after its first row, holding the cache open for writing
    first = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, time
        from mambavl.extract.decode import SamplingConfig
        from mambavl.extract.encoders import EncoderConfig
        from mambavl.cache.build import ExtractConfig, run_extraction
        from mambavl.progress import Recorder
        class Pause(Recorder):  # after the first written row, wait (holding the cache open) until told to go on
            def advance(self, n=1, **fields):
                super().advance(n, **fields)
                if self.done >= 1 and not pathlib.Path({str(go)!r}).exists():
                    pathlib.Path({str(started)!r}).touch()
                    while not pathlib.Path({str(go)!r}).exists():
                        time.sleep(0.05)
        progress = Pause()
        cfg = ExtractConfig(annotations={str(clips / "ann.csv")!r}, videos={str(clips)!r}, out={str(out)!r},
                            encoder=EncoderConfig(model="mambavl-tiny-clip", pretrained="none", device="cpu"),
                            sampling=SamplingConfig(num_frames=2, size=32), decode_workers=1)
        s = run_extraction(cfg, progress)
        print("first", s.done, s.failed)
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(started, first)
        r = CliRunner().invoke(app, ["extract", str(clips / "ann.csv"), "--videos", str(clips), "--out", str(out),
                                     *ARGS])
        assert r.exit_code == 2 and "in use by another process" in r.output, r.output
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0 and "first 5 0" in stdout, stderr
    cache = open_cache(out)
    assert cache.attrs["complete"] and len(cache.valid_indices()) == 5
