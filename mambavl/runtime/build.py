"""Building a fusion model from a run configuration and the dims of its data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from mambavl.cache import schema
from mambavl.cache.reader import CacheFile
from mambavl.errors import InputError
from mambavl.fuse.model import create_model
from mambavl.runtime.config import TrainConfig

# ModelConfig fields that come from the caches, not from the user.
DATA_FIELDS = ("video_dim", "text_dim", "num_verbs", "num_nouns", "num_actions")


# Rows read for the feature statistics (evenly spaced over the training rows): enough for a mean and sd per dimension.
STATISTICS_ROWS = 4096
# Rows read at a time for them (an EK-100 row of 16 x 1024 float32 features is 64 KiB).
STATISTICS_CHUNK = 256


def build_model(cfg: TrainConfig, data_dims: dict,
                video_stats: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[nn.Module, Any]:
    """The preset's model with the user's overrides and the cache-derived dims (video/text dim, class counts):
    (model, its ModelConfig). `video_stats` returns ((Dv,) mean, (Dv,) sd), e.g. `feature_statistics` of the training
    rows; it is called (the cache read) only for a model built with `standardize_video`, whose buffers it
    sets. InputError for an override of a data-derived field, an unknown
    preset or key."""
    clash = sorted(set(cfg.model_overrides) & set(DATA_FIELDS))
    if clash:
        raise InputError(f"model override(s) {', '.join(clash)} are set from the cache and cannot be overridden")
    # create_model refuses unknown presets and unknown override keys with InputError
    model, mcfg = create_model(cfg.preset, **data_dims, **cfg.model_overrides)
    if video_stats is not None and mcfg.standardize_video:
        model.set_video_statistics(*video_stats())
    return model, mcfg


def feature_statistics(cache: CacheFile, window: str, rows: np.ndarray,
                       max_rows: int = STATISTICS_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation ((Dv,) float64 each) of the real frame tokens (the first
    `num_frames` of each row; view 0) of cache `rows` in `window`, over at most `max_rows` evenly spaced rows."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) > max_rows:
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).round().astype(np.int64)]
    rows = np.unique(rows)  # h5py reads increasing indices
    prefix = schema.window_prefix(window)
    f = cache.h5()
    with schema.reading(cache.path):
        dim = f[prefix + "features"].shape[-1]
        # Chan et al.'s pairwise update (from count 0 it takes the first chunk as it is): exact for any offset,
        # memory of one chunk
        count, mean, m2 = 0, np.zeros(dim), np.zeros(dim)
        for start in range(0, len(rows), STATISTICS_CHUNK):
            part = rows[start: start + STATISTICS_CHUNK]
            feats = f[prefix + "features"][part].astype(np.float64)  # (m, F, D)
            frames = f[prefix + "num_frames"][part].astype(np.int64)  # (m,)
            real = feats[np.arange(feats.shape[1])[None, :] < frames[:, None]]  # (tokens, D)
            if len(real) == 0:
                continue
            n, chunk_mean = len(real), real.mean(0)
            chunk_m2 = np.square(real - chunk_mean).sum(0)
            delta = chunk_mean - mean
            total = count + n
            mean = mean + delta * (n / total)
            m2 = m2 + chunk_m2 + np.square(delta) * (count * n / total)
            count = total
    if count == 0:
        raise InputError(f"cache {cache.path}: no frame tokens in the training rows to standardise the features with")
    return torch.from_numpy(mean), torch.from_numpy(np.sqrt(m2 / count))


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
