"""A run's live logs, written by rank 0 after every epoch beside metrics.csv (`mambavl.train.state`):

| file | what |
|---|---|
| `tensorboard/` | TensorBoard event files (`logger` tensorboard, the default): every numeric column of the epoch's metrics row (losses, validation top-1/top-5, batch size, question fallbacks...), the learning rate and the seconds per optimiser step, against the epoch |
| W&B run | the same scalars through `wandb.log` (`logger` wandb; `WANDB_MODE=offline` writes under out_dir/wandb without network; a resumed run continues the same W&B run, whose id is kept in out_dir/wandb-run-id.txt) |
| `curves.png` | training losses and validation top-1 per epoch, redrawn every epoch |
| `train.log` | the console's lines: the run's settings, one line per epoch (`epoch_line`), appended on resume |

A resumed run appends to each (TensorBoard's files are per process, so the curves continue).
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from mambavl import __version__
from mambavl.plots import training_curves_plot
from mambavl.runtime import RunLogger, TrainConfig, plain

# Row fields that are positions or counters of the run, not scalars to plot.
NOT_SCALARS = ("epoch", "step")


def in_terms(key: str, heads: dict[str, str] | None) -> str:
    """A metric name with the heads named as the dataset names them (`mambavl.cache.schema.head_names`:
    val_verb_top1 -> val_label_top1 for a generic clip CSV; metrics.csv keeps the internal names)."""
    return "_".join((heads or {}).get(p, p) for p in key.split("_"))


def epoch_line(row: dict[str, Any], heads: dict[str, str] | None = None) -> str:
    """One epoch's console line: "epoch 3  loss 1.2345  loss_qa 0.5000  verb_top1 50.00 ... 12.3s" (heads named by
    `heads`, see `in_terms`)."""
    parts = [f"epoch {row['epoch']}", f"loss {row.get('train_loss', float('nan')):.4f}"]
    for key in ("train_loss_qa", "val_verb_top1", "val_noun_top1", "val_action_top1"):
        if key in row:
            parts.append(f"{in_terms(key, heads).removeprefix('train_').removeprefix('val_')} {row[key]:.2f}")
    parts.append(f"{row.get('time_s', 0):.1f}s")
    return "  ".join(parts)


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics row, plus `step_time_s` (the epoch's seconds per optimiser step, recognition
    and QA steps together)."""
    out = {k: float(v) for k, v in row.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_SCALARS}
    steps = int(row.get("rec_steps", 0) or 0) + int(row.get("qa_steps", 0) or 0)
    if steps and "time_s" in row:
        out["step_time_s"] = float(row["time_s"]) / steps
    return out


class RunLog:
    """The live logs of one run folder (see the module docstring); construct on rank 0 only."""

    def __init__(self, out_dir: Path, cfg: TrainConfig):
        self.out_dir = out_dir
        self.tensorboard = (SummaryWriter(log_dir=str(out_dir / "tensorboard"))
                            if cfg.logger is RunLogger.TENSORBOARD else None)
        self.wandb = _wandb_run(out_dir, cfg) if cfg.logger is RunLogger.WANDB else None
        settings = json.dumps(plain(dataclasses.asdict(cfg)), sort_keys=True)
        self._append(f"mambavl {__version__} train{' (resumed)' if cfg.resume else ''}: {settings}")

    def _append(self, line: str) -> None:
        with open(self.out_dir / "train.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def epoch(self, history: list[dict[str, Any]]) -> None:
        """Log the last row of `history` (the whole history redraws curves.png)."""
        row = history[-1]
        values = scalars(row)
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, row["epoch"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({**values, "epoch": row["epoch"]}, step=int(row["step"]))
        training_curves_plot(self.out_dir / "curves.png", history)
        self._append(epoch_line(row))

    def note(self, line: str) -> None:
        """A line of the run's outcome (e.g. the best checkpoint) into train.log."""
        self._append(line)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(out_dir: Path, cfg: TrainConfig) -> Any:
    """A W&B run for `out_dir` (the same one when the run is resumed), project $WANDB_PROJECT or "mambavl"."""
    import wandb  # optional dependency (mambavl[wandb]); TrainConfig refuses logger wandb without it

    id_file = out_dir / "wandb-run-id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:16]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "mambavl"), name=out_dir.name, id=run_id,
                      dir=str(out_dir), config=plain(dataclasses.asdict(cfg)), resume="allow")
