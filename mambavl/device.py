"""Device choice shared by every stage: "auto" is CUDA when available, else the CPU."""

from __future__ import annotations

import torch

from mambavl.errors import InputError


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available else cpu; anything else is passed to torch.device (InputError when it is not a
    device, or names CUDA on a machine without it)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"device {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available")
    return dev
