"""Extraction across processes: the cost-balanced shard plan, the merge's checks, and a 2-process torchrun (gloo, CPU)
extraction that resumes a crashed shard and leaves one cache equal, bit for bit, to the single-process one."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from mambavl.cache.build import run_extraction
from mambavl.cache.distributed import launch_from_env, shard_path
from mambavl.cache.merge import merge_caches
from mambavl.data.annotations import Segment, VideoInfo, load_annotations
from mambavl.data.synthetic import make_kitchen_dataset
from mambavl.errors import InputError
from mambavl.extract.decode import SamplingConfig
from mambavl.extract.shards import imbalance, lpt_assign, plan_shards, segment_costs

ARGS = ["--model", "mambavl-tiny-clip", "--pretrained", "none", "--frames", "4", "--size", "64", "--quiet",
        "--anticipation", "--tau-a", "0.5", "--tau-o", "1.0"]


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory):
    return make_kitchen_dataset(tmp_path_factory.mktemp("kitchen"), n_train=9, n_val=2, n_test=1,
                                segments_per_video=3)


@pytest.fixture
def _cfg(tiny_extract_config):
    return tiny_extract_config


def _seg(i, video, start, stop):
    return Segment(narration_id=f"{video}_{i}", participant_id=video.split("_")[0], video_id=video,
                   start_time=start, stop_time=stop, start_frame=None, stop_frame=None, narration="", verb="",
                   noun="", verb_class=-1, noun_class=-1, all_noun_classes=(), row=i + 1)


def test_lpt_plan_is_a_deterministic_balanced_partition():
    rng = np.random.default_rng(0)
    costs = rng.lognormal(1.0, 1.2, size=500)  # long-tailed, as EK-100 segment lengths are
    for n in (1, 2, 3, 8):
        plan = plan_shards(costs, n)
        assert np.array_equal(np.sort(np.concatenate(plan)), np.arange(500))
        assert all((np.diff(rows) > 0).all() for rows in plan)  # each shard in annotation order
        assert [r.tolist() for r in plan] == [r.tolist() for r in plan_shards(costs.copy(), n)]
        # Graham's bound for LPT: makespan <= 4/3 OPT, and OPT >= max(mean load, largest job)
        lower = max(costs.sum() / n, costs.max())
        assert max(costs[r].sum() for r in plan) <= 4 / 3 * lower + 1e-9
    round_robin = [np.arange(500)[np.arange(500) % 8 == i] for i in range(8)]
    assert imbalance(costs, plan_shards(costs, 8)) < imbalance(costs, round_robin)
    # ties: equal costs go round-robin over the shards in row order
    assert lpt_assign(np.ones(5), 2).tolist() == [0, 1, 0, 1, 0]


def test_costs_follow_frames_times_pixels(tmp_path):
    (tmp_path / "P01" / "videos").mkdir(parents=True)
    for vid in ("P01_01", "P01_02", "P01_03"):
        (tmp_path / "P01" / "videos" / f"{vid}.MP4").write_bytes(b"x")  # located, never probed: video_info has it
    (tmp_path / "P01" / "rgb_frames" / "P01_04").mkdir(parents=True)
    info = {"P01_01": VideoInfo(100.0, 59.94, "1920x1080"), "P01_02": VideoInfo(100.0, 59.94, "1920x1440"),
            "P01_03": VideoInfo(100.0, 90.0, "1920x1080"), "P01_04": VideoInfo(100.0, 50.0, "1920x1080")}
    segs = [_seg(0, "P01_01", 10, 12), _seg(1, "P01_01", 20, 26), _seg(2, "P01_02", 10, 12),
            _seg(3, "P01_03", 10, 12), _seg(4, "P01_04", 10, 12), _seg(5, "P01_04", 10, 30),
            _seg(6, "P09_01", 10, 12)]  # P09_01: no such video (it will fail at decode) -> the median rate
    cfg = SamplingConfig(num_frames=8)
    c = segment_costs(tmp_path, segs, cfg, info)
    assert c[1] == pytest.approx(3 * c[0])                   # 3x the seconds
    assert c[2] == pytest.approx(c[0] * 1440 / 1080)         # more pixels
    assert c[3] == pytest.approx(c[0] * 90 / 59.94)          # more frames per second
    assert c[4] == c[5] == pytest.approx(8 * 1920 * 1080)    # JPEG folder: only the sampled frames are decoded
    assert c[6] == pytest.approx(2 * np.median([59.94 * 1920 * 1080, 59.94 * 1920 * 1440, 90 * 1920 * 1080]))
    with_ant = segment_costs(tmp_path, segs, cfg, info, anticipation=True, tau_a=1.0, tau_o=2.0)
    assert with_ant[0] == pytest.approx(2 * c[0])            # 2 s segment + 2 s observed window


def test_launch_from_env():
    assert launch_from_env({}) is None and launch_from_env({"WORLD_SIZE": "1"}) is None
    launch = launch_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert (launch.rank, launch.world, launch.local_rank, launch.main) == (2, 4, 0, False)
    with pytest.raises(InputError, match="RANK"):
        launch_from_env({"WORLD_SIZE": "2", "RANK": "5"})
    assert shard_path("/x/train.h5", 1, 8).name == "train.shard-00001-of-00008.h5"


def _shards(kitchen, tmp_path, encoder, _cfg, n=3):
    paths = []
    for i in range(n):
        p = tmp_path / f"s{i}.h5"
        run_extraction(_cfg(kitchen, p, shard=(i, n)), encoder=encoder)
        paths.append(str(p))
    return paths


def test_merge_refuses_incomplete_missing_duplicate_and_foreign_shards(tmp_path, kitchen, tiny_encoder, _cfg):
    paths = _shards(kitchen, tmp_path, tiny_encoder, _cfg)
    with pytest.raises(InputError, match=r"shard\(s\) 1/3 missing"):
        merge_caches([paths[0], paths[2]], str(tmp_path / "m.h5"))
    with pytest.raises(InputError, match="given twice"):
        merge_caches([paths[0], paths[1], paths[2], paths[1]], str(tmp_path / "m.h5"))
    other = tmp_path / "other.h5"
    run_extraction(_cfg(kitchen, other, shard=(1, 3), sampling=SamplingConfig(num_frames=2, size=64)),
                   encoder=tiny_encoder)
    with pytest.raises(InputError, match="other.h5 differs .* 'decoded_frames'"):
        merge_caches([paths[0], str(other), paths[2]], str(tmp_path / "m.h5"))
    with h5py.File(paths[2], "r+") as f:
        f["valid"][0] = False
        f.attrs["complete"] = False
    with pytest.raises(InputError, match="s2.h5 is incomplete .*re-run"):
        merge_caches(paths, str(tmp_path / "m.h5"))
    assert not (tmp_path / "m.h5").exists()
    # the re-run of the incomplete shard resumes it; then the merge goes through
    assert run_extraction(_cfg(kitchen, paths[2], shard=(2, 3)), encoder=tiny_encoder).skipped == 2
    merge_caches(paths, str(tmp_path / "m.h5"))
    with h5py.File(tmp_path / "m.h5") as f:
        assert f["source_row"][()].tolist() == list(range(9)) and f["valid"][()].all() and f.attrs["complete"]


# Imports that `cache merge` and `cache inspect` must not need: torch and numba (torch's import alone is 1.2-1.9 s on
# 2 cores), and the decoding / encoding libraries (a node that merges shards may have only h5py).
NOT_FOR_CACHE_FILES = ("torch", "numba", "av", "ffmpeg", "imageio_ffmpeg", "open_clip", "torchcodec", "transformers",
                       "timm", "cv2")


def test_cache_merge_and_inspect_run_without_torch_or_a_decoder(tmp_path, kitchen, tiny_encoder, _cfg,
                                                                 run_refusing):
    """`mambavl cache merge` and `cache inspect` in a fresh interpreter where torch, numba and the decoding /
    encoding libraries cannot be imported (a finder refuses them): the merge writes the whole cache, inspect reports
    it (as JSON and as tables), a bad shard list is refused with exit 2, and none of the project's decoding modules
    was imported."""
    paths = _shards(kitchen, tmp_path, tiny_encoder, _cfg)
    out = tmp_path / "merged.h5"
    code = f"""
from mambavl.cli import main
def run(*argv):
    sys.argv = ["mambavl", *argv]
    try:
        main()
    except SystemExit as exc:
        return exc.code or 0
    return 0
paths = {paths!r}
assert run("cache", "merge", {str(tmp_path / "partial.h5")!r}, paths[0], paths[2]) == 2
assert run("cache", "merge", {str(out)!r}, *paths) == 0
print("JSON>")
assert run("cache", "inspect", "--json", {str(out)!r}) == 0
print("<JSON")
assert run("cache", "inspect", {str(out)!r}) == 0
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED
                       or m in ("mambavl.extract.decode", "mambavl.extract.encoders", "mambavl.cache.build")))
"""
    res = run_refusing(code, NOT_FOR_CACHE_FILES, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "shard(s) 1/3 missing" in res.stderr and not (tmp_path / "partial.h5").exists()
    info = json.loads(res.stdout.split("JSON>\n", 1)[1].split("<JSON", 1)[0])
    assert info["segments"] == 9 and info["complete"] and info["failed"] == 0
    assert info["windows"]["recognition"]["valid"] == 9 and info["windows"]["anticipation"]["rows"] == 9
    assert "recognition: 9/9 valid" in res.stdout and "failures: 0" in res.stdout
    assert res.stdout.rsplit("LOADED ", 1)[1].strip() == "[]", res.stdout[-3000:]


def _datasets(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        attrs = {k: f.attrs[k] for k in f.attrs if k not in ("created", "source")}
    return out, attrs


def test_torchrun_two_processes_equal_one_process(tmp_path, kitchen, tiny_encoder, _cfg):
    single = tmp_path / "one.h5"
    run_extraction(_cfg(kitchen, single), encoder=tiny_encoder)
    out = tmp_path / "two.h5"
    # An earlier launch died while rank 0's shard had 2 rows done (the rows after them half written, their done-flags
    # unset, as a crash leaves them): the launch below resumes that shard.
    crashed = _cfg(kitchen, shard_path(out, 0, 2), shard=(0, 2))
    run_extraction(crashed, encoder=tiny_encoder)
    with h5py.File(crashed.out, "r+") as f:
        f["valid"][2:] = False
        f["anticipation/valid"][2:] = False
        f.attrs["complete"] = False
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mambavl",
           "extract", str(kitchen.train_csv), "--videos", str(kitchen.videos), "--out", str(out), *ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "9/9 segments done (2 already there)" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == ["two.h5"]  # one cache left

    a, attrs_a = _datasets(single)
    b, attrs_b = _datasets(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        if a[name].dtype.kind == "f":
            assert a[name].tobytes() == b[name].tobytes(), name  # bit-identical (NaN padding included)
        else:  # strings and vlen int lists (all_noun_classes) as plain Python values
            assert [np.asarray(x).tolist() for x in a[name]] == [np.asarray(x).tolist() for x in b[name]], name
    assert {k: str(v) for k, v in attrs_a.items()} == {k: str(v) for k, v in attrs_b.items()}

    # running the finished command again changes nothing
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "9/9 segments done (9 already there)" in again.stdout
    assert _datasets(out)[0]["features"].tobytes() == b["features"].tobytes()


def test_torchrun_refuses_shard_option(tmp_path, kitchen, _cfg):
    from mambavl.cache.distributed import Launch, run_distributed_extraction

    with pytest.raises(InputError, match="--shard and a torchrun launch"):
        run_distributed_extraction(dataclasses.replace(_cfg(kitchen, tmp_path / "x.h5"), shard=(0, 2)),
                                   Launch(0, 2, 0))


def test_slurm_array_template_and_merge_job(tmp_path, kitchen, tiny_encoder, _cfg):
    """scripts/slurm/*.sbatch run as Slurm would run them (bash, SLURM_ARRAY_* set; #SBATCH lines are comments):
    two array tasks, then the merge job, give the single-process cache and leave no shard behind."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "mambavl").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mambavl "$@"\n')
    (shim / "mambavl").chmod(0o755)
    out = tmp_path / "caches" / "train.h5"
    out.parent.mkdir()
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}", ANNOTATIONS=str(kitchen.train_csv),
               VIDEOS=str(kitchen.videos), OUT=str(out), SLURM_ARRAY_TASK_COUNT="2", SLURM_CPUS_PER_TASK="2",
               EXTRACT_ARGS=" ".join(a for a in ARGS if a != "--quiet"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    for task in ("1", "0"):
        r = subprocess.run(["bash", os.path.join(repo, "scripts", "slurm", "extract_array.sbatch")],
                           env=dict(env, SLURM_ARRAY_TASK_ID=task), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run(["bash", os.path.join(repo, "scripts", "slurm", "merge.sbatch")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.h5"]
    single = tmp_path / "one.h5"
    run_extraction(_cfg(kitchen, single), encoder=tiny_encoder)
    a, _ = _datasets(single)
    b, _ = _datasets(out)
    assert a["features"].tobytes() == b["features"].tobytes()
    assert a["anticipation/features"].tobytes() == b["anticipation/features"].tobytes()
    assert a["narration_id"].tolist() == b["narration_id"].tolist()


def test_decode_threads_reach_ffmpeg_and_change_nothing(kitchen):
    from mambavl.extract.decode import decode_segment

    ann = load_annotations(kitchen.train_csv)
    seg = ann.segments[1]
    cfg = SamplingConfig(num_frames=4, size=64)
    base = decode_segment(kitchen.videos, seg, seg.start_time, seg.stop_time, cfg, ann.frame_rate(seg.video_id))
    for threads in (1, 2):
        frames, times = decode_segment(kitchen.videos, seg, seg.start_time, seg.stop_time, cfg, ann.frame_rate(seg.video_id),
                                       threads=threads)
        assert np.array_equal(frames, base[0]) and np.array_equal(times, base[1])
    with pytest.raises(Exception, match="ffmpeg failed"):  # an invalid -threads value reaches ffmpeg, which refuses it
        decode_segment(kitchen.videos, seg, seg.start_time, seg.stop_time, cfg, ann.frame_rate(seg.video_id), threads=-3)
