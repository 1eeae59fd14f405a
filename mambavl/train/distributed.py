"""Distributed bookkeeping: which rank does what of a global batch, and the epoch statistics the ranks add up.

Under torchrun (WORLD_SIZE > 1), W processes take one step per *global* batch of batch_size x W rows of the seeded
permutation, each process a contiguous part of it (`global_batches`). Each rank's loss is its share of the global
batch's mean, so the gradient DistributedDataParallel averages is the one a single process with the global batch
would take (see the package docstring of `mambavl.train`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mambavl.device import join_process_group


@dataclass
class ProcessLayout:
    """This process's place among the training processes: rank, world size, local rank (its GPU)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> ProcessLayout:
        """The layout torchrun describes in the environment (one process without it); joins the process group
        (nccl on CUDA, gloo otherwise) when there are several."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        join_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@dataclass
class StepPart:
    """One training step seen from one rank: the global batch as dataset positions (G,), cache rows (G,) and their
    cached frame counts (G,); this rank's slice of it; the weight of this rank's loss (the world size, or 0 for a
    stand-in row, see `global_batches`)."""

    positions: np.ndarray
    grows: torch.Tensor
    num_frames: torch.Tensor
    part: slice
    scale: float

    @classmethod
    def whole(cls, positions: np.ndarray, rows: torch.Tensor, num_frames: torch.Tensor) -> StepPart:
        """A batch that one process takes whole (no other ranks)."""
        return cls(positions, rows, num_frames, slice(0, len(rows)), 1.0)


def global_batches(positions: np.ndarray, rows: np.ndarray, num_frames: np.ndarray, batch_size: int,
                   layout: ProcessLayout) -> list[StepPart]:
    """Cut an epoch's dataset positions into global batches of batch_size x world (`rows`: position -> cache row;
    `num_frames`: cache row -> cached frames). Each rank takes a contiguous part of each batch (`np.array_split`:
    parts differ by at most one row), so every rank runs the same steps on the same global batches as one process
    with batch_size x world would, the last, shorter batch included. A rank whose part of a short last batch is
    empty takes the batch's first row as a stand-in with zero weight, so that it still joins the all-reduce."""
    out = []
    for lo in range(0, len(positions), batch_size * layout.world):
        pos = positions[lo : lo + batch_size * layout.world]
        bounds = np.cumsum([0] + [len(x) for x in np.array_split(np.arange(len(pos)), layout.world)])
        a, b = int(bounds[layout.rank]), int(bounds[layout.rank + 1])
        part, scale = (slice(a, b), float(layout.world)) if b > a else (slice(0, 1), 0.0)
        out.append(StepPart(pos, torch.as_tensor(rows[pos], dtype=torch.long),
                            torch.as_tensor(num_frames[rows[pos]], dtype=torch.long), part, scale))
    return out


def gather_parts(obj: Any, layout: ProcessLayout) -> list:
    """Every rank's `obj`, in rank order (just [obj] for one process)."""
    if layout.world == 1:
        return [obj]
    box: list = [None] * layout.world
    dist.all_gather_object(box, obj)
    return box


@dataclass
class EpochStats:
    """What an epoch's steps add up: the recognition loss and its verb / noun / action parts and the QA loss, each
    as this rank's share of the global batches' means (they add up over ranks to the global means), and the number
    of questions that fell back to a template (a count, added up over ranks)."""

    loss: float = 0.0
    verb: float = 0.0
    noun: float = 0.0
    action: float = 0.0
    qa: float = 0.0
    fallbacks: float = 0.0

    def add(self, other: EpochStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def all_reduce(self, layout: ProcessLayout) -> None:
        """Sum every field over the ranks (float64, so shares add up without float32 rounding)."""
        if layout.world == 1:
            return
        names = [f.name for f in dataclasses.fields(self)]
        t = torch.tensor([getattr(self, n) for n in names], dtype=torch.float64)
        dist.all_reduce(t)
        for n, v in zip(names, t.tolist()):
            setattr(self, n, v)
