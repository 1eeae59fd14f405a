"""The layer's fused pieces (`mambavl.fuse.ops`, `mambavl.fuse.conv`) compute what the torch expressions they
replace compute: outputs and gradients, float32 and float64, strided inputs, masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mambavl.fuse.conv import causal_conv_silu
from mambavl.fuse.ops import cross_entropy_sum, linear, residual_dropout, rms_norm

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _grads(fn, *tensors):
    out = fn(*tensors)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    grads = torch.autograd.grad((out * weight).sum(), tensors)
    return out, grads


def _check(fused, plain, tensors, dtype):
    out, grads = _grads(fused, *tensors)
    want, want_grads = _grads(plain, *tensors)
    torch.testing.assert_close(out, want, **TOL[dtype])
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_causal_conv_silu_matches_torch(dtype):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv1d(6, 6, 4, groups=6, padding=3).to(dtype)
    xz = torch.randn(3, 7, 12, generator=g, dtype=dtype, requires_grad=True)  # the conv reads half of it: strided
    mask = torch.ones(3, 1, 7, dtype=dtype)
    mask[1, :, 5:] = 0.0

    def plain(xz, w, b):
        x = xz[..., :6].transpose(1, 2) * mask
        return F.silu(F.conv1d(x, w, b, padding=3, groups=6)[..., :7]).transpose(1, 2)

    _check(lambda xz, w, b: causal_conv_silu(xz[..., :6], mask, conv), plain, (xz, conv.weight, conv.bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_and_linear_match_torch(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(8, generator=g, dtype=dtype, requires_grad=True)
    _check(lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: F.rms_norm(x, (8,), w, 1e-5), (x, w), dtype)
    layer = nn.Linear(8, 3).to(dtype)
    for view in (lambda x: x, lambda x: x.transpose(0, 1)):  # contiguous, strided
        _check(lambda x, w, b, v=view: linear(v(x), layer), lambda x, w, b, v=view: F.linear(v(x), w, b),
               (x, layer.weight, layer.bias), dtype)
    short = nn.Linear(5, 3).to(dtype)  # a slice of the last axis, as the Δ rank's part of x_proj's output
    _check(lambda x, w, b: linear(x[..., :5], short), lambda x, w, b: F.linear(x[..., :5], w, b),
           (x, short.weight, short.bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_dropout_draws_and_computes_as_torch(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, 16, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randn(3, 6, 16, generator=g, dtype=dtype, requires_grad=True)
    drop = nn.Dropout(0.25).train()

    def seeded(fn):
        def run(x, y):
            torch.manual_seed(7)
            return fn(x, y)
        return run

    _check(seeded(lambda x, y: residual_dropout(x, y, drop)), seeded(lambda x, y: x + drop(y)), (x, y), dtype)
    torch.manual_seed(7)
    out = residual_dropout(x, y, drop)
    assert 0 < int((out == x).sum()) < x.numel()  # some of y dropped, not all
    drop.eval()
    assert torch.equal(residual_dropout(x, y, drop), x + y)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_sum_matches_torch(smoothing, dtype):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 9, generator=g, dtype=dtype, requires_grad=True)
    target = torch.tensor([3, -1, 0, 8, -1, 5])

    def plain(x):
        return 0.7 * F.cross_entropy(x, target, ignore_index=-1, label_smoothing=smoothing, reduction="sum")

    _check(lambda x: cross_entropy_sum(x, target, smoothing, 0.7), plain, (logits,), dtype)
