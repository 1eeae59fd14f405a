"""`standardize_video` (on by default): video features scaled with the training rows' statistics (one gain, or per
dimension), so a large offset common to every frame (random-init CLIP features: 99 % of a token's energy) does not
hide the part that varies; the offset is kept up to `video_offset_cap` times the varying part's scale."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from mambavl.cache.reader import open_cache
from mambavl.cache.synthetic import make_order_cache
from mambavl.fuse.model import create_model
from mambavl.runtime import feature_statistics

DIMS = dict(video_dim=16, text_dim=8, num_verbs=6, num_nouns=5, num_actions=0)


def _inputs(gen):
    video = torch.randn(3, 6, 16, generator=gen)  # (B, F, Dv)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    q = torch.randn(3, 2, 5, 8, generator=gen)  # (B, 2, T, Dt)
    return video, mask, q, torch.ones(3, 2, 5, dtype=torch.bool)


@pytest.mark.parametrize("chunk", [256, 5])  # one read, or chunks combined (Chan et al.'s update)
def test_statistics_read_the_real_frames_only(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr("mambavl.runtime.build.STATISTICS_CHUNK", chunk)
    path = make_order_cache(tmp_path / "c.h5", n=24, dim=16)
    with h5py.File(path, "r+") as f:  # row 0 keeps 3 real frames; its padding holds garbage
        f["num_frames"][0] = 3
        f["features"][:] += 30.0  # an offset well above the spread: the update must not lose the sd to it
        f["features"][0, 3:] = 1000.0
        feats = f["features"][()].astype(np.float64)
    real = np.concatenate([feats[0, :3], feats[1:].reshape(-1, 16)])
    mean, std = feature_statistics(open_cache(path), "recognition", np.arange(24))
    np.testing.assert_allclose(mean.numpy(), real.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(std.numpy(), real.std(0), rtol=1e-6, atol=1e-9)
    sub_mean, _ = feature_statistics(open_cache(path), "recognition", np.arange(1, 24), max_rows=4)
    assert sub_mean.shape == (16,) and abs(sub_mean.numpy() - real.mean(0)).max() < 1.0  # a subset: no garbage


def test_model_is_invariant_to_an_affine_change_of_the_features():
    """Offset every feature dimension (an offset 50x the signal, common to all frames) and shrink the features: a
    model that centres fully (`video_offset_cap=0`) and is given the statistics of the changed features computes
    what it computed on the original ones. (One gain for all dimensions: the variance floor, a share of the mean
    variance, makes per-dimension gains nearly but not exactly invariant.)"""
    gen = torch.Generator().manual_seed(0)
    video, mask, q, qm = _inputs(gen)
    offset, gain = 50.0 * torch.randn(16, generator=gen), 0.05
    changed = video * gain + offset
    torch.manual_seed(0)
    model, _ = create_model("small", d_model=32, standardize_video=True, video_offset_cap=0.0, **DIMS)
    model.eval()
    flat = video[mask]  # (tokens, Dv)
    model.set_video_statistics(flat.mean(0), flat.std(0))
    want = model(video, mask, q, qm)["verb"]
    model.set_video_statistics(changed[mask].mean(0), changed[mask].std(0))
    got = model(changed, mask, q, qm)["verb"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_common_offset_is_shrunk_to_the_cap_and_kept_below_it():
    """Standardised features (x - shift) * scale keep the training mean's direction; its RMS in standardised units
    becomes min(RMS, video_offset_cap): a large offset is shrunk to the cap, a small one kept (scaling only)."""
    gen = torch.Generator().manual_seed(2)
    std = 0.5 + torch.rand(16, generator=gen, dtype=torch.float64)
    direction = torch.randn(16, generator=gen, dtype=torch.float64)
    for cap in (0.0, 1.0, 3.0):
        model, _ = create_model("small", d_model=32, standardize_video=True, video_scale="dimension",
                                video_offset_cap=cap, **DIMS)
        for size in (0.5, 2.0, 40.0):  # the offset's RMS in standardised units, before the cap
            mean = direction / direction.square().mean().sqrt() * size * std  # mean * scale has RMS ~size
            model.set_video_statistics(mean, std)
            kept = (mean - model.video_shift) * model.video_scale  # the standardised training mean
            rms = float(kept.square().mean().sqrt())
            full = float((mean * model.video_scale).square().mean().sqrt())
            assert rms == pytest.approx(min(full, cap), rel=1e-5, abs=1e-5)  # float32 buffers
            if full <= cap:
                assert torch.equal(model.video_shift, torch.zeros(16, dtype=model.video_shift.dtype))
            elif cap > 0:  # the same direction, shorter
                cos = torch.nn.functional.cosine_similarity(kept, mean * model.video_scale, dim=0)
                assert float(cos) == pytest.approx(1.0, abs=1e-6)


def test_weights_saved_without_the_statistics_load_as_the_identity():
    torch.manual_seed(0)
    model, _ = create_model("small", d_model=32, standardize_video=True, **DIMS)
    model.set_video_statistics(torch.full((16,), 3.0), torch.full((16,), 2.0))
    old = {k: v for k, v in model.state_dict().items() if k not in ("video_shift", "video_scale")}
    fresh, _ = create_model("small", d_model=32, standardize_video=True, **DIMS)
    fresh.load_state_dict(old)  # strict: the buffers are filled in, not missing
    assert torch.equal(fresh.video_shift, torch.zeros(16)) and torch.equal(fresh.video_scale, torch.ones(16))
    plain, _ = create_model("small", d_model=32, standardize_video=False, **DIMS)
    plain.load_state_dict(old)
    gen = torch.Generator().manual_seed(1)
    video, mask, q, qm = _inputs(gen)
    fresh.eval(), plain.eval()
    torch.testing.assert_close(fresh(video, mask, q, qm)["verb"], plain(video, mask, q, qm)["verb"])


def test_the_cap_is_a_config_field_with_a_checked_range():
    from mambavl.errors import InputError
    from mambavl.fuse.model import model_config_from_dict

    model, cfg = create_model("small", d_model=32, **DIMS)  # the default: global scale, offset capped at 2
    assert (cfg.standardize_video, cfg.video_scale, cfg.video_offset_cap) == (True, "global", 2.0)
    assert hasattr(model, "video_shift")
    assert model_config_from_dict(cfg.to_dict()) == cfg
    # configs saved before a field say what they were trained with, not today's default
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("video_offset_cap", "video_scale")}
    assert model_config_from_dict({**old, "standardize_video": True}).video_offset_cap == 0.0  # centred fully
    older = {k: v for k, v in old.items() if k != "standardize_video"}
    assert not model_config_from_dict(older).standardize_video
    for bad in (-1.0, float("inf"), "3", True):
        with pytest.raises(InputError, match="video_offset_cap"):
            model_config_from_dict({**old, "video_offset_cap": bad})


@pytest.mark.parametrize("overrides", [{}, {"video_scale": "dimension", "video_offset_cap": 0.0}])
def test_training_sets_the_statistics_of_the_training_rows(tmp_path, overrides):
    """The default training run (no override) and a per-dimension one store the training rows' statistics."""
    from mambavl.runtime import TrainedModel
    from mambavl.train import TrainConfig, train

    path = make_order_cache(tmp_path / "c.h5", n=24, dim=16)
    with h5py.File(path, "r+") as f:  # an offset above the cap, so that the shift is not zero
        f["features"][:] += 3.0
    result = train(TrainConfig(train_cache=path, val_cache=None, out_dir=tmp_path / "run", epochs=1, patience=0,
                               batch_size=8, min_steps=0, device="cpu", logger="none",
                               model_overrides={"d_model": 16, **overrides}))
    run = TrainedModel.load(result.last_checkpoint)
    mean, std = feature_statistics(open_cache(path), "recognition", np.arange(24))
    want, _ = create_model("small", d_model=16, video_dim=16, text_dim=16, num_verbs=6, num_nouns=5, num_actions=0,
                           **overrides)
    want.set_video_statistics(mean, std)
    scale, shift = want.video_scale, want.video_shift
    assert float(shift.abs().max()) > 0.1 and float(scale[0]) != 1.0  # not the identity's
    if overrides:  # one gain per dimension
        assert float(scale.std()) > 0
    else:  # the default: one gain for all
        assert torch.equal(scale, torch.full_like(scale, float(scale[0])))
    for name in ("video_shift", "video_scale"):
        np.testing.assert_allclose(run.weights[name].numpy(), getattr(want, name).numpy(), rtol=1e-5, atol=1e-6)
    assert run.model().cfg.standardize_video and run.model_config.video_scale == want.cfg.video_scale


@pytest.mark.parametrize("video_scale", ["global", "dimension"])
def test_features_that_never_vary_are_only_shifted_to_the_cap(video_scale):
    """Training features with no variance at all (a constant encoder output): no gain of 1e6 that would blow up any
    change at evaluation; the gain is 1 and the offset is brought to the cap (in units of 1)."""
    model, _ = create_model("small", d_model=32, video_scale=video_scale, **DIMS)
    model.set_video_statistics(torch.full((16,), 5.0), torch.zeros(16))
    assert torch.equal(model.video_scale, torch.ones(16))
    kept = (torch.full((16,), 5.0) - model.video_shift) * model.video_scale
    assert float(kept.square().mean().sqrt()) == pytest.approx(2.0, rel=1e-5)
