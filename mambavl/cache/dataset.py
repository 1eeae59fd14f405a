"""The cached tokens of one window as a torch `Dataset` (`SegmentDataset`): what training and scoring iterate.

Apart from `mambavl.cache.reader` so that what reads a cache without a model (`mambavl cache inspect`, `cache merge`)
imports no torch.
"""

from __future__ import annotations

import os
from functools import cached_property

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from mambavl.cache import schema
from mambavl.cache.reader import CacheFile, fits_in_memory
from mambavl.errors import InputError


class SegmentDataset(Dataset):
    """Cached tokens of one window, row by row, one view at a time.

    Items: dict(features float32 (F, D), num_frames int64, index int64 (row in the cache)).
    `in_memory=None` loads the window's whole features array when it fits in RAM (`fits_in_memory`: at most half of
    the memory available; one read of the file, epochs then never touch HDF5); otherwise rows are read lazily through
    the per-process handle. True / False force either way.

    Views (a multi-view cache, see `mambavl.cache.schema`): `num_views` V; items are view `view` (0 unless set: the
    centre crop of the first temporal clip, all a single-view cache has), or, after `draw_views`, one view per row
    drawn for the epoch (training). Evaluation sets `view` to each view in turn (`mambavl.runtime.predict_scores`).
    """

    def __init__(self, cache: CacheFile, window: str = schema.RECOGNITION, indices=None,
                 in_memory: bool | None = None):
        self.cache = cache
        self.window = window
        self.prefix = schema.window_prefix(window)
        f = cache.h5()
        if self.prefix + "features" not in f:
            raise InputError(f"cache {cache.path} has no {window} window (extract with --anticipation)")
        feats = f[self.prefix + "features"]
        self.indices = (
            cache.valid_indices(window) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        )
        self.num_frames = f[self.prefix + "num_frames"][()].astype(np.int64)  # (N,)
        extra = f[schema.VIEW_FEATURES] if window == schema.RECOGNITION and schema.VIEW_FEATURES in f else None
        self.num_views = 1 + (int(extra.shape[1]) if extra is not None else 0)
        self.view = 0
        self.view_of: np.ndarray | None = None  # (M,) view per position, drawn by `draw_views`
        nbytes = int(np.prod(feats.shape)) * feats.dtype.itemsize * self.num_views
        self.in_memory = fits_in_memory(nbytes) if in_memory is None else bool(in_memory)
        with schema.reading(cache.path):
            self._features: np.ndarray | None = feats[()] if self.in_memory else None  # (N, F, D) float16
            # (N, V-1, F, D) float16
            self._views: np.ndarray | None = extra[()] if self.in_memory and extra is not None else None
        self._lazy: tuple[int, h5py.Dataset, h5py.Dataset | None] | None = None  # (pid, datasets) of the lazy path

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_lazy"] = None  # h5py objects do not cross processes; workers look the dataset up again
        return state

    def __len__(self) -> int:
        return len(self.indices)

    @cached_property
    def feature_shape(self) -> tuple[int, int]:
        shape = self.cache.h5()[self.prefix + "features"].shape
        return int(shape[1]), int(shape[2])

    def draw_views(self, generator: torch.Generator) -> None:
        """Draw one view per row for the coming epoch (uniform over the V views, from `generator`); a single-view
        window draws nothing, so its runs replay as before views existed."""
        if self.num_views > 1:
            self.view_of = torch.randint(self.num_views, (len(self.indices),), generator=generator).numpy()

    def _lazy_features(self) -> tuple[h5py.Dataset, h5py.Dataset | None]:
        """The features datasets (view 0, views 1..) of this process's open file, looked up once per process (a
        lookup builds a new h5py Dataset object, which costs more than reading a row)."""
        pid = os.getpid()
        if self._lazy is None or self._lazy[0] != pid or not self._lazy[1].id.valid:
            f = self.cache.h5()
            self._lazy = (pid, f[self.prefix + "features"], f[schema.VIEW_FEATURES] if self.num_views > 1 else None)
        return self._lazy[1], self._lazy[2]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = int(self.indices[i])
        view = int(self.view_of[i]) if self.view_of is not None else self.view
        if view == 0:
            x = self._features[row] if self._features is not None else self._lazy_features()[0][row]
        else:
            x = self._views[row, view - 1] if self._views is not None else self._lazy_features()[1][row, view - 1]
        return {
            "features": torch.from_numpy(np.asarray(x, dtype=np.float32)),  # (F, D)
            "num_frames": torch.tensor(int(self.num_frames[row]), dtype=torch.long),
            "index": torch.tensor(row, dtype=torch.long),
        }
