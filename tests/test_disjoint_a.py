"""The `disjoint-A` ablation is wired: two state matrices, each used at its own positions of the scan, both trained.
(Why it can barely differ from the shared A under template questions: docs/model.md, *Why disjoint-A barely
differs*.)"""

from __future__ import annotations

import pytest
import torch

from mambavl.cache.synthetic import make_planted_cache
from mambavl.fuse.block import MambaVLMixer
from mambavl.runtime import TrainedModel
from mambavl.train import TrainConfig, train


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, 16, generator=g), torch.randn(2, 4, 16, generator=g)  # video (B, F, d), question (B, T, d)


@pytest.mark.parametrize("layout", ["joint", "parallel"])
def test_each_A_acts_at_its_own_positions(layout):
    torch.manual_seed(0)
    mixer = MambaVLMixer(16, d_state=4, layout=layout, shared_A=False, scan_impl="reference")
    assert not hasattr(mixer, "A_log") and mixer.A_log_video is not mixer.A_log_question
    video, question = _inputs()
    with torch.no_grad():
        v0, q0 = mixer(video, None, question, None)
        mixer.A_log_video.add_(0.7)  # a different video A: the question positions (scanned first, or apart) keep
        v1, q1 = mixer(video, None, question, None)  # their outputs, the video positions change
        assert torch.equal(q1, q0) and (v1 - v0).abs().max() > 1e-6  # small: Δ is small at init
        mixer.A_log_video.sub_(0.7)
        mixer.A_log_question.add_(0.7)  # a different question A: the question positions change; the video ones
        v2, q2 = mixer(video, None, question, None)  # only through the state the question leaves (joint layout)
        assert (q2 - q0).abs().max() > 1e-6
        if layout == "joint":
            assert (v2 - v0).abs().max() > 1e-6
        else:
            assert torch.equal(v2, v0)


def test_training_moves_the_two_matrices_apart(tmp_path):
    cache = make_planted_cache(tmp_path / "c.h5", n=24, seed=0)
    cfg = TrainConfig(train_cache=str(cache), val_cache=None, out_dir=str(tmp_path / "run"), preset="disjoint-A",
                      model_overrides={"d_model": 16, "n_layers": 1}, epochs=2, batch_size=8, lr=1e-2, frames=4,
                      min_steps=0, device="cpu", question_source="annotation")
    train(cfg)
    weights = TrainedModel.load(tmp_path / "run" / "last.pt").weights
    a_v, a_q = weights["fusion.layers.0.mixer.A_log_video"], weights["fusion.layers.0.mixer.A_log_question"]
    init = torch.log(torch.arange(1, a_v.shape[1] + 1, dtype=torch.float32)).repeat(a_v.shape[0], 1)
    # both start at the same S4D init; both receive gradients, and different ones
    assert (a_v - init).abs().max() > 1e-4 and (a_q - init).abs().max() > 1e-4
    assert (a_v - a_q).abs().max() > 1e-4
