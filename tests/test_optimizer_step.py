"""The trainer's optimiser step (fused AdamW where torch has it, clipping through the fused kernel's grad_scale)
makes the update of torch's plain AdamW after `clip_grad_norm_`, and skips parameters without a gradient."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from mambavl.runtime import TrainConfig
from mambavl.train.schedule import Optimizer, param_groups


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3), nn.Linear(3, 2))


@pytest.mark.parametrize("scale", [0.01, 100.0])  # clipping off / on (grad_clip 1.0)
def test_step_equals_plain_adamw_after_clipping(tmp_path, scale):
    cfg = TrainConfig(train_cache="-", val_cache=None, out_dir=str(tmp_path))
    ours, ref = _model(), _model()
    opt = Optimizer(ours, cfg, total_steps=10, warmup_steps=0, device=torch.device("cpu"))
    ref_opt = torch.optim.AdamW(param_groups(ref, cfg.weight_decay), lr=cfg.lr, foreach=False, fused=False)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        # the last layer gets no gradient (as a head the step does not use): neither optimiser may move it
        opt.step(ours[:3](x).pow(2).sum() * scale)
        ref_opt.zero_grad(set_to_none=True)
        (ref[:3](x).pow(2).sum() * scale).backward()
        nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip)
        ref_opt.step()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(ours[3].weight, _model()[3].weight)


def test_resume_keeps_this_machines_implementation(tmp_path):
    cfg = TrainConfig(train_cache="-", val_cache=None, out_dir=str(tmp_path))
    model = _model()
    opt = Optimizer(model, cfg, total_steps=10, warmup_steps=0, device=torch.device("cpu"))
    opt.step(model(torch.randn(2, 6)).sum())
    saved = copy.deepcopy(opt.states())
    for group in saved["optimizer"]["param_groups"]:  # as a checkpoint of a per-parameter AdamW holds them
        group["fused"], group["foreach"] = None, None
    again = Optimizer(model, cfg, total_steps=10, warmup_steps=0, device=torch.device("cpu"))
    again.restore(type("State", (), {**saved, "scaler": None})())
    assert all(g["fused"] == (True if again.fused else None) for g in again.optimizer.param_groups)
    again.step(model(torch.randn(2, 6)).sum())


def test_flat_state_moves_to_and_from_torch_adamw(tmp_path):
    """The flat optimiser's state dict has torch AdamW's layout: either one resumes the other's run, and the model's
    parameters keep their names, shapes and state dict."""
    from mambavl.train.flat_adamw import FlatAdamW

    cfg = TrainConfig(train_cache="-", val_cache=None, out_dir=str(tmp_path))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    ours, ref = _model(), _model()
    opt = Optimizer(ours, cfg, total_steps=10, warmup_steps=0, device=torch.device("cpu"))
    assert isinstance(opt.optimizer, FlatAdamW)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref_opt = torch.optim.AdamW(param_groups(ref, cfg.weight_decay), lr=cfg.lr, foreach=False, fused=False)
    for _ in range(2):
        opt.step(ours[:3](x).pow(2).sum() * 0.01)  # no clipping at this scale
        ref_opt.zero_grad(set_to_none=True)
        (ref[:3](x).pow(2).sum() * 0.01).backward()
        ref_opt.step()
    # torch's AdamW resumes the flat optimiser's state, and the flat optimiser torch's
    saved, ref_saved = copy.deepcopy(opt.optimizer.state_dict()), copy.deepcopy(ref_opt.state_dict())
    assert sorted(saved["state"]) == sorted(ref_saved["state"]) and len(saved["state"]) == 6  # unused layer: none
    a, b = copy.deepcopy(ref), copy.deepcopy(ours)
    a_opt = torch.optim.AdamW(param_groups(a, cfg.weight_decay), lr=cfg.lr, foreach=False, fused=False)
    a_opt.load_state_dict(saved)
    b_opt = Optimizer(b, cfg, total_steps=10, warmup_steps=0, device=torch.device("cpu")).optimizer
    b_opt.load_state_dict(ref_saved)
    for model, o in ((a, a_opt), (b, b_opt)):
        o.zero_grad()
        model[:3](x).pow(2).sum().mul(0.01).backward()
        o.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_a_checkpoint_holds_each_moment_once(tmp_path):
    """last.pt of a run trained with the flat optimiser holds the weights and the two AdamW moments once each: before,
    each parameter's moments were written with a copy of the whole flat buffer (a 0.5 M-parameter model's 6 MB of
    tensors took 233 MB, growing with parameters x tensors)."""
    from mambavl.cache.synthetic import make_order_cache
    from mambavl.train import train
    from mambavl.train.flat_adamw import FlatAdamW

    path = make_order_cache(tmp_path / "c.h5", n=16, dim=16)
    result = train(TrainConfig(train_cache=path, val_cache=None, out_dir=tmp_path / "run", epochs=1, patience=0,
                               batch_size=8, min_steps=0, device="cpu", logger="none",
                               model_overrides={"d_model": 32}))
    state = torch.load(result.last_checkpoint, weights_only=True)
    params = sum(t.numel() for t in state["weights"].values())
    moments = state["training"]["optimizer"]["state"]
    assert len(moments) > 20 and all(t.untyped_storage().nbytes() == t.numel() * t.element_size()
                                     for m in moments.values() for t in m.values())
    size = os.path.getsize(result.last_checkpoint)
    assert size < 3 * 4 * params + 2_000_000, f"last.pt is {size} bytes for {params} parameters"
    # the saved moments are a snapshot: stepping on does not change a state dict already taken
    model = _model()
    opt = Optimizer(model, TrainConfig(train_cache="-", val_cache=None, out_dir=str(tmp_path)), total_steps=4,
                    warmup_steps=0, device=torch.device("cpu"))
    assert isinstance(opt.optimizer, FlatAdamW)
    opt.step(model(torch.randn(2, 6)).sum())
    taken = opt.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    kept = opt.optimizer.state_dict()
    opt.step(model(torch.randn(2, 6)).sum())
    assert torch.equal(kept["state"][0]["exp_avg"], taken)
