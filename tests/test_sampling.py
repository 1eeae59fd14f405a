"""Temporal sub-sampling of cached frames: bins, determinism, fps-mode padding."""

from __future__ import annotations

import pytest
import torch

from mambavl.data.sampling import (
    eval_frame_indices,
    gather_frames,
    output_width,
    subsample,
    train_frame_indices,
)


def test_output_width():
    assert output_width(16, 8) == 8
    assert output_width(4, 8) == 4
    assert output_width(16, 0) == 16


def test_eval_takes_bin_centres():
    idx, mask = eval_frame_indices(torch.tensor([16, 10]), cached_frames=16, frames=4)
    # 16 frames in 4 bins of 4 -> centres 2, 6, 10, 14; 10 frames -> bins [0,2) [2,5) [5,7) [7,10) -> 1, 3, 6, 8
    assert idx.tolist() == [[2, 6, 10, 14], [1, 3, 6, 8]]
    assert mask.all()


def test_eval_identity_when_all_frames_used():
    idx, mask = eval_frame_indices(torch.tensor([8]), cached_frames=8, frames=8)
    assert idx.tolist() == [list(range(8))]
    assert mask.all()


def test_train_draws_one_frame_per_bin_and_covers_bins():
    n = torch.full((500,), 16)
    idx, mask = train_frame_indices(n, cached_frames=16, frames=4, generator=torch.Generator().manual_seed(0))
    assert mask.all()
    bins = torch.arange(4) * 4
    assert ((idx >= bins) & (idx < bins + 4)).all()
    assert (idx[:, 1:] > idx[:, :-1]).all()
    # every frame of every bin is drawn at some point (500 draws of 4 choices)
    for k in range(4):
        assert set(idx[:, k].tolist()) == set(range(4 * k, 4 * k + 4))


def test_train_is_seeded():
    n = torch.tensor([16, 13, 9, 12])
    a, _ = train_frame_indices(n, 16, 8, torch.Generator().manual_seed(3))
    b, _ = train_frame_indices(n, 16, 8, torch.Generator().manual_seed(3))
    c, _ = train_frame_indices(n, 16, 8, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("train", [False, True])
def test_fps_padding_is_respected(train):
    # fps-mode rows: 13 and 9 valid frames of 16 cached, the rest zero padding that must never be picked
    n = torch.tensor([13, 9])
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        if train:
            idx, mask = train_frame_indices(n, 16, 8, gen)
        else:
            idx, mask = eval_frame_indices(n, 16, 8)
        assert mask.all()
        assert (idx < n[:, None]).all()
        assert (idx[:, 1:] > idx[:, :-1]).all()


@pytest.mark.parametrize("train", [False, True])
def test_short_rows_keep_all_frames_then_mask(train):
    # 3 valid frames, 8 slots: frames 0, 1, 2 then masked slots (no repeated tokens)
    n = torch.tensor([3, 8])
    gen = torch.Generator().manual_seed(1)
    idx, mask = train_frame_indices(n, 8, 8, gen) if train else eval_frame_indices(n, 8, 8)
    assert idx[0, :3].tolist() == [0, 1, 2]
    assert mask[0].tolist() == [True] * 3 + [False] * 5
    assert idx[1].tolist() == list(range(8)) and mask[1].all()


def test_zero_frame_row_reads_one_token():
    idx, mask = eval_frame_indices(torch.tensor([0]), 4, 4)
    assert mask[0].tolist() == [True, False, False, False]
    assert idx[0, 0] == 0


def test_gather_and_subsample_pick_the_indexed_frames():
    feats = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # (B, F, D)
    idx = torch.tensor([[0, 5], [2, 3]])
    out = gather_frames(feats, idx)
    assert torch.equal(out[0, 1], feats[0, 5]) and torch.equal(out[1, 0], feats[1, 2])
    video, mask = subsample(feats, torch.tensor([6, 6]), frames=3, train=False)
    assert video.shape == (2, 3, 3) and mask.shape == (2, 3)
    assert torch.equal(video[:, 0], feats[:, 1])  # bins [0,2) [2,4) [4,6) -> centres 1, 3, 5
    with pytest.raises(ValueError):
        subsample(feats, torch.tensor([6, 6]), frames=3, train=True)
