"""CLI commands of the train stage (registered on `mambavl.cli.app`).

`mambavl train` builds a `TrainConfig` from its options and calls `mambavl.train.train`; the only logic here is
`--resume` (the run's own config is read from last.pt, explicit options must agree with it) and the rich progress.
Multi-GPU: ``torchrun --nproc_per_node=G --no-python mambavl train ...`` (each process reads WORLD_SIZE/RANK).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mambavl.cli import EXIT_TRAINING_STOPPED, app, defaults_from, fail, optional_path, positive
from mambavl.cli.config_file import ConfigOption, build_config, precision_option, read_config_file
from mambavl.cli.progress import rich_progress
from mambavl.errors import InputError, TrainingStopped
from mambavl.extract.questions import QuestionSource
from mambavl.runtime import Compile, RunLogger, Task, TrainConfig


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings -> dict; values are read as JSON (numbers, true/false, null) and fall back to text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}", param_hint="--set")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _resume_config(out: Path, explicit: dict[str, Any]) -> TrainConfig:
    """The run's config from out/last.pt; an explicit option that disagrees with it (`same_run`) is an error, not an
    override. Cache paths may differ (a moved cache): what the caches hold is checked when the run resumes."""
    from mambavl.runtime import RESUME_FIELDS, TrainedModel, plain, same_run

    saved = TrainedModel.load(out / "last.pt").train_config
    device, num_workers = explicit.pop("device", TrainConfig.device), explicit.pop("num_workers", None)
    if "model_overrides" in explicit:
        explicit = {**explicit, "model_overrides": {**saved.model_overrides, **explicit["model_overrides"]}}
    differs = same_run(saved, dataclasses.replace(saved, **explicit), resuming=True)
    if differs is not None:
        if differs == "model_overrides":
            raise InputError(f"--set {explicit['model_overrides']} differs from the run's model overrides "
                             f"{saved.model_overrides}")
        option = "--" + differs.replace("_", "-")
        raise InputError(f"{option} {plain(explicit[differs])!r} differs from the run being resumed "
                         f"({plain(getattr(saved, differs))!r}); drop the option")
    changes: dict[str, Any] = {"resume": True, "device": device, "out_dir": str(out)}
    # a resume may change the budget and the early stopping (recorded in the run; the schedule is re-planned)
    changes.update({k: explicit[k] for k in RESUME_FIELDS if k in explicit})
    if num_workers is not None:
        changes["num_workers"] = num_workers
    for key in ("train_cache", "val_cache"):
        if explicit.get(key) is not None:
            changes[key] = str(explicit[key])
    if explicit.get("logger") is not None:
        changes["logger"] = RunLogger(explicit["logger"])
    if explicit.get("compile") is not None:
        changes["compile"] = Compile(explicit["compile"])
    return dataclasses.replace(saved, **changes)


def _config(out: Path, explicit: dict[str, Any], resume: bool, config: Optional[Path], quiet: bool) -> TrainConfig:
    """The TrainConfig of the command: the resumed run's own, or a new one from the explicit options over the
    `--config` file over the dataclass's defaults (the config dataclass owns every default). Under --resume the
    file's settings count as options: they must be the run's own."""
    from_file = read_config_file(config, TrainConfig) if config is not None else {}
    if resume:
        where = {k: v for k, v in from_file.items() if k not in ("out_dir", "resume", "device", "num_workers")}
        return _resume_config(out, {**where, **explicit})
    if explicit.get("train_cache") is None and from_file.get("train_cache") is None:
        raise typer.BadParameter("--train-cache is required (unless --resume)", param_hint="--train-cache")
    cfg = build_config(TrainConfig, config, {**explicit, "out_dir": str(out), "resume": False},
                       unset={"val_cache": None})
    if cfg.question_source == QuestionSource.PREDICTED and not quiet:
        typer.echo(f"self-questioning: training {cfg.candidate_folds} video-only first-pass models (one per "
                   f"fold) before the run; this takes a while", err=True)
    return cfg


# The options of the run's length (the budget, the step floor and early stopping), shared help texts.
EpochsOption = Annotated[Optional[int], typer.Option(
    min=1, help="Epochs. With --resume: a new budget; the learning-rate schedule is re-planned from the "
                "current step and the change is recorded in last.pt.")]
PatienceOption = Annotated[Optional[int], typer.Option(
    min=0, help="Early stopping: stop after this many epochs in a row without improvement of the validation "
                "selection metric (0 = off; needs --val-cache).")]
MinDeltaOption = Annotated[Optional[float], typer.Option(
    "--min-delta", min=0.0, help="Early stopping: the rise (percentage points) that counts as an "
                                 "improvement.")]
MinStepsOption = Annotated[Optional[int], typer.Option(
    "--min-steps", min=0, help="Fewest recognition steps of the run: on small data the batch shrinks "
                               "(not below 8) and epochs make several passes; 0 = off.")]


@app.command("train")
@defaults_from(TrainConfig, questions="question_source", set_="model_overrides")
def train_command(
    out: Annotated[Path, typer.Option("--out", help="Run folder: last.pt, best.pt, metrics.csv.")],
    train_cache: Annotated[Optional[Path], typer.Option("--train-cache", help="Training feature cache (.h5).")] = None,
    val_cache: Annotated[
        Optional[Path], typer.Option("--val-cache", help="Validation cache (.h5); best.pt is chosen on it.")
    ] = None,
    preset: Annotated[Optional[str], typer.Option(help="Model preset (small, base, paper, ...).")] = None,
    epochs: EpochsOption = None,
    patience: PatienceOption = None,
    min_delta: MinDeltaOption = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Batch size per process.")] = None,
    lr: Annotated[Optional[float], typer.Option(callback=positive, help="Peak learning rate (AdamW).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.")] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option("--warmup-epochs", min=0.0, help="Linear warm-up epochs.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from last.pt.")] = False,
    seed: Annotated[Optional[int], typer.Option(min=0, help="Random seed.")] = None,
    task: Annotated[Optional[Task], typer.Option(help="recognition or anticipation.")] = None,
    questions: Annotated[
        Optional[QuestionSource],
        typer.Option(help="Question protocol: templates (label-free), predicted (self-questioning: the template plus "
                          "the top-k candidates of a video-only first pass; label-free), annotation (paper's), file."),
    ] = None,
    candidates_k: Annotated[
        Optional[int], typer.Option("--candidates-k", min=1, help="predicted: candidates per head.")
    ] = None,
    candidate_folds: Annotated[
        Optional[int],
        typer.Option("--candidate-folds", min=2, help="predicted: cross-fitting folds for the training rows' candidates."),
    ] = None,
    candidate_epochs: Annotated[
        Optional[int], typer.Option("--candidate-epochs", min=0, help="predicted: first-pass epochs (0 = --epochs).")
    ] = None,
    candidates_from: Annotated[
        Optional[Path],
        typer.Option("--candidates-from", help="predicted: a trained checkpoint used as the first pass for "
                                               "evaluation (training rows still get cross-fitted candidates)."),
    ] = None,
    qa_weight: Annotated[Optional[float], typer.Option("--qa-weight", min=0.0, help="QA loss weight; 0 = no QA.")] = None,
    qa_every: Annotated[
        Optional[int], typer.Option("--qa-every", min=1, help="One QA step after every N recognition steps.")
    ] = None,
    frames: Annotated[
        Optional[int], typer.Option(min=0, help="Frame tokens the model sees, sub-sampled from the cache (0 = all).")
    ] = None,
    min_steps: MinStepsOption = None,
    precision: precision_option("the forward passes (weights and scan state stay float32; fp16 scales the loss)",
                                "bf16 on CUDA, fp16 on GPUs without bf16") = None,
    compile_: Annotated[Optional[Compile], typer.Option(
        "--compile", help="torch.compile of the fusion around the scan: off, fusion (CPU or CUDA; the first steps "
                          "pay the compile), cudagraphs (CUDA: compiled parts replayed as CUDA graphs).")] = None,
    logger: Annotated[Optional[RunLogger], typer.Option(
        help="Live scalars besides metrics.csv: tensorboard, wandb (WANDB_MODE=offline works without "
             "network), none.")] = None,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", min=0, help="DataLoader workers.")] = None,
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Model override key=value (repeatable), e.g. d_model=128.")
    ] = None,
    allow_incomplete: Annotated[Optional[bool], typer.Option(
        "--allow-incomplete", help="Train (and validate) on the finished rows of a cache whose extraction did not "
                                   "finish; recorded in train_config.json.")] = None,
    config: ConfigOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or per-epoch lines.")] = False,
) -> None:
    """Train the MambaVL fusion on a feature cache."""
    # Under torchrun only rank 0 talks.
    quiet = quiet or int(os.environ.get("RANK", "0")) != 0
    options = dict(
        train_cache=optional_path(train_cache), val_cache=optional_path(val_cache), preset=preset, epochs=epochs,
        patience=patience, min_delta=min_delta, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, seed=seed, task=task, question_source=questions, candidates_k=candidates_k,
        candidate_folds=candidate_folds, candidate_epochs=candidate_epochs,
        candidates_from=optional_path(candidates_from), qa_weight=qa_weight, qa_every=qa_every, frames=frames,
        min_steps=min_steps, precision=precision, compile=compile_, logger=logger,
        model_overrides=parse_overrides(set_) if set_ else None,
        allow_incomplete=allow_incomplete, device=device, num_workers=num_workers,
    )
    explicit = {k: v for k, v in options.items() if v is not None}
    try:
        result = _run(_config(out, explicit, resume, config, quiet), quiet)
    except InputError as exc:
        raise fail(str(exc)) from None
    except TrainingStopped as exc:
        raise fail(str(exc), EXIT_TRAINING_STOPPED) from None
    if not quiet:
        for line in _run_notes(result):
            typer.echo(line)


def _run_notes(result) -> list[str]:
    """What a resume changed (the latest resume's changes), how the run stopped early, its best metric and its
    checkpoints, as lines."""
    from mambavl.train.logs import in_terms

    lines = []
    done = result.history[-1]["epoch"] if result.history else 0
    if result.changes:
        at = result.changes[-1]["step"]
        latest = [c for c in result.changes if c["step"] == at]
        trained = done > latest[0]["epoch"]  # an epoch after the change was saved, and the change with it
        for c in latest:
            lines.append(f"resumed after epoch {c['epoch']} (step {c['step']}) with {c['field']} {c['to']} instead of "
                         f"{c['from']}" + ("; learning-rate schedule re-planned from there" if c["field"] == "epochs"
                                           else "") + (" (recorded in last.pt)" if trained else ""))
        if not trained and result.stopped_early is None:
            lines.append(f"nothing to train: the run has done {done} epochs already (last.pt unchanged)")
    stop = result.stopped_early
    if stop is not None:
        metric = in_terms(stop["metric"], result.heads)
        lines.append(f"stopped early after epoch {stop['epoch']}: {metric} did not rise by more than "
                     f"{stop['min_delta']:g} for {stop['epochs_without_improvement']} epochs (--patience "
                     f"{stop['patience']}); best at epoch {stop['best_epoch']}")
    best = "n/a" if result.best_metric is None else f"{result.best_metric:.2f}"
    lines += [f"best {in_terms(result.best_metric_name, result.heads)}: {best}",
              f"last checkpoint: {result.last_checkpoint}"]
    if result.best_checkpoint is not None:
        lines.append(f"best checkpoint: {result.best_checkpoint}")
    return lines


def _epoch_status(fields: dict) -> str | None:
    return f"epoch {fields['epoch']}/{fields['epochs']}" if "epoch" in fields else None


def _epoch_report(fields: dict) -> str | None:
    from mambavl.train.logs import epoch_line

    return epoch_line(fields["metrics"], fields.get("heads")) if "metrics" in fields else None


def _run(cfg: TrainConfig, quiet: bool):
    """Call the library with a rich progress bar (stderr) and one line per epoch, unless quiet."""
    from mambavl.train import train

    with rich_progress("train", quiet, describe=_epoch_status, log=_epoch_report, transient=False) as bar:
        return train(cfg, progress=bar)
