"""The MambaVL layer: Mamba (S6) mixers for video and question tokens with one state matrix A shared between them.

Each modality (stream) has its own input projection, causal depthwise conv, Δ/B/C projections and output projection;
the layer owns the state matrix `A_log` (d_inner, d_state) and the skip `D` (d_inner) that both streams use.

Two layouts (`ScanLayout`):

* joint: one scan over the concatenation [question ; video]. The question comes first so the state that has read
  the question goes on to read the video. Every token's Δ, B, C come from its own stream; each stream's conv runs
  on its own subsequence, so nothing leaks across the boundary through the conv. With `shared_A=False` the two
  streams have their own A; the scan then takes a grouped A (2, d_inner, d_state) plus an index saying which one
  each position uses (scaling Δ cannot emulate a different A: A differs per state dimension, Δ does not).
* parallel (the authors' design, preset "paper"): each stream scans its own sequence; only A_log is shared.

Masks: padded tokens get Δ = 0, so the state passes them unchanged and takes no input from them, and their conv
input is zeroed, so neither padding values nor padding length change the outputs at valid positions.
`D` is shared by both streams even with `shared_A=False`: the ablation isolates the state matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mambavl.fuse.config import ModelConfig
from mambavl.fuse.conv import causal_conv_silu
from mambavl.fuse.ops import linear as fused_linear
from mambavl.fuse.ops import residual_dropout
from mambavl.fuse.ops import rms_norm as fused_rms_norm
from mambavl.fuse.scan import selective_scan

VIDEO, QUESTION = "video", "question"


def no_weight_decay(p: nn.Parameter) -> nn.Parameter:
    """Tag a parameter so the optimiser's param-group builder skips weight decay for it (mamba-ssm's convention)."""
    p._no_weight_decay = True
    return p


def tag_norms_and_biases(module: nn.Module) -> None:
    """Tag every norm weight/bias and every bias under `module` with `_no_weight_decay`."""
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or name.endswith("bias"):
                no_weight_decay(p)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions of x (B, L, D) where mask (B, L) is True -> (B, D); rows without valid tokens give 0."""
    if mask is None:
        return x.mean(1)
    m = mask.to(x.dtype)[..., None]  # (B, L, 1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def rms_norm(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    """`norm(x)`: x * rsqrt(mean(x²) + eps) * weight, torch's RMSNorm arithmetic with a hand-written backward
    (`mambavl.fuse.ops.rms_norm`; torch's own CPU path dispatches about 24 ops, casts included, for the same
    result)."""
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    return fused_rms_norm(x, norm.weight, eps)


def float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, L) bool -> (B, 1, L) in `dtype`, made once per forward and shared by every layer (None stays None)."""
    return None if mask is None else mask[:, None, :].to(dtype)


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """layer(x) for x (..., C_in) as one 2-D matrix product with a hand-written backward (`mambavl.fuse.ops`)."""
    return fused_linear(x, layer)


def _scan_dtype(t: torch.Tensor) -> torch.Tensor:
    # Under autocast the projections yield bf16/fp16; the scan's inputs and state, and the residual streams, are
    # float32 (or float64 when given so).
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class Stream(nn.Module):
    """One modality's projections in a MambaVL mixer (mamba-ssm's `Mamba` without its A_log and D).

    in_proj d_model -> 2*d_inner (x, z); causal depthwise conv1d over x; x_proj -> (dt_rank + 2*d_state) giving the
    per-token Δ (through dt_proj), B and C; out_proj d_inner -> d_model. With `bidirectional` a second x_proj/dt_proj
    pair gives the Δ, B, C of the reversed scan (the conv and the gate are shared by both directions).
    """

    def __init__(
        self,
        d_model: int,
        d_inner: int,
        d_state: int,
        d_conv: int,
        dt_rank: int,
        bidirectional: bool,
        output: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.x_proj_b = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False) if bidirectional else None
        self.dt_proj_b = nn.Linear(dt_rank, d_inner, bias=True) if bidirectional else None
        # The joint layout's last layer pools only video positions: its question outputs would be dead weights.
        self.out_proj = nn.Linear(d_inner, d_model, bias=False) if output else None
        for dt_proj in (self.dt_proj, self.dt_proj_b):
            if dt_proj is not None:
                _init_dt_proj(dt_proj, dt_rank, dt_min, dt_max, dt_init_floor)

    def project(self, x: torch.Tensor, fmask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, d_model), fmask (B, 1, L) float | None -> conv'd, activated scan input u (B, L, d_inner) and
        gate z (B, L, d_inner), token-major (the mixer transposes them for the scan once, after any concatenation)."""
        xz = _linear(x, self.in_proj)  # (B, L, 2*d_inner)
        u, z = xz.split(self.d_inner, dim=-1)  # (B, L, d_inner) each
        # Padded tokens are zeroed before the conv: they must not reach later valid tokens through its window.
        u = causal_conv_silu(u, fmask, self.conv1d)  # (B, L, d_inner)
        return u, z

    def ssm_params(
        self, u: torch.Tensor, fmask: torch.Tensor | None, reverse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u (B, L, d_inner) -> Δ (B, L, d_inner) after softplus and masking, B (B, L, N), C (B, L, N), token-major."""
        x_proj, dt_proj = (self.x_proj_b, self.dt_proj_b) if reverse else (self.x_proj, self.dt_proj)
        x_dbl = _linear(u, x_proj)  # (B, L, dt_rank + 2N)
        dt, b, c = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # Softplus here rather than inside the scan so padded tokens get exactly Δ = 0 (softplus is never 0).
        delta = F.softplus(_linear(dt, dt_proj))  # (B, L, d_inner)
        if fmask is not None:
            delta = delta * fmask.view(fmask.shape[0], fmask.shape[-1], 1)  # (B, 1, L) -> (B, L, 1), same memory
        return delta, b, c


def _init_dt_proj(dt_proj: nn.Linear, dt_rank: int, dt_min: float, dt_max: float, floor: float) -> None:
    """mamba-ssm's Δ init: small uniform weights; bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]."""
    std = dt_rank**-0.5
    nn.init.uniform_(dt_proj.weight, -std, std)
    dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=floor)
    inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
    with torch.no_grad():
        dt_proj.bias.copy_(inv_dt)
    dt_proj.bias._no_reinit = True


def _A_log_init(d_inner: int, d_state: int) -> nn.Parameter:
    """mamba-ssm's S4D-real init: A = -(1, 2, ..., N) for every channel, stored as log."""
    a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # (d_inner, N)
    return no_weight_decay(nn.Parameter(torch.log(a)))


class MambaVLMixer(nn.Module):
    """Video and question streams plus the state matrix they share (or not, `shared_A=False`).

    forward(video (B, F, d), video_mask (B, F) | None, question (B, T, d) | None, question_mask (B, T) | None)
    -> (video_out (B, F, d), question_out (B, T, d) | None). Without a question stream (`use_question=False`)
    only the video is scanned.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        layout: str = "joint",
        shared_A: bool = True,
        use_question: bool = True,
        bidirectional: bool = False,
        scan_impl: str = "auto",
        question_output: bool = True,
    ):
        super().__init__()
        self.layout = str(getattr(layout, "value", layout))
        if self.layout not in ("joint", "parallel"):
            raise ValueError(f"layout must be 'joint' or 'parallel', got {layout!r}")
        self.d_inner = expand * d_model
        self.shared_A = shared_A or not use_question
        self.bidirectional = bidirectional
        self.scan_impl = scan_impl
        dt_rank = math.ceil(d_model / 16)
        kinds = [VIDEO, QUESTION] if use_question else [VIDEO]
        self.streams = nn.ModuleDict(
            {
                k: Stream(d_model, self.d_inner, d_state, d_conv, dt_rank, bidirectional, k == VIDEO or question_output)
                for k in kinds
            }
        )
        if self.shared_A:
            self.A_log = _A_log_init(self.d_inner, d_state)
        else:
            self.A_log_video = _A_log_init(self.d_inner, d_state)
            self.A_log_question = _A_log_init(self.d_inner, d_state)
        self.D = no_weight_decay(nn.Parameter(torch.ones(self.d_inner)))

    def A(self, kind: str) -> torch.Tensor:
        """The (negative real) state matrix of a stream, (d_inner, d_state), in float32 or float64."""
        a_log = self.A_log if self.shared_A else getattr(self, f"A_log_{kind}")
        return -torch.exp(_scan_dtype(a_log))

    def _scan(self, u, delta, A, b, c, z, A_index=None, reverse_params=None):
        """One or two (bidirectional) scans over (B, d_inner, L) inputs -> y (B, d_inner, L), gated by silu(z)."""
        args = [_scan_dtype(t) for t in (u, delta)]
        y = _opaque_scan(
            *args, A, _scan_dtype(b), _scan_dtype(c), D=_scan_dtype(self.D), z=_scan_dtype(z), A_index=A_index,
            impl=self.scan_impl,
        )
        if reverse_params is not None:
            delta_b, b_b, c_b = (_scan_dtype(t).flip(-1) for t in reverse_params)
            y_b = _opaque_scan(
                args[0].flip(-1), delta_b, A, b_b, c_b, D=None, z=_scan_dtype(z).flip(-1),
                A_index=A_index.flip(0) if A_index is not None else None, impl=self.scan_impl,
            )
            y = y + y_b.flip(-1)  # both directions share the gate: (y_f + y_b) * silu(z)
        return y

    def _stream_inputs(self, kind, x, fmask):
        """The stream's scan inputs, token-major: u, z, Δ (B, L, d_inner), B, C (B, L, N), and the reverse pass's
        (Δ, B, C) or None."""
        s = self.streams[kind]
        u, z = s.project(x, fmask)
        delta, b, c = s.ssm_params(u, fmask)
        rev = s.ssm_params(u, fmask, reverse=True) if self.bidirectional else None
        return u, z, delta, b, c, rev

    def _scan_stream(self, kind, x, fmask):
        u, z, delta, b, c, rev = (_scan_layout(t) for t in self._stream_inputs(kind, x, fmask))
        return self._scan(u, delta, self.A(kind), b, c, z, reverse_params=rev)

    def forward(self, video, video_mask=None, question=None, question_mask=None):
        dtype = video.dtype
        qf = float_mask(question_mask, question.dtype) if question is not None else None
        return self.mix(video, float_mask(video_mask, dtype), question, qf)

    def mix(self, video, video_fmask=None, question=None, question_fmask=None):
        """`forward` with the masks as `float_mask` gives them ((B, 1, L) float | None), made once per stack."""
        if question is None or QUESTION not in self.streams:
            return self._out(VIDEO, self._scan_stream(VIDEO, video, video_fmask), video.dtype), None
        if self.layout == "parallel":
            return tuple(self._out(kind, self._scan_stream(kind, x, m), x.dtype)
                         for kind, x, m in ((VIDEO, video, video_fmask), (QUESTION, question, question_fmask)))
        # joint: one scan over [question ; video], concatenated token-major and transposed once for the scan
        t_len = question.shape[1]
        q_in = self._stream_inputs(QUESTION, question, question_fmask)
        v_in = self._stream_inputs(VIDEO, video, video_fmask)
        u, z, delta, b, c = (_cat_scan(q, v) for q, v in zip(q_in[:5], v_in[:5]))
        rev = tuple(_cat_scan(q, v) for q, v in zip(q_in[5], v_in[5])) if self.bidirectional else None
        if self.shared_A:
            A, A_index = self.A(VIDEO), None  # (d_inner, N)
        else:
            A = torch.stack([self.A(QUESTION), self.A(VIDEO)])  # (2, d_inner, N): group 0 question, 1 video
            A_index = torch.zeros(u.shape[-1], dtype=torch.long, device=u.device)  # (T + F,)
            A_index[t_len:] = 1
        y = self._scan(u, delta, A, b, c, z, A_index=A_index, reverse_params=rev)  # (B, d_inner, T + F)
        return self._out(VIDEO, y[..., t_len:], video.dtype), self._out(QUESTION, y[..., :t_len], question.dtype)

    def _out(self, kind, y, dtype):
        """y (B, d_inner, L) -> (B, L, d_model) through the stream's output projection, in the stream's dtype (None
        when the stream has no output projection)."""
        proj = self.streams[kind].out_proj
        if proj is None:
            return None
        y = y.transpose(1, 2)  # (B, L, d_inner)
        return _linear(y if y.dtype == dtype else y.to(dtype), proj)


def _opaque_scan(*args, **kwargs):
    """`selective_scan`, never traced by torch.compile (`MambaVL.compile_fusion` compiles only what lies around
    it: the numba and mamba-ssm kernels are opaque to it, and the reference loop would unroll)."""
    return selective_scan(*args, **kwargs)


if hasattr(torch, "compiler") and hasattr(torch.compiler, "disable"):  # torch >= 2.1
    _opaque_scan = torch.compiler.disable(_opaque_scan)


def _scan_layout(t: torch.Tensor | tuple | None):
    """A token-major stream tensor (B, L, C) as the scan takes it, (B, C, L) (a transposed view), in the scan's dtype;
    a tuple (the reverse pass's Δ, B, C) element by element; None stays None."""
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(_scan_layout(x) for x in t)
    return _scan_dtype(t).transpose(1, 2)


def _cat_scan(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Token-major question (B, T, C) and video (B, F, C) -> [question ; video] as the scan takes it, (B, C, T + F)
    (a transposed view of the concatenation), in the scan's dtype."""
    return torch.cat([_scan_dtype(q), _scan_dtype(v)], dim=1).transpose(1, 2)


class MambaVLLayer(nn.Module):
    """Pre-norm residual layer: x + dropout(mixer(norm(x))) for each stream (per-stream RMSNorm)."""

    def __init__(self, cfg: ModelConfig, question_output: bool = True):
        super().__init__()
        self.mixer = MambaVLMixer(
            cfg.d_model, cfg.d_state, cfg.expand, cfg.d_conv, layout=cfg.scan_layout, shared_A=cfg.shared_A,
            use_question=cfg.use_question, bidirectional=cfg.bidirectional, scan_impl=cfg.scan_impl,
            question_output=question_output,
        )
        self.norm_video = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.norm_question = nn.RMSNorm(cfg.d_model, eps=1e-5) if cfg.use_question else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, video, video_mask, question=None, question_mask=None):
        qf = float_mask(question_mask, question.dtype) if question is not None else None
        return self.mix(video, float_mask(video_mask, video.dtype), question, qf)

    def mix(self, video, video_fmask, question=None, question_fmask=None):
        """`forward` with the masks as `float_mask` gives them (made once for the whole stack)."""
        qn = rms_norm(question, self.norm_question) if question is not None else None
        v_out, q_out = self.mixer.mix(rms_norm(video, self.norm_video), video_fmask, qn, question_fmask)
        video = residual_dropout(video, v_out, self.drop)
        question = residual_dropout(question, q_out, self.drop) if q_out is not None else None
        return video, question


class MambaVLFusion(nn.Module):
    """A stack of `n_layers` MambaVL layers and the pooling that turns tokens into one vector.

    forward(video (B, F, d), video_mask (B, F) bool | None, question (B, T, d) | None, question_mask (B, T) | None)
    -> (B, d). joint: masked mean over the video positions of the fused sequence. parallel: masked mean of the
    video stream + masked mean of the question stream (the authors' sum of pooled outputs).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layout = str(getattr(cfg.scan_layout, "value", cfg.scan_layout))
        self.use_question = cfg.use_question
        parallel = self.layout == "parallel"
        self.layers = nn.ModuleList(
            [MambaVLLayer(cfg, question_output=parallel or i < cfg.n_layers - 1) for i in range(cfg.n_layers)]
        )
        self.norm_video = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.norm_question = nn.RMSNorm(cfg.d_model, eps=1e-5) if cfg.use_question and parallel else None
        tag_norms_and_biases(self)

    def forward(self, video, video_mask=None, question=None, question_mask=None):
        if not self.use_question:
            question = None
        # Residual streams in float32 (mamba-ssm's residual_in_fp32): under autocast the input projections return
        # bf16/fp16, and the residual sums and RMSNorms would otherwise round to it (torch's rms_norm is not on
        # autocast's float32 list); each mixer's projections still run in the autocast dtype.
        video = _scan_dtype(video)
        question = _scan_dtype(question) if question is not None else None
        vf = float_mask(video_mask, video.dtype)
        qf = float_mask(question_mask, question.dtype) if question is not None else None
        for layer in self.layers:
            video, question = layer.mix(video, vf, question, qf)
        pooled = masked_mean(rms_norm(video, self.norm_video), video_mask)  # (B, d)
        if question is not None and self.layout == "parallel":
            pooled = pooled + masked_mean(rms_norm(question, self.norm_question), question_mask)
        return pooled
