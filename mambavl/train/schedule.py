"""The optimiser and the step schedule: AdamW with no-decay tags, warm-up + cosine, mixed precision, gradient
clipping, and how an epoch is cut into steps (`plan_steps`, the step floor for small data)."""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mambavl.device import Precision, autocast, resolve_precision
from mambavl.fuse.ops import scalar
from mambavl.runtime import TrainConfig, TrainingState
from mambavl.train.flat_adamw import FlatAdamW, flat_adamw_supported


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers; hashing keeps streams (seed, epoch, purpose, rank) independent."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: no weight decay for parameters tagged `_no_weight_decay` (A_log, D, norms, biases, as
    mamba-ssm tags them where they are defined) or with fewer than 2 dims; decay for the rest."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "_no_weight_decay", False) or p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# The smallest batch `plan_steps` shrinks to: smaller batches make noisy steps without making them much cheaper.
MIN_BATCH = 8


@dataclass(frozen=True)
class StepPlan:
    """How an epoch is cut into recognition steps: `passes` passes over the rows in batches of `batch_size`."""

    batch_size: int
    passes: int
    steps_per_epoch: int


def plan_steps(rows: int, batch_size: int, epochs: int, min_steps: int) -> StepPlan:
    """Batch size and passes per epoch so that a run makes at least `min_steps` recognition steps.

    rows: training rows per process. With `epochs * ceil(rows / batch_size) >= min_steps` (or min_steps 0) nothing
    changes: one pass, the given batch. Otherwise the batch shrinks towards rows * epochs / min_steps, not below
    MIN_BATCH (nor above the given batch), and when that is still short each epoch makes `passes` passes over the rows,
    each in its own order and with its own frame draws. Measured (docs/model.md): on 72 clips the default batch of 64
    gives 40 steps in 20 epochs and every model stays at the majority class; 1000 steps reach the linear probe.
    """
    steps = math.ceil(rows / batch_size)
    if min_steps <= 0 or steps * epochs >= min_steps:
        return StepPlan(batch_size, 1, steps)
    batch = min(batch_size, max(MIN_BATCH, (rows * epochs) // min_steps))
    steps = math.ceil(rows / batch)
    passes = max(1, math.ceil(min_steps / (steps * epochs)))
    return StepPlan(batch, passes, steps * passes)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then cosine decay to `min_lr_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def replanned_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float,
                     replan: dict | None) -> float:
    """`lr_factor`, or after a re-plan (`replan`: step, factor, total_steps; a resumed run that changed its epochs)
    a cosine from the factor the old plan had reached at that step down to `min_lr_ratio` at the new last step, so
    the rate goes on from where it was instead of jumping to the new plan's value."""
    if replan is None or step < int(replan["step"]):
        return lr_factor(step, total_steps, warmup_steps, min_lr_ratio)
    start, f0, total = int(replan["step"]), float(replan["factor"]), int(replan["total_steps"])
    progress = min(max((step - start) / max(1, total - start), 0.0), 1.0)
    return min_lr_ratio + (f0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def replan(step: int, old_total: int, new_total: int, warmup_steps: int, min_lr_ratio: float,
           previous: dict | None) -> dict | None:
    """The re-plan of a schedule whose length changes from `old_total` to `new_total` steps at `step` (steps
    taken): None when nothing changes for the steps ahead (same length, or still warming up: the warm-up does not
    depend on the length), else the `replanned_factor` record."""
    if new_total == old_total or (previous is None and step < warmup_steps):
        return previous
    factor = replanned_factor(step, old_total, warmup_steps, min_lr_ratio, previous)
    return {"step": int(step), "factor": float(factor), "total_steps": int(new_total)}


def adamw(groups: list[dict], lr: float) -> tuple[torch.optim.AdamW, bool]:
    """AdamW over `groups`, and whether it is torch's fused implementation (one kernel call updates every parameter;
    torch >= 2.4 on CPU, CUDA and MPS); else the multi-tensor one where torch has it, else the per-parameter loop.
    The three compute the same update up to float rounding. Fused only where every parameter is on a CPU or CUDA
    device (torch checks other devices at the first step, not here)."""
    on = {p.device.type for g in groups for p in g["params"]}
    if not on <= {"cpu", "cuda"}:
        return torch.optim.AdamW(groups, lr=lr), False
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True), True
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the fused kernel
        return torch.optim.AdamW(groups, lr=lr), False


def clip_coefficient(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (‖g‖ + 1e-6)) over the gradients of `params` (0-dim tensor), as `clip_grad_norm_` scales
    them: the norm of all gradients flattened into one vector, one reduction instead of one per parameter."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.ones(())
    return clip_scale(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])), max_norm)


def clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (norm + 1e-6)) for the gradients' total norm (0-dim), `clip_grad_norm_`'s coefficient."""
    return torch.div(scalar(max_norm, norm), norm + scalar(1e-6, norm)).clamp_max(1.0)


class NonFiniteLoss(ArithmeticError):
    """A training loss that is NaN or inf (raised before the step; the loop adds the epoch and step)."""


class Optimizer:
    """AdamW (no decay for tagged parameters), warm-up + cosine schedule per recognition step, the run's precision
    (`TrainConfig.precision`: autocast of the forward passes, fp16 with loss scaling) and gradient clipping."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, total_steps: int, warmup_steps: int, device: torch.device,
                 lr_replan: dict | None = None):
        self.model, self.grad_clip, self.device_type = model, cfg.grad_clip, device.type
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = device
        # auto: bf16 on CUDA (fp16 where the GPU has no bf16), fp32 elsewhere
        self.precision = resolve_precision(cfg.precision, device, on_cuda=Precision.BF16)
        # bf16 keeps fp32's range and needs no loss scaling; fp16 does (its gradients underflow otherwise)
        self.scaler = torch.amp.GradScaler(device.type if device.type in ("cpu", "cuda") else "cpu",
                                           enabled=self.precision is Precision.FP16)
        groups = param_groups(model, cfg.weight_decay)
        # One flat buffer where nothing else touches the gradients (DistributedDataParallel writes them itself, the
        # fp16 scaler unscales them per parameter): a dozen ops per step instead of ~7 per parameter.
        distributed = dist.is_available() and dist.is_initialized()
        if self.params and not distributed and not self.scaler.is_enabled() and flat_adamw_supported(self.params):
            self.optimizer, self.fused = FlatAdamW(groups, cfg.lr), False
        else:
            self.optimizer, self.fused = adamw(groups, cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: replanned_factor(s, total_steps, warmup_steps, cfg.min_lr_ratio, lr_replan)
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of the run's forward passes (`mambavl.device.autocast` at the run's precision)."""
        return autocast(self.precision, self.device)

    def step(self, loss: torch.Tensor) -> None:
        """One optimiser step on `loss` (the schedule advances separately, per recognition step: `schedule`).

        NonFiniteLoss (before any gradient is applied) when the loss is NaN or inf on any process."""
        value = float(loss.detach())  # the step's one read of a device value (a scalar loss)
        finite = math.isfinite(value)
        if dist.is_available() and dist.is_initialized():
            bad = torch.tensor([0.0 if finite else 1.0], device=loss.device)
            dist.all_reduce(bad)  # every rank stops together, none waits in the gradient all-reduce
            finite = float(bad) == 0
        if not finite:
            raise NonFiniteLoss(value)
        if isinstance(self.optimizer, FlatAdamW):
            self.optimizer.zero_grad()
            loss.backward()
            scale = clip_scale(self.optimizer.grad_norm(), self.grad_clip) if self.grad_clip > 0 else None
            self.optimizer.step(scale=scale)
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0 and self.fused and not self.scaler.is_enabled():
            # torch's fused AdamW divides every gradient by `grad_scale` inside its kernel (the hook GradScaler
            # uses): clipping then costs one norm instead of a multiply per parameter.
            self.optimizer.grad_scale = 1.0 / clip_coefficient(self.params, self.grad_clip)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale
            return
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def schedule(self) -> None:
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def states(self) -> dict:
        """The optimizer, scheduler and gradient-scaler states (`TrainingState` fields of the same names)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }

    def restore(self, state: TrainingState) -> None:
        """Continue from a checkpoint's training state."""
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if state.scaler:
            self.scaler.load_state_dict(state.scaler)
        if isinstance(self.optimizer, FlatAdamW):
            return
        # A saved state carries the implementation flags of the run that wrote it: use this machine's choice.
        for group in self.optimizer.param_groups:
            group["fused"], group["foreach"] = (True, None) if self.fused else (None, group.get("foreach"))
        if self.fused:  # the fused kernel keeps each step count as a float32 tensor on the parameter's device
            for p, st in self.optimizer.state.items():
                if "step" in st:
                    st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(p.device)
