"""A run's files: the checkpoints (`TrainedModel` with its `TrainingState`), metrics.csv, train_config.json and the
live logs (`mambavl.train.logs`: TensorBoard or W&B, curves.png, train.log), written by rank 0; resuming a run (checked against the configuration and the caches it was
started with); the RNG states that make a resumed run replay exactly."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mambavl.cache.reader import CacheFile
from mambavl.errors import InputError, TrainingStopped
from mambavl.files import atomic_copy, atomic_write_text
from mambavl.runtime import RunProgress, TrainConfig, TrainedModel, TrainingState, plain, same_run
from mambavl.train.logs import RunLog
from mambavl.train.schedule import Optimizer


def on_cpu(tree):
    """`tree` (dicts, lists, tuples of tensors and plain values) with every tensor detached and copied to the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return type(tree)((k, on_cpu(v)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(on_cpu(v) for v in tree)
    return tree


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG a run draws from (torch, CUDA, numpy, Python, the sampling generator), as plain types and tensors."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    generator.set_state(state["generator"].cpu())


METRIC_COLUMNS = (
    "epoch", "step", "lr", "task", "question_source",
    "train_loss", "train_loss_verb", "train_loss_noun", "train_loss_action", "train_loss_qa",
    "rec_steps", "qa_steps", "batch_size", "passes", "question_fallbacks", "precision",
    "val_verb_top1", "val_verb_top5", "val_noun_top1", "val_noun_top5",
    "val_action_top1", "val_action_top5", "val_action_head_top1", "val_question_fallbacks",
    "epochs_without_improvement", "time_s",
)  # fmt: skip


def write_metrics_csv(history: list[dict], path: Path) -> None:
    """Rewrite metrics.csv from the whole history (atomic; a resumed run keeps earlier rows)."""
    columns = [c for c in METRIC_COLUMNS if any(c in row for row in history)]
    columns += sorted({k for row in history for k in row} - set(columns))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in columns})
    atomic_write_text(path, buf.getvalue())


class Checkpointer:
    """Writes the run folder on rank 0: train_config.json, last.pt every epoch (atomic, with the training state),
    best.pt when the selection metric improves, metrics.csv and the live logs (`RunLog`).
    `artifact` is the run's TrainedModel; each save stores the model's current weights and the run's progress in it."""

    def __init__(self, out_dir: Path, artifact: TrainedModel, cfg: TrainConfig, main: bool):
        self.out_dir, self.artifact, self.main = out_dir, artifact, main
        self.last, self.best = out_dir / "last.pt", out_dir / "best.pt"
        self.log: RunLog | None = None
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_dir / "train_config.json",
                              json.dumps(plain(dataclasses.asdict(cfg)), indent=2, sort_keys=True) + "\n")
            self.log = RunLog(out_dir, cfg)

    def save(self, model: nn.Module, opt: Optimizer, progress: RunProgress, sample_gen: torch.Generator,
             improved: bool) -> None:
        """Checkpoint the end of epoch `progress.epoch` and log its metrics row (`progress.history[-1]`).
        TrainingStopped when a file cannot be written (the previous one is kept)."""
        if not self.main:
            return
        # host copies: a checkpoint holds CPU tensors whatever device trained it (as `FirstPass.state`), so that
        # it loads anywhere without a map_location
        self.artifact.weights = on_cpu(model.state_dict())
        self.artifact.progress = progress
        training = TrainingState(rng=rng_state(sample_gen), **on_cpu(opt.states()))
        _written(self.last, lambda: self.artifact.save(self.last, training))
        if improved:
            _written(self.best, lambda: atomic_copy(self.last, self.best))
        write_metrics_csv(progress.history, self.out_dir / "metrics.csv")
        if self.log is not None:
            self.log.epoch(progress.history)

    def close(self, outcome: str | None = None) -> None:
        """Close the live logs, with `outcome` (e.g. the best validation metric) as train.log's last line."""
        if self.log is not None:
            if outcome:
                self.log.note(outcome)
            self.log.close()


def _written(path: Path, write) -> None:
    """write() (an atomic write of `path`); an OSError (a full disk, a quota) -> TrainingStopped saying that `path`
    is unchanged and what to do."""
    try:
        write()
    except OSError as exc:
        kept = f"{path} is unchanged" if path.exists() else f"no {path.name} was written"
        raise TrainingStopped(f"could not write {path} ({exc.strerror or exc}); {kept}. Free space or choose "
                              "another --out, then resume") from exc


def resume_point(cfg: TrainConfig, last_path: Path) -> tuple[TrainedModel, TrainingState] | None:
    """The run to continue (its last.pt, checked against `cfg` by `same_run`: epochs, patience and min_delta may
    change), or None for a fresh run. InputError
    when a fresh run would overwrite an existing one, when there is nothing to resume, or when `cfg` is not the
    run's own configuration (naming the first differing field)."""
    if not cfg.resume:
        if last_path.exists():
            raise InputError(
                f"{last_path.parent} already holds a run ({last_path.name}); resume it or choose another output folder"
            )
        return None
    if not last_path.is_file():
        raise InputError(f"cannot resume: {last_path} does not exist")
    artifact, training = TrainedModel.load_with_state(last_path)
    if training is None:
        raise InputError(f"cannot resume: {last_path} holds no training state (optimizer, schedule); train a new run")
    differs = same_run(artifact.train_config, cfg, resuming=True)
    if differs is not None:
        raise InputError(
            f"cannot resume {last_path}: {differs} is {plain(getattr(cfg, differs))!r} but the run was started with "
            f"{plain(getattr(artifact.train_config, differs))!r} (resume with the run's own settings)"
        )
    return artifact, training


def check_resumed_cache(artifact: TrainedModel, cache: CacheFile, run: Path) -> None:
    """InputError unless the training cache still holds what the resumed run was trained on: the same features, the
    same classes in the same order, and (when the run recorded it) the same annotation file. A cache re-extracted in
    place with the classes in another order would otherwise continue training head output i as another class."""
    artifact.check_cache(cache, f"run {run}", "train cache")
    recorded = artifact.annotation.get("sha256")
    now = str(cache.attrs.get("annotation_sha256") or "")
    if recorded and now and recorded != now:
        raise InputError(
            f"cannot resume {run}: train cache {cache.path} was extracted from another annotation file "
            f"({cache.attrs.get('annotation_file', '?')}, sha256 {now[:12]}...) than the run "
            f"({artifact.annotation.get('file', '?')}, sha256 {recorded[:12]}...); re-extract it from the run's "
            "annotations, or train a new run")
