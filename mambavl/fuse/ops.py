"""Autograd functions and helpers for the MambaVL layer's small pieces, written to dispatch few ops.

At the default training sizes (batch 64, ~50 tokens, d_model 128) a step is made of hundreds of small tensor ops,
and autograd's generic backward formulas add views, casts and reductions to each. The functions here compute the
same results as the plain torch expressions they replace (`tests/test_fusion_reference.py` checks the model's
outputs and gradients against recorded values), with a hand-written backward of a few ops.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

_CONSTANTS: dict[tuple[float, torch.dtype, torch.device], torch.Tensor] = {}


def scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """`value` as a cached 0-dim tensor in like's dtype and device, for arithmetic with tensors: an op with a Python
    number operand dispatches four more ops (the number is wrapped into a tensor and copied) on every call."""
    key = (float(value), like.dtype, like.device)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return t


class _RMSNorm(torch.autograd.Function):
    """y = x * rsqrt(mean(x², -1) + eps) * weight for x (..., d), weight (d,)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        d = x.shape[-1]
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (..., 1)
        r = torch.addcmul(scalar(eps, x), norm, norm, value=1.0 / d).rsqrt_()  # 1 / rms
        xhat = x * r  # (..., d)
        ctx.save_for_backward(xhat, r, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, gy):
        xhat, r, weight = ctx.saved_tensors
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (gy * xhat).sum(dim=tuple(range(gy.dim() - 1)))  # (d,)
        gx = None
        if ctx.needs_input_grad[0]:
            g = gy * weight  # d loss / d xhat
            # d xhat / d x applied to g: r * (g - xhat * mean(g * xhat))
            dot = (g * xhat).sum(-1, keepdim=True)  # (..., 1)
            gx = torch.addcmul(g, xhat, dot, value=-1.0 / xhat.shape[-1]).mul_(r)
        return gx, gw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x (..., d) with weight (d,): x * rsqrt(mean(x²) + eps) * weight, 5 ops forward and 10 backward
    (torch's CPU path dispatches ~24 forward, autograd's formulas for the expression ~40 backward)."""
    return _RMSNorm.apply(x, weight, eps)


class _Linear(torch.autograd.Function):
    """x (..., C_in) @ weight.T (+ bias) as one 2-D matrix product, and its backward as two (plus a sum for the bias):
    autograd's formulas for `F.linear` on a batch of tokens add transposes, views and copies around each."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (M, C_in); a view for contiguous x
        y = torch.mm(x2, weight.transpose(0, 1))  # (M, C_out)
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(x2, weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x2, weight = ctx.saved_tensors
        g = gy if gy.dim() == 2 else gy.reshape(-1, gy.shape[-1])  # (M, C_out)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(g, weight)
            gx = gx if len(ctx.x_shape) == 2 else gx.view(ctx.x_shape)
        gw = torch.mm(g.transpose(0, 1), x2) if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """`layer(x)` for x (..., C_in): about 8 ops forward and 14 backward where `F.linear` and its autograd formulas
    take ~30 for a 3-D input. Under autocast, and on devices other than CPU and CUDA, `F.linear` itself."""
    if x.device.type not in ("cpu", "cuda") or torch.is_autocast_enabled(x.device.type):
        return torch.nn.functional.linear(x, layer.weight, layer.bias)
    return _Linear.apply(x, layer.weight, layer.bias)
