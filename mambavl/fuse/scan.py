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
  parallel over channels. The states are not stored: forward keeps one checkpoint every `_CKPT` positions and
  backward recomputes each chunk from its checkpoint. Internally float64 for every input dtype (results are cast
  back), so float32 inputs get float64-accurate outputs and gradient reductions.
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
"""

from __future__ import annotations

import math
import os
from enum import Enum

import torch
import torch.nn.functional as F

from mambavl.errors import InputError

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


class ScanImpl(str, Enum):
    AUTO = "auto"
    REFERENCE = "reference"
    CHUNKED = "chunked"
    CPU = "cpu"
    CUDA = "cuda"
    TRITON = "triton"


# ----------------------------------------------------------------------------------------------------------------
# argument checks shared by every implementation


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

# Positions between stored states in the cpu forward; backward recomputes the states of one chunk at a time.
_CKPT = 64

try:  # numba is a dependency, but the package still imports (cpu impl unavailable) without it
    import numba
    import numpy as np
    from llvmlite import ir as _llvm_ir
    from numba.extending import intrinsic as _intrinsic
except ImportError:  # pragma: no cover - exercised only on broken installs
    numba = None

# Reassociation lets LLVM vectorise the sums over the state dimension; no finite-math assumptions (inputs may hold
# inf/nan, which must propagate as in the reference).
_FASTMATH = {"reassoc", "contract"}


def _jit(**kw):
    """numba.njit(cache=True, ...) when numba is importable, else leave the function plain (never called)."""
    if numba is None:
        return lambda f: f
    return numba.njit(cache=True, **kw)


if numba is not None:

    @_intrinsic
    def _bits_to_f64(typingctx, x):
        """Reinterpret an int64's bits as a float64 (free; used to build 2**k in `_exp`)."""
        sig = numba.types.float64(numba.types.int64)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _llvm_ir.DoubleType())

        return sig, codegen


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split in two so k * _LN2_HI is exact (Cody-Waite reduction)
_LN2_LO = 1.90821492927058770002e-10


@_jit(inline="always")
def _exp(x):
    """exp(x) in float64 to ~1 ulp, written in plain arithmetic so LLVM can vectorise the loops that call it.

    Without Intel's SVML numba calls libm's scalar exp, which dominated the fused loop. exp(x) = 2**k * exp(r),
    k = round(x / ln 2), |r| <= ln(2)/2, exp(r) by its Taylor series to r**13 (truncation < 1e-17 relative).
    """
    xc = min(max(x, -708.0), 709.0)
    k = math.floor(xc * _LOG2E + 0.5)
    r = xc - k * _LN2_HI - k * _LN2_LO
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
    res = p * _bits_to_f64((np.int64(k) + 1023) << 52)
    if x < -708.0:  # below the smallest normal: flush to 0 (the exact value is < 3.3e-308)
        res = 0.0
    if x > 709.0:
        res = math.inf
    if x != x:
        res = x
    return res


# numba resolves globals by value, so the alias still marks the parallel loops
_prange = numba.prange if numba is not None else range


@_jit(inline="always")
def _softplus(x):
    # torch.nn.functional.softplus with its default threshold 20
    return x if x > 20.0 else math.log1p(math.exp(x))


@_jit(inline="always")
def _sigmoid(x):
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@_jit(parallel=True, fastmath=_FASTMATH)
def _cpu_forward(u, dl, bias, softplus, A, aidx, Bm, Cm, Dv, z, has_z, ckpt_every, out, ckpt, last):
    # u, dl, z, out (Bt, Din, L) float64; A (G, Din, N); aidx (L,); Bm, Cm (Bt, 1|Din, L, N); ckpt (Bt, Din, nck, N):
    # the state before every `ckpt_every`-th position, for the backward's recomputation; last (Bt, Din, N).
    bt, din, length = u.shape
    n = A.shape[2]
    per_b = Bm.shape[1] > 1
    per_c = Cm.shape[1] > 1
    for ii in _prange(bt * din):
        i = np.int64(ii)  # prange indices may be unsigned; mixing them with int64 would give floats
        b = i // din
        d = i % din
        gb = d if per_b else 0
        gc = d if per_c else 0
        h = np.zeros(n)
        for t in range(length):
            if t % ckpt_every == 0:
                ckpt[b, d, t // ckpt_every, :] = h
            x = dl[b, d, t] + bias[d]
            dt = _softplus(x) if softplus else x
            ut = u[b, d, t]
            dtu = dt * ut
            g = aidx[t]
            y = 0.0
            for k in range(n):
                h[k] = _exp(dt * A[g, d, k]) * h[k] + dtu * Bm[b, gb, t, k]
                y += Cm[b, gc, t, k] * h[k]
            y += Dv[d] * ut
            if has_z:
                zt = z[b, d, t]
                y *= zt * _sigmoid(zt)
            out[b, d, t] = y
        last[b, d, :] = h


@_jit(parallel=True, fastmath=_FASTMATH)
def _cpu_backward(u, dl, bias, softplus, A, aidx, Bm, Cm, Dv, z, has_z, ckpt_every, ckpt, dout, nblocks,
                  du, ddl, dA, dD, dbias, dz, dB, dC):
    # Reverse-time recurrence per (b, d): g_t = dL/dh_t = dy_t C_t + exp(delta_{t+1} A) g_{t+1}.
    # Channels are split into `nblocks` contiguous blocks, one per thread; a thread owns its channels' dA, dD, dbias.
    # dB, dC are (P|1, Bt, 1|Din, L, N): with B/C shared by the channels, block p accumulates into its own slice p
    # (the caller sums them) so no two threads write the same element.
    bt, din, length = u.shape
    n = A.shape[2]
    per_b = Bm.shape[1] > 1
    per_c = Cm.shape[1] > 1
    nck = ckpt.shape[2]
    for pp in _prange(nblocks):
        p = np.int64(pp)  # prange indices may be unsigned; mixing them with int64 would give floats
        d0 = p * din // nblocks
        d1 = (p + 1) * din // nblocks
        pb = 0 if per_b else p
        pc = 0 if per_c else p
        hs = np.empty((ckpt_every + 1, n))  # h_{t0-1} .. h_{t1-1} of one chunk
        ea = np.empty((ckpt_every, n))  # exp(delta_t A) of one chunk
        dts = np.empty(ckpt_every)
        dh = np.empty(n)
        for b in range(bt):
            for d in range(d0, d1):
                gb = d if per_b else 0
                gc = d if per_c else 0
                dh[:] = 0.0
                acc_D = 0.0
                acc_bias = 0.0
                for c in range(nck - 1, -1, -1):
                    t0 = c * ckpt_every
                    t1 = min(length, t0 + ckpt_every)
                    hs[0, :] = ckpt[b, d, c, :]
                    for t in range(t0, t1):  # recompute this chunk's states from its checkpoint
                        j = t - t0
                        x = dl[b, d, t] + bias[d]
                        dt = _softplus(x) if softplus else x
                        dts[j] = dt
                        dtu = dt * u[b, d, t]
                        g = aidx[t]
                        for k in range(n):
                            a = _exp(dt * A[g, d, k])
                            ea[j, k] = a
                            hs[j + 1, k] = a * hs[j, k] + dtu * Bm[b, gb, t, k]
                    for t in range(t1 - 1, t0 - 1, -1):
                        j = t - t0
                        ut = u[b, d, t]
                        dt = dts[j]
                        g = aidx[t]
                        go = dout[b, d, t]
                        if has_z:
                            y = Dv[d] * ut  # y_t recomputed rather than stored
                            for k in range(n):
                                y += Cm[b, gc, t, k] * hs[j + 1, k]
                            zt = z[b, d, t]
                            s = _sigmoid(zt)
                            dz[b, d, t] = go * y * s * (1.0 + zt * (1.0 - s))
                            dy = go * zt * s
                        else:
                            dy = go
                        acc_D += dy * ut
                        du_t = dy * Dv[d]
                        ddt = 0.0
                        for k in range(n):
                            dC[pc, b, gc, t, k] += dy * hs[j + 1, k]
                            gk = dh[k] + dy * Cm[b, gc, t, k]  # dL/dh_t
                            bk = Bm[b, gb, t, k]
                            ga = gk * hs[j, k] * ea[j, k]  # dL/d(delta_t A) through the exp
                            ddt += ga * A[g, d, k] + gk * bk * ut
                            dA[g, d, k] += ga * dt
                            dB[pb, b, gb, t, k] += gk * dt * ut
                            du_t += gk * dt * bk
                            dh[k] = gk * ea[j, k]  # carried to h_{t-1}
                        du[b, d, t] = du_t
                        if softplus:
                            ddt *= _sigmoid(dl[b, d, t] + bias[d])
                        ddl[b, d, t] = ddt
                        acc_bias += ddt
                dD[d] += acc_D
                dbias[d] += acc_bias


def _numba_threads() -> int:
    """Follow torch's thread setting (tests and DDP workers pin it), within numba's pool."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _np(t: torch.Tensor):
    return t.detach().to("cpu", torch.float64).contiguous().numpy()


class _SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, A_index, delta_softplus, return_last_state):
        bt, din, length = u.shape
        n = A.shape[-1]
        numba.set_num_threads(_numba_threads())
        A3 = A if A.dim() == 3 else A[None]  # (G, Din, N)
        aidx = (A_index if A_index is not None else torch.zeros(length, dtype=torch.long)).to("cpu", torch.int64)
        # (Bt, 1|Din, L, N): the state dimension innermost so the fused loop reads B_t, C_t contiguously.
        B4 = (B[:, None] if B.dim() == 3 else B).transpose(-1, -2)
        C4 = (C[:, None] if C.dim() == 3 else C).transpose(-1, -2)
        a = dict(
            u=_np(u), dl=_np(delta), bias=_np(delta_bias) if delta_bias is not None else np.zeros(din),
            softplus=bool(delta_softplus), A=_np(A3), aidx=aidx.contiguous().numpy(), Bm=_np(B4), Cm=_np(C4),
            Dv=_np(D) if D is not None else np.zeros(din), z=_np(z) if z is not None else np.zeros((1, 1, 1)),
            has_z=z is not None, ckpt_every=_CKPT,
        )
        out = np.empty((bt, din, length))
        ckpt = np.empty((bt, din, max(1, -(-length // _CKPT)), n))
        last = np.empty((bt, din, n))
        _cpu_forward(**a, out=out, ckpt=ckpt, last=last)
        ctx.arrays = a
        ctx.ckpt = ckpt
        ctx.meta = (A.dim(), B.dim(), C.dim(), D is not None, z is not None, delta_bias is not None)
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias))
        out_t = torch.from_numpy(out).to(u.dtype)
        if return_last_state:
            last_t = torch.from_numpy(last).to(u.dtype)
            ctx.mark_non_differentiable(last_t)
            return out_t, last_t
        return out_t

    @staticmethod
    def backward(ctx, dout, *_):
        a = ctx.arrays
        bt, din, length = a["u"].shape
        groups, _, n = a["A"].shape
        numba.set_num_threads(_numba_threads())
        nblocks = max(1, min(din, _numba_threads()))
        gb, gc = a["Bm"].shape[1], a["Cm"].shape[1]
        du = np.empty((bt, din, length))
        ddl = np.empty((bt, din, length))
        dA = np.zeros((groups, din, n))
        dD = np.zeros(din)
        dbias = np.zeros(din)
        dz = np.zeros((bt, din, length)) if a["has_z"] else np.zeros((1, 1, 1))
        dB = np.zeros((1 if gb > 1 else nblocks, bt, gb, length, n))
        dC = np.zeros((1 if gc > 1 else nblocks, bt, gc, length, n))
        _cpu_backward(**a, ckpt=ctx.ckpt, dout=_np(dout), nblocks=nblocks, du=du, ddl=ddl, dA=dA, dD=dD, dbias=dbias,
                      dz=dz, dB=dB, dC=dC)
        a_dim, b_dim, c_dim, has_D, has_z, has_bias = ctx.meta
        tu, tdelta, tA, tB, tC, tD, tz, tbias = ctx.dtypes
        t = torch.from_numpy
        gB = t(dB.sum(0)).transpose(-1, -2)  # (Bt, 1|Din, N, L)
        gC = t(dC.sum(0)).transpose(-1, -2)
        return (
            t(du).to(tu),
            t(ddl).to(tdelta),
            (t(dA) if a_dim == 3 else t(dA[0])).to(tA),
            (gB[:, 0] if b_dim == 3 else gB).to(tB),
            (gC[:, 0] if c_dim == 3 else gC).to(tC),
            t(dD).to(tD) if has_D else None,
            t(dz).to(tz) if has_z else None,
            t(dbias).to(tbias) if has_bias else None,
            None,
            None,
            None,
        )


def selective_scan_cpu(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, *, A_index=None
):
    """Fast CPU selective scan: numba-fused forward and hand-written backward, parallel over channels.

    Same arguments and result as `selective_scan_ref`; CPU tensors only. Computes in float64 internally for every
    input dtype; results and gradients are returned in the inputs' dtypes. Memory: one stored state every 64
    positions (Bt, Din, L/64, N) plus the float64 copies of the inputs; backward recomputes the rest.
    The first call in a fresh environment compiles the kernels (seconds); numba caches them on disk.
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias, A_index)
    for name, v in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if v.device.type != "cpu":
            raise InputError(f"selective_scan_cpu: {name} is on {v.device}; use impl='chunked' or 'cuda' there")
    return _SelectiveScanCPU.apply(u, delta, A, B, C, D, z, delta_bias, A_index, delta_softplus, return_last_state)


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
