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


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., C) as (M, C): one `view` for a contiguous tensor (`reshape` dispatches two), else `reshape`."""
    if t.dim() == 2:
        return t
    return t.view(-1, t.shape[-1]) if t.is_contiguous() else t.reshape(-1, t.shape[-1])


def _transposed(m: torch.Tensor) -> torch.Tensor:
    """The transpose of a 2-D tensor as one `as_strided` (`transpose` dispatches two). Only inside the autograd
    functions here: as an autograd op, `as_strided`'s backward is far costlier than `transpose`'s."""
    return m.as_strided((m.shape[1], m.shape[0]), (m.stride(1), m.stride(0)), m.storage_offset())


class _Linear(torch.autograd.Function):
    """x (..., C_in) @ weight.T (+ bias) as one 2-D matrix product, and its backward as two (plus a sum for the bias):
    autograd's formulas for `F.linear` on a batch of tokens add transposes, views and copies around each."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = _rows(x)  # (M, C_in)
        y = torch.mm(x2, _transposed(weight))  # (M, C_out)
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(x2, weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x2, weight = ctx.saved_tensors
        g = _rows(gy)  # (M, C_out)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(g, weight)
            gx = gx if len(ctx.x_shape) == 2 else gx.view(ctx.x_shape)
        gw = torch.mm(_transposed(g), x2) if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """`layer(x)` for x (..., C_in): about 8 ops forward and 14 backward where `F.linear` and its autograd formulas
    take ~30 for a 3-D input. Under autocast, and on devices other than CPU and CUDA, `F.linear` itself."""
    if x.device.type not in ("cpu", "cuda") or torch.is_autocast_enabled(x.device.type):
        return torch.nn.functional.linear(x, layer.weight, layer.bias)
    return _Linear.apply(x, layer.weight, layer.bias)


class _ResidualDropout(torch.autograd.Function):
    """x + dropout(y, p) for x, y of one shape: y * noise + x with noise = Bernoulli(1 - p) / (1 - p), drawn as
    torch's CPU dropout draws it (`empty_like(y).bernoulli_(1 - p).div_(1 - p)`: the same random numbers)."""

    @staticmethod
    def forward(ctx, x, y, p: float):
        noise = torch.empty_like(y).bernoulli_(1.0 - p).div_(scalar(1.0 - p, y))
        ctx.save_for_backward(noise)
        return torch.addcmul(x, y, noise)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (noise,) = ctx.saved_tensors
        return g, g * noise, None


def residual_dropout(x: torch.Tensor, y: torch.Tensor, drop: torch.nn.Dropout) -> torch.Tensor:
    """`x + drop(y)` for x, y of one shape and dtype: 5 ops forward and 1 backward where `nn.Dropout` and the add
    dispatch ~11 and ~3 (plus the sum node's). In evaluation (or p = 0) `x + y`; under autocast, with other dtypes
    and on devices other than CPU and CUDA, the plain expression."""
    if not drop.training or drop.p == 0:
        return x + y
    if (x.device.type not in ("cpu", "cuda") or torch.is_autocast_enabled(x.device.type) or x.dtype != y.dtype
            or x.shape != y.shape):
        return x + drop(y)
    return _ResidualDropout.apply(x, y, float(drop.p))


class _CrossEntropy(torch.autograd.Function):
    """scale * sum over rows with target >= 0 of cross-entropy with label smoothing (torch's definition: (1 - eps)
    * nll + eps * mean over classes of -log p), logits (B, K) float, target (B,) long; -> 0-dim."""

    @staticmethod
    def forward(ctx, logits, target, smoothing: float, scale: float):
        k = logits.shape[-1]
        logp = torch.log_softmax(logits, dim=-1)  # (B, K)
        valid = torch.ge(target, scalar(0, target)).unsqueeze(1)  # (B, 1) bool
        index = target.clamp_min(0).unsqueeze(1)  # (B, 1): ignored rows read class 0, then count 0
        picked = logp.gather(1, index)  # (B, 1)
        if smoothing:
            picked = torch.add(picked, logp.sum(-1, keepdim=True), alpha=smoothing / (k * (1.0 - smoothing)))
        total = torch.where(valid, picked, scalar(0.0, picked)).sum()
        ctx.save_for_backward(logp, index, valid)
        ctx.smoothing, ctx.scale = smoothing, scale
        return torch.add(scalar(0.0, total), total, alpha=-(1.0 - smoothing) * scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        logp, index, valid = ctx.saved_tensors
        eps, k = ctx.smoothing, logp.shape[-1]
        # d/dlogits = scale * (softmax - ((1 - eps) * onehot(target) + eps / K)) on valid rows
        g = torch.exp(logp).scatter_add_(1, index, torch.full_like(index, eps - 1.0, dtype=logp.dtype))
        g = torch.add(g, scalar(1.0, g), alpha=-eps / k) if eps else g
        coef = torch.where(valid, gy * ctx.scale, scalar(0.0, g))  # (B, 1)
        return g.mul_(coef), None, None, None


def cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0,
                      scale: float = 1.0) -> torch.Tensor:
    """`scale * F.cross_entropy(logits, target, ignore_index=-1, label_smoothing=smoothing, reduction="sum")` for
    logits (B, K) float32/float64 and target (B,) long, in ~15 ops forward and ~8 backward (torch's: ~60)."""
    if logits.device.type not in ("cpu", "cuda"):
        return scale * torch.nn.functional.cross_entropy(logits, target, ignore_index=-1,
                                                         label_smoothing=smoothing, reduction="sum")
    return _CrossEntropy.apply(logits, target, smoothing, scale)
