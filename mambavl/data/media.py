"""Locating the ffmpeg binary, shared by decoding (`mambavl.extract.decode`) and the synthetic dataset writer."""

from __future__ import annotations

import shutil


def ffmpeg_binary() -> str:
    """The system ``ffmpeg`` on PATH, else the static binary shipped with imageio-ffmpeg."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg  # only where no system ffmpeg is found

    return imageio_ffmpeg.get_ffmpeg_exe()
