"""`TrainConfig.compile`: the fusion compiled with `torch.compile` for a run's training steps.

`compile_for_training` compiles each fusion layer's arithmetic around the selective scan
(`mambavl.fuse.model.MambaVL.compile_fusion`) in inductor's default mode (`fusion`) or its "reduce-overhead" mode
(`cudagraphs`: the compiled parts are recorded as CUDA graphs and replayed, which needs CUDA). Under CUDA graphs a
step starts with `torch.compiler.cudagraph_mark_step_begin` (`mark_step`: the previous step's graph outputs may then
be overwritten) and validation runs the fusion eagerly (`eager_fusion`: the per-batch outputs it keeps would be
overwritten by the next replay).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mambavl.errors import InputError
from mambavl.runtime import Compile

# torch.compile's mode for each setting (inductor's modes).
MODES = {Compile.FUSION: "default", Compile.CUDAGRAPHS: "reduce-overhead"}


def compile_for_training(model: nn.Module, mode: Compile, device: torch.device) -> None:
    """Compile `model`'s fusion for the run's steps (nothing for `Compile.OFF`).

    InputError (exit 2) for `cudagraphs` on a device other than CUDA (CUDA graphs are a CUDA feature; `fusion`
    compiles for the CPU too)."""
    mode = Compile(mode)
    if mode is Compile.OFF:
        return
    if mode is Compile.CUDAGRAPHS and device.type != "cuda":
        raise InputError(f"compile cudagraphs needs a CUDA device (this run is on {device}); use --compile fusion "
                         "(or off) there")
    model.compile_fusion(mode=MODES[mode])


def mark_step(mode: Compile) -> None:
    """Begin a training step: under `cudagraphs`, tell the CUDA-graph runtime that the previous step's outputs are
    no longer read (`torch.compiler.cudagraph_mark_step_begin`); nothing otherwise."""
    if mode is Compile.CUDAGRAPHS:
        torch.compiler.cudagraph_mark_step_begin()


def eager_fusion(mode: Compile) -> contextlib.AbstractContextManager:
    """The context of a validation pass: the compiled fusion runs eagerly under `cudagraphs` (the pass keeps every
    batch's outputs, which a graph's next replay would overwrite); the compiled code as it is otherwise."""
    if mode is Compile.CUDAGRAPHS:
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()
