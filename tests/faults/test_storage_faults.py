"""Storage faults: caches that point outside themselves (external raw storage, external links, virtual datasets),
caches whose tail is zero-filled or cut off, outputs on a read-only file system, and a merge of more shards than the
open-files limit (`ulimit -n`) allows at once.

Real read-only mounts are made in a private mount namespace (`unshare -rm`, no root needed where user namespaces
are allowed); where that is impossible those tests skip and the simulated ones (patched OS calls) still run.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from mambavl.cache import schema
from mambavl.cache.build import ExtractConfig, run_extraction
from mambavl.cache.merge import merge_caches
from mambavl.cache.reader import open_cache
from mambavl.cache.synthetic import make_planted_cache
from mambavl.cli import app
from mambavl.data.synthetic import make_kitchen_dataset
from mambavl.errors import InputError, check_writable
from mambavl.extract.decode import SamplingConfig
from mambavl.extract.encoders import EncoderConfig

REPO = Path(__file__).resolve().parents[2]
TRAIN_FAST = ["--epochs", "1", "--min-steps", "0", "--batch-size", "8", "--device", "cpu", "--quiet",
              "--set", "d_model=32", "--set", "n_layers=1"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    make_planted_cache(root / "val.h5", n=20, seed=1)
    return make_planted_cache(root / "clean.h5", n=40, seed=0)


def _variant(clean: Path, path: Path, edit) -> Path:
    shutil.copy(clean, path)
    with h5py.File(path, "r+") as f:
        edit(f, path.parent)
    return path


def _external_storage(f, root):
    shape, dtype = f["features"].shape, f["features"].dtype
    secret = (np.arange(int(np.prod(shape))) % 1000 + 1000).astype(np.float16)
    secret.tofile(root / "secret.bin")
    del f["features"]
    f.create_dataset("features", shape=shape, dtype=dtype, external=[(str(root / "secret.bin"), 0, secret.nbytes)])


def _external_storage_in_group(f, root):  # the anticipation-less kind, in a nested group
    np.zeros(8, np.float16).tofile(root / "other.bin")
    del f["answers"]["verb"]
    f["answers"].create_dataset("verb", shape=(8,), dtype=np.float16, external=[("other.bin", 0, 16)])


def _external_link(f, root):
    with h5py.File(root / "private.h5", "w") as o:
        o["v"] = np.asarray([b"secret"], dtype=object)
    del f["classes"]["verb"]
    f["classes"]["verb"] = h5py.ExternalLink(str(root / "private.h5"), "/v")


def _virtual(f, root):
    shape, dtype = f["features"].shape, f["features"].dtype
    with h5py.File(root / "source.h5", "w") as o:
        o["x"] = np.ones(shape, dtype)
    del f["features"]
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    layout[:] = h5py.VirtualSource(str(root / "source.h5"), "x", shape=shape)
    f.create_virtual_dataset("features", layout)


@pytest.mark.parametrize("edit, dataset, target", [
    (_external_storage, "features", "secret.bin"),
    (_external_storage_in_group, "answers/verb", "other.bin"),
    (_external_link, "classes/verb", "private.h5"),
    (_virtual, "features", "source.h5"),
])
def test_cache_pointing_outside_itself_is_refused_by_every_command(tmp_path, clean, edit, dataset, target):
    bad = _variant(clean, tmp_path / "shared.h5", edit)
    with pytest.raises(InputError) as info:
        open_cache(bad)
    assert dataset in str(info.value) and target in str(info.value) and "outside the file" in str(info.value)
    for args in (["cache", "inspect", str(bad)],
                 ["train", "--train-cache", str(bad), "--val-cache", str(clean.parent / "val.h5"),
                  "--out", str(tmp_path / "run"), *TRAIN_FAST],
                 ["train", "--train-cache", str(clean), "--val-cache", str(bad), "--out", str(tmp_path / "run2"),
                  *TRAIN_FAST]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert dataset in res.output and target in res.output
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run2" / "last.pt").exists()
    # the writer refuses to resume into such a file as well (it would read its done-flags from elsewhere)
    with pytest.raises(InputError, match="outside the file"):
        schema.open_h5(bad, "r+")


def test_virtual_dataset_inside_the_file_is_accepted(tmp_path, clean):
    def inside(f, root):
        layout = h5py.VirtualLayout(shape=f["valid"].shape, dtype=bool)
        layout[:] = h5py.VirtualSource(".", "valid", shape=f["valid"].shape)
        f.create_virtual_dataset("valid_view", layout)

    ok = _variant(clean, tmp_path / "inside.h5", inside)
    assert open_cache(ok).n == 40


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7, 0.9, 0.97])
def test_zero_filled_tail_is_reported_as_damaged(tmp_path, clean, fraction):
    data = clean.read_bytes()
    cut = int(len(data) * fraction)
    bad = tmp_path / "val_zerotail.h5"
    bad.write_bytes(data[:cut] + bytes(len(data) - cut))
    with pytest.raises(InputError) as info:
        c = open_cache(bad)
        c.labels(), c.questions(), c.answers(), c.failures()
    assert "damaged" in str(info.value) and str(bad) in str(info.value)
    res = CliRunner().invoke(app, ["train", "--train-cache", str(clean), "--val-cache", str(bad),
                                   "--out", str(tmp_path / "run"), *TRAIN_FAST])
    assert res.exit_code == 2 and "damaged" in res.output and "val_zerotail.h5" in res.output, res.output


def test_truncated_cache_says_damaged_not_move_a_healthy_file(tmp_path, clean):
    bad = tmp_path / "trunc.h5"
    bad.write_bytes(clean.read_bytes()[: len(clean.read_bytes()) // 2])
    with pytest.raises(InputError, match="damaged"):
        open_cache(bad)


# ---------------------------------------------------------------------------------------------------- read-only


def _readonly_mount(src: Path, mnt: Path, command: list[str]) -> subprocess.CompletedProcess:
    """Run `command` with `src` bind-mounted read-only at `mnt` in a private mount namespace; skip where the system
    does not allow it."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not available")
    mnt.mkdir(exist_ok=True)
    q = shlex.quote
    script = (f"mount --bind {q(str(src))} {q(str(mnt))} && mount -o remount,ro,bind {q(str(mnt))} || exit 97; "
              f"exec {' '.join(q(c) for c in command)}")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=600)
    if p.returncode == 97 or "unshare:" in p.stderr[:200]:
        pytest.skip(f"cannot make a read-only mount here: {p.stderr.strip()[:200]}")
    return p


def test_outputs_on_a_read_only_file_system(tmp_path, clean):
    src = tmp_path / "share"
    src.mkdir()
    shutil.copy(clean, src / "train.h5")
    shutil.copy(clean.parent / "val.h5", src / "val.h5")
    ro = tmp_path / "ro"
    code = textwrap.dedent(f"""
        import sys
        from mambavl.cli import main
        commands = [
            ["train", "--train-cache", "{ro}/train.h5", "--val-cache", "{ro}/val.h5", "--out", "{ro}/run2",
             {", ".join(repr(a) for a in TRAIN_FAST)}],
            ["cache", "merge", "{ro}/merged.h5", "{ro}/train.h5"],
            ["cache", "inspect", "{ro}/train.h5"],
        ]
        for args in commands:
            sys.argv = ["mambavl", *args]
            try:
                main()
                print("RC 0")
            except SystemExit as exc:
                print("RC", exc.code, flush=True)
    """)
    p = _readonly_mount(src, ro, [sys.executable, "-c", code])
    rcs = [line.split()[1] for line in p.stdout.splitlines() if line.startswith("RC ")]
    assert rcs == ["2", "2", "0"], p.stdout + p.stderr
    assert p.stderr.count("read-only file system") == 2, p.stderr
    assert f"{ro}/run2" in p.stderr and f"{ro}/merged.h5" in p.stderr
    assert "move it away" not in p.stderr and "Traceback" not in p.stderr
    assert not (src / "run2").exists()


def test_resume_of_a_finished_cache_on_a_read_only_file_system_is_not_called_damaged(tmp_path, clean, monkeypatch):
    # simulated (works everywhere): the file system reports read-only
    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly())
    with pytest.raises(InputError) as info:
        check_writable(clean, "cache")
    assert "read-only file system" in str(info.value) and str(clean) in str(info.value)
    monkeypatch.undo()

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Unable to synchronously open file (unable to open file: errno = 30, error "
                                   "message = 'Read-only file system')")

    monkeypatch.setattr(h5py, "File", refuse)
    with pytest.raises(InputError) as info:
        schema.open_h5(clean, "r+")
    assert "read-only file system" in str(info.value) and "move it away" not in str(info.value)


# ------------------------------------------------------------------------------------------------ open-files limit


def test_open_files_limit_is_named_never_damage(clean, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EMFILE, "Unable to synchronously open file (unable to open file: errno = 24, error "
                                    "message = 'Too many open files')")

    monkeypatch.setattr(h5py, "File", refuse)
    with pytest.raises(InputError) as info:
        open_cache(clean)
    text = str(info.value)
    assert "ulimit -n" in text and "too many open files" in text and "move it away" not in text
    assert "damaged" not in text


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_encoder):
    root = tmp_path_factory.mktemp("shards")
    kitchen = make_kitchen_dataset(root / "data", n_train=24, n_val=0, n_test=0, size=32, segments_per_video=6)
    enc_cfg = EncoderConfig(model="mambavl-tiny-clip", pretrained="none", device="cpu")
    paths = []
    for i in range(24):
        out = root / f"train.shard{i:03d}.h5"
        run_extraction(ExtractConfig(annotations=str(kitchen.train_csv), videos=str(kitchen.videos), out=str(out),
                                     encoder=enc_cfg, sampling=SamplingConfig(num_frames=2, size=32), shard=(i, 24),
                                     decode_workers=1), None, tiny_encoder)
        paths.append(out)
    whole = root / "whole.h5"
    merge_caches([str(p) for p in paths], str(whole))
    return paths, whole


def test_merge_of_more_shards_than_the_open_files_limit(tmp_path, shards):
    """24 shards merged under an open-files limit a dozen descriptors above what the interpreter holds: the merge
    opens shards a few at a time and gives the same cache as without the limit."""
    paths, whole = shards
    out = tmp_path / "merged.h5"
    code = textwrap.dedent(f"""
        import os, resource
        from mambavl.cache.merge import merge_caches
        in_use = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 12, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        merge_caches({[str(p) for p in paths]!r}, {str(out)!r})
        print("merged")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 0 and "merged" in p.stdout, p.stderr[-3000:]
    with h5py.File(out, "r") as a, h5py.File(whole, "r") as b:
        for name in ("features", "valid", "frame_times", "narration_id", "source_row"):
            assert np.array_equal(a[name][()], b[name][()], equal_nan=name == "frame_times"), name


# ------------------------------------------------------------------------------------------------ incomplete cache


def _unfinished(clean: Path, path: Path, done: int) -> Path:
    """A copy of `clean` as an extraction killed after `done` rows leaves it: later rows not flagged, not complete."""
    shutil.copy(clean, path)
    with h5py.File(path, "r+") as f:
        valid = f["valid"][()]
        valid[done:] = False
        f["valid"][...] = valid
        f.attrs["complete"] = False
    return path


def test_incomplete_cache_is_refused_for_training_and_evaluation_unless_allowed(tmp_path, clean):
    import json

    partial = _unfinished(clean, tmp_path / "train.h5", 16)
    val = clean.parent / "val.h5"
    res = CliRunner().invoke(app, ["train", "--train-cache", str(partial), "--val-cache", str(val),
                                   "--out", str(tmp_path / "refused"), *TRAIN_FAST])
    assert res.exit_code == 2, res.output
    assert "16 of 40 rows" in res.output and "train.h5" in res.output and "--allow-incomplete" in res.output
    assert "mambavl extract" in res.output  # how to finish it
    assert not (tmp_path / "refused" / "last.pt").exists()
    # asked for explicitly: trains on the 16 finished rows and records the choice in the run
    res = CliRunner().invoke(app, ["train", "--train-cache", str(partial), "--val-cache", str(val),
                                   "--out", str(tmp_path / "run"), "--allow-incomplete", *TRAIN_FAST])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["allow_incomplete"] is True
    # a finished extraction with recorded failures is complete: trained on as before
    failed = make_planted_cache(tmp_path / "failed.h5", n=40, seed=0, invalid_rows=3)
    res = CliRunner().invoke(app, ["train", "--train-cache", str(failed), "--val-cache", str(val),
                                   "--out", str(tmp_path / "run_failed"), *TRAIN_FAST])
    assert res.exit_code == 0, res.output
    # evaluation: refused on an unfinished cache, allowed explicitly and recorded in metrics.json
    partial_val = _unfinished(val, tmp_path / "val.h5", 7)
    ckpt = str(tmp_path / "run_failed" / "last.pt")
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", ckpt, "--cache", str(partial_val), "--out",
                                   str(tmp_path / "eval"), "--device", "cpu", "--no-plots", "--quiet"])
    assert res.exit_code == 2 and "7 of 20 rows" in res.output, res.output
    assert not (tmp_path / "eval").exists()
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", ckpt, "--cache", str(partial_val), "--out",
                                   str(tmp_path / "eval"), "--device", "cpu", "--no-plots", "--quiet",
                                   "--allow-incomplete"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["cache_completeness"] == {"complete": False, "rows_done": 7, "rows_total": 20,
                                             "allow_incomplete": True}
    assert metrics["config"]["allow_incomplete"] is True


def test_cache_killed_after_its_last_row_is_complete(tmp_path, clean):
    from mambavl.cache.reader import require_complete

    whole = _unfinished(clean, tmp_path / "killed_late.h5", 40)  # every row flagged, `complete` never written
    assert require_complete(open_cache(whole))["complete"] is True


# ------------------------------------------------------------------------------------------------------ disk full


def _rows(n: int):
    from mambavl.cache.writer import RowMeta

    return RowMeta([f"P01_01_{i}" for i in range(n)], ["P01_01"] * n, ["P01"] * n, [""] * n, np.zeros(n, np.int32),
                   np.zeros(n, np.int32), [()] * n, np.arange(n, dtype=float), np.arange(n, dtype=float) + 1)


ATTRS = dict(frames_per_segment=16, feature_dim=64)


def test_full_disk_refused_before_the_cache_is_created(tmp_path, monkeypatch):
    from mambavl.cache import writer as W

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(W.shutil, "disk_usage", lambda p: usage._replace(free=300_000))
    with pytest.raises(InputError) as info:
        W.CacheWriter(tmp_path / "c.h5", ATTRS, _rows(400), ["a"], ["b"])
    text = str(info.value)
    assert "no space left on" in text and "need ~" in text and "MB" in text and "c.h5" in text
    assert list(tmp_path.iterdir()) == []


def test_disk_filling_up_during_creation_leaves_no_temporary_file(tmp_path, monkeypatch):
    from mambavl.cache import writer as W

    real, calls = W.allocate_early, []

    def early(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(W, "allocate_early", early)
    with pytest.raises(InputError, match="no space left on"):
        W.CacheWriter(tmp_path / "c.h5", ATTRS, _rows(10), ["a"], ["b"])
    assert list(tmp_path.iterdir()) == []  # neither the cache nor its *.creating-PID file


def test_disk_full_while_rows_are_written_keeps_finished_rows(tmp_path, monkeypatch):
    from mambavl.cache import writer as W

    path = tmp_path / "c.h5"
    feats = np.ones((16, 64))
    with pytest.raises(InputError, match="no space left on"):
        with W.CacheWriter(path, ATTRS, _rows(10), ["a"], ["b"]) as w:
            for i in range(10):
                if i == 6:
                    monkeypatch.setattr(h5py.File, "flush", lambda self: (_ for _ in ()).throw(
                        OSError(errno.ENOSPC, "No space left on device")))
                w.write_row(i, feats * i, np.arange(16))
    monkeypatch.undo()
    with W.CacheWriter(path, ATTRS, _rows(10), ["a"], ["b"]) as w:  # resumes: the 6 finished rows are kept
        assert w.pending_rows() == [6, 7, 8, 9]
        for i in w.pending_rows():
            w.write_row(i, feats * i, np.arange(16))
        assert w.finalize()
    c = open_cache(path)
    assert c.valid_indices().tolist() == list(range(10))
    assert np.array_equal(c.h5()["features"][3, 0, :3], np.full(3, 3, np.float16))


RACE = """
import collections, sys
import numpy as np
from mambavl.cache import writer as W
from mambavl.errors import InputError
if sys.argv[1] == "race":  # the free space looked sufficient, then HDF5 ran out of it
    W.shutil = type("S", (), {{"disk_usage": staticmethod(
        lambda p: collections.namedtuple("U", "total used free")(1 << 40, 0, 1 << 40))}})
try:
    n = 400
    rows = W.RowMeta([f"P01_01_{{i}}" for i in range(n)], ["P01_01"] * n, ["P01"] * n, [""] * n,
                     np.zeros(n, np.int32), np.zeros(n, np.int32), [()] * n, np.zeros(n), np.ones(n))
    W.CacheWriter({out!r}, dict(frames_per_segment=16, feature_dim=64), rows, ["a"], ["b"]).close()
    print("created")
except InputError as exc:
    print("refused:", exc)
"""


@pytest.mark.parametrize("mode", ["check", "race"])
def test_full_tmpfs_real(tmp_path, mode):
    """A real 200 KiB tmpfs (private mount namespace); the 400-row cache needs ~1.9 MB. Without the check HDF5
    segfaulted on close and left `c.h5.creating-PID` filling the disk."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not available")
    small = tmp_path / "small"
    small.mkdir()
    code = RACE.format(out=str(small / "c.h5"))
    script = (f"mount -t tmpfs -o size=200k tmpfs {shlex.quote(str(small))} || exit 97; "
              f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} {mode}; echo rc=$?; ls -A {shlex.quote(str(small))}")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    if p.returncode == 97 or "unshare:" in p.stderr[:200]:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()[:200]}")
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("refused: no space left on") and str(small) in lines[0], p.stdout + p.stderr
    assert lines[1] == "rc=0" and len(lines) == 2, p.stdout + p.stderr  # no crash, nothing left in the tmpfs
