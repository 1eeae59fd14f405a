"""The Mamba block's causal depthwise convolution with its input mask and SiLU, fused for CPU.

    u = silu(bias + sum_k w[:, k] * (x * mask)[t - (K - 1) + k])      x, u (B, L, D); w (D, K); mask (B, 1, L)

On CPU, numba kernels compute it and its backward in one pass each (parallel over batch rows) and dispatch no
torch ops; `torch.nn.functional.conv1d` and its autograd formulas take ~40 ops and, for the backward of a depthwise
convolution, most of the layer's non-scan time. Elsewhere (CUDA, half precision, no numba) the torch expression
runs: the masked input, `conv1d` with K - 1 positions of left padding, the first L outputs, SiLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambavl.fuse.scan import _numpy  # the scan wrapper's address-based numpy views (Tensor.numpy: 4 ops each)

try:  # numba is a dependency, but the package still imports (torch path only) without it
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - exercised only on broken installs
    numba = None


def _jit(**kw):
    if numba is None:
        return lambda f: f
    return numba.njit(cache=True, **kw)


@_jit(parallel=True)
def _forward(x, mask, w, bias, pre, out):  # pragma: no cover - compiled by numba
    bt, length, dim = x.shape
    k_len = w.shape[1]
    for b in numba.prange(bt):
        for t in range(length):
            for d in range(dim):
                acc = bias[d]
                for k in range(k_len):
                    s = t - (k_len - 1) + k
                    if s >= 0:
                        acc += w[d, k] * (x[b, s, d] * mask[b, s])
                pre[b, t, d] = acc
                out[b, t, d] = acc / (1.0 + np.exp(-acc))


@_jit(parallel=True)
def _backward(x, mask, w, pre, gout, gx, gw, gbias):  # pragma: no cover - compiled by numba
    bt, length, dim = x.shape
    k_len = w.shape[1]
    for b in numba.prange(bt):
        gpre = np.empty((length, dim), pre.dtype)
        for t in range(length):
            for d in range(dim):
                sig = 1.0 / (1.0 + np.exp(-pre[b, t, d]))
                g = gout[b, t, d] * sig * (1.0 + pre[b, t, d] * (1.0 - sig))  # silu'
                gpre[t, d] = g
                gbias[b, d] += g
                for k in range(k_len):
                    s = t - (k_len - 1) + k
                    if s >= 0:
                        gw[b, d, k] += g * (x[b, s, d] * mask[b, s])
        for s in range(length):
            for d in range(dim):
                acc = 0.0
                for k in range(k_len):
                    t = s + (k_len - 1) - k
                    if t < length:
                        acc += w[d, k] * gpre[t, d]
                gx[b, s, d] = acc * mask[b, s]


class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, weight, bias):
        bt, length, dim = x.shape
        npd = np.float64 if x.dtype == torch.float64 else np.float32
        w = np.ascontiguousarray(_numpy(weight).reshape(dim, -1))  # (D, K)
        m = _numpy(mask)[:, 0, :] if mask is not None else np.ones((bt, length), npd)  # (B, L)
        pre, out = np.empty((bt, length, dim), npd), np.empty((bt, length, dim), npd)
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        _forward(_numpy(x), m, w, _numpy(bias), pre, out)
        ctx.save_for_backward(x, weight)
        ctx.arrays = (m, w, pre)
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, gout):
        x, weight = ctx.saved_tensors
        m, w, pre = ctx.arrays
        bt, length, dim = x.shape
        gx = np.empty((bt, length, dim), pre.dtype)
        gw, gbias = np.zeros((bt, dim, w.shape[1]), np.float64), np.zeros((bt, dim), np.float64)
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        _backward(_numpy(x), m, w, pre, _numpy(gout), gx, gw, gbias)
        g_w = torch.from_numpy(gw.sum(0).astype(pre.dtype).reshape(weight.shape))
        return torch.from_numpy(gx), None, g_w, torch.from_numpy(gbias.sum(0).astype(pre.dtype))


def causal_conv_silu(x: torch.Tensor, mask: torch.Tensor | None, conv: torch.nn.Conv1d) -> torch.Tensor:
    """silu(causal depthwise conv(x * mask)) for x (B, L, D) (any strides), mask (B, 1, L) float | None and a
    depthwise `conv` (weight (D, 1, K), bias (D,), left padding K - 1) -> (B, L, D); see the module docstring."""
    fused = (numba is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
             and conv.weight.dtype == x.dtype and (mask is None or mask.dtype == x.dtype))
    if fused:
        return _CausalConvSiLU.apply(x, mask, conv.weight, conv.bias)
    xt = x.transpose(1, 2)  # (B, D, L)
    if mask is not None:
        xt = xt * mask  # padded tokens must not reach later valid tokens through the conv window
    return F.silu(conv(xt)[..., : x.shape[1]]).transpose(1, 2)
