"""The `--precision` choices (`Precision`), torch-free so that the run configuration and a command's --help can
name them without importing torch; `mambavl.device` maps them to autocast dtypes per device."""

from __future__ import annotations

from enum import Enum

from mambavl.errors import InputError

__all__ = ["Precision", "as_precision"]


class Precision(str, Enum):
    """The precision a stage runs its networks in (`--precision`). fp32: no autocast. bf16 / fp16: torch.autocast
    with that dtype (weights, optimiser state and the selective scan's state stay float32; fp16 training scales the
    loss). auto: the stage's own choice on CUDA (`resolve_precision`'s `on_cuda`), fp32 elsewhere."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


def as_precision(value: str | Precision, where: str = "precision") -> Precision:
    """`value` as a Precision; InputError naming `where` and the choices otherwise."""
    try:
        return Precision(value)
    except ValueError:
        raise InputError(f"{where} {value!r} is not one of {[p.value for p in Precision]}") from None
