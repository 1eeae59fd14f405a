"""Fusion baselines with the MambaVL fusion's interface, so `MambaVL` swaps them in by `ModelConfig.fusion`.

forward(video (B, F, d), video_mask (B, F) bool | None, question (B, T, d) | None, question_mask (B, T) | None)
-> (B, d).

* `TransformerFusion` ("transformer"): `n_layers` pre-norm layers of the same width d_model; in each, the video
  tokens self-attend, then cross-attend to the question tokens, then pass a feed-forward block (4*d_model hidden).
  Padded keys are masked in both attentions; the result is the masked mean over the video tokens. Cost grows with
  the square of the number of video tokens (the comparison `benchmarks/fusion_scaling.py` makes).
* `ConcatFusion` ("concat"): an MLP on [masked mean of video tokens ; masked mean of question tokens].
Without a question (`use_question=False`) the cross-attention / the question half are not built.
"""

from __future__ import annotations

import torch
from torch import nn

from mambavl.fuse.block import masked_mean, tag_norms_and_biases
from mambavl.fuse.config import ModelConfig


def _attend(attn: nn.MultiheadAttention, query, keys, key_mask):
    """attn(query, keys, keys) ignoring keys where key_mask (B, S) is False.

    A row without any valid key would make softmax over nothing (NaN); such rows attend to nothing and get 0.
    """
    if key_mask is None:
        return attn(query, keys, keys, need_weights=False)[0]
    empty = ~key_mask.any(1)  # (B,)
    pad = ~key_mask  # (B, S) True = ignore
    if bool(empty.any()):
        pad = pad.clone()
        pad[empty, 0] = False
    out = attn(query, keys, keys, key_padding_mask=pad, need_weights=False)[0]  # (B, L, d)
    return out.masked_fill(empty[:, None, None], 0.0)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.norm_self = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        if cfg.use_question:
            self.norm_cross = nn.LayerNorm(d)
            self.cross_attn = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        else:
            self.norm_cross = self.cross_attn = None
        self.norm_ff = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, video, video_mask, question, question_mask):
        h = self.norm_self(video)
        video = video + self.drop(_attend(self.self_attn, h, h, video_mask))
        if question is not None and self.cross_attn is not None:
            video = video + self.drop(_attend(self.cross_attn, self.norm_cross(video), question, question_mask))
        return video + self.drop(self.ff(self.norm_ff(video)))


class TransformerFusion(nn.Module):
    """Cross-attention fusion of the same width and depth as the MambaVL fusion (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.use_question = cfg.use_question
        self.layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.n_layers)])
        self.norm = nn.LayerNorm(cfg.d_model)
        tag_norms_and_biases(self)

    def forward(self, video, video_mask=None, question=None, question_mask=None):
        if not self.use_question:
            question = None
        for layer in self.layers:
            video = layer(video, video_mask, question, question_mask)
        return masked_mean(self.norm(video), video_mask)  # (B, d)


class ConcatFusion(nn.Module):
    """MLP on the concatenation of the pooled video and the pooled question tokens -> (B, d)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.use_question = cfg.use_question
        d = cfg.d_model
        d_in = 2 * d if cfg.use_question else d
        self.mlp = nn.Sequential(
            nn.LayerNorm(d_in),
            nn.Linear(d_in, cfg.expand * d),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.expand * d, d),
        )
        tag_norms_and_biases(self)

    def forward(self, video, video_mask=None, question=None, question_mask=None):
        pooled = masked_mean(video, video_mask)  # (B, d)
        if self.use_question and question is not None:
            pooled = torch.cat([pooled, masked_mean(question, question_mask)], dim=-1)  # (B, 2d)
        return self.mlp(pooled)
