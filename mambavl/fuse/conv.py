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

from mambavl.fuse.scan import _FASTMATH, _jit, _numba_threads, _numpy, _sigmoid  # the scan's numba set-up

try:  # numba is a dependency, but the package still imports (torch path only) without it
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - exercised only on broken installs
    numba = None


# The loops over channels are innermost: x, u (B, L, D) are read and written one contiguous row of channels at a
# time, and w is taken as (K, D), so every loop over d vectorises.


@_jit(parallel=True, fastmath=_FASTMATH)
def _forward(x, mask, w, bias, pre, out):  # pragma: no cover - compiled by numba
    # x (B, L, D) any strides; mask (B, L); w (K, D); bias (D,); pre (the conv before SiLU), out (B, L, D)
    bt, length, dim = x.shape
    k_len = w.shape[0]
    for b in numba.prange(bt):
        for t in range(length):
            for d in range(dim):
                pre[b, t, d] = bias[d]
            for k in range(k_len):
                s = t - (k_len - 1) + k
                if s >= 0:
                    ms = mask[b, s]
                    for d in range(dim):
                        pre[b, t, d] += w[k, d] * (x[b, s, d] * ms)
            for d in range(dim):
                a = pre[b, t, d]
                out[b, t, d] = a * _sigmoid(a)


@_jit(parallel=True, fastmath=_FASTMATH)
def _backward(x, mask, w, pre, gout, gx, gw, gbias):  # pragma: no cover - compiled by numba
    # gw (B, K, D), gbias (B, D): float64 sums per batch row (the caller sums over B)
    bt, length, dim = x.shape
    k_len = w.shape[0]
    for b in numba.prange(bt):
        gpre = np.empty((length, dim), pre.dtype)
        one = pre.dtype.type(1.0)
        for t in range(length):
            for d in range(dim):
                a = pre[b, t, d]
                sig = _sigmoid(a)
                g = gout[b, t, d] * sig * (one + a * (one - sig))  # silu'
                gpre[t, d] = g
                gbias[b, d] += g
            for k in range(k_len):
                s = t - (k_len - 1) + k
                if s >= 0:
                    ms = mask[b, s]
                    for d in range(dim):
                        gw[b, k, d] += gpre[t, d] * (x[b, s, d] * ms)
        for s in range(length):
            for d in range(dim):
                gx[b, s, d] = 0.0
            for k in range(k_len):
                t = s + (k_len - 1) - k
                if t < length:
                    for d in range(dim):
                        gx[b, s, d] += w[k, d] * gpre[t, d]
            ms = mask[b, s]
            for d in range(dim):
                gx[b, s, d] *= ms


class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, weight, bias):
        bt, length, dim = x.shape
        npd = np.float64 if x.dtype == torch.float64 else np.float32
        w = np.ascontiguousarray(_numpy(weight).reshape(dim, -1).T)  # (K, D)
        m = _numpy(mask)[:, 0, :] if mask is not None else np.ones((bt, length), npd)  # (B, L)
        pre, out = np.empty((bt, length, dim), npd), np.empty((bt, length, dim), npd)
        numba.set_num_threads(_numba_threads())
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
        gw, gbias = np.zeros((bt, w.shape[0], dim), np.float64), np.zeros((bt, dim), np.float64)
        numba.set_num_threads(_numba_threads())
        _backward(_numpy(x), m, w, pre, _numpy(gout), gx, gw, gbias)
        g_w = torch.from_numpy(np.ascontiguousarray(gw.sum(0).T).astype(pre.dtype).reshape(weight.shape))
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
