"""Named model presets (plain data; `mambavl.fuse.model.create_model` builds one).

A preset is a dict of `ModelConfig` fields, plus optionally a "train" dict of `TrainConfig` fields that the
trainer applies on top of its own defaults (before the user's explicit options) — e.g. "no-qa" is the "small"
model trained with `qa_weight = 0`. Dataset-dependent fields (video_dim, text_dim, num_verbs, num_nouns,
num_actions) are not in presets: the trainer passes them from the cache.

    model, cfg = create_model("small", video_dim=768, text_dim=512, num_verbs=97, num_nouns=300)
"""

from __future__ import annotations

import copy

from mambavl.errors import InputError
from mambavl.fuse.config import ModelConfig

TRAIN_KEY = "train"

_SMALL = {"d_model": 128, "n_layers": 2}

PRESETS: dict[str, dict] = {
    # Our default: one joint scan over [question ; video] with the shared A.
    "small": dict(_SMALL),
    "base": {"d_model": 256, "n_layers": 4},
    # The authors' design: a video Mamba and a text Mamba (one layer each), each scanning its own tokens with one
    # shared A_log (d_state 16, expand 2); pooled outputs summed. Their schedule: 2 warm-up epochs, cosine from
    # 1e-3 down to 3e-5 (min_lr_ratio 0.03).
    "paper": {
        "d_model": 256, "n_layers": 1, "d_state": 16, "expand": 2, "scan_layout": "parallel",
        TRAIN_KEY: {"warmup_epochs": 2, "min_lr_ratio": 0.03},
    },
    # Ablations, all on the small model.
    "disjoint-A": {**_SMALL, "shared_A": False},
    "video-only": {**_SMALL, "use_question": False},
    "transformer": {**_SMALL, "fusion": "transformer"},
    "concat": {**_SMALL, "fusion": "concat"},
    "no-qa": {**_SMALL, TRAIN_KEY: {"qa_weight": 0.0}},
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "small": "joint scan [question ; video], shared A, d_model 128, 2 layers",
    "base": "joint scan, shared A, d_model 256, 4 layers",
    "paper": "the authors' layout: separate video and text scans sharing A_log, pooled outputs summed",
    "disjoint-A": "small with a separate A for question and video tokens",
    "video-only": "small without questions (the text modules are not built)",
    "transformer": "small width/depth, cross-attention fusion instead of the scan",
    "concat": "MLP on [pooled video ; pooled question]",
    "no-qa": "small, trained without the QA objective (train.qa_weight = 0)",
}


def _preset(name: str) -> dict:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def preset_model_fields(name: str) -> dict:
    """The ModelConfig fields a preset sets (without its "train" part)."""
    values = _preset(name)
    values.pop(TRAIN_KEY, None)
    return values


def preset_train_overrides(name: str) -> dict:
    """The TrainConfig fields a preset sets (its "train" part; {} for most presets)."""
    return _preset(name).get(TRAIN_KEY, {})
