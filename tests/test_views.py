"""Multi-view testing: the frames of each temporal clip and spatial crop, the cache layout of views, softmax-mean
averaging in the shared scoring path, and extraction -> training -> evaluation of a multi-view cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mambavl.cache import schema
from mambavl.cache.dataset import SegmentDataset
from mambavl.cache.reader import open_cache
from mambavl.cache.synthetic import make_planted_cache, make_planted_views
from mambavl.data.synthetic import encode_frames, make_timestamp_video, read_timestamp_code
from mambavl.errors import InputError
from mambavl.extract.decode import SamplingConfig, SamplingMode, decode_video_segment
from mambavl.extract.views import ViewConfig, split_views, view_sampling
from mambavl.fuse.model import create_model
from mambavl.runtime import average_views, predict_scores, view_protocol

FPS = 25.0


@pytest.fixture(scope="module")
def ts_video(tmp_path_factory):
    return make_timestamp_video(tmp_path_factory.mktemp("v") / "ts.mp4", duration=4.0, fps=FPS)


def _decode_views(path, start, stop, sampling, views):
    frames, times = decode_video_segment(path, start, stop, view_sampling(sampling, views))
    return split_views(frames, times, views)


@pytest.mark.parametrize("temporal", [1, 2, 3])
def test_temporal_views_are_the_shifted_grids(ts_video, temporal):
    start, stop, n = 1.03, 2.71, 4
    sampling, views = SamplingConfig(num_frames=n, size=32), ViewConfig(temporal, 1)
    frames, times = _decode_views(ts_video, start, stop, sampling, views)
    assert frames.shape == (temporal, n, 32, 32, 3) and times.shape == (temporal, n)
    step = (stop - start) / n
    for t in range(temporal):
        # view t samples each of the n bins at the centre of its t-th sub-bin: start + (i + (t + 1/2) / T) * step
        want = start + (np.arange(n) + (t + 0.5) / temporal) * step
        codes = [read_timestamp_code(f) for f in frames[t]]
        assert codes == np.floor(want * FPS + 1e-6).astype(int).tolist()
        assert np.all(np.abs(times[t] - want) < 1.0 / FPS)
    if temporal == 1:  # 1 x 1 is today's decode, bit for bit
        single, single_times = decode_video_segment(ts_video, start, stop, sampling)
        assert np.array_equal(frames[0], single) and np.array_equal(times[0], single_times)


@pytest.mark.parametrize("portrait", [False, True])
def test_spatial_crops_are_the_expected_pixel_columns(tmp_path, portrait):
    # a grey ramp along the long side (96 px), short side 48 = size: no scaling, so crops are plain pixel ranges
    ramp = (40 + 2 * np.arange(96)).astype(np.uint8)
    frames = np.broadcast_to(ramp[None, None, :, None], (10, 48, 96, 3)).copy()  # (N, H, W, 3)
    if portrait:
        frames = np.ascontiguousarray(frames.transpose(0, 2, 1, 3))  # (N, 96, 48, 3)
    video = encode_frames(tmp_path / "ramp.mp4", frames, 10, lossless=True)
    sampling, views = SamplingConfig(num_frames=2, size=48), ViewConfig(2, 3)
    got, times = _decode_views(video, 0.1, 0.8, sampling, views)
    assert got.shape == (6, 2, 48, 48, 3)
    assert np.array_equal(times[0], times[1]) and np.array_equal(times[0], times[2])  # crops share their clip
    for s, first in enumerate((24, 0, 48)):  # centre, left/top, right/bottom
        profile = got[s, 0, 0, :, 0] if not portrait else got[s, 0, :, 0, 0]  # along the long side
        expected = ramp[first:first + 48].astype(int)
        assert np.abs(profile.astype(int) - expected).max() <= 2, (s, profile[:4], expected[:4])
    # the centre crop of a 3-crop decode is the single-view frame, bit for bit
    single, _ = decode_video_segment(video, 0.1, 0.8, SamplingConfig(num_frames=4, size=48))
    assert np.array_equal(got[0], single[0::2]) and np.array_equal(got[3], single[1::2])


def test_view_options_refused_where_they_cannot_apply():
    with pytest.raises(InputError, match="spatial-crops"):
        ViewConfig(1, 2)
    with pytest.raises(InputError, match="temporal-views"):
        ViewConfig(0, 1)
    with pytest.raises(InputError, match="uniform sampling"):
        ViewConfig(2, 1).check(SamplingConfig(mode=SamplingMode.FPS, num_frames=8), "ffmpeg")
    with pytest.raises(InputError, match="--decoder ffmpeg"):
        ViewConfig(1, 3).check(SamplingConfig(), "torchcodec")
    ViewConfig(2, 3).check(SamplingConfig(), "ffmpeg")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("views")
    single = make_planted_cache(d / "single.h5", n=40, frames=6, dim=16, text_dim=12, seed=3)
    multi = make_planted_views(single, d / "multi.h5", temporal=2, spatial=3, signal_views=(2,), seed=5)
    return single, multi


def test_multiview_cache_layout_and_dataset(planted):
    single, multi = planted
    cache = open_cache(multi)
    assert schema.view_counts(cache.attrs) == (2, 3) and "view_definition" in cache.attrs
    f = cache.h5()
    n, frames, dim = f["features"].shape
    assert f[schema.VIEW_FEATURES].shape == (n, 5, frames, dim)
    assert f[schema.VIEW_FRAME_TIMES].shape == (n, 5, frames)
    assert schema.view_counts(open_cache(single).attrs) == (1, 1)  # a cache from before views: one view
    for in_memory in (True, False):
        ds = SegmentDataset(cache, in_memory=in_memory)
        assert ds.num_views == 6 and SegmentDataset(open_cache(single)).num_views == 1
        ds.view = 2
        assert torch.equal(ds[1]["features"], torch.from_numpy(f[schema.VIEW_FEATURES][int(ds.indices[1]), 1]
                                                               .astype(np.float32)))
        ds.view = 0
        assert torch.equal(ds[1]["features"], torch.from_numpy(f["features"][int(ds.indices[1])].astype(np.float32)))
    ds = SegmentDataset(cache)
    ds.draw_views(torch.Generator().manual_seed(7))
    first = ds.view_of.copy()
    ds.draw_views(torch.Generator().manual_seed(7))
    assert np.array_equal(first, ds.view_of) and set(first.tolist()) <= set(range(6)) and len(set(first)) > 1
    single_ds = SegmentDataset(open_cache(single))
    single_ds.draw_views(torch.Generator().manual_seed(7))
    assert single_ds.view_of is None  # nothing drawn: single-view training replays as before


def test_scores_average_the_views_softmax(planted):
    _, multi = planted
    cache = open_cache(multi)
    torch.manual_seed(0)
    model, _ = create_model("small", video_dim=16, text_dim=12, num_verbs=len(cache.verb_keys),
                            num_nouns=len(cache.noun_keys), num_actions=4, d_model=32, n_layers=1)
    per_view = [predict_scores(model, cache, frames=6, views=[v]) for v in range(6)]
    both = predict_scores(model, cache, frames=6)
    for key in ("verb", "noun"):
        by_hand = np.mean([torch.softmax(torch.from_numpy(p[key]).double(), -1).numpy() for p in per_view], axis=0)
        got = torch.softmax(torch.from_numpy(both[key]).double(), -1).numpy()
        assert np.allclose(got, by_hand, atol=1e-6)
        # the views differ (only view 2 carries the planted features), so the average is not any single view
        assert not np.allclose(per_view[2][key], per_view[0][key])
    one = {"verb": torch.randn(3, 4)}  # one view: its logits untouched
    assert average_views([one]) is one
    assert view_protocol(cache) == {"temporal": 2, "spatial": 3, "scored": [0, 1, 2, 3, 4, 5],
                                    "aggregation": "softmax mean", "definition": cache.attrs["view_definition"]}
    with pytest.raises(InputError, match="views 0..5"):
        predict_scores(model, cache, frames=6, views=[6])


def test_multiview_extract_train_evaluate(tmp_path):
    """Tiny synthetic videos -> 2 x 3 views extracted -> a model trained one view per row -> evaluation averaging
    the six views, with the protocol in metrics.json; each stored view is the encoder on that view's frames."""
    from mambavl.cache.build import ExtractConfig, run_extraction
    from mambavl.data.annotations import load_annotations
    from mambavl.data.synthetic import make_kitchen_dataset
    from mambavl.evaluate import EvalConfig, evaluate
    from mambavl.extract.encoders import EncoderConfig, build_encoder
    from mambavl.runtime import TrainedModel
    from mambavl.train import TrainConfig, train

    ds = make_kitchen_dataset(tmp_path / "kitchen", n_train=8, n_val=4, n_test=0, segments_per_video=4)
    encoder = build_encoder(EncoderConfig(model="mambavl-tiny-clip", pretrained="none", device="cpu"))
    sampling, views = SamplingConfig(num_frames=4, size=48), ViewConfig(2, 3)
    caches = {}
    for split, csv_path in (("train", ds.train_csv), ("val", ds.val_csv)):
        caches[split] = tmp_path / f"{split}.h5"
        summary = run_extraction(ExtractConfig(annotations=str(csv_path), videos=str(ds.videos),
                                               out=str(caches[split]), encoder=encoder.cfg, sampling=sampling,
                                               anticipation=True, tau_a=0.5, tau_o=1.0, views=views),
                                 encoder=encoder)
        assert summary.failed == 0
    cache = open_cache(caches["val"])
    f = cache.h5()
    assert schema.view_counts(cache.attrs) == (2, 3) and f[schema.VIEW_FEATURES].shape[1] == 5
    assert "anticipation/" + schema.VIEW_FEATURES not in f  # the anticipation window keeps one view
    ann = load_annotations(ds.val_csv)
    seg = ann.segments[1]
    video = ds.videos / seg.participant_id / "videos" / f"{seg.video_id}.MP4"
    wide, _ = decode_video_segment(video, seg.start_time, seg.stop_time,
                                   SamplingConfig(num_frames=8, size=48, spatial_crops=3))  # (8, 3, 48, 48, 3)
    step = (seg.stop_time - seg.start_time) / 4
    for v in range(6):
        t, s = divmod(v, 3)
        frames = wide[t::2, s]  # grid index i * T + t: the t-th shifted grid
        want = encoder.encode_segments(frames[None])[0].numpy().astype(np.float16)
        stored = f["features"][1] if v == 0 else f[schema.VIEW_FEATURES][1, v - 1]
        assert np.array_equal(stored, want), v
        times = f["frame_times"][1] if v == 0 else f[schema.VIEW_FRAME_TIMES][1, v - 1]
        assert np.all(np.abs(times - (seg.start_time + (np.arange(4) + (t + 0.5) / 2) * step)) < 1.0 / 12 + 1e-6)

    result = train(TrainConfig(train_cache=str(caches["train"]), val_cache=str(caches["val"]),
                               out_dir=str(tmp_path / "run"), model_overrides={"d_model": 32, "n_layers": 1},
                               epochs=2, batch_size=4, frames=4, min_steps=0, qa_weight=0))
    metrics = evaluate(EvalConfig(checkpoint=str(result.last_checkpoint), cache=str(caches["val"]),
                                  out_dir=str(tmp_path / "eval"), device="cpu", plots=False))
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["views"]["temporal"] == 2 and saved["views"]["spatial"] == 3
    assert saved["views"]["aggregation"] == "softmax mean" and saved["views"]["scored"] == list(range(6))
    assert metrics["views"] == saved["views"]
    assert TrainedModel.load(result.last_checkpoint).progress.epoch == 2


def test_cli_multiview_shards_merge_and_inspect(tmp_path):
    """`extract --temporal-views --spatial-crops` by shard, `cache merge`: the merged views equal one whole run's;
    `cache inspect` reports the views; fps sampling with temporal views is refused with exit 2."""
    import h5py
    from typer.testing import CliRunner

    from mambavl.cli import app
    from mambavl.data.synthetic import make_kitchen_dataset

    ds = make_kitchen_dataset(tmp_path / "kitchen", n_train=4, n_val=0, n_test=0, segments_per_video=4)
    runner = CliRunner()
    args = ["--videos", str(ds.videos), "--model", "mambavl-tiny-clip", "--pretrained", "none", "--frames", "2",
            "--size", "32", "--questions", "templates", "--quiet", "--temporal-views", "2", "--spatial-crops", "3"]
    whole = tmp_path / "whole.h5"
    r = runner.invoke(app, ["extract", str(ds.train_csv), "--out", str(whole), *args])
    assert r.exit_code == 0, r.output
    for i in range(2):
        r = runner.invoke(app, ["extract", str(ds.train_csv), "--out", str(tmp_path / f"s{i}.h5"), "--shard",
                                f"{i}/2", *args])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["cache", "merge", str(tmp_path / "m.h5"), str(tmp_path / "s1.h5"),
                            str(tmp_path / "s0.h5")])
    assert r.exit_code == 0, r.output
    with h5py.File(whole) as a, h5py.File(tmp_path / "m.h5") as b:
        for name in ("features", schema.VIEW_FEATURES, schema.VIEW_FRAME_TIMES):
            assert np.array_equal(a[name][()], b[name][()]), name
        assert b.attrs["temporal_views"] == 2 and b.attrs["spatial_crops"] == 3
    r = runner.invoke(app, ["cache", "inspect", str(whole), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["windows"]["recognition"]["views"] == 6
    r = runner.invoke(app, ["cache", "inspect", str(whole)])
    assert r.exit_code == 0 and "recognition: 4/4 valid" in r.output and "6 views" in r.output
    r = runner.invoke(app, ["extract", str(ds.train_csv), "--out", str(tmp_path / "fps.h5"), *args, "--fps", "4"])
    assert r.exit_code == 2 and "uniform sampling" in r.output


def test_resume_refuses_other_views_and_keeps_old_caches(planted, tmp_path):
    from mambavl.cache.writer import CacheWriter, RowMeta

    def rows_of(path):
        labels = open_cache(path).labels()
        return RowMeta(narration_id=list(labels["narration_id"]), video_id=list(labels["video_id"]),
                       participant_id=list(labels["participant_id"]), narration=list(labels["narration"]),
                       verb_class=labels["verb_class"], noun_class=labels["noun_class"],
                       all_noun_classes=labels["all_noun_classes"], start_time=labels["start_time"],
                       stop_time=labels["stop_time"])

    single, multi = planted
    cache = open_cache(multi)
    rows = rows_of(multi)
    attrs = {k: v for k, v in cache.attrs.items() if k not in ("schema_version", "package_version", "created")}
    cache.close()
    with pytest.raises(InputError, match="temporal_views"):
        CacheWriter(multi, {**attrs, "temporal_views": 1, "spatial_crops": 1}, rows, cache.verb_keys,
                    cache.noun_keys)
    with CacheWriter(multi, attrs, rows, cache.verb_keys, cache.noun_keys) as w:  # same views: resumes
        assert w.resumed and w.extra_views == 5 and not w.pending_rows()
        with pytest.raises(ValueError, match=r"expected \(6, <= 6, 16\)"):
            w.write_row(0, np.zeros((6, 16), np.float32), np.zeros(6))
    old = open_cache(single)  # written without view attributes, as every cache before views
    assert "temporal_views" not in old.attrs
    old_attrs = {k: v for k, v in old.attrs.items() if k not in ("schema_version", "package_version", "created")}
    old.close()
    with CacheWriter(single, {**old_attrs, "temporal_views": 1, "spatial_crops": 1}, rows_of(single), old.verb_keys,
                     old.noun_keys) as w:
        assert w.resumed and w.extra_views == 0
