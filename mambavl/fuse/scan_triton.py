"""The selective scan as Triton kernels: forward and backward, compiled at first call, no build step.

Imported only by `mambavl.fuse.scan.selective_scan_triton` (and only when that is called), so the package never
needs Triton; use that function, which checks the arguments. Conventions as `selective_scan_ref`:

    u, delta, z (Bt, Din, L); A (G, Din, N) with A_index (L,) choosing one per position (G = 1: one A);
    B, C (Bt, N, L) shared by the channels or (Bt, Din, N, L) per channel; D, delta_bias (Din,).

Work split: one program per (batch row, block of `block_d` channels); each runs sequentially over L with the
state h (block_d, N) in registers, in float32 (float64 when an input is float64), whatever the input dtypes
(float32, bfloat16, float16); outputs and gradients are written in the inputs' dtypes.

Backward: the states are not stored. Forward keeps one state every `checkpoint_every` positions (K, default about
sqrt(L)): (Bt, Din, ceil(L/K), N) in the compute dtype. Backward walks the chunks last to first; for each it
recomputes the K states from the chunk's checkpoint into a scratch buffer (Bt, Din, K, N), then runs the
reverse-time recurrence over the chunk (dL/dh_t = dy_t C_t + exp(delta_{t+1} A) dL/dh_{t+1}). Extra memory, in
float32 elements: Bt*Din*N*(ceil(L/K) + K), e.g. 2*1024*16*(64 + 64) = 4.2 M (16 MiB) at L = 4096, against
Bt*Din*L*N = 134 M (512 MiB) for storing every state. Gradients of B, C shared by the channels are sums over the
channel blocks, added with float32 atomics into (Bt, N, L), as mamba-ssm's kernel does: their last bits may differ
from run to run. dA, dD, d(delta_bias) are kept per batch row, (Bt, G, Din, N) and (Bt, Din), then summed (no
atomics).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["interpreting", "triton_selective_scan"]


# ----------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _softplus(x):
    # torch's softplus (threshold 20). triton.language has no portable log1p, and log(1 + e) loses every digit of
    # a tiny e, so log1p(e) = log(w) * e / (w - 1) with w = 1 + e (exact to rounding; Goldberg's trick).
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _step(t, seq, mask_d, mask_dn, delta_ptr, u_ptr, bias_v, A_tile, A_ptrs, aidx_ptr, DN, B_ptrs, sBl,
          SOFTPLUS: tl.constexpr, GROUPED: tl.constexpr, ACC: tl.constexpr):
    """Inputs of position t: pre-softplus delta (block_d,), delta, u (block_d,), A_t, B_t, exp(delta A_t)."""
    xr = tl.load(delta_ptr + seq + t, mask=mask_d, other=0.0).to(ACC) + bias_v
    if SOFTPLUS:
        dt = _softplus(xr)
    else:
        dt = xr
    ut = tl.load(u_ptr + seq + t, mask=mask_d, other=0.0).to(ACC)
    if GROUPED:
        g = tl.load(aidx_ptr + t)
        A_t = tl.load(A_ptrs + g * DN, mask=mask_dn, other=0.0).to(ACC)
    else:
        A_t = A_tile
    B_t = tl.load(B_ptrs + t * sBl, mask=mask_dn, other=0.0).to(ACC)
    return xr, dt, ut, A_t, B_t, tl.exp(dt[:, None] * A_t)


@triton.jit
def _channel_vector(ptr, offs_d, mask_d, PRESENT: tl.constexpr, ACC: tl.constexpr):
    """D or delta_bias for the block's channels, zeros when the argument is absent."""
    if PRESENT:
        v = tl.load(ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        v = tl.zeros(offs_d.shape, dtype=ACC)
    return v


@triton.jit
def _scan_fwd(u_ptr, delta_ptr, bias_ptr, A_ptr, aidx_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr, saved_ptr, last_ptr,
              Din, L, N, every, n_saved, sBb, sBd, sBn, sBl, sCb, sCd, sCn, sCl,
              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr, HAS_BIAS: tl.constexpr,
              SOFTPLUS: tl.constexpr, GROUPED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
              SAVE: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask_d = offs_d < Din
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]  # (BLOCK_D, BLOCK_N)
    seq = (pid_b * Din + offs_d) * L  # start of each channel's sequence in (Bt, Din, L)
    A_ptrs = A_ptr + offs_d[:, None] * N + offs_n[None, :]
    A_tile = tl.load(A_ptrs, mask=mask_dn, other=0.0).to(ACC)  # group 0, the only one when not GROUPED
    B_ptrs = B_ptr + pid_b * sBb + offs_d[:, None] * sBd + offs_n[None, :] * sBn
    C_ptrs = C_ptr + pid_b * sCb + offs_d[:, None] * sCd + offs_n[None, :] * sCn
    bias_v = _channel_vector(bias_ptr, offs_d, mask_d, HAS_BIAS, ACC)
    D_v = _channel_vector(D_ptr, offs_d, mask_d, HAS_D, ACC)
    saved = ((pid_b * Din + offs_d) * n_saved)[:, None] * N + offs_n[None, :]  # into (Bt, Din, n_saved, N)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    for c in range(0, n_saved):
        if SAVE:
            tl.store(saved_ptr + saved + c * N, h, mask=mask_dn)
        for t in range(c * every, tl.minimum(c * every + every, L)):
            xr, dt, ut, A_t, B_t, a = _step(t, seq, mask_d, mask_dn, delta_ptr, u_ptr, bias_v, A_tile, A_ptrs,
                                            aidx_ptr, Din * N, B_ptrs, sBl, SOFTPLUS, GROUPED, ACC)
            h = a * h + (dt * ut)[:, None] * B_t
            C_t = tl.load(C_ptrs + t * sCl, mask=mask_dn, other=0.0).to(ACC)
            y = tl.sum(h * C_t, axis=1) + D_v * ut  # (BLOCK_D,)
            if HAS_Z:
                zt = tl.load(z_ptr + seq + t, mask=mask_d, other=0.0).to(ACC)
                y = y * zt * tl.sigmoid(zt)
            tl.store(out_ptr + seq + t, y.to(out_ptr.dtype.element_ty), mask=mask_d)
    state = (pid_b * Din + offs_d)[:, None] * N + offs_n[None, :]  # into (Bt, Din, N)
    tl.store(last_ptr + state, h.to(last_ptr.dtype.element_ty), mask=mask_dn)


@triton.jit
def _scan_bwd(u_ptr, delta_ptr, bias_ptr, A_ptr, aidx_ptr, B_ptr, C_ptr, D_ptr, z_ptr, saved_ptr, hist_ptr, dout_ptr,
              du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
              Din, L, N, G, every, n_saved, sBb, sBd, sBn, sBl, sCb, sCd, sCn, sCl,
              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, G_PAD: tl.constexpr, ACC: tl.constexpr,
              HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, GROUPED: tl.constexpr, HAS_D: tl.constexpr,
              HAS_Z: tl.constexpr, B_PER_CH: tl.constexpr, C_PER_CH: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < Din
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    row = pid_b * Din + offs_d  # (BLOCK_D,) channel rows of (Bt, Din, ...)
    seq = row * L
    A_ptrs = A_ptr + offs_d[:, None] * N + offs_n[None, :]
    A_tile = tl.load(A_ptrs, mask=mask_dn, other=0.0).to(ACC)
    B_ptrs = B_ptr + pid_b * sBb + offs_d[:, None] * sBd + offs_n[None, :] * sBn
    C_ptrs = C_ptr + pid_b * sCb + offs_d[:, None] * sCd + offs_n[None, :] * sCn
    bias_v = _channel_vector(bias_ptr, offs_d, mask_d, HAS_BIAS, ACC)
    D_v = _channel_vector(D_ptr, offs_d, mask_d, HAS_D, ACC)
    hist = (row * every)[:, None] * N + offs_n[None, :]  # into the scratch (Bt, Din, every, N)
    # dB, dC: (Bt, Din, N, L) per channel; else (Bt, N, L), to which every channel block adds its sum
    per_ch = (row * N)[:, None] * L + offs_n[None, :] * L  # (BLOCK_D, BLOCK_N)
    shared = (pid_b * N + offs_n) * L  # (BLOCK_N,)
    dh = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)  # dL/dh_t carried backwards
    dA_acc = tl.zeros((G_PAD, BLOCK_D, BLOCK_N), dtype=ACC)
    dD_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for cc in range(0, n_saved):
        c = n_saved - 1 - cc
        t0 = c * every
        t1 = tl.minimum(t0 + every, L)
        h = tl.load(saved_ptr + (row * n_saved + c)[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)
        for t in range(t0, t1):  # recompute the chunk's states h_{t-1} from its checkpoint
            tl.store(hist_ptr + hist + (t - t0) * N, h, mask=mask_dn)
            xr, dt, ut, A_t, B_t, a = _step(t, seq, mask_d, mask_dn, delta_ptr, u_ptr, bias_v, A_tile, A_ptrs,
                                            aidx_ptr, Din * N, B_ptrs, sBl, SOFTPLUS, GROUPED, ACC)
            h = a * h + (dt * ut)[:, None] * B_t
        tl.debug_barrier()  # the scratch written above is read below, possibly by other threads of the program
        for tt in range(0, t1 - t0):
            t = t1 - 1 - tt
            hp = tl.load(hist_ptr + hist + (t - t0) * N, mask=mask_dn, other=0.0)  # h_{t-1}
            xr, dt, ut, A_t, B_t, a = _step(t, seq, mask_d, mask_dn, delta_ptr, u_ptr, bias_v, A_tile, A_ptrs,
                                            aidx_ptr, Din * N, B_ptrs, sBl, SOFTPLUS, GROUPED, ACC)
            h = a * hp + (dt * ut)[:, None] * B_t  # h_t
            C_t = tl.load(C_ptrs + t * sCl, mask=mask_dn, other=0.0).to(ACC)
            dy = tl.load(dout_ptr + seq + t, mask=mask_d, other=0.0).to(ACC)  # dL/dout_t, then dL/dy_t
            if HAS_Z:
                y = tl.sum(h * C_t, axis=1) + D_v * ut  # recomputed rather than stored
                zt = tl.load(z_ptr + seq + t, mask=mask_d, other=0.0).to(ACC)
                s = tl.sigmoid(zt)
                tl.store(dz_ptr + seq + t, (dy * y * s * (1.0 + zt * (1.0 - s))).to(dz_ptr.dtype.element_ty),
                         mask=mask_d)
                dy = dy * zt * s
            dD_acc += dy * ut
            gh = dh + dy[:, None] * C_t  # dL/dh_t
            ga = gh * hp * a  # dL/d(delta_t A_t), through the exp
            ddt = tl.sum(ga * A_t + gh * B_t * ut[:, None], axis=1)
            if GROUPED:
                sel = tl.arange(0, G_PAD) == tl.load(aidx_ptr + t)
                dA_acc += tl.where(sel[:, None, None], (ga * dt[:, None])[None, :, :], 0.0)
            else:
                dA_acc += (ga * dt[:, None])[None, :, :]
            dB_t = gh * (dt * ut)[:, None]
            dC_t = dy[:, None] * h
            if B_PER_CH:
                tl.store(dB_ptr + per_ch + t, dB_t.to(dB_ptr.dtype.element_ty), mask=mask_dn)
            else:
                tl.atomic_add(dB_ptr + shared + t, tl.sum(dB_t, axis=0), mask=mask_n, sem="relaxed")
            if C_PER_CH:
                tl.store(dC_ptr + per_ch + t, dC_t.to(dC_ptr.dtype.element_ty), mask=mask_dn)
            else:
                tl.atomic_add(dC_ptr + shared + t, tl.sum(dC_t, axis=0), mask=mask_n, sem="relaxed")
            tl.store(du_ptr + seq + t, (tl.sum(gh * B_t, axis=1) * dt + dy * D_v).to(du_ptr.dtype.element_ty),
                     mask=mask_d)
            dh = gh * a
            if SOFTPLUS:
                ddt = ddt * tl.where(xr > 20.0, 1.0, tl.sigmoid(xr))
            tl.store(ddelta_ptr + seq + t, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_d)
            dbias_acc += ddt
        tl.debug_barrier()  # the next chunk overwrites the scratch
    offs_g = tl.arange(0, G_PAD)
    dA_ptrs = dA_ptr + (((pid_b * G + offs_g) * Din)[:, None, None] + offs_d[None, :, None]) * N + offs_n[None, None, :]
    tl.store(dA_ptrs, dA_acc, mask=(offs_g < G)[:, None, None] & mask_dn[None, :, :])
    tl.store(dD_ptr + row, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + row, dbias_acc, mask=mask_d)


# ----------------------------------------------------------------------------------------------------------------
# launch


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1, read by Triton when it is imported):
    CPU tensors work then, slowly; otherwise the kernels need CUDA tensors."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block_d(bt: int, din: int, device: torch.device) -> int:
    """Channels per program. A program runs the whole sequence, so the grid (Bt, Din / block) must fill the GPU:
    halve the block (from 64) until there are at least two programs per multiprocessor, down to 4 channels."""
    if device.type != "cuda":  # the interpreter: fewer, larger programs run faster
        return min(64, _next_pow2(din))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    block = min(64, _next_pow2(din))
    while block > 4 and bt * -(-din // block) < 2 * sms:
        block //= 2
    return block


def _checkpoint_every(length: int) -> int:
    """About sqrt(L) (a power of two, 16..256): minimises the checkpoints plus the backward's scratch."""
    return min(256, max(16, _next_pow2(math.isqrt(max(length, 1)))))


def _bc_strides(m: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, channel, state, position) strides of B or C; channel stride 0 when shared by the channels."""
    if m.dim() == 3:
        return m.stride(0), 0, m.stride(1), m.stride(2)
    return m.stride(0), m.stride(1), m.stride(2), m.stride(3)


class _Launch:
    """Everything both kernels need, prepared once in forward and kept for backward."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, A_index, softplus, block_d, checkpoint_every):
        bt, din, length = u.shape
        self.shape = (bt, din, length, A.shape[-1])
        self.u, self.delta, self.z = u.contiguous(), delta.contiguous(), z.contiguous() if z is not None else None
        self.A = (A if A.dim() == 3 else A[None]).contiguous()  # (G, Din, N)
        self.B, self.C, self.D = B, C, D.contiguous() if D is not None else None
        self.bias = delta_bias.contiguous() if delta_bias is not None else None
        grouped = A.dim() == 3
        self.aidx = (A_index if grouped else torch.zeros(1)).to(u.device, torch.int32).contiguous()
        f64 = any(t.dtype == torch.float64 for t in (u, delta, A, B, C))
        self.acc_t, self.acc = (torch.float64, tl.float64) if f64 else (torch.float32, tl.float32)
        self.block_d = block_d or _block_d(bt, din, u.device)
        self.block_n = _next_pow2(self.shape[3])
        self.every = checkpoint_every or _checkpoint_every(length)
        self.n_saved = max(1, -(-length // self.every))
        self.grid = (bt, -(-din // self.block_d))
        self.num_warps = max(1, min(4, self.block_d * self.block_n // 256))
        self.flags = dict(BLOCK_D=self.block_d, BLOCK_N=self.block_n, ACC=self.acc, HAS_BIAS=self.bias is not None,
                          SOFTPLUS=bool(softplus), GROUPED=grouped, HAS_D=self.D is not None, HAS_Z=self.z is not None)

    _TENSORS = ("u", "delta", "z", "A", "B", "C", "D", "bias", "aidx")

    def take_tensors(self) -> list:
        """The tensors held, which are dropped here (forward hands them to save_for_backward)."""
        out = [getattr(self, k) for k in self._TENSORS]
        for k in self._TENSORS:
            setattr(self, k, None)
        return out

    def put_tensors(self, tensors) -> None:
        for k, t in zip(self._TENSORS, tensors):
            setattr(self, k, t)

    def common(self):
        """The arguments both kernels take first: inputs (a placeholder for absent ones, never read)."""
        u = self.u
        return (u, self.delta, self.bias if self.bias is not None else u, self.A, self.aidx, self.B, self.C,
                self.D if self.D is not None else u, self.z if self.z is not None else u)

    def device_guard(self):
        return torch.cuda.device(self.u.device) if self.u.is_cuda else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _forward(p: _Launch, save: bool):
    bt, din, length, n = p.shape
    out = torch.empty_like(p.u)  # (Bt, Din, L) in u's dtype
    last = torch.empty(bt, din, n, device=p.u.device, dtype=p.u.dtype)
    saved = torch.empty(bt, din, p.n_saved, n, device=p.u.device, dtype=p.acc_t) if save else last
    with p.device_guard():
        _scan_fwd[p.grid](*p.common(), out, saved, last, din, length, n, p.every, p.n_saved,
                          *_bc_strides(p.B), *_bc_strides(p.C), **p.flags, SAVE=save, num_warps=p.num_warps)
    return out, last, saved


def _backward(p: _Launch, saved, dout):
    bt, din, length, n = p.shape
    dev, acc_t = p.u.device, p.acc_t
    groups = p.A.shape[0]
    du, ddelta = torch.empty_like(p.u), torch.empty_like(p.delta)
    dz = torch.empty_like(p.z) if p.z is not None else du
    hist = torch.empty(bt, din, p.every, n, device=dev, dtype=acc_t)  # scratch: one chunk's states

    def bc_grad(m):  # per channel: written in m's dtype; shared: float32 sums over the channel blocks
        if m.dim() == 4:
            return torch.empty(bt, din, n, length, device=dev, dtype=m.dtype)
        return torch.zeros(bt, n, length, device=dev, dtype=acc_t)

    dB, dC = bc_grad(p.B), bc_grad(p.C)
    dA = torch.empty(bt, groups, din, n, device=dev, dtype=acc_t)
    dD = torch.empty(bt, din, device=dev, dtype=acc_t)
    dbias = torch.empty(bt, din, device=dev, dtype=acc_t)
    with p.device_guard():
        _scan_bwd[p.grid](*p.common(), saved, hist, dout.contiguous(), du, ddelta, dz, dB, dC, dA, dD, dbias,
                          din, length, n, groups, p.every, p.n_saved, *_bc_strides(p.B), *_bc_strides(p.C),
                          **p.flags, G_PAD=_next_pow2(groups), B_PER_CH=p.B.dim() == 4, C_PER_CH=p.C.dim() == 4,
                          num_warps=p.num_warps)
    return du, ddelta, dz, dB, dC, dA.sum(0), dD.sum(0), dbias.sum(0)


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, A_index, softplus, return_last_state, block_d, every):
        p = _Launch(u, delta, A, B, C, D, z, delta_bias, A_index, softplus, block_d, every)
        save = any(ctx.needs_input_grad[:8])
        out, last, saved = _forward(p, save)
        if save:  # the tensors go through save_for_backward (in-place changes to them are then detected)
            ctx.save_for_backward(*p.take_tensors(), saved)
            ctx.p = p
            ctx.dtypes = (A.dim(), A.dtype, B.dtype, C.dtype, D.dtype if D is not None else None,
                          delta_bias.dtype if delta_bias is not None else None)
        if return_last_state:
            ctx.mark_non_differentiable(last)
            return out, last
        return out

    @staticmethod
    def backward(ctx, dout, *_):
        *tensors, saved = ctx.saved_tensors
        ctx.p.put_tensors(tensors)
        du, ddelta, dz, dB, dC, dA, dD, dbias = _backward(ctx.p, saved, dout)
        a_dim, tA, tB, tC, tD, tbias = ctx.dtypes
        return (
            du, ddelta, (dA if a_dim == 3 else dA[0]).to(tA), dB.to(tB), dC.to(tC),
            dD.to(tD) if tD is not None else None, dz if ctx.p.z is not None else None,
            dbias.to(tbias) if tbias is not None else None, None, None, None, None, None,
        )


def triton_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, A_index=None, block_d=None, checkpoint_every=None):
    """The Triton scan on checked arguments (see `mambavl.fuse.scan.selective_scan_triton`)."""
    return _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, A_index, delta_softplus,
                                      return_last_state, block_d, checkpoint_every)
