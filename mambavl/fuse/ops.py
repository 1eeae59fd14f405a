"""Autograd functions and helpers for the MambaVL layer's small pieces, written to dispatch few ops.

At the default training sizes (batch 64, ~50 tokens, d_model 128) a step is made of hundreds of small tensor ops,
and autograd's generic backward formulas add views, casts and reductions to each. The functions here compute the
same results as the plain torch expressions they replace (`tests/test_fusion_reference.py` checks the model's
outputs and gradients against recorded values), with a hand-written backward of a few ops.
"""

from __future__ import annotations

import torch

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
