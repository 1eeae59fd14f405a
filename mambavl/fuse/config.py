"""Fusion model configuration (`ModelConfig`, its enums and plain-dict round trip, the scan implementations'
names, what each QA kind is answered with): data only and torch-free, so the fusion modules (block, baselines,
scan), the model, the presets and the run configuration all import it without importing each other (and a
command's --help without importing torch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

from mambavl.errors import InputError


class ScanImpl(str, Enum):
    """Which selective-scan implementation runs (`mambavl.fuse.scan.selective_scan`)."""

    AUTO = "auto"
    REFERENCE = "reference"
    CHUNKED = "chunked"
    CPU = "cpu"
    CUDA = "cuda"
    TRITON = "triton"


# What each QA kind is scored against: the verb or noun answer embeddings (scene: nouns, multi-label).
QA_TARGET = {"verb": "verb", "next_verb": "verb", "noun": "noun", "next_noun": "noun", "scene": "scene",
             "action": "action"}


class FusionKind(str, Enum):
    MAMBA = "mamba"
    TRANSFORMER = "transformer"
    CONCAT = "concat"


class ScanLayout(str, Enum):
    JOINT = "joint"
    PARALLEL = "parallel"


# How `standardize_video` scales the video features: each dimension to unit sd, or all by one gain (unit RMS sd).
VIDEO_SCALES = ("dimension", "global")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a MambaVL model; stored in checkpoints as plain types (`to_dict`)."""

    video_dim: int = 512  # Dv, from the cache's feature_dim
    text_dim: int = 512  # Dt, from the cache's text_dim
    num_verbs: int = 97
    num_nouns: int = 300  # 0: no noun head (generic datasets)
    num_actions: int = 0  # 0: no action head
    d_model: int = 256
    n_layers: int = 2
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    fusion: FusionKind = FusionKind.MAMBA
    scan_layout: ScanLayout = ScanLayout.JOINT
    shared_A: bool = True
    use_question: bool = True
    bidirectional: bool = False
    dropout: float = 0.1
    n_heads: int = 4  # transformer fusion
    scan_impl: str = "auto"  # auto | reference | chunked | cpu | cuda | triton
    max_frames: int = 64  # length of the learned temporal position table: the most video tokens a clip may have
    # standardise the video features with the training set's statistics (buffers set by the trainer): features whose
    # clip-to-clip variation is a small part of a large offset common to every frame (random-init CLIP: 0.6 % of the
    # squared norm varies) otherwise reach the fusion as almost the same token for every frame. `video_scale`
    # "global" scales every dimension by one gain (the varying part to unit RMS; the features keep their geometry),
    # "dimension" each to unit sd; the common offset is then shrunk to an RMS of at most `video_offset_cap` (0 centres
    # fully; removing it entirely cost ~11 points of verb top-1 on noise-dominated features, and shrinking a moderate
    # offset cost the generic clip CSV). The study and the choice of 2: docs/model.md, "Order-defined verbs".
    standardize_video: bool = True
    video_offset_cap: float = 2.0
    video_scale: str = "global"  # global: one gain for all dimensions | dimension: unit sd per feature dimension

    def __post_init__(self):
        self.fusion = _enum(FusionKind, self.fusion, "fusion")
        self.scan_layout = _enum(ScanLayout, self.scan_layout, "scan_layout")
        self.scan_impl = _enum(ScanImpl, self.scan_impl, "scan_impl").value
        for name in ("video_dim", "text_dim", "num_verbs", "d_model", "n_layers", "d_state", "expand", "d_conv",
                     "n_heads", "max_frames"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"model config: {name} must be a positive integer, got {v!r}")
        for name in ("num_nouns", "num_actions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"model config: {name} must be a non-negative integer, got {v!r}")
        for name in ("shared_A", "use_question", "bidirectional", "standardize_video"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"model config: {name} must be true or false, got {getattr(self, name)!r}")
        cap = self.video_offset_cap
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0.0 <= float(cap) < float("inf"):
            raise InputError(f"model config: video_offset_cap must be a finite number >= 0, got {cap!r}")
        self.video_offset_cap = float(cap)
        if self.video_scale not in VIDEO_SCALES:
            raise InputError(f"model config: video_scale must be one of {', '.join(VIDEO_SCALES)}, "
                             f"got {self.video_scale!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise InputError(f"model config: dropout must be in [0, 1), got {self.dropout!r}")
        if self.fusion == FusionKind.TRANSFORMER and self.d_model % self.n_heads:
            raise InputError(f"model config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")

    def to_dict(self) -> dict:
        """Plain types only (enums as their string values): a checkpoint holding it loads with weights_only=True."""
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """Inverse of `to_dict`. Unknown keys -> InputError listing the valid ones."""
        return model_config_from_dict(values)


def _enum(kind: type[Enum], value, field: str):
    try:
        return kind(getattr(value, "value", value))
    except ValueError:
        raise InputError(
            f"model config: {field}={value!r} is not one of {', '.join(m.value for m in kind)}"
        ) from None


# What a saved config without these keys was trained with (a default that changed later: not today's default).
# Before `standardize_video` existed nothing was standardised; its first version (the default for a while) centred
# fully, before `video_offset_cap` existed; `video_scale` came with "dimension" as the default.
SAVED_BEFORE_THE_FIELD = {"standardize_video": False, "video_offset_cap": 0.0, "video_scale": "dimension"}


def model_config_from_dict(values: dict) -> ModelConfig:
    """ModelConfig from a plain dict (e.g. a checkpoint's "model_config"); enums are restored from strings.

    Keys missing from the dict take their defaults, except the fields in `SAVED_BEFORE_THE_FIELD`, whose default
    changed after they were added: a config saved without them was trained as they say. Unknown keys raise
    InputError naming them and the valid keys.
    """
    known = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"model config: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(known)}")
    return ModelConfig(**{**SAVED_BEFORE_THE_FIELD, **values})


def model_config_to_dict(cfg: ModelConfig) -> dict:
    """`cfg.to_dict()`: plain types only (enums as strings)."""
    return cfg.to_dict()


def question_is_offset(cfg: ModelConfig) -> bool:
    """True when the fused vector is (a function of the video alone) + (a function of the question alone).

    That is the parallel layout of the Mamba fusion (the `paper` preset): each stream scans only its own tokens and
    the pooled outputs are summed, so the question stream never sees the video. With a question that is the same for
    every clip (template questions at evaluation) its term is one constant vector per head, and the model is
    video-only plus a per-head bias. The joint layout (the state that read the question reads the video), the
    transformer (video tokens attend to the question) and the concat MLP (a non-linear function of both) let the
    question change how the video is read.
    """
    return cfg.use_question and cfg.fusion == FusionKind.MAMBA and cfg.scan_layout == ScanLayout.PARALLEL
