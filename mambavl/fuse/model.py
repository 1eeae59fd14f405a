"""MambaVL: video tokens + question tokens -> fused vector -> verb / noun / action heads and a QA head.

    video (B, F, Dv) --Linear+LayerNorm, + learned temporal position--> (B, F, d) --+
                                                                                    |-- fusion --> h (B, d)
    question tokens (B, T, Dt) --3-layer MLP + LayerNorm--------------> (B, T, d) --+

`forward` asks two questions per clip, the verb question and the noun question, batched as 2B in one fusion call:
h_verb feeds the verb head, h_noun the noun head, concat(h_verb, h_noun) the action head. The QA head maps a fused
vector into the text-embedding space (`qa_embed`) and scores answer candidates by scaled cosine (`qa_logits`; the
multi-label scene question adds a learnable bias, `scene_logits`, see `mambavl.fuse.qa`).
The fusion is chosen by `ModelConfig.fusion` (mamba / transformer / concat) and, for mamba, `scan_layout`
(joint / parallel); see docs/model.md.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from mambavl.errors import InputError
from mambavl.fuse.baselines import ConcatFusion, TransformerFusion
from mambavl.fuse.block import MambaVLFusion, tag_norms_and_biases
# Re-exported: the configuration is data in `mambavl.fuse.config`; `mambavl.fuse.model` is its usual entry point.
from mambavl.fuse.config import (  # noqa: F401
    FusionKind,
    ModelConfig,
    ScanLayout,
    model_config_from_dict,
    model_config_to_dict,
)
from mambavl.fuse.ops import linear, scalar
from mambavl.fuse.presets import preset_model_fields
from mambavl.fuse.qa import scene_prior_logit


# Floor of the standardisation's variance, as a share of the mean variance over dimensions (`set_video_statistics`).
VIDEO_VAR_FLOOR = 0.01


def _sequential(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """`seq(x)` with its linear layers as `mambavl.fuse.ops.linear` (fewer dispatched ops, same result)."""
    for module in seq:
        x = linear(x, module) if isinstance(module, nn.Linear) else module(x)
    return x


def build_fusion(cfg: ModelConfig) -> nn.Module:
    """The fusion module for `cfg.fusion`: (video (B,F,d), video_mask, question (B,T,d) | None, q_mask) -> (B, d)."""
    if cfg.fusion == FusionKind.MAMBA:
        return MambaVLFusion(cfg)
    if cfg.fusion == FusionKind.TRANSFORMER:
        return TransformerFusion(cfg)
    return ConcatFusion(cfg)


class MambaVL(nn.Module):
    """Video + question fusion with verb, noun, action and QA heads (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if cfg.standardize_video:
            # x -> (x - video_shift) * video_scale per feature dimension; identity until `set_video_statistics`
            self.register_buffer("video_shift", torch.zeros(cfg.video_dim))  # (Dv,)
            self.register_buffer("video_scale", torch.ones(cfg.video_dim))  # (Dv,)
        self.video_proj = nn.Sequential(nn.Linear(cfg.video_dim, d), nn.LayerNorm(d))
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_frames, d))  # (max_frames, d)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if cfg.use_question:
            # The authors project RoBERTa token embeddings with a 3-layer MLP; the LayerNorm puts question tokens on
            # the same scale as the video tokens entering the fusion.
            self.question_proj = nn.Sequential(
                nn.Linear(cfg.text_dim, d), nn.GELU(), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.LayerNorm(d)
            )
        else:
            self.question_proj = None
        self.fusion = build_fusion(cfg)
        self.head_drop = nn.Dropout(cfg.dropout)
        self.verb_head = nn.Linear(d, cfg.num_verbs)
        self.noun_head = nn.Linear(d, cfg.num_nouns) if cfg.num_nouns > 0 else None
        self.action_head = nn.Linear(2 * d, cfg.num_actions) if cfg.num_actions > 0 else None
        self.qa_proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.text_dim))
        # CLIP's learnable temperature: logits = exp(logit_scale) * cosine, initialised at 1/0.07, capped at 100.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_scale._no_weight_decay = True
        # Multi-label scene answers: a bias at the prior logit, so hundreds of negatives start near p = 1/Nn, not 0.5.
        self.scene_bias = nn.Parameter(torch.tensor(scene_prior_logit(cfg.num_nouns)))
        self.scene_bias._no_weight_decay = True
        tag_norms_and_biases(self)

    def set_video_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise video features with these per-dimension statistics ((Dv,) each, of the training set's frame
        tokens): x -> (x - shift) * scale. With `video_scale` "global" (the default) the scale is one gain for every
        dimension, 1 / RMS(std), so the varying part has unit RMS and the features keep their geometry; with
        "dimension" it is 1 / sqrt(std^2 + 0.01 * mean(std^2)) per dimension (a dimension that hardly varies in
        training is not blown up). The shift removes the common offset (the mean, in scaled units m = mean * scale)
        down to an RMS of `video_offset_cap`: shift = mean * (1 - a), a = min(1, cap / RMS(m)), so the offset shared
        by every frame is at most `cap` times the varying part (0: centred; features whose offset is already within
        the cap are only scaled). Features that do not vary at all get a gain of 1. Needs `standardize_video`;
        InputError otherwise."""
        if not self.cfg.standardize_video:
            raise InputError("set_video_statistics: this model was built with standardize_video=False")
        var = std.detach().double().cpu() ** 2
        mean = mean.detach().double().cpu()
        if not float(var.mean()) > 0:  # nothing varies in training: no gain (1e6 would blow up any later change)
            scale = torch.ones_like(var)
        elif self.cfg.video_scale == "global":
            scale = torch.full_like(var, float(var.mean().rsqrt()))
        else:
            scale = torch.rsqrt(var + VIDEO_VAR_FLOOR * var.mean())
        offset_rms = float((mean * scale).square().mean().sqrt())
        keep = min(1.0, self.cfg.video_offset_cap / offset_rms) if offset_rms > 0 else 1.0
        self.video_shift.copy_(mean * (1.0 - keep))
        self.video_scale.copy_(scale)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # weights saved before the standardisation existed computed without it: they load with the identity
        if self.cfg.standardize_video:
            for name, value in (("video_shift", self.video_shift), ("video_scale", self.video_scale)):
                state_dict.setdefault(prefix + name, torch.zeros_like(value) if name == "video_shift"
                                      else torch.ones_like(value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def use_scan(self, impl):
        """Run every selective scan of the fusion with `impl` (a `ScanImpl` name, or a callable as
        `mambavl.fuse.scan.selective_scan` takes); returns the previous setting. The config's `scan_impl` is not
        changed: this is a runtime choice (benchmarks, FLOP counting), not part of the saved model."""
        previous = self.cfg.scan_impl
        for module in self.modules():
            if hasattr(module, "scan_impl"):
                previous = module.scan_impl
                module.scan_impl = impl
        return previous

    def compile_fusion(self, **options) -> None:
        """Compile each fusion layer's arithmetic around the selective scan with `torch.compile` (the scan itself
        stays the chosen kernel, called between the compiled parts). An option, not the default: on CPU the first
        step then pays the compile (docs/benchmarks.md, step_ops.py). `options` go to `torch.compile`."""
        for layer in getattr(self.fusion, "layers", []):
            layer.mix = torch.compile(layer.mix, **options)

    # ---- inputs

    def _check(self, video, video_mask, q_tokens, q_mask, q_dims: int):
        if video.dim() != 3 or video.shape[-1] != self.cfg.video_dim:
            raise InputError(f"video must be (B, F, {self.cfg.video_dim}), got {tuple(video.shape)}")
        if video.shape[1] > self.cfg.max_frames:
            raise InputError(
                f"video has {video.shape[1]} tokens but the model's position table holds max_frames="
                f"{self.cfg.max_frames}; sub-sample the frames or build the model with a larger max_frames"
            )
        if video_mask is not None and video_mask.shape != video.shape[:2]:
            raise InputError(f"video_mask shape {tuple(video_mask.shape)} != {tuple(video.shape[:2])}")
        if not self.cfg.use_question:
            return
        if q_tokens is None:
            raise InputError("this model reads questions (use_question=True) but no question tokens were given")
        if q_tokens.dim() != q_dims or q_tokens.shape[-1] != self.cfg.text_dim:
            want = "(B, 2, T, Dt)" if q_dims == 4 else "(B, T, Dt)"
            raise InputError(f"question tokens must be {want} with Dt={self.cfg.text_dim}, got {tuple(q_tokens.shape)}")
        if q_mask is not None and q_mask.shape != q_tokens.shape[:-1]:
            raise InputError(f"question mask shape {tuple(q_mask.shape)} != {tuple(q_tokens.shape[:-1])}")

    def _embed_video(self, video, video_mask):
        """(B, F, Dv) -> (B, F, d); padded tokens zeroed (their values must never matter)."""
        if self.cfg.standardize_video:
            shift, scale = self.video_shift, self.video_scale
            if shift.dtype != video.dtype:  # `Tensor.to` dispatches an op even when it has nothing to do
                shift, scale = shift.to(video.dtype), scale.to(video.dtype)
            video = (video - shift) * scale
        if video_mask is None:
            return _sequential(self.video_proj, video) + self.pos_embed[: video.shape[1]]  # (B, F, d)
        keep = video_mask[..., None]  # (B, F, 1)
        video = torch.where(keep, video, scalar(0.0, video))
        v = _sequential(self.video_proj, video) + self.pos_embed[: video.shape[1]]  # (B, F, d)
        return torch.where(keep, v, scalar(0.0, v))

    def _embed_question(self, q_tokens, q_mask):
        if q_mask is not None:
            q_tokens = torch.where(q_mask[..., None], q_tokens, scalar(0.0, q_tokens))
        return _sequential(self.question_proj, q_tokens)  # (B, T, d)

    # ---- public API

    def fuse(self, video, video_mask, q_tokens=None, q_mask=None) -> torch.Tensor:
        """Fuse a clip with one question.

        video (B, F, Dv) float, video_mask (B, F) bool (True = real token; None = all real), q_tokens (B, T, Dt),
        q_mask (B, T) bool -> h (B, d_model). With use_question=False the question arguments are ignored.
        """
        self._check(video, video_mask, q_tokens, q_mask, q_dims=3)
        v = self._embed_video(video, video_mask)
        q = self._embed_question(q_tokens, q_mask) if self.cfg.use_question else None
        return self.fusion(v, video_mask, q, q_mask if self.cfg.use_question else None)

    def forward(self, video, video_mask, q_tokens=None, q_mask=None) -> dict[str, torch.Tensor]:
        """video (B, F, Dv), video_mask (B, F) bool, q_tokens (B, 2, T, Dt) [verb question, noun question],
        q_mask (B, 2, T) bool -> dict(verb (B, V), noun (B, Nn) [absent when Nn == 0], action (B, A) [absent when
        A == 0], h_verb (B, d), h_noun (B, d)). Both questions go through the fusion as one batch of 2B."""
        self._check(video, video_mask, q_tokens, q_mask, q_dims=4)
        b = video.shape[0]
        if self.cfg.use_question:
            if q_tokens.shape[1] != 2:
                raise InputError(f"q_tokens must hold 2 questions (verb, noun) per clip, got {q_tokens.shape[1]}")
            v = self._embed_video(video, video_mask)  # (B, F, d): embedded once for both questions
            vm2 = torch.cat([video_mask, video_mask]) if video_mask is not None else None
            q2 = torch.cat([q_tokens[:, 0], q_tokens[:, 1]])  # (2B, T, Dt)
            qm2 = torch.cat([q_mask[:, 0], q_mask[:, 1]]) if q_mask is not None else None
            h = self.fusion(torch.cat([v, v]), vm2, self._embed_question(q2, qm2), qm2)  # (2B, d)
            h_verb, h_noun = h[:b], h[b:]
        else:
            h_verb = h_noun = self.fuse(video, video_mask)  # the questions would be ignored: fuse once
        out = {"h_verb": h_verb, "h_noun": h_noun, "verb": linear(self.head_drop(h_verb), self.verb_head)}
        if self.noun_head is not None:
            out["noun"] = linear(self.head_drop(h_noun), self.noun_head)
        if self.action_head is not None:
            out["action"] = linear(self.head_drop(torch.cat([h_verb, h_noun], dim=-1)), self.action_head)
        return out

    def qa_embed(self, h: torch.Tensor) -> torch.Tensor:
        """Fused vectors h (B, d) -> L2-normalised embeddings in the answer-text space (B, Dt)."""
        return F.normalize(_sequential(self.qa_proj, h), dim=-1)

    def qa_logits(self, emb: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """emb (B, Dt) from `qa_embed`, candidates (K, Dt) answer-text embeddings (normalised here) -> (B, K)
        logits = exp(logit_scale) * cosine, the scale learned and capped at 100 (CLIP)."""
        scale = self.logit_scale.exp().clamp(max=100.0)
        return scale * emb @ F.normalize(candidates.to(emb.dtype), dim=-1).T

    def scene_logits(self, emb: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Multi-label scene scores: `qa_logits` + the learnable scene bias. emb (B, Dt), candidates (Nn, Dt) ->
        (B, Nn) logits; sigmoid gives p(noun present). The bias starts at the prior logit of 1 / Nn."""
        return self.qa_logits(emb, candidates) + self.scene_bias


def create_model(preset: str, **overrides) -> tuple[MambaVL, ModelConfig]:
    """Build the model of a preset with explicit ModelConfig overrides on top.

    Overrides that are None are ignored (so CLI options left unset fall through to the preset). Unknown preset ->
    InputError listing the presets; unknown override keys -> InputError listing the valid ModelConfig fields.
    Returns (model, its ModelConfig).
    """
    values = preset_model_fields(preset)
    known = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise InputError(f"unknown model option(s) {', '.join(unknown)}; valid keys: {', '.join(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = ModelConfig(**values)
    return MambaVL(cfg), cfg
