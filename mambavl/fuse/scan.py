"""Selective scan (the S6 recurrence of Mamba): a plain reference and four fast implementations.

For every batch row b and channel d, with a state h of size N:

    delta_t = softplus(delta_t + delta_bias)        (bias and softplus only when asked)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t     = <C_t, h_t> + D * u_t
    out_t   = y_t * silu(z_t)                        (only when z is given)

Argument conventions follow mamba-ssm's `selective_scan_fn` so the CUDA kernel is a drop-in:

    u, delta      (Bt, Din, L)
    A             (Din, N)           one state matrix for every position, or
                  (G, Din, N)        G state matrices, with `A_index` (L,) int choosing one per position
                                     (mambavl's extension: modality-specific A inside one joint scan)
    B, C          (Bt, N, L)         shared by all channels, or (Bt, Din, N, L) per channel
    D, delta_bias (Din,)
    z             (Bt, Din, L)
    returns       (Bt, Din, L) in u's dtype; with return_last_state also h_L (Bt, Din, N). As in mamba-ssm, the
                  gradient does not flow through the returned last state.

Implementations (pick with `selective_scan(..., impl=...)`):

* `reference`: `selective_scan_ref`, a Python loop over L: the definition, used to check the others.
* `chunked`: `selective_scan_chunked`, pure torch on any device. Within a chunk of K positions the state is a
  closed form over log-space cumulative sums of delta*A ("segsum"); the state is carried from chunk to chunk.
  Each chunk is recomputed in backward (activation checkpointing) so memory stays O(Bt*Din*L), not O(L*K*N).
* `cpu`: `selective_scan_cpu`, a numba-compiled fused loop for forward and a hand-written reverse-time backward,
  parallel over (batch row, channel) pairs, so both cores are busy at batch 64 and at batch 2 alike. The states are
  not stored: forward keeps one checkpoint every `_CKPT` positions and backward recomputes each chunk from its
  checkpoint. Computes in float32 for float32 inputs and in float64 when an input is float64 (the reference's
  rule); the gradient sums over positions, rows and channels (dA, dB, dC, dD, d delta_bias) are formed in the
  compute dtype over at most one chunk of positions (dA, dD, d delta_bias) or 32 channels (dB, dC) and
  accumulated in float64 beyond. u, delta, z are read in place in any layout (a Mamba block's transposed views
  included), no copies; exp, softplus and sigmoid are plain-arithmetic float32 versions (~1-2 ulp) so the loops
  vectorise.
* `cuda`: `selective_scan_cuda`, mamba-ssm's kernel, imported only when called (`pip install mambavl[cuda]`).
  It has no per-position A.
* `triton`: `selective_scan_triton`, Triton kernels for forward and backward (`mambavl.fuse.scan_triton`), compiled
  at the first call, nothing to build; Triton comes with PyPI's CUDA builds of PyTorch and is imported only when
  called. One program per (batch row, block of channels) runs sequentially over L with the state in registers, in
  float32 for float32/bfloat16/float16 inputs. Backward recomputes the states chunk by chunk from checkpoints saved
  every ~sqrt(L) positions. Takes the grouped A. On CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1
  set before Triton is imported; slow, for tests).

`impl="auto"` picks, for CUDA tensors: `cuda` when mamba-ssm imports and A is not grouped, else `triton` when Triton
imports, else `chunked`; for CPU tensors: `cpu` when numba imports, else `chunked`.

Precision: the state is never kept in half precision. Every implementation computes in float32 (float64 when an
input is float64) whatever the input dtypes and returns in u's dtype. The torch implementations also run with
autocast switched off (`_without_autocast`): under a bf16/fp16 autocast region their matmuls and einsums would
otherwise be cast back down to half precision.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from enum import Enum

import torch
import torch.nn.functional as F

from mambavl.errors import InputError
from mambavl.fuse.config import ScanImpl

__all__ = [
    "ScanImpl",
    "available_impls",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_cpu",
    "selective_scan_cuda",
    "selective_scan_ref",
    "selective_scan_triton",
]


# ----------------------------------------------------------------------------------------------------------------
# argument checks and precision shared by every implementation


def _without_autocast(scan):
    """`scan` run with autocast off on its inputs' device: its float32 state and products stay float32 inside a
    bf16/fp16 autocast region (the caller's inputs may be half; the scan casts them up itself)."""

    @functools.wraps(scan)
    def run(u, *args, **kwargs):
        kind = u.device.type
        if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
            with torch.autocast(kind, enabled=False):
                return scan(u, *args, **kwargs)
        return scan(u, *args, **kwargs)

    return run



def _check_args(u, delta, A, B, C, D, z, delta_bias, A_index) -> tuple[int, int, int, int]:
    """Validate shapes; return (Bt, Din, L, N). Raises InputError naming the argument."""
    if u.dim() != 3:
        raise InputError(f"selective scan: u must be (batch, dim, length), got shape {tuple(u.shape)}")
    bt, din, length = u.shape
    if delta.shape != u.shape:
        raise InputError(f"selective scan: delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if A.dim() == 2:
        if A_index is not None:
            raise InputError("selective scan: A_index is only meaningful with a grouped A of shape (G, dim, state)")
        if A.shape[0] != din:
            raise InputError(f"selective scan: A shape {tuple(A.shape)} does not match dim {din}")
    elif A.dim() == 3:
        if A.shape[1] != din:
            raise InputError(f"selective scan: A shape {tuple(A.shape)} does not match dim {din}")
        if A_index is None:
            raise InputError("selective scan: a grouped A (G, dim, state) needs A_index (length,)")
        if A_index.shape != (length,):
            raise InputError(f"selective scan: A_index shape {tuple(A_index.shape)} != (length,) = ({length},)")
        if length and (int(A_index.min()) < 0 or int(A_index.max()) >= A.shape[0]):
            raise InputError(f"selective scan: A_index values must lie in [0, {A.shape[0]})")
    else:
        raise InputError(f"selective scan: A must be (dim, state) or (groups, dim, state), got {tuple(A.shape)}")
    n = A.shape[-1]
    for name, m in (("B", B), ("C", C)):
        ok = (m.dim() == 3 and m.shape == (bt, n, length)) or (m.dim() == 4 and m.shape == (bt, din, n, length))
        if not ok:
            raise InputError(
                f"selective scan: {name} must be (batch, state, length) = {(bt, n, length)} or "
                f"(batch, dim, state, length), got {tuple(m.shape)}"
            )
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (din,):
            raise InputError(f"selective scan: {name} must be (dim,) = ({din},), got {tuple(v.shape)}")
    if z is not None and z.shape != u.shape:
        raise InputError(f"selective scan: z shape {tuple(z.shape)} != u shape {tuple(u.shape)}")
    return bt, din, length, n


def _compute_dtype(*tensors) -> torch.dtype:
    """float64 when any input is float64, else float32 (half inputs are computed in float32, as mamba-ssm does)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _prepare_delta(delta, delta_bias, delta_softplus, dtype):
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _per_position_A(A, A_index, dtype):
    """A as (Din, N) when shared by every position, else (L, Din, N)."""
    A = A.to(dtype)
    return A if A.dim() == 2 else A[A_index.long()]


def _finish(y, u, D, z, dtype_out):
    """y (Bt, Din, L) -> + D u, * silu(z), cast."""
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_out)


# ----------------------------------------------------------------------------------------------------------------
# reference


@_without_autocast
def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, *, A_index=None
):
    """The selective scan by its definition: a sequential loop over positions.

    u, delta (Bt, Din, L); A (Din, N) or (G, Din, N) with A_index (L,); B, C (Bt, N, L) or (Bt, Din, N, L);
    D, delta_bias (Din,); z (Bt, Din, L). Returns out (Bt, Din, L) in u's dtype, and with return_last_state also
    the final state (Bt, Din, N). Computes in float64 when any input is float64, else float32.
    """
    bt, din, length, n = _check_args(u, delta, A, B, C, D, z, delta_bias, A_index)
    dtype = _compute_dtype(u, delta, A, B, C)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)  # (Bt, Din, L)
    x = u.to(dtype)  # (Bt, Din, L)
    A_pos = _per_position_A(A, A_index, dtype)  # (Din, N) or (L, Din, N)
    B = B.to(dtype)
    C = C.to(dtype)
    h = x.new_zeros(bt, din, n)  # (Bt, Din, N)
    ys = []
    for t in range(length):
        A_t = A_pos if A_pos.dim() == 2 else A_pos[t]  # (Din, N)
        B_t = B[:, None, :, t] if B.dim() == 3 else B[..., t]  # (Bt, 1 or Din, N)
        C_t = C[:, None, :, t] if C.dim() == 3 else C[..., t]
        d_t = delta[:, :, t, None]  # (Bt, Din, 1)
        h = torch.exp(d_t * A_t) * h + d_t * B_t * x[:, :, t, None]
        ys.append((h * C_t).sum(-1))  # (Bt, Din)
    y = torch.stack(ys, dim=-1) if ys else x.new_zeros(bt, din, 0)  # (Bt, Din, L)
    out = _finish(y, x, D, z, u.dtype)
    return (out, h.to(u.dtype)) if return_last_state else out


# ----------------------------------------------------------------------------------------------------------------
# chunked (pure torch, any device)

# Elements of the largest per-chunk temporary, (Bt, Din, K, K, N); 2**23 floats = 32 MiB in float32.
_CHUNK_BUDGET = 2**23


def _auto_chunk(bt: int, din: int, n: int, length: int, device: torch.device) -> int:
    """Chunk size: the segsum form does K times the sequential work, which a GPU hides (it wants few, large chunks
    to amortise launches) and a CPU does not (measured fastest near K=8 on 2 cores, B=2 D=256 N=16 L=2048)."""
    if device.type == "cpu":
        k = 8
    else:
        k = int(math.sqrt(_CHUNK_BUDGET / max(1, bt * din * n)))
        k = min(64, 1 << max(0, int(math.log2(max(k, 1)))))
    return max(1, min(k, length))


def _chunk_step(delta_c, x_c, A_c, B_c, C_c, h0):
    """One chunk of K positions in closed form.

    delta_c, x_c (Bt, Din, K) with x = delta*u; A_c (Din, N) or (K, Din, N); B_c, C_c (Bt, 1|Din, N, K);
    h0 (Bt, Din, N) the state before the chunk. Returns y (Bt, Din, K) without the D term and the last state.
    The state dimension sits before time so the sum over source positions is one batched matmul.
    """
    if A_c.dim() == 2:
        log_a = A_c[None, :, :, None] * delta_c[:, :, None, :]  # (Bt, Din, N, K), <= 0 for A <= 0
    else:
        log_a = A_c.permute(1, 2, 0)[None] * delta_c[:, :, None, :]  # (Bt, Din, N, K)
    cum = torch.cumsum(log_a, dim=-1)  # (Bt, Din, N, K)
    k = delta_c.shape[-1]
    # segsum: decay from s to t is exp(cum_t - cum_s) for s <= t. Entries with s > t are set to -inf *before* the
    # exp, so no exp of a (possibly large) positive number is ever formed, and their gradient is exactly zero.
    seg = cum[..., :, None] - cum[..., None, :]  # (Bt, Din, N, K_t, K_s)
    causal = torch.ones(k, k, dtype=torch.bool, device=delta_c.device).tril()  # (K_t, K_s)
    decay = torch.exp(seg.masked_fill(~causal, float("-inf")))
    inp = x_c[:, :, None, :] * B_c  # (Bt, Din, N, K)
    h = (decay @ inp[..., None])[..., 0] + torch.exp(cum) * h0[..., None]  # (Bt, Din, N, K)
    y = (h * C_c).sum(2)  # (Bt, Din, K)
    return y, h[..., -1]


class _RecomputeChunk(torch.autograd.Function):
    """`_chunk_step` whose (Bt, Din, K, K, N) temporaries are recomputed in backward instead of kept.

    (torch.utils.checkpoint does the same but imports torch._dynamo on first use, seconds on a small CPU.)
    """

    @staticmethod
    def forward(ctx, *args):
        ctx.save_for_backward(*args)
        with torch.no_grad():
            return _chunk_step(*args)

    @staticmethod
    def backward(ctx, gy, gh):
        args = [a.detach().requires_grad_(need) for a, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        wanted = [a for a in args if a.requires_grad]
        with torch.enable_grad():
            y, h = _chunk_step(*args)
            grads = iter(torch.autograd.grad((y, h), wanted, (gy, gh), allow_unused=True))
        return tuple(next(grads) if a.requires_grad else None for a in args)


@_without_autocast
def selective_scan_chunked(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    *,
    A_index=None,
    chunk_size: int | None = None,
):
    """Portable selective scan: closed form within chunks (log-space cumulative sums), state carried between them.

    Same arguments and result as `selective_scan_ref`. `chunk_size` K (default: 8 on CPU; elsewhere the largest
    power of two up to 64 whose (Bt, Din, K, K, N) temporary fits 32 MiB). When gradients are needed each chunk is
    recomputed in backward (activation checkpointing), so only the chunk inputs are kept.
    """
    bt, din, length, n = _check_args(u, delta, A, B, C, D, z, delta_bias, A_index)
    dtype = _compute_dtype(u, delta, A, B, C)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)  # (Bt, Din, L)
    x = u.to(dtype)
    xd = delta * x  # (Bt, Din, L)
    A_pos = _per_position_A(A, A_index, dtype)
    B4 = (B[:, None] if B.dim() == 3 else B).to(dtype)  # (Bt, 1|Din, N, L)
    C4 = (C[:, None] if C.dim() == 3 else C).to(dtype)
    k = chunk_size or _auto_chunk(bt, din, n, length, u.device)
    if k < 1:
        raise InputError(f"selective scan: chunk_size must be >= 1, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias)
    )
    h = x.new_zeros(bt, din, n)  # (Bt, Din, N)
    ys = []
    for s in range(0, length, k):
        e = min(s + k, length)
        A_c = A_pos if A_pos.dim() == 2 else A_pos[s:e]
        args = (delta[..., s:e], xd[..., s:e], A_c, B4[..., s:e], C4[..., s:e], h)
        if needs_grad:
            y_c, h = _RecomputeChunk.apply(*args)
        else:
            y_c, h = _chunk_step(*args)
        ys.append(y_c)
    y = torch.cat(ys, dim=-1) if ys else x.new_zeros(bt, din, 0)  # (Bt, Din, L)
    out = _finish(y, x, D, z, u.dtype)
    return (out, h.detach().to(u.dtype)) if return_last_state else out


# ----------------------------------------------------------------------------------------------------------------
# cpu: numba-fused forward and backward

# Positions between stored states in the cpu forward; backward recomputes the states of one chunk at a time. The
# per-chunk buffers of the backward (states and decays, 2 x 64 x N) stay in L1.
_CKPT = 64

try:  # numba is a dependency, but the package still imports (cpu impl unavailable) without it
    import numba
    import numpy as np
    from llvmlite import ir as _llvm_ir
    from numba.extending import intrinsic as _intrinsic
    from numba.extending import overload as _overload
except ImportError:  # pragma: no cover - exercised only on broken installs
    numba = None

# Reassociation lets LLVM vectorise the sums over the state dimension; no finite-math assumptions (inputs may hold
# inf/nan, which must propagate as in the reference).
_FASTMATH = {"reassoc", "contract"}


def _jit(**kw):
    """numba.njit(cache=True, error_model="numpy", ...) when numba is importable, else leave the function plain (never
    called). numpy's error model: a float division by zero gives inf/nan instead of raising, so a loop that divides
    (softplus, sigmoid) has no exception branch and vectorises (with Python's, such loops stayed scalar)."""
    if numba is None:
        return lambda f: f
    return numba.njit(cache=True, error_model="numpy", **kw)


def _exp(x):
    """exp(x) in x's float type, vectorisable (numba-only; the implementations are chosen by `_exp_overload`)."""
    raise NotImplementedError("numba-only helper")


if numba is not None:

    @_intrinsic
    def _bits_to_float(typingctx, x):
        """Reinterpret an int64's bits as a float64, an int32's as a float32 (free; builds 2**k in the exps)."""
        if x == numba.types.int64:
            sig, llty = numba.types.float64(numba.types.int64), _llvm_ir.DoubleType()
        elif x == numba.types.int32:
            sig, llty = numba.types.float32(numba.types.int32), _llvm_ir.FloatType()
        else:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llty)

        return sig, codegen

    _F32 = np.float32
    _LOG2E_32, _LN2_HI_32, _LN2_LO_32 = _F32(1.44269504088896341), _F32(0.693359375), _F32(-2.12194440e-4)
    # Cephes' expf minimax coefficients: exp(r) = 1 + r + r**2 P(r) on |r| <= ln(2)/2, about 1 ulp.
    _EXPF_P = tuple(_F32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                     1.6666665459e-1, 5.0000001201e-1))
    _F32_0, _F32_HALF, _F32_1 = _F32(0.0), _F32(0.5), _F32(1.0)


def _exp_f32(x):
    """float32 exp to ~1 ulp in plain arithmetic. 2**k is applied as two factors 2**(k//2) * 2**(k - k//2), so
    results near the float32 limits (denormals below exp(-87.3), up to 3.4e38 at exp(88.72)) come out as libm's."""
    xc = min(max(x, _F32(-104.0)), _F32(88.8))
    kf = np.floor(xc * _LOG2E_32 + _F32_HALF)
    r = xc - kf * _LN2_HI_32
    r = r - kf * _LN2_LO_32
    p = _EXPF_P[0]
    p = p * r + _EXPF_P[1]
    p = p * r + _EXPF_P[2]
    p = p * r + _EXPF_P[3]
    p = p * r + _EXPF_P[4]
    p = p * r + _EXPF_P[5]
    p = p * (r * r) + r + _F32_1
    # The exponent bits (k + 127) << 23 formed in float32 arithmetic (exact: integers below 2**31), so the only
    # integer step is one float -> int32 conversion per factor (numba would widen int32 arithmetic to int64).
    k1 = np.floor(kf * _F32_HALF)
    res = p * _bits_to_float(np.int32((k1 + _F32(127.0)) * _F32(8388608.0)))
    res = res * _bits_to_float(np.int32((kf - k1 + _F32(127.0)) * _F32(8388608.0)))
    if x < _F32(-104.0):  # exp(-104) < 2**-149, the smallest denormal
        res = _F32_0
    if x > _F32(88.8):  # exp(88.73) already overflows
        res = _F32(math.inf)
    if x != x:
        res = x
    return res


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split in two so k * _LN2_HI is exact (Cody-Waite reduction)
_LN2_LO = 1.90821492927058770002e-10


def _exp_f64(x):
    """float64 exp to ~1 ulp in plain arithmetic: exp(x) = 2**k * exp(r), k = round(x / ln 2), |r| <= ln(2)/2,
    exp(r) by its Taylor series to r**13 (truncation < 1e-17 relative); flushes to 0 below exp(-708)."""
    xc = min(max(x, -708.0), 709.0)
    kf = np.floor(xc * _LOG2E + 0.5)
    r = xc - kf * _LN2_HI
    r = r - kf * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    res = p * _bits_to_float((np.int64(kf) + 1023) << 52)
    if x < -708.0:  # below the smallest normal: flush to 0 (the exact value is < 3.3e-308)
        res = 0.0
    if x > 709.0:
        res = math.inf
    if x != x:
        res = x
    return res


if numba is not None:

    @_overload(_exp)
    def _exp_overload(x):
        """Without Intel's SVML numba calls libm's scalar exp, which would dominate the fused loops; these are
        plain arithmetic, so LLVM vectorises the loops over the state dimension that call them."""
        return _exp_f32 if x == numba.types.float32 else _exp_f64


# numba resolves globals by value, so the alias still marks the parallel loops
_prange = numba.prange if numba is not None else range


def _sigmoid(x):
    """1 / (1 + exp(-x)) in x's float type (numba-only; see `_sigmoid_overload`)."""
    raise NotImplementedError("numba-only helper")


def _softplus(x):
    """torch.nn.functional.softplus (threshold 20) in x's float type (numba-only; see `_softplus_overload`)."""
    raise NotImplementedError("numba-only helper")


def _softplus_grad(x):
    """d softplus / dx as torch's softplus backward has it: 1 above the threshold 20, else sigmoid (numba-only)."""
    raise NotImplementedError("numba-only helper")


def _softplus_grad_f32(x):
    return _F32_1 if x > _F32(20.0) else _sigmoid(x)


def _softplus_grad_f64(x):
    return 1.0 if x > 20.0 else _sigmoid(x)


def _sigmoid_f32(x):
    return _F32_1 / (_F32_1 + _exp(-x))


def _softplus_f32(x):
    # log1p(e) = 2 atanh(s) with s = e / (2 + e) <= 1/3: the series 2 s (1 + s**2/3 + ... + s**14/15) is within
    # 2e-9 relative, and s is formed from e without cancellation, so tiny e (x << 0) keeps its accuracy.
    e = _exp(-abs(x))
    s = e / (_F32(2.0) + e)
    s2 = s * s
    p = _F32(1.0 / 15.0)
    p = p * s2 + _F32(1.0 / 13.0)
    p = p * s2 + _F32(1.0 / 11.0)
    p = p * s2 + _F32(1.0 / 9.0)
    p = p * s2 + _F32(1.0 / 7.0)
    p = p * s2 + _F32(1.0 / 5.0)
    p = p * s2 + _F32(1.0 / 3.0)
    p = p * s2 + _F32_1
    res = max(x, _F32_0) + _F32(2.0) * s * p
    return x if x > _F32(20.0) else res


def _sigmoid_f64(x):
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _softplus_f64(x):
    return x if x > 20.0 else math.log1p(math.exp(x))


if numba is not None:

    @_overload(_sigmoid)
    def _sigmoid_overload(x):
        # float32: plain arithmetic over `_exp`, so the loops over positions vectorise; float64: libm, as torch
        return _sigmoid_f32 if x == numba.types.float32 else _sigmoid_f64

    @_overload(_softplus)
    def _softplus_overload(x):
        return _softplus_f32 if x == numba.types.float32 else _softplus_f64

    @_overload(_softplus_grad)
    def _softplus_grad_overload(x):
        return _softplus_grad_f32 if x == numba.types.float32 else _softplus_grad_f64


@_jit(fastmath=_FASTMATH)
def _chunk_deltas(dl, u, bias, softplus, b, d, t0, m, dts, xs, sig):
    # dts[j] = delta at position t0 + j after bias and softplus, xs[j] = dts[j] * u; with `sig` of length > 0 also
    # softplus's derivative (torch's: 1 above the threshold 20). Loops over positions: vectorised in float32.
    bd = bias[d]
    want_sig = sig.shape[0] > 0
    for j in range(m):
        x = dl[b, d, t0 + j] + bd
        dt = x
        if softplus:
            dt = _softplus(x)
            if want_sig:
                sig[j] = _softplus_grad(x)
        dts[j] = dt
        xs[j] = dt * u[b, d, t0 + j]


@_jit(fastmath=_FASTMATH, inline="always")
def _scan_chunk(b, d, t0, m, n, A, aidx, Bm, Cm, gb, gc, dts, xs, h, ys):
    # The recurrence over positions t0 .. t0 + m - 1 of one row, the state dimension innermost (vectorised).
    for j in range(m):
        t = t0 + j
        g = aidx[t]
        dt = dts[j]
        x = xs[j]
        acc = ys.dtype.type(0.0)
        for k in range(n):
            hk = _exp(dt * A[g, d, k]) * h[k] + x * Bm[b, gb, t, k]
            h[k] = hk
            acc += Cm[b, gc, t, k] * hk
        ys[j] = acc


@_jit(fastmath=_FASTMATH)
def _forward_row(b, d, u, dl, bias, softplus, A, aidx, Bm, Cm, Dv, z, has_z, save, ckpt_every, out, ypre, ckpt,
                 last, h, dts, xs, ys):
    # One (batch row, channel): the recurrence over positions, the state dimension innermost (vectorised).
    n = A.shape[2]
    length = u.shape[2]
    gb = d if Bm.shape[1] > 1 else 0
    gc = d if Cm.shape[1] > 1 else 0
    nosig = dts[:0]
    zero = u.dtype.type(0.0)
    h[:] = zero
    for t0 in range(0, length, ckpt_every):
        if save:
            ckpt[b, d, t0 // ckpt_every, :] = h
        m = min(length, t0 + ckpt_every) - t0
        _chunk_deltas(dl, u, bias, softplus, b, d, t0, m, dts, xs, nosig)
        if n == 16:  # mamba's d_state: a trip count LLVM knows, one 16-float vector with no remainder loop
            _scan_chunk(b, d, t0, m, 16, A, aidx, Bm, Cm, gb, gc, dts, xs, h, ys)
        else:
            _scan_chunk(b, d, t0, m, n, A, aidx, Bm, Cm, gb, gc, dts, xs, h, ys)
        for j in range(m):
            t = t0 + j
            ut = u[b, d, t]
            y = ys[j] + Dv[d] * ut
            if has_z:
                if save:
                    ypre[b, d, t] = y
                zt = z[b, d, t]
                y = y * (zt * _sigmoid(zt))
            out[b, d, t] = y
    last[b, d, :] = h


@_jit(parallel=True, fastmath=_FASTMATH)
def _cpu_forward(u, dl, bias, softplus, A, aidx, Bm, Cm, Dv, z, has_z, save, ckpt_every, nblocks, out, ypre, ckpt,
                 last):
    # u, dl, z, out, ypre (Bt, Din, L); A (G, Din, N); aidx (L,); Bm, Cm (Bt, 1|Din, L, N); ckpt (Bt, Din, nck, N):
    # the state before every `ckpt_every`-th position; ypre: y before the gate (with z). Both only when `save`.
    # Rows (b, d) are split into `nblocks` contiguous blocks; each block allocates its buffers once.
    bt, din, length = u.shape
    rows = bt * din
    n = A.shape[2]
    for pp in _prange(nblocks):
        p = np.int64(pp)  # prange indices may be unsigned; mixing them with int64 would give floats
        h = np.empty(n, u.dtype)
        dts = np.empty(ckpt_every, u.dtype)
        xs = np.empty(ckpt_every, u.dtype)
        ys = np.empty(ckpt_every, u.dtype)
        for r in range(p * rows // nblocks, (p + 1) * rows // nblocks):
            _forward_row(r // din, r % din, u, dl, bias, softplus, A, aidx, Bm, Cm, Dv, z, has_z, save, ckpt_every,
                         out, ypre, ckpt, last, h, dts, xs, ys)


def _softplus_e_f32(x, e):
    # softplus(x) from e = exp(-|x|), the series of `_softplus_f32`: one exp serves softplus and its derivative
    s = e / (_F32(2.0) + e)
    s2 = s * s
    p = _F32(1.0 / 15.0)
    p = p * s2 + _F32(1.0 / 13.0)
    p = p * s2 + _F32(1.0 / 11.0)
    p = p * s2 + _F32(1.0 / 9.0)
    p = p * s2 + _F32(1.0 / 7.0)
    p = p * s2 + _F32(1.0 / 5.0)
    p = p * s2 + _F32(1.0 / 3.0)
    p = p * s2 + _F32_1
    res = max(x, _F32_0) + _F32(2.0) * s * p
    return x if x > _F32(20.0) else res


def _softplus_e_f64(x, e):
    return x if x > 20.0 else max(x, 0.0) + math.log1p(e)


def _softplus_grad_e_f32(x, e):
    r = _F32_1 / (_F32_1 + e)
    s = r if x >= _F32_0 else e * r
    return _F32_1 if x > _F32(20.0) else s


def _softplus_grad_e_f64(x, e):
    r = 1.0 / (1.0 + e)
    s = r if x >= 0.0 else e * r
    return 1.0 if x > 20.0 else s


def _softplus_e(x, e):
    """softplus(x) given e = exp(-|x|), in x's float type (numba-only; see `_softplus_e_overload`)."""
    raise NotImplementedError("numba-only helper")


def _softplus_grad_e(x, e):
    """d softplus / dx as torch has it (1 above the threshold 20, else sigmoid(x)) given e = exp(-|x|) (numba-only)."""
    raise NotImplementedError("numba-only helper")


if numba is not None:

    @_overload(_softplus_e)
    def _softplus_e_overload(x, e):
        return _softplus_e_f32 if x == numba.types.float32 else _softplus_e_f64

    @_overload(_softplus_grad_e)
    def _softplus_grad_e_overload(x, e):
        return _softplus_grad_e_f32 if x == numba.types.float32 else _softplus_grad_e_f64


# Rows of a backward chunk's buffer (_NROWS, K): per-position values of one (row, chunk), contiguous so that the
# loops computing softplus, sigmoid and the gate's backward over positions vectorise (the inputs' own rows may be
# strided; they are copied in once).
_R_U, _R_DT, _R_X, _R_SIG, _R_GO, _R_Z, _R_YP, _R_DY, _R_SA, _R_SB, _R_T1, _R_T2 = range(12)
_NROWS = 12
# dB, dC shared by the channels: summed in the compute dtype over at most this many channels of a chunk, then added
# to the float64 totals (a float64 add per state update cost about as much as the rest of the backward).
_FLUSH_ROWS = 32


@_jit(fastmath=_FASTMATH, inline="always")
def _load_row(a, b, d, t0, m, cb, row):
    # cb[row, :m] = a[b, d, t0:t0 + m] (a possibly strided row into a contiguous buffer). Rows of cb are indexed,
    # not taken as views: a view costs a reference count update (an atomic add) each time it is made.
    for j in range(m):
        cb[row, j] = a[b, d, t0 + j]


@_jit(fastmath=_FASTMATH, inline="always")
def _store_row(cb, row, b, d, t0, m, a):
    for j in range(m):
        a[b, d, t0 + j] = cb[row, j]


@_jit(fastmath=_FASTMATH, inline="always")
def _backward_chunk_inputs(b, d, t0, m, u, dl, bias, softplus, z, has_z, ypre, dout, dz, cb):
    # Fills cb's rows U, DT (delta after bias and softplus), X (delta * u), SIG (softplus'), DY (dL/dy before the
    # D term, after the gate's backward); writes dz. Returns this chunk's sum of dy * u (for dD).
    _load_row(u, b, d, t0, m, cb, _R_U)
    _load_row(dl, b, d, t0, m, cb, _R_DT)
    bd = bias[d]
    if softplus:
        for j in range(m):
            x = cb[_R_DT, j] + bd
            e = _exp(-abs(x))
            sp = _softplus_e(x, e)
            cb[_R_SIG, j] = _softplus_grad_e(x, e)
            cb[_R_DT, j] = sp
            cb[_R_X, j] = sp * cb[_R_U, j]
    else:
        for j in range(m):
            x = cb[_R_DT, j] + bd
            cb[_R_DT, j] = x
            cb[_R_X, j] = x * cb[_R_U, j]
    _load_row(dout, b, d, t0, m, cb, _R_GO)
    acc = u.dtype.type(0.0)
    if has_z:
        _load_row(z, b, d, t0, m, cb, _R_Z)
        _load_row(ypre, b, d, t0, m, cb, _R_YP)
        one = u.dtype.type(1.0)
        for j in range(m):
            zj = cb[_R_Z, j]
            go = cb[_R_GO, j]
            s = _sigmoid(zj)
            cb[_R_T1, j] = go * cb[_R_YP, j] * s * (one + zj * (one - s))
            dy = go * (zj * s)
            cb[_R_DY, j] = dy
            acc += dy * cb[_R_U, j]
        _store_row(cb, _R_T1, b, d, t0, m, dz)
    else:
        for j in range(m):
            go = cb[_R_GO, j]
            cb[_R_DY, j] = go
            acc += go * cb[_R_U, j]
    return acc


@_jit(fastmath=_FASTMATH, inline="always")
def _backward_chunk_outputs(b, d, t0, m, softplus, Dv, cb, du, ddl):
    # du and d delta of one chunk from the reverse pass's per-position sums SA = sum_k dL/d(delta A)_k A_k and
    # SB = sum_k dL/dh_k B_k; returns the chunk's sum of d delta (for d delta_bias).
    dd = Dv[d]
    acc = cb.dtype.type(0.0)
    for j in range(m):
        sb = cb[_R_SB, j]
        cb[_R_T1, j] = cb[_R_DY, j] * dd + cb[_R_DT, j] * sb
        cb[_R_T2, j] = cb[_R_SA, j] + cb[_R_U, j] * sb
    if softplus:
        for j in range(m):
            cb[_R_T2, j] = cb[_R_T2, j] * cb[_R_SIG, j]
    for j in range(m):
        acc += cb[_R_T2, j]
    _store_row(cb, _R_T1, b, d, t0, m, du)
    _store_row(cb, _R_T2, b, d, t0, m, ddl)
    return acc


@_jit(fastmath=_FASTMATH, inline="always")
def _recompute_chunk(b, d, t0, m, n, A, aidx, Bm, ckpt_every, ckpt, cb, hs, ea, h):
    # hs[j] = the state before position t0 + j (hs[0] = the checkpoint, hs[m] the state after the chunk), ea[j] =
    # exp(delta A) at t0 + j. The state is carried in h, not read back from hs[j]: LLVM does not vectorise a loop
    # whose rows depend on each other at a distance it cannot see.
    gb = d if Bm.shape[1] > 1 else 0
    c = t0 // ckpt_every
    for k in range(n):
        h[k] = ckpt[b, d, c, k]
        hs[0, k] = h[k]
    for j in range(m):
        t = t0 + j
        g = aidx[t]
        dt = cb[_R_DT, j]
        x = cb[_R_X, j]
        for k in range(n):
            a = _exp(dt * A[g, d, k])
            ea[j, k] = a
            hk = a * h[k] + x * Bm[b, gb, t, k]
            h[k] = hk
            hs[j + 1, k] = hk


@_jit(fastmath=_FASTMATH, inline="always")
def _reverse_chunk(b, d, t0, m, n, A, aidx, Bm, Cm, cb, hs, ea, gg):
    # Reverse-time recurrence over one chunk: gg[j] = dL/dh at t0 + j = dy C + exp(delta A at t0 + j + 1) gg[j + 1];
    # the caller puts the carry from the next chunk in gg[m] with ea[m] = 1. The recurrence loop does nothing else;
    # the per-position sums SA, SB here and dA, dB, dC (`_chunk_param_grads`) are read off gg afterwards.
    gb = d if Bm.shape[1] > 1 else 0
    gc = d if Cm.shape[1] > 1 else 0
    zero = cb.dtype.type(0.0)
    for j in range(m - 1, -1, -1):
        t = t0 + j
        g = aidx[t]
        dy = cb[_R_DY, j]
        for k in range(n):
            gg[j, k] = gg[j + 1, k] * ea[j + 1, k] + dy * Cm[b, gc, t, k]
    for j in range(m):  # the per-position sums, off the recurrence's critical path
        t = t0 + j
        g = aidx[t]
        s_a = zero
        s_b = zero
        for k in range(n):
            gk = gg[j, k]
            s_a += gk * hs[j, k] * ea[j, k] * A[g, d, k]
            s_b += gk * Bm[b, gb, t, k]
        cb[_R_SA, j] = s_a
        cb[_R_SB, j] = s_b


@_jit(fastmath=_FASTMATH, inline="always")
def _chunk_param_grads(b, d, t0, m, n, aidx, cb, hs, ea, gg, dAc, per_b, per_c, dBk, dCk, dBc, dCc):
    # dA (this row, compute dtype) += sum_t dL/dh_t h_{t-1} exp(delta_t A) delta_t; dB_t = dL/dh_t delta_t u_t and
    # dC_t = dy_t h_t, into the channel sums dBk/dCk (L, N) when shared, else written per channel.
    for j in range(m):
        g = aidx[t0 + j]
        dt = cb[_R_DT, j]
        for k in range(n):
            dAc[g, k] += gg[j, k] * hs[j, k] * ea[j, k] * dt
    if per_b:
        for j in range(m):
            x = cb[_R_X, j]
            for k in range(n):
                dBc[b, d, t0 + j, k] = gg[j, k] * x
    else:
        for j in range(m):
            x = cb[_R_X, j]
            for k in range(n):
                dBk[t0 + j, k] += gg[j, k] * x
    if per_c:
        for j in range(m):
            dy = cb[_R_DY, j]
            for k in range(n):
                dCc[b, d, t0 + j, k] = dy * hs[j + 1, k]
    else:
        for j in range(m):
            dy = cb[_R_DY, j]
            for k in range(n):
                dCk[t0 + j, k] += dy * hs[j + 1, k]


@_jit(fastmath=_FASTMATH, inline="always")
def _flush_channel_sums(s, b, acc, out):
    # out[s, b] (L, N) float64 += acc; acc zeroed
    for t in range(acc.shape[0]):
        for k in range(acc.shape[1]):
            out[s, b, t, k] += acc[t, k]
            acc[t, k] = 0.0


@_jit(fastmath=_FASTMATH)
def _backward_row_chunk(b, d, t0, m, u, dl, bias, softplus, A, aidx, Bm, Cm, Dv, z, has_z, ckpt_every, ckpt, ypre,
                        dout, du, ddl, dz, per_b, per_c, dBc, dCc, cb, hs, ea, gg, h, dAc, dBk, dCk, carry, r):
    # One (row, chunk) of the backward; carry (N): in, the gradient flowing into the chunk from the positions after
    # it (times their exp(delta A)); out, the same for the chunk before. Returns (sum dy u, sum d delta).
    n = A.shape[2]
    acc_D = _backward_chunk_inputs(b, d, t0, m, u, dl, bias, softplus, z, has_z, ypre, dout, dz, cb)
    for k in range(n):
        gg[m, k] = carry[r, k]
        ea[m, k] = 1.0
    for g in range(dAc.shape[0]):
        for k in range(n):
            dAc[g, k] = 0.0
    if n == 16:  # as in the forward: a known trip count for mamba's d_state
        _recompute_chunk(b, d, t0, m, 16, A, aidx, Bm, ckpt_every, ckpt, cb, hs, ea, h)
        _reverse_chunk(b, d, t0, m, 16, A, aidx, Bm, Cm, cb, hs, ea, gg)
        _chunk_param_grads(b, d, t0, m, 16, aidx, cb, hs, ea, gg, dAc, per_b, per_c, dBk, dCk, dBc, dCc)
    else:
        _recompute_chunk(b, d, t0, m, n, A, aidx, Bm, ckpt_every, ckpt, cb, hs, ea, h)
        _reverse_chunk(b, d, t0, m, n, A, aidx, Bm, Cm, cb, hs, ea, gg)
        _chunk_param_grads(b, d, t0, m, n, aidx, cb, hs, ea, gg, dAc, per_b, per_c, dBk, dCk, dBc, dCc)
    for k in range(n):
        carry[r, k] = gg[0, k] * ea[0, k]
    acc_bias = _backward_chunk_outputs(b, d, t0, m, softplus, Dv, cb, du, ddl)
    return acc_D, acc_bias


@_jit(fastmath=_FASTMATH)
def _backward_unit(b, s, d0, d1, u, dl, bias, softplus, A, aidx, Bm, Cm, Dv, z, has_z, ckpt_every, ckpt, ypre, dout,
                   du, ddl, dz, dA, dD, dbias, per_b, per_c, dBs, dCs, dBc, dCc):
    # Channels d0 .. d1 - 1 of batch row b, each from its last chunk to its first (a row's inputs are then read in
    # order, which the hardware prefetcher follows; going over the channels within a chunk read each row's 64
    # positions from another page and was slower at long L). dB, dC shared by the channels: summed over channels
    # in dBk, dCk (L, N) (cache-resident: 256 KiB for L = 4096 in float32), added to the float64 slice s of
    # dBs/dCs every _FLUSH_ROWS channels. Sums over positions: per chunk in the compute dtype, across chunks in
    # float64 (dA (Bt, G, Din, N), dD, dbias (Bt, Din): this row's entries, so no two units write the same one).
    length = u.shape[2]
    groups, _, n = A.shape
    nck = ckpt.shape[2]
    ft = u.dtype
    cb = np.empty((_NROWS, ckpt_every), ft)
    hs = np.empty((ckpt_every + 1, n), ft)
    ea = np.empty((ckpt_every + 1, n), ft)
    gg = np.empty((ckpt_every + 1, n), ft)
    h = np.empty(n, ft)
    dAc = np.empty((groups, n), ft)
    dBk = np.zeros((1 if per_b else length, n), ft)
    dCk = np.zeros((1 if per_c else length, n), ft)
    carry = np.empty((1, n), ft)
    for d in range(d0, d1):
        carry[0, :] = 0.0
        for c in range(nck - 1, -1, -1):
            t0 = c * ckpt_every
            m = min(length, t0 + ckpt_every) - t0
            acc_D, acc_bias = _backward_row_chunk(
                b, d, t0, m, u, dl, bias, softplus, A, aidx, Bm, Cm, Dv, z, has_z, ckpt_every, ckpt, ypre, dout,
                du, ddl, dz, per_b, per_c, dBc, dCc, cb, hs, ea, gg, h, dAc, dBk, dCk, carry, 0,
            )
            dD[b, d] += acc_D
            dbias[b, d] += acc_bias
            for g in range(groups):
                for k in range(n):
                    dA[b, g, d, k] += dAc[g, k]
        if (d - d0) % _FLUSH_ROWS == _FLUSH_ROWS - 1 or d == d1 - 1:
            if not per_b:
                _flush_channel_sums(s, b, dBk, dBs)
            if not per_c:
                _flush_channel_sums(s, b, dCk, dCs)


@_jit(parallel=True, fastmath=_FASTMATH)
def _cpu_backward(u, dl, bias, softplus, A, aidx, Bm, Cm, Dv, z, has_z, ckpt_every, ckpt, ypre, dout, dblock,
                  du, ddl, dz, dA, dD, dbias, per_b, per_c, dBs, dCs, dBc, dCc):
    # Work units: (batch row b, block s of `dblock` channels), handed out one at a time. dBs, dCs (S, Bt, L, N)
    # float64 when B/C are shared by the channels (unit (b, s) owns slice [s, b]; the caller sums over S); dBc, dCc
    # (Bt, Din, L, N) when per channel. dA (Bt, G, Din, N), dD, dbias (Bt, Din) float64, summed over Bt by the caller.
    bt, din, length = u.shape
    nd = (din + dblock - 1) // dblock
    for pp in _prange(bt * nd):
        p = np.int64(pp)  # prange indices may be unsigned; mixing them with int64 would give floats
        b = p // nd
        s = p % nd
        _backward_unit(b, s, s * dblock, min(din, (s + 1) * dblock), u, dl, bias, softplus, A, aidx, Bm, Cm, Dv, z,
                       has_z, ckpt_every, ckpt, ypre, dout, du, ddl, dz, dA, dD, dbias, per_b, per_c, dBs, dCs, dBc,
                       dCc)


def _numba_threads() -> int:
    """Follow torch's thread setting (tests and DDP workers pin it), within numba's pool."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


_ENTRIES: dict = {}
_A_ARG = 4  # position of A (G, Din, N) in the kernels' arguments: 3-D, but contiguous like B and C


def _run(kernel, *args) -> None:
    """Call a numba kernel with its 3-D arrays but A ((Bt, Din, L), (Bt, Din, N)) typed as strided (layout "A"): one
    compiled version per dtype serves contiguous inputs and the transposed views a Mamba block passes alike (numba
    would otherwise compile one per combination of layouts). Every other array is C-contiguous, so the loops over
    the state dimension read A, B, C with unit stride (vector loads, not gathers)."""
    types = []
    for i, (a, ty) in enumerate(zip(args, map(numba.typeof, args))):
        if isinstance(ty, numba.types.Array):
            if ty.ndim == 3 and i != _A_ARG:
                ty = ty.copy(layout="A")
            elif ty.layout != "C":
                raise AssertionError(f"selective_scan_cpu: internal array of shape {a.shape} is not contiguous")
        types.append(ty)
    types = tuple(types)
    entry = _ENTRIES.get((kernel, types))
    if entry is None:
        entry = _ENTRIES[(kernel, types)] = kernel.compile(types)
    with numba.parallel_chunksize(1):  # blocks handed out one at a time: a thread slowed by other work gets fewer
        entry(*args)


_NUMPY_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.int64: "int64"}


def _numpy(t: torch.Tensor):
    """A numpy array over a CPU tensor's memory with its strides, made from its address: `Tensor.numpy()`
    dispatches four ops (detach, to, resolve_conj, resolve_neg) per call, and a scan call converts a dozen tensors
    each way. The array holds a reference to `t`, so the memory outlives neither."""
    dt = np.dtype(_NUMPY_DTYPES[t.dtype])
    if t.numel() == 0:
        return np.empty(tuple(t.shape), dt)
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))  # elements from the first to the last
    buffer = (ctypes.c_char * (span * dt.itemsize)).from_address(t.data_ptr())
    buffer.tensor = t  # the array's base is the buffer: it keeps the tensor alive
    flat = np.frombuffer(buffer, dt)
    return np.lib.stride_tricks.as_strided(flat, tuple(t.shape), tuple(s * dt.itemsize for s in t.stride()))


def _view(t: torch.Tensor | None, dtype: torch.dtype, empty_shape: tuple[int, ...] = (1,)):
    """numpy view of a CPU tensor (any strides) in the compute dtype; a copy only when the dtype differs. None ->
    zeros of `empty_shape` (a placeholder the kernels read as 'absent')."""
    if t is None:
        return np.zeros(empty_shape, dtype=_NUMPY_DTYPES[dtype])
    if t.dtype not in _NUMPY_DTYPES:  # half precision: numpy has no bfloat16
        t = t.detach().to(dtype)
    a = _numpy(t)
    return a if a.dtype == _NUMPY_DTYPES[dtype] else a.astype(_NUMPY_DTYPES[dtype])


def _state_last(m: torch.Tensor, dtype: torch.dtype):
    """B or C (Bt, N, L) | (Bt, Din, N, L) -> contiguous (Bt, 1|Din, L, N) in the compute dtype: the layout the
    loops over the state dimension want. A copy unless already so; for B, C shared by the channels it is 1/Din of
    the scan's work."""
    a = _view(m, dtype)
    return np.ascontiguousarray((a[:, None] if a.ndim == 3 else a).swapaxes(-1, -2))


def _kernel_inputs(u, delta, A, B, C, D, z, delta_bias, A_index, softplus):
    """The kernels' leading arguments (u, dl, bias, softplus, A, aidx, Bm, Cm, Dv, z, has_z) and the compute dtype:
    float64 when u, delta, A, B or C is float64, else float32 (the reference's rule)."""
    dtype = _compute_dtype(u, delta, A, B, C)
    din, length = u.shape[1], u.shape[2]
    aidx = np.zeros(length, np.int64) if A_index is None else _view(A_index.to("cpu", torch.int64), torch.int64)
    a = _view(A, dtype)
    args = (
        _view(u, dtype), _view(delta, dtype), np.ascontiguousarray(_view(delta_bias, dtype, (din,))), bool(softplus),
        np.ascontiguousarray(a if a.ndim == 3 else a[None]), np.ascontiguousarray(aidx), _state_last(B, dtype),
        _state_last(C, dtype), np.ascontiguousarray(_view(D, dtype, (din,))), _view(z, dtype, (1, 1, 1)),
        z is not None,
    )
    return args, dtype


def _tensor(a, dtype: torch.dtype) -> torch.Tensor:
    """A kernel's numpy result as a tensor of `dtype` (no cast when it is one already). A float64 → float32 cast
    (the float64 sums of the backward) is numpy's, which rounds as torch's does and dispatches no torch op
    (`Tensor.to` dispatches four)."""
    np_dtype = _NUMPY_DTYPES.get(dtype)
    if np_dtype is not None and a.dtype != np_dtype:
        a = a.astype(np_dtype)
    t = torch.from_numpy(a)
    return t if t.dtype == dtype else t.to(dtype)


class _SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, A_index, delta_softplus, return_last_state, save):
        bt, din, length = u.shape
        n = A.shape[-1]
        threads = _numba_threads()
        numba.set_num_threads(threads)
        args, dtype = _kernel_inputs(u, delta, A, B, C, D, z, delta_bias, A_index, delta_softplus)
        npd = args[0].dtype
        nck = max(1, -(-length // _CKPT))
        out = np.empty((bt, din, length), npd)
        ckpt = np.empty((bt, din, nck, n) if save else (1, 1, 1, n), npd)
        ypre = np.empty((bt, din, length) if save and z is not None else (1, 1, 1), npd)
        last = np.empty((bt, din, n), npd)
        _run(_cpu_forward, *args, bool(save), _CKPT, min(bt * din, 8 * threads), out, ypre, ckpt, last)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, A_index)
            # backward reuses the kernel arguments (views of the saved inputs, B and C laid out for the kernels)
            ctx.state = (ckpt, ypre, _CKPT, args, dtype)
        out_t = _tensor(out, u.dtype)
        if return_last_state:
            last_t = _tensor(last, u.dtype)
            ctx.mark_non_differentiable(last_t)
            return out_t, last_t
        return out_t

    @staticmethod
    def backward(ctx, dout, *_):
        u, delta, A, B, C, D, z, delta_bias, A_index = ctx.saved_tensors  # (unpacking checks their versions)
        ckpt, ypre, ckpt_every, args, dtype = ctx.state
        bt, din, length = u.shape
        groups, n = args[4].shape[0], args[4].shape[2]
        npd = args[0].dtype
        threads = _numba_threads()
        numba.set_num_threads(threads)
        # work units (batch row, block of channels): whole rows of channels when the batch alone gives each thread
        # a few units, else the channels split too (batch 2 of long sequences)
        nd = min(din, -(-4 * threads // bt))
        dblock = -(-din // nd)
        nd = -(-din // dblock)
        per_b, per_c = B.dim() == 4, C.dim() == 4
        grads = dict(
            du=np.empty((bt, din, length), npd), ddl=np.empty((bt, din, length), npd),
            dz=np.empty((bt, din, length) if z is not None else (1, 1, 1), npd),
            dA=np.zeros((bt, groups, din, n)), dD=np.zeros((bt, din)), dbias=np.zeros((bt, din)),
        )
        # dB, dC: summed over channels (float64, one slice per block of channels, "s") when shared, else per channel
        for name, per in (("B", per_b), ("C", per_c)):
            grads[f"d{name}s"] = np.zeros((1, 1, 1, 1) if per else (nd, bt, length, n))
        for name, per in (("B", per_b), ("C", per_c)):
            grads[f"d{name}c"] = np.empty((bt, din, length, n) if per else (1, 1, 1, 1), npd)
        _run(_cpu_backward, *args, ckpt_every, ckpt, ypre, _view(dout, dtype), dblock, *list(grads.values())[:6],
             per_b, per_c, *list(grads.values())[6:])
        t = _tensor
        g_B, g_C = (
            (grads[f"d{k}c"] if per else grads[f"d{k}s"].sum(0)).swapaxes(-1, -2)  # (Bt, [Din,] N, L)
            for k, per in (("B", per_b), ("C", per_c))
        )
        g_A = grads["dA"].sum(0)  # (G, Din, N)
        return (
            t(grads["du"], u.dtype),
            t(grads["ddl"], delta.dtype),
            t(g_A if A.dim() == 3 else g_A[0], A.dtype),
            t(g_B, B.dtype),
            t(g_C, C.dtype),
            t(grads["dD"].sum(0), D.dtype) if D is not None else None,
            t(grads["dz"], z.dtype) if z is not None else None,
            t(grads["dbias"].sum(0), delta_bias.dtype) if delta_bias is not None else None,
            None,
            None,
            None,
            None,
        )


@_without_autocast
def selective_scan_cpu(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, *, A_index=None
):
    """Fast CPU selective scan: numba-fused forward and backward, parallel over (batch row, channel) pairs.

    Same arguments and result as `selective_scan_ref`; CPU tensors only. Computes in float32 for float32 inputs
    and in float64 when u, delta, A, B or C is float64 (the reference's rule); sums of gradients over positions,
    batch rows and channels (dA, dB, dC, dD, d delta_bias) are formed in the compute dtype over at most 64
    positions or 32 channels and accumulated in float64 beyond. Results and gradients come
    back in the inputs' dtypes. u, delta, z (the large inputs) are read in place in any strides; B and C are laid
    out as contiguous (Bt, L, N) (a copy unless already so: for shared B, C 1/Din of the scan's work); inputs of
    another dtype than the compute dtype are cast. Memory when gradients are needed: one stored state every 64
    positions (Bt, Din, L/64, N), plus y before the gate (Bt, Din, L) when z is given; backward recomputes the rest.
    The first call in a fresh environment compiles the kernels (seconds); numba caches them on disk.
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias, A_index)
    for name, v in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if v.device.type != "cpu":
            raise InputError(f"selective_scan_cpu: {name} is on {v.device}; use impl='chunked' or 'cuda' there")
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias)
    )
    return _SelectiveScanCPU.apply(
        u, delta, A, B, C, D, z, delta_bias, A_index, delta_softplus, return_last_state, save
    )


# ----------------------------------------------------------------------------------------------------------------
# cuda: mamba-ssm's kernel


def selective_scan_cuda(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, *, A_index=None
):
    """mamba-ssm's fused CUDA kernel (`mamba_ssm.ops.selective_scan_interface.selective_scan_fn`).

    Same arguments and result as `selective_scan_ref`, CUDA tensors only, no grouped A (`A_index`). mamba-ssm is
    imported here, not at module import, so the package works on machines without it.
    """
    if A_index is not None or A.dim() == 3:
        raise InputError("selective_scan_cuda: mamba-ssm's kernel has no per-position A; use impl='chunked'")
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as exc:
        raise RuntimeError(
            f"the CUDA selective scan needs mamba-ssm, which is not importable here ({exc}); "
            "install it with `pip install mambavl[cuda]` on a machine with CUDA, or use impl='chunked'"
        ) from exc
    _check_args(u, delta, A, B, C, D, z, delta_bias, A_index)
    # The kernel wants float32 A, D, delta_bias (as mamba-ssm's Mamba passes them).
    return selective_scan_fn(
        u.contiguous(), delta.contiguous(), A.float().contiguous(), B.contiguous(), C.contiguous(),
        D.float().contiguous() if D is not None else None, z.contiguous() if z is not None else None,
        delta_bias.float().contiguous() if delta_bias is not None else None, delta_softplus, return_last_state,
    )


# ----------------------------------------------------------------------------------------------------------------
# triton: kernels in mambavl.fuse.scan_triton, imported here only when called


def selective_scan_triton(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    *,
    A_index=None,
    block_d: int | None = None,
    checkpoint_every: int | None = None,
):
    """Triton kernels for forward and backward (`mambavl.fuse.scan_triton`): no build step, grouped A supported.

    Same arguments and result as `selective_scan_ref`; CUDA tensors (CPU tensors only under Triton's interpreter,
    TRITON_INTERPRET=1). State and sums in float32 for float32/bfloat16/float16 inputs (float64 when an input is
    float64); output and gradients in the inputs' dtypes. `block_d`: channels per program (a power of two; default
    from the GPU's size); `checkpoint_every`: positions between the states forward keeps for backward (default
    about sqrt(L)). Memory beyond inputs and outputs: Bt*Din*N*(L/K + K) floats for K = checkpoint_every.
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias, A_index)
    for name, v in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias)):
        if v is not None and v.device != u.device:
            raise InputError(f"selective_scan_triton: {name} is on {v.device}, u on {u.device}")
    if block_d is not None and (block_d < 1 or block_d & (block_d - 1)):
        raise InputError(f"selective_scan_triton: block_d must be a power of two, got {block_d}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise InputError(f"selective_scan_triton: checkpoint_every must be >= 1, got {checkpoint_every}")
    try:
        from mambavl.fuse import scan_triton
    except ImportError as exc:
        raise RuntimeError(
            f"the Triton selective scan needs triton, which is not importable here ({exc}); it comes with PyPI's "
            "CUDA builds of PyTorch (`pip install triton`), or use impl='chunked'"
        ) from exc
    if u.device.type != "cuda" and not scan_triton.interpreting():
        raise InputError(
            f"selective_scan_triton: u is on {u.device}; the kernels need CUDA tensors (CPU tensors only under "
            "Triton's interpreter, TRITON_INTERPRET=1); use impl='cpu' or 'chunked' there"
        )
    return scan_triton.triton_selective_scan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, A_index=A_index, block_d=block_d,
        checkpoint_every=checkpoint_every,
    )


# ----------------------------------------------------------------------------------------------------------------
# dispatch


def _mamba_ssm_importable() -> bool:
    try:
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken CUDA install raises more than ImportError
        return False
    return True


def _numba_importable() -> bool:
    return numba is not None


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install raises more than ImportError
        return False
    return True


def _triton_interpreting() -> bool:
    """TRITON_INTERPRET is on (read from the environment, so that listing the impls does not import Triton)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes") and _triton_importable()


def available_impls() -> list[str]:
    """Implementations usable on this machine: always "reference" and "chunked"; "cpu" when numba imports;
    "cuda" when CUDA is available and mamba-ssm imports; "triton" when Triton imports and CUDA is available (or
    Triton's interpreter is on, TRITON_INTERPRET=1, which runs it on CPU tensors, slowly)."""
    impls = ["reference", "chunked"]
    if _numba_importable():
        impls.append("cpu")
    if torch.cuda.is_available() and _mamba_ssm_importable():
        impls.append("cuda")
    if (torch.cuda.is_available() and _triton_importable()) or _triton_interpreting():
        impls.append("triton")
    return impls


_IMPLS = {
    ScanImpl.REFERENCE: selective_scan_ref,
    ScanImpl.CHUNKED: selective_scan_chunked,
    ScanImpl.CPU: selective_scan_cpu,
    ScanImpl.CUDA: selective_scan_cuda,
    ScanImpl.TRITON: selective_scan_triton,
}


def resolve_impl(impl: str | ScanImpl, device: torch.device, grouped_A: bool = False) -> ScanImpl:
    """The implementation `selective_scan` runs for `impl` on `device`.

    auto, for CUDA tensors: mamba-ssm's kernel when importable and A is not grouped, else the Triton kernels when
    Triton imports, else the chunked torch scan; for CPU tensors: numba's when importable, else the chunked scan.
    """
    try:
        impl = ScanImpl(impl)
    except ValueError:
        raise InputError(f"scan impl {impl!r} is not one of {[i.value for i in ScanImpl]}") from None
    if impl != ScanImpl.AUTO:
        return impl
    if device.type == "cuda" and not grouped_A and _mamba_ssm_importable():
        return ScanImpl.CUDA
    if device.type == "cuda" and _triton_importable():
        return ScanImpl.TRITON
    if device.type == "cpu" and _numba_importable():
        return ScanImpl.CPU
    return ScanImpl.CHUNKED


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    *,
    A_index=None,
    impl: str | ScanImpl = "auto",
):
    """Selective scan with a chosen implementation ("auto", "reference", "chunked", "cpu", "cuda", "triton"), or a
    callable taking `selective_scan_ref`'s arguments (positional up to return_last_state, then A_index by keyword),
    e.g. one that records the calls (`mambavl.analysis.efficiency.record_scans`).

    Arguments and result as `selective_scan_ref`: u, delta (Bt, Din, L); A (Din, N) or (G, Din, N) + A_index (L,);
    B, C (Bt, N, L) or (Bt, Din, N, L); D, delta_bias (Din,); z (Bt, Din, L) -> (Bt, Din, L).
    """
    if callable(impl):
        return impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, A_index=A_index)
    chosen = resolve_impl(impl, u.device, grouped_A=A.dim() == 3)
    return _IMPLS[chosen](
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, A_index=A_index
    )
