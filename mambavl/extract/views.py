"""Multi-view testing: T temporal clips x S spatial crops of every segment (`mambavl extract --temporal-views T
--spatial-crops S`), so that evaluation can average the views' class probabilities as the EK-100 recognition
baselines report their numbers.

What the views are (`ViewConfig.definition` writes this into the cache attributes):

* temporal view t of T (uniform sampling of N frames): the uniform grid shifted by (t + 1/2) / T of a step. The
  single-view grid takes the centres of N equal bins of the segment, start + (i + 1/2) * step (step = length / N);
  view t takes start + (i + (t + 1/2) / T) * step, i.e. every view samples each bin once, at the centre of its t-th
  sub-bin. Together the T views are exactly the single-view grid of N * T frames (one decode per segment), and with
  T = 1 the grid is today's. This is TSM's ``twice_sample`` test protocol (two clips, the grid at offsets 0 and 1/2
  of a step; Lin et al., TSM, ``ops/dataset.py``) generalised to T symmetric offsets; SlowFast's
  ``TEST.NUM_ENSEMBLE_VIEWS`` instead places T fixed-length clips at evenly spaced starts over a long video
  (``slowfast/datasets/decoder.py`` ``get_start_end_idx``: start = delta * t / T, delta = video length - clip length;
  t * delta / (T - 1) with ``USE_OFFSET_SAMPLING``): the same idea, T clips shifted by t/T of what is left over, for
  dense clips; for segment-based sampling of a short action segment the shift is a fraction of the grid's step. fps sampling keeps T = 1 (its grid count depends on
  the window length; shifting it would change what is sampled at the segment ends).
* spatial crop s of S (S = 1 or 3): after scaling the short side to `size`, the centre square (s = 0), then the
  square at the start of the long side (left, or top for portrait video; s = 1) and at its end (right or bottom;
  s = 2) -- SlowFast's 3-crop testing (``TEST.NUM_SPATIAL_CROPS = 3``, ``uniform_crop`` with spatial_idx 0/1/2 =
  left/centre/right). The order differs from SlowFast's on purpose: view 0 is the centre crop, which is what a
  reader that knows nothing of views (an older mambavl, `mambavl predict`, training's validation) reads.
* view v = t * S + s (temporal-major).

How evaluation combines them: the mean of the views' softmax probabilities (the EK-100 baselines' test-time
aggregation; `mambavl.runtime.scoring.average_views`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from mambavl.errors import InputError
from mambavl.extract.sampling import SamplingConfig, SamplingMode

AGGREGATION = "softmax mean"
CROP_ORDER = ("centre", "left/top", "right/bottom")


@dataclass(frozen=True)
class ViewConfig:
    """T temporal clips x S spatial crops per segment (see the module docstring); 1 x 1 = the single centre view."""

    temporal: int = 1
    spatial: int = 1

    def __post_init__(self) -> None:
        if int(self.temporal) < 1:
            raise InputError(f"--temporal-views: must be >= 1, got {self.temporal}")
        if int(self.spatial) not in (1, 3):
            raise InputError(f"--spatial-crops: must be 1 (centre) or 3 (centre, left/top, right/bottom), "
                             f"got {self.spatial}")

    @property
    def count(self) -> int:
        return int(self.temporal) * int(self.spatial)

    def definition(self) -> str:
        """The views in words (the cache attribute `view_definition`)."""
        return (f"view v = t * {self.spatial} + s; temporal clip t of {self.temporal}: uniform grid shifted by "
                f"(t + 1/2) / {self.temporal} of a step; spatial crop s of {self.spatial}: "
                f"{', '.join(CROP_ORDER[:self.spatial])} square after scaling the short side")

    def attrs(self) -> dict[str, Any]:
        """Root attributes recorded by extraction (absent in caches from before views: 1 x 1)."""
        return {"temporal_views": int(self.temporal), "spatial_crops": int(self.spatial),
                "view_definition": self.definition()}

    @classmethod
    def of_attrs(cls, attrs: Mapping[str, Any]) -> ViewConfig:
        """The views a cache holds (1 x 1 for a cache written before views existed)."""
        return cls(int(attrs.get("temporal_views", 1) or 1), int(attrs.get("spatial_crops", 1) or 1))

    def check(self, sampling: SamplingConfig, decoder_name: str) -> None:
        """InputError for combinations extraction cannot make: temporal views of fps sampling, crops with a decoder
        that only centre-crops."""
        if self.temporal > 1 and sampling.mode is not SamplingMode.UNIFORM:
            raise InputError("--temporal-views > 1 needs uniform sampling (--frames N without --fps): fps sampling "
                             "has one grid per window")
        if self.spatial > 1 and decoder_name != "ffmpeg":
            raise InputError(f"--spatial-crops {self.spatial} needs --decoder ffmpeg (decoder {decoder_name!r} "
                             "only centre-crops)")


def view_sampling(sampling: SamplingConfig, views: ViewConfig) -> SamplingConfig:
    """The one decode that yields every view: N * T uniform frames (the T shifted grids interleaved) and S crops."""
    return dataclasses.replace(sampling, num_frames=sampling.num_frames * views.temporal, spatial_crops=views.spatial)


def split_views(frames, times: np.ndarray, views: ViewConfig):
    """Frames of `view_sampling`'s decode -> per view. frames (N*T, H, W, 3) or (N*T, S, H, W, 3) (numpy or torch),
    times (N*T,) -> frames (V, N, H, W, 3), times (V, N), views in order v = t * S + s."""
    t, s = views.temporal, views.spatial
    n = len(times) // t
    if s == 1:
        frames = frames.reshape(n, t, 1, *frames.shape[1:])  # (N, T, 1, H, W, 3)
    else:
        frames = frames.reshape(n, t, s, *frames.shape[2:])  # (N, T, S, H, W, 3)
    # grid index j = i * T + t: frame i of temporal view t
    frames = frames.permute(1, 2, 0, 3, 4, 5) if hasattr(frames, "permute") else frames.transpose(1, 2, 0, 3, 4, 5)
    frames = frames.reshape(t * s, n, *frames.shape[3:])  # (V, N, H, W, 3)
    per_t = np.asarray(times, dtype=np.float64).reshape(n, t).T  # (T, N)
    return frames, np.repeat(per_t, s, axis=0)  # (V, N)


def decode_views(root, segment, start: float, stop: float, sampling: SamplingConfig, views: ViewConfig,
                 frame_rate: float | None = None, threads: int = 0, decoder=None, chunk_seconds: int | None = None):
    """Every view of [start, stop] of `segment` from one decode (`decode_segment` with `view_sampling`): frames
    uint8 (V, N, size, size, 3), times float64 (V, N)."""
    from mambavl.extract.decode import decode_segment  # here: scoring imports this module and decodes nothing

    frames, times = decode_segment(root, segment, start, stop, view_sampling(sampling, views), frame_rate, threads,
                                   decoder, chunk_seconds)
    return split_views(frames, times, views)
