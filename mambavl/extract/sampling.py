"""How extraction samples frames from a segment: `SamplingMode` and `SamplingConfig`.

Kept apart from the decoder (`mambavl.extract.decode`, which re-exports both) so that what only reads a cache's or a
model's sampling settings (`mambavl.extract.spec`, hence training and evaluation on cached features) imports none
of the decoding libraries (PyAV, ffmpeg-python).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from mambavl.errors import InputError


class SamplingMode(str, Enum):
    UNIFORM = "uniform"   # num_frames frames at the centres of num_frames equal bins of the segment
    FPS = "fps"           # a fixed rate, capped at num_frames by uniform sub-selection


@dataclass
class SamplingConfig:
    """Frames taken from each segment and their size; InputError naming the field for an invalid value."""

    mode: SamplingMode = SamplingMode.UNIFORM
    num_frames: int = 16    # UNIFORM: frames per segment. FPS: the cap (most frames stored)
    fps: float = 4.0        # FPS mode only
    size: int = 224         # output H = W = size: ffmpeg scales the short side to `size`, then centre-crops
    spatial_crops: int = 1  # 3: centre, left/top, right/bottom squares, frames (F, 3, S, S, 3) (mambavl.extract.views)

    def __post_init__(self) -> None:
        try:
            self.mode = SamplingMode(self.mode)
        except ValueError:
            raise InputError(f"sampling mode: {self.mode!r} is not one of "
                             f"{', '.join(m.value for m in SamplingMode)}") from None
        if int(self.num_frames) < 1:
            raise InputError(f"sampling num_frames: must be >= 1, got {self.num_frames}")
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise InputError(f"sampling fps: must be > 0, got {self.fps}")
        if int(self.size) < 1:
            raise InputError(f"sampling size: must be >= 1, got {self.size}")
        if int(self.spatial_crops) not in (1, 3):
            raise InputError(f"sampling spatial_crops: must be 1 or 3, got {self.spatial_crops}")
        self.num_frames, self.size, self.fps = int(self.num_frames), int(self.size), float(self.fps)
        self.spatial_crops = int(self.spatial_crops)
