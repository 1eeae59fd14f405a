"""Device choice shared by every stage: "auto" is CUDA when available, else the CPU; and the process group of a
torchrun launch, joined once per process."""

from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as dist

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


def join_process_group(backend: str, timeout: datetime.timedelta | None = None, rank: int | None = None,
                       world_size: int | None = None) -> None:
    """Join torch.distributed's default process group from the launcher's environment (torchrun: RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT), unless this process is already in one (then that group is used as it is).

    The group is kept until the process exits, so that several runs in one process (train, then train again, or
    extraction then training) share it. Destroying it and creating a new one under the same launch is unsafe:
    torch numbers the new default group like the old one (`destroy_process_group` resets the group counter), so
    its gloo rendezvous keys in the launcher's store are the old group's, and a rank can read a peer's stale
    address and fail with "Connection refused" or wait forever. backend: "gloo" or "nccl"; timeout: of collective
    operations (torch's default when None); rank, world_size: as torch's init_process_group (default: from the
    environment). RuntimeError when an existing group's rank or size differs from the ones given."""
    if dist.is_initialized():
        if (rank, world_size) != (None, None) and (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RuntimeError(f"this process is rank {dist.get_rank()} of {dist.get_world_size()} in its process "
                               f"group, not {rank} of {world_size}")
        return
    kwargs = {} if timeout is None else {"timeout": timeout}
    if rank is not None:
        kwargs.update(rank=rank, world_size=world_size)
    dist.init_process_group(backend=backend, **kwargs)
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def available_memory_bytes() -> int:
    """Memory the OS could give this process now (Linux MemAvailable; elsewhere the free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
