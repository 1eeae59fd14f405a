"""Device choice shared by every stage: "auto" is CUDA when available, else the CPU; the numeric precision a stage
runs its networks in (`Precision`, `resolve_precision`, `autocast`); and the process group of a torchrun launch,
joined once per process."""

from __future__ import annotations

import atexit
import contextlib
import datetime

import torch
import torch.distributed as dist

from mambavl.errors import InputError
from mambavl.precision import Precision, as_precision  # noqa: F401  (re-exported)


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


AUTOCAST_DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def resolve_precision(precision: str | Precision, device: torch.device,
                      on_cuda: Precision = Precision.FP32) -> Precision:
    """The concrete precision (fp32, bf16 or fp16) a stage runs in on `device`.

    auto: `on_cuda` on a CUDA device (bf16 falls back to fp16 on a GPU without bf16), fp32 elsewhere. InputError
    (exit 2) for a precision the device cannot run usefully: fp16 off CUDA (CPU autocast emulates fp16 matmuls, ~6x
    slower than fp32 where bf16 is ~2x faster: use bf16 there), bf16 on a GPU without bf16, and autocast on a device
    other than cpu or cuda."""
    p = as_precision(precision)
    cuda = device.type == "cuda"
    if p is Precision.AUTO:
        p = on_cuda if cuda else Precision.FP32
        if p is Precision.BF16 and not torch.cuda.is_bf16_supported():
            p = Precision.FP16
    if p is Precision.FP32:
        return p
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"precision {p.value} on device {device}: mixed precision runs on cpu and cuda only; "
                         "use --precision fp32 there")
    if p is Precision.FP16 and not cuda:
        raise InputError(f"precision fp16 needs a CUDA device (this run is on {device}): on the CPU fp16 is "
                         "emulated and slower than fp32; use --precision bf16 (or fp32) there")
    if p is Precision.BF16 and cuda and not torch.cuda.is_bf16_supported():
        raise InputError(f"precision bf16: the GPU {device} does not support bfloat16; use --precision fp16 "
                         "(with loss scaling) or fp32")
    return p


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in at a concrete `precision` (from `resolve_precision`): torch.autocast
    with its dtype on `device`, or nothing for fp32 (also on devices autocast does not know, e.g. meta)."""
    if precision is Precision.FP32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


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
