"""Building a fusion model from a run configuration and the dims of its data."""

from __future__ import annotations

from typing import Any

from torch import nn

from mambavl.cache.reader import CacheFile
from mambavl.errors import InputError
from mambavl.fuse.model import create_model
from mambavl.runtime.config import TrainConfig

# ModelConfig fields that come from the caches, not from the user.
DATA_FIELDS = ("video_dim", "text_dim", "num_verbs", "num_nouns", "num_actions")


def build_model(cfg: TrainConfig, data_dims: dict) -> tuple[nn.Module, Any]:
    """The preset's model with the user's overrides and the cache-derived dims (video/text dim, class counts):
    (model, its ModelConfig). InputError for an override of a data-derived field, an unknown preset or key."""
    clash = sorted(set(cfg.model_overrides) & set(DATA_FIELDS))
    if clash:
        raise InputError(f"model override(s) {', '.join(clash)} are set from the cache and cannot be overridden")
    # create_model refuses unknown presets and unknown override keys with InputError
    return create_model(cfg.preset, **data_dims, **cfg.model_overrides)


def cache_dims(cache: CacheFile, num_actions: int) -> dict[str, int]:
    """The data-derived ModelConfig fields (`DATA_FIELDS`) of a cache with `num_actions` action classes."""
    return {"video_dim": int(cache.attrs["feature_dim"]), "text_dim": int(cache.attrs["text_dim"]),
            "num_verbs": len(cache.verb_keys), "num_nouns": len(cache.noun_keys), "num_actions": int(num_actions)}


def question_tokens(cache: CacheFile) -> int:
    """T, the question length of the cache's question table (0 when it has none)."""
    try:
        return int(cache.questions().tokens.shape[1])
    except InputError:
        return 0
