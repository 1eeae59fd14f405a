"""The training loop: set-up, then per epoch the recognition steps (a QA step after every `qa_every`-th),
validation and a checkpoint (see the package docstring of `mambavl.train` for the objectives, the question protocol,
reproducibility and the distributed layout)."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mambavl import __version__
from mambavl.cache import schema
from mambavl.cache.dataset import SegmentDataset
from mambavl.cache.reader import releases_caches
from mambavl.data.sampling import gather_frames, train_frame_indices
from mambavl.device import resolve_device
from mambavl.errors import TrainingStopped, check_writable
from mambavl.extract.questions import QuestionSource
from mambavl.extract.spec import FeatureSpec
from mambavl.fuse.config import ModelConfig, question_is_offset
from mambavl.progress import NO_PROGRESS, Progress, or_none
from mambavl.runtime import (
    RESUME_FIELDS,
    RunProgress,
    TrainConfig,
    TrainedModel,
    Vocabulary,
    build_model,
    clip_batches,
    feature_statistics,
    head_logits,
    loader,
    plain,
    question_tokens,
    validation_metrics,
)
from mambavl.train.compiled import compile_for_training, eager_fusion, mark_step
from mambavl.train.data import RunData, load_data
from mambavl.train.distributed import EpochStats, ProcessLayout, StepPart, gather_parts, global_batches
from mambavl.train.objective import Objective, qa_loss_share, recognition_loss
from mambavl.train.schedule import NonFiniteLoss, Optimizer, StepPlan, mix_seed, plan_steps, replan
from mambavl.train.stopping import early_stop, epochs_without_improvement
from mambavl.train.state import Checkpointer, resume_point, set_rng_state


@dataclass
class TrainResult:
    """Outcome of `train`: best validation metric (action top-1, or verb top-1 without nouns; None without a
    validation cache), checkpoint paths (None where not written, e.g. on ranks > 0 or without validation for best),
    one metrics dict per epoch (the rows of metrics.csv), the name of the selection metric, the trained model
    (unwrapped, on its device), the early stop (None, or `RunProgress.stopped_early`), the settings resumes
    changed (`RunProgress.changes`) and what the dataset calls the heads (`schema.head_names`: "label" for the verb
    head of a generic clip CSV)."""

    best_metric: float | None
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    history: list[dict]
    best_metric_name: str = "val_action_top1"
    model: nn.Module | None = field(default=None, repr=False)
    stopped_early: dict | None = None
    changes: list[dict] = field(default_factory=list)
    heads: dict[str, str] = field(default_factory=lambda: schema.head_names("ek100"))


def question_warning(mcfg: ModelConfig, source: QuestionSource) -> str | None:
    """Why a configuration cannot use its questions, or None. With template questions every clip is asked the same
    question per head; in a fusion where the question only adds its own term (`question_is_offset`: the parallel
    layout, preset `paper`) that term is then a constant, so `h_verb - h_noun` is the same vector for every clip."""
    if QuestionSource(source) != QuestionSource.TEMPLATES or not question_is_offset(mcfg):
        return None
    return ("this configuration cannot use its questions: in the parallel layout (preset 'paper') the question "
            "stream never sees the video, and with template questions (one fixed question per head) its pooled output "
            "is the same vector for every clip, so the model is video-only plus a per-head bias. Use the joint layout "
            "(preset 'small'), or questions that differ per clip (--questions annotation / file), to let the question "
            "change how the video is read. See docs/model.md.")


# ----------------------------------------------------------------------------------------------------------------
# steps


@dataclass
class StepBatch:
    """One training batch on the device: this rank's cache rows (B,), sub-sampled video (B, K, D) and mask (B, K),
    and where they sit in the global batch."""

    rows: torch.Tensor
    video: torch.Tensor
    vmask: torch.Tensor
    part: StepPart


def recognition_step(objective: nn.Module, opt: Optimizer, data: RunData, cfg: TrainConfig, batch: dict,
                     p: StepPart, sample_gen: torch.Generator, device: torch.device
                     ) -> tuple[StepBatch, torch.Tensor, EpochStats]:
    """Sub-sample frames, pick the heads' questions, one optimiser step on the recognition loss. Frames and
    paraphrases are drawn for the whole global batch (every rank draws the same) and each rank keeps its part, so
    the draws are those of one process with the global batch. Returns the batch (reused by a QA step), the loss
    and what the step adds to the epoch's statistics."""
    rows = batch["index"].to(torch.long)  # (B,) cache rows of this rank
    feats = batch["features"].to(device, non_blocking=True).float()  # (B, F, D), widened on the device
    idx, vmask = train_frame_indices(p.num_frames, feats.shape[1], cfg.frames, sample_gen)  # (G, K)
    video, vmask = gather_frames(feats, idx[p.part].to(device)), vmask[p.part].to(device)  # (B, K, D), (B, K)
    q = data.train_q.heads(p.grows, train=True, generator=sample_gen)[0][p.part]  # (B, 2)
    fb = data.train_q.fallbacks(rows) if p.scale else 0
    qt, qm = data.train_q.tokens_of(q, rows, device)  # (B, 2, T', Dt), (B, 2, T')
    mark_step(cfg.compile)
    with opt.autocast():
        out = objective("rec", video, vmask, qt, qm)
    loss = recognition_loss(out, rows, p, data.train_labels, cfg.label_smoothing, device)
    opt.step(loss.total)
    opt.schedule()
    stats = EpochStats(loss=loss.share, verb=loss.verb, noun=loss.noun, action=loss.action, fallbacks=fb)
    return StepBatch(rows, video, vmask, p), loss.total, stats


def qa_step(objective: nn.Module, opt: Optimizer, data: RunData, answers: Any, cfg: TrainConfig, b: StepBatch,
            sample_gen: torch.Generator, device: torch.device) -> float:
    """One QA step on the batch: a question kind drawn for the whole batch, answers scored against its table
    (`answers`: the asker's AnswerTables on the device), one optimiser step on `qa_weight` x the QA loss. Returns this
    rank's share of the global batch's (unweighted) QA loss."""
    kind = data.qa_kinds[int(torch.randint(len(data.qa_kinds), (1,), generator=sample_gen))]
    qk = data.train_q.template(kind, len(b.part.grows), train=True, generator=sample_gen)[b.part.part]  # (B,)
    qkt, qkm = data.train_q.gather(qk, device)  # (B, T, Dt), (B, T)
    mark_step(cfg.compile)
    with opt.autocast():
        mode = "scene" if data.spec.is_multi_label(kind) else "qa"
        logits = objective(mode, b.video, b.vmask, qkt, qkm, answers.for_kind(kind))  # (B, K)
    lq = qa_loss_share(kind, logits, b.rows, b.part, data.train_labels, device)
    opt.step(cfg.qa_weight * lq)
    return float(lq.detach()) / b.part.scale if b.part.scale else 0.0


def validate(model: nn.Module, val_dataset: SegmentDataset | None, data: RunData, cfg: TrainConfig,
             device: torch.device, layout: ProcessLayout) -> dict | None:
    """Validation metrics of the epoch over the whole split, once: each rank scores its contiguous part of it (all
    hold the same synchronised weights; `val_dataset` is this rank's part, None when empty), the parts are gathered
    in rank order and every rank computes the metrics; question fallbacks are summed. None without a validation
    cache."""
    if data.val_cache is None:
        return None
    with eager_fusion(cfg.compile):
        part = (head_logits(model, clip_batches(val_dataset, max(cfg.batch_size, 64), cfg.frames, device,
                                                cfg.num_workers), data.val_q)
                if val_dataset is not None else (None, 0))
    gathered = gather_parts(part, layout)
    pieces = [scores for scores, _ in gathered if scores is not None]
    scores = {k: torch.cat([sc[k] for sc in pieces]) for k in pieces[0]}
    metrics = validation_metrics(scores, data.val_labels)
    metrics["val_question_fallbacks"] = sum(n for _, n in gathered)
    return metrics


def epoch_row(cfg: TrainConfig, data: RunData, epoch: int, step: int, lr: float, stats: EpochStats,
              rec_steps: int, qa_steps: int, plan: StepPlan) -> dict[str, Any]:
    """The training half of an epoch's metrics row (mean losses over the epoch's steps)."""
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": step,
        "lr": lr,
        "task": cfg.task.value,
        "question_source": cfg.question_source.value,
        "train_loss": float(stats.loss / max(rec_steps, 1)),
        "train_loss_verb": float(stats.verb / max(rec_steps, 1)),
        "rec_steps": rec_steps,
        "qa_steps": qa_steps,
        "batch_size": plan.batch_size,
        "passes": plan.passes,
        "question_fallbacks": int(stats.fallbacks),
    }
    if data.has_nouns:
        row["train_loss_noun"] = float(stats.noun / max(rec_steps, 1))
    if data.action_pairs:
        row["train_loss_action"] = float(stats.action / max(rec_steps, 1))
    if cfg.qa_weight > 0:
        row["train_loss_qa"] = float(stats.qa / max(qa_steps, 1))
    row.update(data.candidate_metrics)
    return row


# ----------------------------------------------------------------------------------------------------------------
# the run


def _kept(saver: Checkpointer) -> str:
    return (f"the last good checkpoint {saver.last} is kept" if saver.last.exists()
            else "no checkpoint was written (the first epoch did not finish)")


@contextmanager
def _stop_on_nonfinite(epoch: int, step: int, kind: str, saver: Checkpointer):
    """NonFiniteLoss inside -> TrainingStopped naming the epoch (1-based), the step and what to do."""
    try:
        yield
    except NonFiniteLoss as exc:
        raise TrainingStopped(
            f"non-finite {kind} loss ({exc.args[0]}) at epoch {epoch + 1}, step {step}: training stopped before "
            f"the step was applied, and {_kept(saver)}. Check the features for NaN/inf (`mambavl cache inspect`), "
            "or lower --lr; then resume with --resume") from None


def _check_weights(model: nn.Module, epoch: int, step: int, saver: Checkpointer) -> None:
    """TrainingStopped instead of checkpointing weights that are NaN or inf."""
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise TrainingStopped(f"non-finite weights after epoch {epoch + 1} (step {step}) in {', '.join(bad[:3])}: "
                              f"not saved, {_kept(saver)}; lower --lr and resume with --resume")


def new_artifact(cfg: TrainConfig, mcfg: ModelConfig, data: RunData) -> TrainedModel:
    """The run's TrainedModel before any weights: configs, vocabularies, the training cache's feature spec and
    annotation provenance, the action answers and, under self-questioning, the first pass and its candidates."""
    attrs = data.train_cache.attrs
    features = FeatureSpec.from_attrs({**attrs, "question_tokens": question_tokens(data.train_cache)})
    answers = data.train_q.answers
    return TrainedModel(
        model_config=mcfg, train_config=dataclasses.replace(cfg), weights={},
        vocab=Vocabulary(list(data.verbs), list(data.nouns), list(data.action_pairs)),
        features=features, cache_schema_version=int(attrs.get("schema_version", 1)),
        annotation={"file": str(attrs.get("annotation_file", "")), "sha256": str(attrs.get("annotation_sha256", "")),
                    "kind": str(attrs.get("dataset_kind", "ek100"))},
        # the action QA answers, in the order of vocab.action_pairs: evaluation scores them without the training
        # cache (an evaluated cache's own action answers are the pairs of *its* labels)
        action_answers=answers.action.detach().cpu() if data.qa_kinds and answers.action is not None else None,
        first_pass=data.first_pass.state() if data.first_pass is not None else None,
        train_candidates=torch.as_tensor(data.train_candidates) if data.first_pass is not None else None,
        candidate_recall=dict(data.candidate_metrics),
        package_version=__version__,
    )


def _build(cfg: TrainConfig, resumed: TrainedModel | None, data: RunData, device: torch.device,
           layout: ProcessLayout) -> tuple[nn.Module, ModelConfig, nn.Module]:
    """The model (fresh from the preset, or the resumed weights) on `device`, and the objective that runs it
    (wrapped in DistributedDataParallel under torchrun)."""
    torch.manual_seed(cfg.seed)
    if resumed is not None:
        mcfg = resumed.model_config
        model = resumed.model("cpu").train()
    else:
        model, mcfg = build_model(cfg, data.data_dims(),
                                  lambda: feature_statistics(data.train_cache, data.window, data.train_rows))
    message = question_warning(mcfg, cfg.question_source)
    if message is not None and layout.main:
        warnings.warn(message, UserWarning, stacklevel=4)
    model.to(device)
    compile_for_training(model, cfg.compile, device)
    objective: nn.Module = Objective(model)
    if layout.world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # recognition and QA steps use different heads
        )
    return model, mcfg, objective


@dataclass
class _Run:
    """What the epochs of one run share once it is set up."""

    data: RunData
    model: nn.Module
    objective: nn.Module
    dataset: SegmentDataset
    val_dataset: SegmentDataset | None
    plan: StepPlan
    opt: Optimizer
    sample_gen: torch.Generator
    state: RunProgress
    saver: Checkpointer
    metric_name: str


def planned_epochs(resumed: TrainedModel) -> int:
    """The epochs a resumed run's step plan was made for: those it was started with (before any change)."""
    first = next((c for c in resumed.progress.changes if c["field"] == "epochs"), None)
    return int(first["from"]) if first is not None else int(resumed.train_config.epochs)


def resumed_progress(resumed: TrainedModel, cfg: TrainConfig, steps_per_epoch: int, warmup_steps: int) -> RunProgress:
    """The resumed run's progress, with the settings this resume changes (`RESUME_FIELDS`) recorded and, for a new
    budget of epochs, the learning-rate schedule re-planned from the current step (`schedule.replan`)."""
    old = resumed.progress
    state = dataclasses.replace(old, history=list(old.history), changes=list(old.changes))
    for name in RESUME_FIELDS:
        before, now = plain(getattr(resumed.train_config, name)), plain(getattr(cfg, name))
        if before != now:
            state.changes.append({"epoch": state.epoch, "step": state.step, "field": name, "from": before, "to": now})
    state.lr_replan = replan(state.step, steps_per_epoch * resumed.train_config.epochs, steps_per_epoch * cfg.epochs,
                             warmup_steps, cfg.min_lr_ratio, old.lr_replan)
    return state


def _set_up(cfg: TrainConfig, device: torch.device, layout: ProcessLayout) -> _Run:
    """Caches, model, optimiser, schedule and checkpointer of a fresh or resumed run."""
    out_dir = Path(cfg.out_dir)
    check_writable(out_dir, "run folder (--out)")
    resume = resume_point(cfg, out_dir / "last.pt")
    resumed, training = resume if resume is not None else (None, None)
    data = load_data(cfg, resumed, out_dir / "last.pt", device, layout)
    model, mcfg, objective = _build(cfg, resumed, data, device, layout)
    dataset = SegmentDataset(data.train_cache, window=data.window, indices=data.train_rows)
    val_part = np.array_split(data.val_rows, layout.world)[layout.rank] if data.val_cache is not None else []
    val_dataset = (SegmentDataset(data.val_cache, window=data.window, indices=val_part)
                   if len(val_part) else None)  # fmt: skip
    # the step plan (batch, passes per epoch) is the one the run was started with, whatever a resume does to epochs
    planned = planned_epochs(resumed) if resumed is not None else cfg.epochs
    plan = plan_steps(math.ceil(len(data.train_rows) / layout.world), cfg.batch_size, planned, cfg.min_steps)
    steps_per_epoch = plan.passes * math.ceil(len(data.train_rows) / (plan.batch_size * layout.world))
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    state = RunProgress()
    if resumed is not None:
        state = resumed_progress(resumed, cfg, steps_per_epoch, warmup_steps)
    opt = Optimizer(model, cfg, steps_per_epoch * cfg.epochs, warmup_steps, device, state.lr_replan)
    sample_gen = torch.Generator()
    if resumed is not None:
        opt.restore(training)
        set_rng_state(training.rng, sample_gen)
    metric_name = data.spec.selection_metric(data.has_nouns)
    saver = Checkpointer(out_dir, new_artifact(cfg, mcfg, data), cfg, layout.main)
    return _Run(data, model, objective, dataset, val_dataset, plan, opt, sample_gen, state, saver, metric_name)


@releases_caches
def train(cfg: TrainConfig, progress: Progress | None = None, stop_after_epochs: int | None = None) -> TrainResult:
    """Train MambaVL on `cfg.train_cache`, validating on `cfg.val_cache` after every epoch.

    Writes into `cfg.out_dir`: last.pt (every epoch), best.pt (best validation action top-1 — verb and noun both
    right — or verb top-1 when the data has no nouns), metrics.csv, train_config.json and the live logs of
    `cfg.logger` (`mambavl.train.logs`: tensorboard/ or a W&B run, curves.png, train.log).
    `stop_after_epochs=k` returns after k epochs of this call (the run can be continued with `resume=True`).
    With a validation cache the run stops early after `cfg.patience` epochs without a rise of the selection metric
    by more than `cfg.min_delta` (`mambavl.train.stopping`; recorded in the progress and the result). A resumed run
    may change `epochs` (the step plan stays the run's, the learning-rate schedule is re-planned from the current
    step: `schedule.replan`), `patience` and `min_delta`; each change is recorded in `RunProgress.changes`.
    Progress (rank 0 only): one unit per recognition step (fields epoch, epochs, loss), and once per epoch a report
    with its metrics row (`metrics`); a resumed run first reports the steps already taken (`resumed=True`).
    Raises InputError for unusable caches, an incompatible validation cache, or an existing run without `resume`.
    """
    device = resolve_device(cfg.device)
    layout = ProcessLayout.from_env(device)
    if device.type == "cuda" and layout.world > 1:
        device = torch.device("cuda", layout.local_rank)
        torch.cuda.set_device(device)
    run = _set_up(cfg, device, layout)
    progress = or_none(progress) if layout.main else NO_PROGRESS
    steps_per_epoch = run.plan.passes * math.ceil(len(run.data.train_rows) / (run.plan.batch_size * layout.world))
    progress.start(steps_per_epoch * cfg.epochs)
    if run.state.step:
        progress.advance(run.state.step, resumed=True)
    run.objective.train()
    first_epoch = run.state.epoch
    # a resumed run that had stopped early goes on only when its (new) patience lets it
    run.state.stopped_early = _stop_decision(run, cfg, layout)
    for epoch in range(first_epoch, cfg.epochs):
        if run.state.stopped_early is not None or (
                stop_after_epochs is not None and epoch - first_epoch >= stop_after_epochs):
            break
        _epoch(run, cfg, epoch, device, layout, progress)
    best = "n/a" if run.state.best_metric is None else f"{run.state.best_metric:.2f}"
    run.saver.close(f"best {run.metric_name}: {best}")
    progress.finish()
    if layout.world > 1:
        dist.barrier()
    return TrainResult(
        best_metric=run.state.best_metric,
        last_checkpoint=run.saver.last if layout.main and run.saver.last.exists() else None,
        best_checkpoint=run.saver.best if layout.main and run.saver.best.exists() else None,
        history=run.state.history,
        best_metric_name=run.metric_name,
        model=run.model,
        stopped_early=run.state.stopped_early,
        changes=list(run.state.changes),
        heads=_heads(run.data),
    )


def _heads(data: RunData) -> dict[str, str]:
    return schema.head_names(str(data.train_cache.attrs.get("dataset_kind", "ek100")))


def _stop_decision(run: _Run, cfg: TrainConfig, layout: ProcessLayout) -> dict | None:
    """Whether the run stops early now (`stopping.early_stop` over the history). Every rank computes the validation
    metrics from the same gathered scores of the whole split; rank 0's decision is still sent to all, so that the
    ranks stop together even if their float arithmetic ever differed."""
    decision = (early_stop(run.state.history, run.metric_name, cfg.patience, cfg.min_delta)
                if run.data.val_cache is not None else None)
    return gather_parts(decision, layout)[0]


def _epoch(run: _Run, cfg: TrainConfig, epoch: int, device: torch.device, layout: ProcessLayout,
           progress: Progress) -> None:
    """One epoch: its steps, validation and checkpoint. Every random draw is seeded by (seed, epoch, stream), so a
    run resumed at an epoch boundary replays exactly."""
    data, state, opt = run.data, run.state, run.opt
    t0 = time.perf_counter()
    torch.manual_seed(mix_seed(cfg.seed, epoch, 1, layout.rank))  # dropout: each rank its own masks
    run.sample_gen.manual_seed(mix_seed(cfg.seed, epoch, 2, 0))  # frames, paraphrases, QA kinds: alike on every rank
    parts = []
    for k in range(run.plan.passes):  # each pass in its own order (pass 0: the single-pass order)
        order = mix_seed(cfg.seed, epoch, 0) if k == 0 else mix_seed(cfg.seed, epoch, 0, k)
        perm = torch.randperm(len(data.train_rows), generator=torch.Generator().manual_seed(order))
        parts += global_batches(perm.numpy(), data.train_rows, run.dataset.num_frames, run.plan.batch_size, layout)
    answers = data.train_q.answers.to(device) if data.qa_kinds else None
    run.dataset.draw_views(torch.Generator().manual_seed(mix_seed(cfg.seed, epoch, 3)))  # multi-view: a view per row
    stats = EpochStats()
    rec_steps = qa_steps = 0
    local = [p.positions[p.part].tolist() for p in parts]
    for p, raw in zip(parts, loader(run.dataset, local, cfg.num_workers, device)):
        with _stop_on_nonfinite(epoch, state.step + 1, "recognition", run.saver):
            b, loss, inc = recognition_step(run.objective, opt, data, cfg, raw, p, run.sample_gen, device)
        state.step += 1
        rec_steps += 1
        stats.add(inc)
        if data.qa_kinds and rec_steps % cfg.qa_every == 0:
            with _stop_on_nonfinite(epoch, state.step, "QA", run.saver):
                stats.qa += qa_step(run.objective, opt, data, answers, cfg, b, run.sample_gen, device)
            qa_steps += 1
            state.qa_steps += 1
        progress.advance(1, epoch=epoch + 1, epochs=cfg.epochs, loss=float(loss.detach()))

    stats.all_reduce(layout)  # the ranks' loss shares add up to the global means; fallback counts add up
    row = epoch_row(cfg, data, epoch, state.step, opt.lr, stats, rec_steps, qa_steps, run.plan)
    row["precision"] = opt.precision.value  # what `cfg.precision` (auto) resolved to on this device
    metrics = validate(run.model, run.val_dataset, data, cfg, device, layout)
    if metrics:
        row.update(metrics)
    row["time_s"] = round(time.perf_counter() - t0, 3)
    improved = metrics is not None and not math.isnan(metrics[run.metric_name]) and (
        state.best_metric is None or metrics[run.metric_name] > state.best_metric
    )
    if improved:
        state.best_metric, state.best_epoch = float(metrics[run.metric_name]), epoch + 1
    if metrics:
        values = [r.get(run.metric_name) for r in state.history] + [metrics[run.metric_name]]
        row["epochs_without_improvement"] = epochs_without_improvement(values, cfg.min_delta)
    state.history.append(plain(row))
    state.epoch = epoch + 1
    state.stopped_early = _stop_decision(run, cfg, layout)
    _check_weights(run.model, epoch, state.step, run.saver)
    run.saver.save(run.model, opt, state, run.sample_gen, improved)
    progress.advance(0, epoch=epoch + 1, epochs=cfg.epochs, metrics=dict(row), heads=_heads(data))
