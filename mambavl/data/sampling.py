"""Temporal sub-sampling of cached frame tokens (stage 2).

The cache stores F frame tokens per segment (fewer valid ones, `num_frames`, in fps mode where rows are padded with
zeros); the model consumes `frames` of them. Training draws one random frame from each of `frames` equal bins of the
valid frames (TSN-style segment sampling: every part of the segment is seen, the exact frame varies from epoch to
epoch, which is the only temporal augmentation possible on cached features); evaluation takes the centre frame of
each bin, so it is deterministic.

All functions are pure: randomness comes only from the `torch.Generator` passed in, so a run is reproducible and a
resumed run draws the same frames as an uninterrupted one.
"""

from __future__ import annotations

import torch


def output_width(cached_frames: int, frames: int) -> int:
    """Number of token slots K the model sees: `frames`, capped at the cached F; `frames <= 0` means all F."""
    if frames <= 0:
        return cached_frames
    return min(frames, cached_frames)


def _bins(num_frames: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer bin edges over the valid frames of each row.

    num_frames (B,) int -> start (B, K), end (B, K) long, full (B,) bool (rows with at least K valid frames).
    """
    # A row with no valid frame (cannot happen for rows flagged valid, but a zero row must not produce NaN
    # from pooling over nothing) is read as one zero token.
    n = num_frames.to(torch.long).clamp(min=1)  # (B,)
    k = torch.arange(width, dtype=torch.long, device=n.device)  # (K,)
    start = (k[None, :] * n[:, None]) // width  # (B, K)
    end = ((k[None, :] + 1) * n[:, None]) // width  # (B, K)
    return start, end, n >= width


def _short_rows(idx: torch.Tensor, mask: torch.Tensor, n: torch.Tensor, full: torch.Tensor) -> None:
    """Rows with fewer valid frames than slots keep all their frames in order; the rest of the slots are masked.

    Repeating frames to fill the slots would change what mean-pooling and the scan see; padding with a mask does not.
    """
    width = idx.shape[1]
    k = torch.arange(width, dtype=torch.long, device=idx.device)  # (K,)
    short = ~full  # (B,)
    if bool(short.any()):
        keep = k[None, :] < n[:, None]  # (B, K)
        idx[short] = torch.where(keep[short], k[None, :].expand_as(idx)[short], torch.zeros_like(idx[short]))
        mask[short] = keep[short]


def eval_frame_indices(num_frames: torch.Tensor, cached_frames: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic frame choice for evaluation: the centre frame of each of K equal bins.

    num_frames (B,) int valid frames per row (<= cached_frames) -> idx (B, K) long, mask (B, K) bool, with
    K = output_width(cached_frames, frames). Rows with fewer than K valid frames keep all of them, then masked slots.
    """
    width = output_width(cached_frames, frames)
    n = num_frames.to(torch.long).clamp(min=1)
    start, end, full = _bins(num_frames, width)
    idx = start + (end - start) // 2  # (B, K)
    mask = torch.ones_like(idx, dtype=torch.bool)
    _short_rows(idx, mask, n, full)
    return idx, mask


def train_frame_indices(
    num_frames: torch.Tensor, cached_frames: int, frames: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random frame choice for training: one uniformly drawn frame inside each of K equal bins (TSN-style).

    num_frames (B,) int -> idx (B, K) long (strictly increasing along K for rows with >= K valid frames),
    mask (B, K) bool. `generator` is a CPU torch.Generator; the draw is made on the CPU and moved to
    num_frames' device so results do not depend on the device.
    """
    width = output_width(cached_frames, frames)
    n = num_frames.to(torch.long).clamp(min=1)
    start, end, full = _bins(num_frames, width)
    u = torch.rand(start.shape, generator=generator).to(start.device)  # (B, K) in [0, 1)
    offset = (u * (end - start).to(u.dtype)).floor().to(torch.long)
    idx = start + torch.minimum(offset, (end - start - 1).clamp(min=0))  # (B, K)
    mask = torch.ones_like(idx, dtype=torch.bool)
    _short_rows(idx, mask, n, full)
    return idx, mask


def gather_frames(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick frames per row: features (B, F, D), idx (B, K) long -> (B, K, D)."""
    b, _, d = features.shape
    return torch.gather(features, 1, idx[:, :, None].expand(b, idx.shape[1], d))


def subsample(
    features: torch.Tensor,
    num_frames: torch.Tensor,
    frames: int,
    train: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-sample cached tokens for the model.

    features (B, F, D), num_frames (B,) -> video (B, K, D), mask (B, K) bool. `train=True` needs `generator`.
    """
    cached = features.shape[1]
    if train:
        if generator is None:
            raise ValueError("train=True sampling needs a torch.Generator")
        idx, mask = train_frame_indices(num_frames, cached, frames, generator)
    else:
        idx, mask = eval_frame_indices(num_frames, cached, frames)
    idx = idx.to(features.device)
    return gather_frames(features, idx), mask.to(features.device)
