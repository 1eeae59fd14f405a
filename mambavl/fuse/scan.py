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
  parallel over (batch row, block of 256 channels; 64 when a small batch would leave threads idle). The
  loops run token-major with the channels innermost: each step of the recurrence updates whole vectors of channels,
  with no sums across vector lanes. The states are not stored: forward keeps one checkpoint every `_CKPT`
  positions and backward recomputes each chunk from its checkpoint. Computes in float32 for float32 inputs and in
  float64 when an input is float64 (the reference's rule); the gradient sums over positions, rows and channels
  (dA, dB, dC, dD, d delta_bias) are formed in the compute dtype over at most one chunk of positions (dA, dD,
  d delta_bias) or one block of channels (dB, dC) and accumulated in float64 beyond. A Mamba block's transposed
  views of token-major tensors are read in place; exp, softplus and sigmoid are plain-arithmetic float32 versions
  (~1-2 ulp) so the loops vectorise.
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

# Positions between stored states in the cpu forward; backward recomputes the states of one chunk at a time. A
# unit's per-chunk buffers of the backward (decayed states and decays, 2 x 16 x N x 256 channels, 0.5 MiB) stay in L2.
_CKPT = 16

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


def _sigmoid_f32(x):
    return _F32_1 / (_F32_1 + _exp(-x))


def _softplus_f32(x):
    return _softplus_e(x, _exp(-abs(x)))


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


def _softplus_e_f32(x, e):
    # softplus(x) from e = exp(-|x|): one exp serves softplus and its derivative. log1p(e) = 2 atanh(s) with
    # s = e / (2 + e) <= 1/3: the series 2 s (1 + s**2/3 + ... + s**14/15) is within 2e-9 relative, and s is formed
    # from e without cancellation, so tiny e (x << 0) keeps its accuracy.
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


# The kernels work token-major, channels innermost: u, delta, z, the output and their gradients as flat
# (Bt * L * Din) arrays of (Bt, L, Din) (a Mamba block's transposed views are such arrays already), A as A_T
# (G, N, Din), B and C as (Bt, L, N) when shared by the channels or (Bt, L, N, Din) per channel, states as
# (N, Din) per row. A work unit is one batch row and a block of `db` channels; every loop over its channels is
# innermost and contiguous, so the recurrence runs on whole vectors of channels (16 float32 lanes per AVX-512
# vector) with no sums across vector lanes, and exp(delta A) is computed once per state update.
_DB = 256  # channels per work unit (the buffers' width): whole rows at d_inner 256, the fastest per thread measured
_DB_NARROW = 64  # ... unless that leaves fewer than 2 units per thread (a small batch of long sequences)
# Rows of a backward chunk's buffer (_NROWS, K, _DB): per-position values of one unit's chunk.
_R_U, _R_DT, _R_X, _R_SIG, _R_DY, _R_GZ, _R_Y, _R_SA, _R_SB = range(9)
_NROWS = 9


def _coef(M, b, t, k, d, shared):
    """B or C for channel d at (b, t, k): `shared` (the caller's M[b, t, k], read once per k) when M is (Bt, L, N),
    M[b, t, k, d] when M is (Bt, L, N, Din) (numba-only; chosen by M's rank at compile time)."""
    raise NotImplementedError("numba-only helper")


def _coef_shared(M, b, t, k):
    """M[b, t, k] when B or C is shared by the channels, else 0 (numba-only)."""
    raise NotImplementedError("numba-only helper")


def _put(M, b, t, k, d, v):
    """M[b, t, k, d] = v for a per-channel gradient (Bt, L, N, Din); nothing for the shared case's placeholder."""
    raise NotImplementedError("numba-only helper")


def _add_shared(M, s, b, t, k, v):
    """M[s, b, t, k] += v for a shared gradient's float64 sums (S, Bt, L, N); nothing for the placeholder."""
    raise NotImplementedError("numba-only helper")


if numba is not None:

    @_overload(_coef, inline="always")
    def _coef_overload(M, b, t, k, d, shared):
        if M.ndim == 3:
            return lambda M, b, t, k, d, shared: shared
        return lambda M, b, t, k, d, shared: M[b, t, k, d]

    @_overload(_coef_shared, inline="always")
    def _coef_shared_overload(M, b, t, k):
        if M.ndim == 3:
            return lambda M, b, t, k: M[b, t, k]
        return lambda M, b, t, k: M.dtype.type(0.0)

    @_overload(_put, inline="always")
    def _put_overload(M, b, t, k, d, v):
        if M.ndim == 4:
            def put(M, b, t, k, d, v):
                M[b, t, k, d] = v
            return put
        return lambda M, b, t, k, d, v: None

    @_overload(_add_shared, inline="always")
    def _add_shared_overload(M, s, b, t, k, v):
        if M.ndim == 4:
            def add(M, s, b, t, k, v):
                M[s, b, t, k] += v
            return add
        return lambda M, s, b, t, k, v: None


_U64 = np.uint64 if numba is not None else None  # flat indices as uint64: numba adds no negative-index wraparound,
# which would turn the contiguous loads of a row into gathers


@_jit(fastmath=_FASTMATH, inline="always")
def _unit(pp, nb, db, din, A_T, bias, Dv, ft):
    # Work unit pp of (batch row, block of db channels): its row b, block s, first channel d0, width w, and its
    # channels' A (G, N, _DB), delta_bias and D (_DB,) copied into contiguous buffers of dtype ft.
    p = np.int64(pp)  # prange indices may be unsigned; mixing them with int64 would give floats
    b = p // nb
    s = p % nb
    d0 = s * db
    w = min(din, d0 + db) - d0
    groups, n, _ = A_T.shape
    ab = np.empty((groups, n, _DB), ft)
    bv = np.empty(_DB, ft)
    dv = np.empty(_DB, ft)
    for g in range(groups):
        for k in range(n):
            for i in range(w):
                ab[g, k, i] = A_T[g, k, d0 + i]
    for i in range(w):
        bv[i] = bias[d0 + i]
        dv[i] = Dv[d0 + i]
    return b, s, d0, w, ab, bv, dv


@_jit(fastmath=_FASTMATH, inline="always")
def _forward_position(b, t, d0, w, n, g, ab, Bm, Cm, dts, xs, h, y):
    # one position of the recurrence for the unit's channels: h (N, _DB) updated in place, y[i] = <C_t, h_t>
    for i in range(w):
        y[i] = 0.0
    for k in range(n):
        bs = _coef_shared(Bm, b, t, k)
        cs = _coef_shared(Cm, b, t, k)
        for i in range(w):
            a = _exp(dts[i] * ab[g, k, i])
            hk = a * h[k, i] + xs[i] * _coef(Bm, b, t, k, d0 + i, bs)
            h[k, i] = hk
            y[i] += _coef(Cm, b, t, k, d0 + i, cs) * hk


@_jit(parallel=True, fastmath=_FASTMATH)
def _cpu_forward(u, dl, bias, softplus, A_T, aidx, Bm, Cm, Dv, z, has_z, length, save, ckpt_every, db, out, ckpt,
                 last):
    # u, dl, z, out: flat token-major (Bt * L * Din); ckpt (Bt, nck, N, Din): the state before every
    # `ckpt_every`-th position, only when `save`; last (Bt, N, Din).
    _, n, din = A_T.shape
    bt = u.shape[0] // max(1, length * din)
    nb = (din + db - 1) // db
    for pp in _prange(bt * nb):
        ft = u.dtype
        b, _, d0, w, ab, bv, dv = _unit(pp, nb, db, din, A_T, bias, Dv, ft)
        h = np.zeros((n, _DB), ft)
        dts = np.empty(_DB, ft)
        xs = np.empty(_DB, ft)
        y = np.empty(_DB, ft)
        for t in range(length):
            if save and t % ckpt_every == 0:
                c = t // ckpt_every
                for k in range(n):
                    for i in range(w):
                        ckpt[b, c, k, d0 + i] = h[k, i]
            base = _U64((b * length + t) * din + d0)
            for i in range(w):
                dts[i] = dl[base + _U64(i)] + bv[i]
            if softplus:
                for i in range(w):
                    dts[i] = _softplus(dts[i])
            for i in range(w):
                xs[i] = dts[i] * u[base + _U64(i)]
            g = aidx[t]
            if w == _DB and n == 16:  # mamba's d_state and a whole unit: trip counts LLVM knows, no remainder loops
                _forward_position(b, t, d0, _DB, 16, g, ab, Bm, Cm, dts, xs, h, y)
            else:
                _forward_position(b, t, d0, w, n, g, ab, Bm, Cm, dts, xs, h, y)
            for i in range(w):
                y[i] += dv[i] * u[base + _U64(i)]
            if has_z:
                for i in range(w):
                    zt = z[base + _U64(i)]
                    y[i] *= zt * _sigmoid(zt)
            for i in range(w):
                out[base + _U64(i)] = y[i]
        for k in range(n):
            for i in range(w):
                last[b, k, d0 + i] = h[k, i]


@_jit(fastmath=_FASTMATH, inline="always")
def _backward_rows(b, t0, m, length, din, d0, w, u, dl, bv, softplus, z, has_z, dout, cb):
    # cb's rows U, DT (delta after bias and softplus), X (delta * u), SIG (softplus', 1 without), DY (dL/dy before
    # the D term, after the gate's backward), GZ (dL/dz = GZ * y, y before the gate: the recompute pass forms y,
    # so the forward stores none) for positions t0 .. t0 + m - 1. Each loop does one thing with no branch inside, so
    # each vectorises.
    one = cb.dtype.type(1.0)
    for j in range(m):
        base = _U64((b * length + t0 + j) * din + d0)
        for i in range(w):
            cb[_R_U, j, i] = u[base + _U64(i)]
            cb[_R_DT, j, i] = dl[base + _U64(i)] + bv[i]
            cb[_R_DY, j, i] = dout[base + _U64(i)]
        if softplus:
            for i in range(w):
                x = cb[_R_DT, j, i]
                e = _exp(-abs(x))
                cb[_R_SIG, j, i] = _softplus_grad_e(x, e)
                cb[_R_DT, j, i] = _softplus_e(x, e)
        else:
            for i in range(w):
                cb[_R_SIG, j, i] = one
        for i in range(w):
            cb[_R_X, j, i] = cb[_R_DT, j, i] * cb[_R_U, j, i]
        if has_z:
            for i in range(w):
                zt = z[base + _U64(i)]
                go = cb[_R_DY, j, i]
                s = _sigmoid(zt)
                cb[_R_GZ, j, i] = go * s * (one + zt * (one - s))
                cb[_R_DY, j, i] = go * (zt * s)


@_jit(fastmath=_FASTMATH, inline="always")
def _backward_recompute(b, s, t0, m, n, c, d0, w, ab, aidx, Bm, Cm, ckpt, cb, ah, ea, h, dCs, dCc):
    # Forward over one chunk from its checkpoint: ea[j] = exp(delta A) at t0 + j and ah[j] = ea[j] * h_{t0+j-1}
    # (the decayed previous state, which is all the reverse pass reads of it), for (N, _DB). What needs only the
    # state h_t and dL/dy_t is formed here, while h_t is in a register: the row Y = <C_t, h_t> (y before the gate,
    # for dz) and dC (summed over the unit's channels when shared, else per channel): this loop is bound by exp,
    # the reverse pass by loads and stores, which then come to 10 arrays read and 4 written per state update. The
    # state is carried in h, not read back from ah (LLVM does not vectorise a loop whose rows depend on each other
    # at a distance it cannot see).
    zero = cb.dtype.type(0.0)
    for k in range(n):
        for i in range(w):
            h[k, i] = ckpt[b, c, k, d0 + i]
    for j in range(m):
        t = t0 + j
        g = aidx[t]
        for i in range(w):
            cb[_R_Y, j, i] = zero
        for k in range(n):
            bs = _coef_shared(Bm, b, t, k)
            cs = _coef_shared(Cm, b, t, k)
            sum_c = zero
            for i in range(w):
                a = _exp(cb[_R_DT, j, i] * ab[g, k, i])
                ea[j, k, i] = a
                decayed = a * h[k, i]
                ah[j, k, i] = decayed
                hk = decayed + cb[_R_X, j, i] * _coef(Bm, b, t, k, d0 + i, bs)
                h[k, i] = hk
                cb[_R_Y, j, i] += _coef(Cm, b, t, k, d0 + i, cs) * hk  # y = <C, h> at t (for dz)
                gcc = cb[_R_DY, j, i] * hk  # dL/dC at t, per state and channel
                sum_c += gcc
                _put(dCc, b, t, k, d0 + i, gcc)
            _add_shared(dCs, s, b, t, k, sum_c)


@_jit(fastmath=_FASTMATH, inline="always")
def _backward_reverse(b, s, t0, m, n, d0, w, ab, aidx, Bm, Cm, cb, ah, ea, gc, dAc, dBs, dBc):
    # Reverse-time recurrence over one chunk. gc (N, _DB): in, dL/dh flowing into the chunk's last position from
    # the positions after it (times their exp(delta A)); out, the same for the chunk before. Per position: the
    # sums over the state dimension SA = sum_k dL/d(delta A)_k A_k and SB = sum_k dL/dh_k B_k (rows of cb), dA into
    # dAc (G, N, _DB), dB either summed over the unit's channels (shared) or stored per channel.
    zero = cb.dtype.type(0.0)
    for j in range(m - 1, -1, -1):
        t = t0 + j
        g = aidx[t]
        for i in range(w):
            cb[_R_SA, j, i] = zero
            cb[_R_SB, j, i] = zero
        for k in range(n):
            bs = _coef_shared(Bm, b, t, k)
            cs = _coef_shared(Cm, b, t, k)
            sum_b = zero
            for i in range(w):
                dy = cb[_R_DY, j, i]
                ck = _coef(Cm, b, t, k, d0 + i, cs)
                gk = gc[k, i] + dy * ck  # dL/dh at t
                a = ea[j, k, i]
                q = gk * ah[j, k, i]  # dL/d(delta A) at t, per state
                dAc[g, k, i] += q * cb[_R_DT, j, i]
                cb[_R_SA, j, i] += q * ab[g, k, i]
                cb[_R_SB, j, i] += gk * _coef(Bm, b, t, k, d0 + i, bs)
                gb = gk * cb[_R_X, j, i]
                sum_b += gb
                _put(dBc, b, t, k, d0 + i, gb)
                gc[k, i] = gk * a
            _add_shared(dBs, s, b, t, k, sum_b)


@_jit(fastmath=_FASTMATH, inline="always")
def _backward_outputs(b, t0, m, length, din, d0, w, dv, has_z, cb, du, ddl, dz, sD, sbias):
    # du, d delta and dz of one chunk from the reverse pass's sums; sD, sbias (_DB): this chunk's sums of dy u and
    # of d delta (for dD and d delta_bias)
    for j in range(m):
        base = _U64((b * length + t0 + j) * din + d0)
        if has_z:
            for i in range(w):
                dz[base + _U64(i)] = cb[_R_GZ, j, i] * (cb[_R_Y, j, i] + dv[i] * cb[_R_U, j, i])
        for i in range(w):
            q = base + _U64(i)
            sb = cb[_R_SB, j, i]
            dy = cb[_R_DY, j, i]
            du[q] = dy * dv[i] + cb[_R_DT, j, i] * sb
            gdt = (cb[_R_SA, j, i] + cb[_R_U, j, i] * sb) * cb[_R_SIG, j, i]
            ddl[q] = gdt
            sD[i] += dy * cb[_R_U, j, i]
            sbias[i] += gdt


@_jit(parallel=True, fastmath=_FASTMATH)
def _cpu_backward(u, dl, bias, softplus, A_T, aidx, Bm, Cm, Dv, z, has_z, length, ckpt_every, db, ckpt, dout,
                  du, ddl, dz, dA, dD, dbias, dBs, dCs, dBc, dCc):
    # Work units (batch row b, block s of db channels), each from its last chunk of positions to its first. Sums
    # over positions are formed per chunk in the compute dtype and added to float64 totals: dA (Bt, G, N, Din),
    # dD, dbias (Bt, Din), summed over Bt by the caller; dB, dC shared by the channels: dBs, dCs (S, Bt, L, N)
    # float64, unit (b, s) owning slice [s, b] (the caller sums over S); per channel: dBc, dCc (Bt, L, N, Din).
    groups, n, din = A_T.shape
    bt = u.shape[0] // max(1, length * din)
    nb = (din + db - 1) // db
    nck = ckpt.shape[1]
    for pp in _prange(bt * nb):
        ft = u.dtype
        b, s, d0, w, ab, bv, dv = _unit(pp, nb, db, din, A_T, bias, Dv, ft)
        cb = np.empty((_NROWS, ckpt_every, _DB), ft)
        ah = np.empty((ckpt_every, n, _DB), ft)
        ea = np.empty((ckpt_every, n, _DB), ft)
        h = np.empty((n, _DB), ft)
        gc = np.zeros((n, _DB), ft)
        dAc = np.empty((groups, n, _DB), ft)
        sD = np.empty(_DB, ft)
        sbias = np.empty(_DB, ft)
        for c in range(nck - 1, -1, -1):
            t0 = c * ckpt_every
            m = min(length, t0 + ckpt_every) - t0
            dAc[:] = 0.0
            sD[:] = 0.0
            sbias[:] = 0.0
            _backward_rows(b, t0, m, length, din, d0, w, u, dl, bv, softplus, z, has_z, dout, cb)
            if w == _DB and n == 16:  # as in the forward: known trip counts
                _backward_recompute(b, s, t0, m, 16, c, d0, _DB, ab, aidx, Bm, Cm, ckpt, cb, ah, ea, h, dCs, dCc)
                _backward_reverse(b, s, t0, m, 16, d0, _DB, ab, aidx, Bm, Cm, cb, ah, ea, gc, dAc, dBs, dBc)
            else:
                _backward_recompute(b, s, t0, m, n, c, d0, w, ab, aidx, Bm, Cm, ckpt, cb, ah, ea, h, dCs, dCc)
                _backward_reverse(b, s, t0, m, n, d0, w, ab, aidx, Bm, Cm, cb, ah, ea, gc, dAc, dBs, dBc)
            _backward_outputs(b, t0, m, length, din, d0, w, dv, has_z, cb, du, ddl, dz, sD, sbias)
            for g in range(groups):
                for k in range(n):
                    for i in range(w):
                        dA[b, g, k, d0 + i] += dAc[g, k, i]
            for i in range(w):
                dD[b, d0 + i] += sD[i]
                dbias[b, d0 + i] += sbias[i]


def _numba_threads() -> int:
    """Follow torch's thread setting (tests and DDP workers pin it), within numba's pool."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _block_width(bt: int, din: int) -> int:
    """Channels per work unit: `_DB` unless that gives fewer than 2 units (batch row, block) per thread, then
    `_DB_NARROW` so every thread stays busy (B=2 of long sequences on many cores)."""
    return _DB if bt * -(-din // _DB) >= 2 * _numba_threads() else _DB_NARROW


_ENTRIES: dict = {}


def _run(kernel, *args) -> None:
    """Call a numba kernel through an entry compiled once per argument types (the dispatcher's own lookup costs
    more than the kernel at small sizes). Every array must be C-contiguous: the loops read rows with unit stride."""
    types = tuple(map(numba.typeof, args))
    for a, ty in zip(args, types):
        if isinstance(ty, numba.types.Array) and ty.layout != "C":
            raise AssertionError(f"selective_scan_cpu: internal array of shape {a.shape} is not contiguous")
    entry = _ENTRIES.get((kernel, types))
    if entry is None:
        entry = _ENTRIES[(kernel, types)] = kernel.compile(types)
    with numba.parallel_chunksize(1):  # units handed out one at a time: a thread slowed by other work gets fewer
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


def _token_major(t: torch.Tensor | None, dtype: torch.dtype):
    """u, delta or z (Bt, Din, L) -> flat token-major (Bt * L * Din) numpy array in the compute dtype: no copy when
    the tensor is a transposed view of a contiguous (Bt, L, Din) tensor, as a Mamba block passes them; else one
    copy. None -> a 1-element placeholder the kernels read as 'absent'."""
    if t is None:
        return np.zeros(1, dtype=_NUMPY_DTYPES[dtype])
    a = _view(t, dtype).swapaxes(1, 2)  # (Bt, L, Din), no torch op
    if not a.flags.c_contiguous:  # torch's blocked, threaded copy (numpy's of a transposed view is several times slower)
        a = _view(t.detach().transpose(1, 2).contiguous(), dtype)
    return a.reshape(-1)


def _coef_layout(m: torch.Tensor, dtype: torch.dtype):
    """B or C (Bt, N, L) | (Bt, Din, N, L) -> contiguous (Bt, L, N) | (Bt, L, N, Din) in the compute dtype (a copy
    unless already so; for B, C shared by the channels it is 1/Din of the scan's work)."""
    a = _view(m, dtype)
    return np.ascontiguousarray(a.swapaxes(1, 2) if a.ndim == 3 else a.transpose(0, 3, 2, 1))


def _kernel_inputs(u, delta, A, B, C, D, z, delta_bias, A_index, softplus):
    """The kernels' leading arguments (u, dl, bias, softplus, A_T, aidx, Bm, Cm, Dv, z, has_z, L) and the compute
    dtype: float64 when u, delta, A, B or C is float64, else float32 (the reference's rule)."""
    dtype = _compute_dtype(u, delta, A, B, C)
    din, length = u.shape[1], u.shape[2]
    aidx = np.zeros(length, np.int64) if A_index is None else _view(A_index.to("cpu", torch.int64), torch.int64)
    a = _view(A, dtype)
    args = (
        _token_major(u, dtype), _token_major(delta, dtype), np.ascontiguousarray(_view(delta_bias, dtype, (din,))),
        bool(softplus), np.ascontiguousarray((a if a.ndim == 3 else a[None]).swapaxes(1, 2)),
        np.ascontiguousarray(aidx), _coef_layout(B, dtype), _coef_layout(C, dtype),
        np.ascontiguousarray(_view(D, dtype, (din,))), _token_major(z, dtype), z is not None, length,
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


def _channels_last(flat, bt: int, length: int, din: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat token-major kernel result -> (Bt, Din, L) tensor: a transposed view of a contiguous (Bt, L, Din)
    tensor, the layout a Mamba block's output projection reads without a copy."""
    return _tensor(flat.reshape(bt, length, din).swapaxes(1, 2), dtype)  # numpy's view: no torch op


class _SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, A_index, delta_softplus, return_last_state, save):
        bt, din, length = u.shape
        n = A.shape[-1]
        numba.set_num_threads(_numba_threads())
        args, dtype = _kernel_inputs(u, delta, A, B, C, D, z, delta_bias, A_index, delta_softplus)
        npd = args[0].dtype
        ckpt_every = _CKPT
        nck = max(1, -(-length // ckpt_every))
        out = np.empty(bt * length * din, npd)
        ckpt = np.empty((bt, nck, n, din) if save else (1, 1, 1, n), npd)
        last = np.zeros((bt, n, din), npd)  # zeros: with L = 0 no work unit runs and h_L is the initial state
        _run(_cpu_forward, *args, bool(save), ckpt_every, _block_width(bt, din), out, ckpt, last)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, A_index)
            # backward reuses the kernel arguments (token-major views or copies of the saved inputs)
            ctx.state = (ckpt, ckpt_every, args, dtype)
        out_t = _channels_last(out, bt, length, din, u.dtype)
        if return_last_state:
            last_t = _tensor(np.ascontiguousarray(last.swapaxes(1, 2)), u.dtype)  # (Bt, Din, N)
            ctx.mark_non_differentiable(last_t)
            return out_t, last_t
        return out_t

    @staticmethod
    def backward(ctx, dout, *_):
        u, delta, A, B, C, D, z, delta_bias, A_index = ctx.saved_tensors  # (unpacking checks their versions)
        ckpt, ckpt_every, args, dtype = ctx.state
        bt, din, length = u.shape
        groups, n = args[4].shape[0], args[4].shape[1]
        npd = args[0].dtype
        numba.set_num_threads(_numba_threads())
        db = _block_width(bt, din)
        nd = -(-din // db)  # channel blocks: the work units are (batch row, block)
        per_b, per_c = B.dim() == 4, C.dim() == 4
        size = bt * length * din
        grads = dict(
            du=np.empty(size, npd), ddl=np.empty(size, npd), dz=np.empty(size if z is not None else 1, npd),
            dA=np.zeros((bt, groups, n, din)), dD=np.zeros((bt, din)), dbias=np.zeros((bt, din)),
        )
        # dB, dC: summed over channels (float64, one slice per block of channels) when shared, else per channel
        for name, per in (("B", per_b), ("C", per_c)):
            grads[f"d{name}s"] = np.zeros(1) if per else np.zeros((nd, bt, length, n))
        for name, per in (("B", per_b), ("C", per_c)):
            grads[f"d{name}c"] = np.empty((bt, length, n, din), npd) if per else np.zeros(1, npd)
        _run(_cpu_backward, *args, ckpt_every, db, ckpt, _token_major(dout, dtype), *grads.values())
        t = _tensor
        g_B, g_C = (
            grads[f"d{k}c"].transpose(0, 3, 2, 1) if per else grads[f"d{k}s"].sum(0).swapaxes(1, 2)
            for k, per in (("B", per_b), ("C", per_c))
        )  # (Bt, [Din,] N, L)
        g_A = grads["dA"].sum(0).swapaxes(1, 2)  # (G, Din, N)
        return (
            _channels_last(grads["du"], bt, length, din, u.dtype),
            _channels_last(grads["ddl"], bt, length, din, delta.dtype),
            t(g_A if A.dim() == 3 else g_A[0], A.dtype),
            t(g_B, B.dtype),
            t(g_C, C.dtype),
            t(grads["dD"].sum(0), D.dtype) if D is not None else None,
            _channels_last(grads["dz"], bt, length, din, z.dtype) if z is not None else None,
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
    """Fast CPU selective scan: numba-fused forward and backward, parallel over (batch row, block of channels).

    Same arguments and result as `selective_scan_ref`; CPU tensors only. Computes in float32 for float32 inputs
    and in float64 when u, delta, A, B or C is float64 (the reference's rule); sums of gradients over positions,
    batch rows and channels (dA, dB, dC, dD, d delta_bias) are formed in the compute dtype over at most 16
    positions or 256 channels and accumulated in float64 beyond. Results and gradients come back in the inputs'
    dtypes. The kernels work token-major, channels innermost: u, delta, z that are transposed views of contiguous
    (Bt, L, Din) tensors (what a Mamba block passes) are read in place, other layouts are copied once; the result
    and the gradients of u, delta, z come back as such views, (Bt, Din, L) over (Bt, L, Din) memory. B and C are
    laid out as contiguous (Bt, L, N), or (Bt, L, N, Din) per channel (a copy unless already so; 1/Din of the scan's
    work when shared by the channels); inputs of another dtype than the compute dtype are cast. Memory when gradients are needed: one stored
    state every 16 positions (Bt, L/16, N, Din); backward recomputes the rest (the states, and y before the gate for
    dz). The first call in a fresh environment compiles the kernels (seconds); numba caches them on
    disk.
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
