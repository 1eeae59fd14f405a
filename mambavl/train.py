"""Stage 2: train the MambaVL fusion on a feature cache.

Only cached tensors are touched here (through `mambavl.cache.reader`): frame tokens, question tokens and answer
embeddings were computed once by stage 1, so an epoch over EK-100 costs seconds to minutes on one GPU.

Objectives (alternating, as in the paper):

* recognition steps — cross-entropy with label smoothing on the verb, noun and action heads. The action vocabulary
  is the set of (verb, noun) pairs seen in the *training* cache labels (EK-100 convention); it is stored in the
  checkpoint, and segments whose pair is not in it are ignored by the action-head loss and metric.
* QA steps — one after every `qa_every` recognition steps, on the same batch, weighted by `qa_weight`
  (`qa_weight=0` runs none: the no-QA ablation). Each QA step asks one kind of template question for the whole batch
  (verb / noun / scene; for anticipation next_verb / next_noun), fuses the video with it, maps the fused vector into
  the text space (`model.qa_embed`) and scores the answer candidates of the cache's AnswerBank (`model.qa_logits`):
  cross-entropy for verb/noun answers, multi-label BCE over nouns for the scene question (targets = all nouns of the
  segment). QA targets come from training annotations only.

Question protocol (`question_source`, recorded in the checkpoint and in every metrics row):

* ``templates`` (default) — label-free template questions: the verb head reads a `verb`-kind question, the noun head a
  `noun`-kind one (`next_verb` / `next_noun` for anticipation). Training draws one paraphrase uniformly per sample;
  evaluation always uses paraphrase 0, the fixed evaluation phrasing.
* ``annotation`` — the paper's narration-derived questions (other label masked), `questions/per_segment/annotation`.
* ``file`` — user-supplied questions, `questions/per_segment/file`.
  Rows without a question of the chosen source fall back to the evaluation template and are counted
  (`question_fallbacks` in the metrics).

Reproducibility: every random draw of an epoch (order, frames, paraphrases, QA kinds, dropout) comes from seeds
derived from (seed, epoch, stream, rank), and the checkpoint carries optimizer, scheduler and RNG states, so a run that
is stopped after k epochs and resumed ends with exactly the weights of an uninterrupted run (bitwise on CPU).

Distributed: launched under torchrun (WORLD_SIZE > 1) each process trains on its shard of the same seeded
permutation (DistributedSampler-style padding), gradients are averaged by DistributedDataParallel, and only rank 0
validates and writes checkpoints and logs. `batch_size` is per process.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mambavl import __version__
from mambavl.cache import schema
from mambavl.cache.reader import SegmentDataset, open_cache
from mambavl.data.sampling import subsample
from mambavl.device import resolve_device
from mambavl.errors import InputError
from mambavl.fuse.model import MambaVL, model_config_from_dict
from mambavl.runtime import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_KIND,
    HEAD_KINDS,
    QA_KINDS,
    QA_TARGET,
    SAMPLING_ATTRS,
    Questions,
    TrainConfig,  # also re-exported: `from mambavl.train import TrainConfig, train`
    action_vocab,
    atomic_copy,
    atomic_torch_save,
    batches,
    build_model,
    labelled_rows,
    load_labels,
    loader,
    plain,
    predict_logits,
    question_tokens,
    require_window,
    validation_metrics,
    window_of,
)

# Progress callback: progress(done_steps, total_steps, info). info carries "epoch", "epochs", "loss" on steps and,
# once per epoch, "metrics" (the epoch's metrics row).
ProgressFn = Callable[[int, int, dict], None]


@dataclass
class TrainResult:
    """Outcome of `train`: best validation metric (action top-1, or verb top-1 without nouns; None without a
    validation cache), checkpoint paths (None where not written, e.g. on ranks > 0 or without validation for best),
    one metrics dict per epoch (the rows of metrics.csv), the name of the selection metric, and the trained model
    (unwrapped, on its device)."""

    best_metric: float | None
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    history: list[dict]
    best_metric_name: str = "val_action_top1"
    model: nn.Module | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _mix(*parts: int) -> int:
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


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then cosine decay to `min_lr_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _ce(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy ignoring target -1. With no usable target the loss is 0 but stays connected to the graph, so
    DDP sees every head take part in every step."""
    if not bool((target >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, ignore_index=-1, label_smoothing=smoothing)


def _rng_state(generator: torch.Generator) -> dict:
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


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
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


# ----------------------------------------------------------------------------------------------------------------
# forward passes


class _Objective(nn.Module):
    """Both objectives behind one forward, so DistributedDataParallel sees (and synchronises) every step.

    Returns only tensors that enter the loss: DDP must not wait for gradients of outputs nobody uses.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, mode: str, video, video_mask, q_tokens, q_mask, candidates=None):
        if mode == "rec":
            out = self.model(video, video_mask, q_tokens, q_mask)
            return {k: out[k] for k in ("verb", "noun", "action") if k in out}
        h = self.model.fuse(video, video_mask, q_tokens, q_mask)  # (B, d)
        return self.model.qa_logits(self.model.qa_embed(h), candidates)  # (B, K)


# ----------------------------------------------------------------------------------------------------------------
# logs


METRIC_COLUMNS = (
    "epoch", "step", "lr", "task", "question_source",
    "train_loss", "train_loss_verb", "train_loss_noun", "train_loss_action", "train_loss_qa",
    "rec_steps", "qa_steps", "question_fallbacks",
    "val_verb_top1", "val_verb_top5", "val_noun_top1", "val_noun_top5",
    "val_action_top1", "val_action_top5", "val_action_head_top1", "val_question_fallbacks",
    "time_s",
)  # fmt: skip


def _write_metrics_csv(history: list[dict], path: Path) -> None:
    """Rewrite metrics.csv from the whole history (atomic; a resumed run keeps earlier rows)."""
    columns = [c for c in METRIC_COLUMNS if any(c in row for row in history)]
    columns += sorted({k for row in history for k in row} - set(columns))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in columns})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def _summary_writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.csv is always written
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


# ----------------------------------------------------------------------------------------------------------------
# distributed


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_setup(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def _shard(perm: torch.Tensor, d: _Dist) -> torch.Tensor:
    """DistributedSampler-style: pad the permutation by wrapping to a multiple of the world size, take every
    world-th element, so every rank runs the same number of steps."""
    if d.world == 1:
        return perm
    total = math.ceil(len(perm) / d.world) * d.world
    padded = torch.cat([perm, perm[: total - len(perm)]]) if total > len(perm) else perm
    return padded[d.rank :: d.world]


def _broadcast(obj: Any, d: _Dist) -> Any:
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------------------------
# training


# Config fields a resumed run may change without changing what is computed (on the same device type).
RESUME_FREE_FIELDS = ("resume", "device", "num_workers", "out_dir")


def _check_resume_config(cfg: TrainConfig, saved: dict, path: Path) -> None:
    current = plain(asdict(cfg))
    for key, value in saved.items():
        if key in RESUME_FREE_FIELDS or key not in current:
            continue
        mine = current[key]
        if key in ("train_cache", "val_cache") and mine and value:
            if Path(mine).resolve() == Path(value).resolve():
                continue
        if mine != value:
            raise InputError(
                f"cannot resume {path}: {key} is {mine!r} but the run was started with {value!r} "
                f"(resume with the run's own settings)"
            )


def train(cfg: TrainConfig, progress: ProgressFn | None = None, stop_after_epochs: int | None = None) -> TrainResult:
    """Train MambaVL on `cfg.train_cache`, validating on `cfg.val_cache` after every epoch.

    Writes into `cfg.out_dir`: last.pt (every epoch), best.pt (best validation action top-1 — verb and noun both
    right — or verb top-1 when the data has no nouns), metrics.csv, train_config.json, tensorboard/ (if installed).
    `stop_after_epochs=k` returns after k epochs of this call (the run can be continued with `resume=True`).
    Raises InputError for unusable caches, an incompatible validation cache, or an existing run without `resume`.
    """
    device = resolve_device(cfg.device)
    d = _dist_setup(device)
    try:
        return _train(cfg, device, d, progress, stop_after_epochs)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig, device: torch.device, d: _Dist, progress: ProgressFn | None, stop_after_epochs: int | None
) -> TrainResult:
    if device.type == "cuda" and d.world > 1:
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    out_dir = Path(cfg.out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    window = window_of(cfg.task)

    # ---- resume or fresh start
    ckpt = None
    if cfg.resume:
        if not last_path.is_file():
            raise InputError(f"cannot resume: {last_path} does not exist")
        ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
            raise InputError(f"cannot resume: {last_path} is not a mambavl checkpoint")
        _check_resume_config(cfg, ckpt["train_config"], last_path)
    elif last_path.exists():
        raise InputError(f"{out_dir} already holds a run ({last_path.name}); resume it or choose another output folder")

    # ---- data
    train_cache = open_cache(cfg.train_cache)
    require_window(train_cache, window)
    if ckpt is not None:
        schema.check_compatible(
            ckpt["cache_attrs"], train_cache.attrs, f"run {last_path}", f"train cache {train_cache.path}"
        )
    val_cache = None
    if cfg.val_cache is not None:
        val_cache = open_cache(cfg.val_cache)
        schema.check_compatible(
            train_cache.attrs, val_cache.attrs, f"train cache {train_cache.path}", f"val cache {val_cache.path}"
        )
        if list(val_cache.verb_keys) != list(train_cache.verb_keys) or list(val_cache.noun_keys) != list(
            train_cache.noun_keys
        ):
            raise InputError(
                f"val cache {val_cache.path} has other verb/noun classes than train cache {train_cache.path}"
            )
        require_window(val_cache, window)
    train_rows = labelled_rows(train_cache, window, "train")
    val_rows = labelled_rows(val_cache, window, "val") if val_cache is not None else None

    verbs, nouns = list(train_cache.verb_keys), list(train_cache.noun_keys)
    has_nouns = len(nouns) > 0
    if ckpt is not None:
        action_pairs = [tuple(p) for p in ckpt["vocab"]["action_pairs"]]
    else:
        action_pairs = action_vocab(train_cache, train_rows) if has_nouns else []
    pair_index = {p: i for i, p in enumerate(action_pairs)}
    train_labels = load_labels(train_cache, pair_index)
    val_labels = load_labels(val_cache, pair_index) if val_cache is not None else None

    head_kinds = HEAD_KINDS[cfg.task]
    train_q = Questions(train_cache, cfg.question_source, head_kinds)
    val_q = Questions(val_cache, cfg.question_source, head_kinds) if val_cache is not None else None
    qa_kinds = tuple(k for k in QA_KINDS[cfg.task] if has_nouns or QA_TARGET[k] == "verb")
    qa_on = cfg.qa_weight > 0
    answers = train_cache.answers() if qa_on else None
    if qa_on:
        for kind in qa_kinds:
            if kind not in train_q.templates or len(train_q.templates[kind]) == 0:
                raise InputError(f"cache {train_cache.path} has no {kind!r} template questions for QA steps")
        cand = {
            "verb": torch.as_tensor(answers.verb, dtype=torch.float32).to(device),  # (V, Dt)
            "noun": torch.as_tensor(answers.noun, dtype=torch.float32).to(device) if has_nouns else None,  # (Nn, Dt)
        }
        cand["scene"] = cand["noun"]

    # ---- model, optimiser, schedule
    torch.manual_seed(cfg.seed)
    data_dims = {
        "video_dim": int(train_cache.attrs["feature_dim"]),
        "text_dim": int(train_cache.attrs["text_dim"]),
        "num_verbs": len(verbs),
        "num_nouns": len(nouns),
        "num_actions": len(action_pairs),
    }
    if ckpt is not None:
        mcfg = model_config_from_dict(ckpt["model_config"])
        model = MambaVL(mcfg)
        model.load_state_dict(ckpt["model"])
    else:
        model, mcfg = build_model(cfg, data_dims)
    model.to(device)
    objective: nn.Module = _Objective(model)
    if d.world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective,
            device_ids=[device.index] if device.type == "cuda" else None,
            # Recognition and QA steps use different heads.
            find_unused_parameters=True,
        )

    dataset = SegmentDataset(train_cache, window=window, indices=train_rows)
    val_dataset = SegmentDataset(val_cache, window=window, indices=val_rows) if val_cache is not None else None
    per_rank = math.ceil(len(train_rows) / d.world)
    steps_per_epoch = math.ceil(per_rank / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, cfg.min_lr_ratio)
    )
    use_amp = cfg.amp and device.type == "cuda"
    # bf16 needs no loss scaling; fp16 (older GPUs) does. The dtype is irrelevant when autocast is off.
    amp_dtype = torch.float16 if use_amp and not torch.cuda.is_bf16_supported() else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    sample_gen = torch.Generator()

    start_epoch, step, qa_total = 0, 0, 0
    best_metric: float | None = None
    history: list[dict] = []
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step, qa_total = int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt.get("qa_steps", 0))
        best_metric = ckpt.get("best_metric")
        history = list(ckpt.get("history", []))
        _set_rng_state(ckpt["rng"], sample_gen)

    metric_name = "val_action_top1" if has_nouns else "val_verb_top1"
    writer = None
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(plain(asdict(cfg)), indent=2, sort_keys=True) + "\n")
        writer = _summary_writer(out_dir)

    static = {
        "kind": CHECKPOINT_KIND,
        "format": CHECKPOINT_FORMAT,
        "package_version": __version__,
        "model_config": mcfg.to_dict(),
        "train_config": plain(asdict(cfg)),
        "task": cfg.task.value,
        "question_source": cfg.question_source.value,
        "window": window,
        "vocab": {"verbs": verbs, "nouns": nouns, "action_pairs": [list(p) for p in action_pairs]},
        # What the features are (compatibility) and how they were sampled, so that `mambavl predict` can extract a
        # new clip the same way without the cache.
        "cache_attrs": {
            **{k: plain(schema.normalise_attr(train_cache.attrs[k]))
               for k in SAMPLING_ATTRS if k in train_cache.attrs},
            **{k: plain(schema.normalise_attr(train_cache.attrs.get(k))) for k in schema.COMPATIBILITY_ATTRS},
            **question_tokens(train_cache),
        },
        "best_metric_name": metric_name,
    }

    def rec_loss(out: dict, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        vt = train_labels.verb[rows].to(device)
        parts = {"verb": _ce(out["verb"], vt, cfg.label_smoothing)}
        if "noun" in out:
            parts["noun"] = _ce(out["noun"], train_labels.noun[rows].to(device), cfg.label_smoothing)
        if "action" in out:
            parts["action"] = _ce(out["action"], train_labels.action[rows].to(device), cfg.label_smoothing)
        total = sum(parts.values())
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def qa_loss(kind: str, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        target_kind = QA_TARGET[kind]
        if target_kind == "verb":
            return _ce(logits, train_labels.verb[rows].to(device), 0.0)
        if target_kind == "noun":
            return _ce(logits, train_labels.noun[rows].to(device), 0.0)
        multi = torch.zeros(logits.shape, dtype=torch.float32)  # (B, Nn) multi-hot of the segment's nouns
        for i, r in enumerate(rows.tolist()):
            ids = train_labels.all_nouns[r]
            ids = ids[(ids >= 0) & (ids < logits.shape[1])]
            multi[i, ids] = 1.0
        return F.binary_cross_entropy_with_logits(logits.float(), multi.to(device))

    def optimise(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()

    objective.train()
    epochs_run = 0
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
            break
        t0 = time.perf_counter()
        # Every random draw of the epoch is seeded by (seed, epoch): resuming at an epoch boundary replays exactly.
        torch.manual_seed(_mix(cfg.seed, epoch, 1, d.rank))  # dropout
        sample_gen.manual_seed(_mix(cfg.seed, epoch, 2, d.rank))  # frames, paraphrases, QA kinds
        perm = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(_mix(cfg.seed, epoch, 0)))
        positions = _shard(perm, d).numpy()
        sums = torch.zeros(6, dtype=torch.float64)  # loss, verb, noun, action, qa, fallbacks
        rec_steps = qa_steps = 0
        for batch in loader(dataset, batches(positions, cfg.batch_size), cfg.num_workers):
            rows = batch["index"].to(torch.long)  # (B,) cache rows
            feats = batch["features"].to(device=device, dtype=torch.float32)  # (B, F, D)
            video, vmask = subsample(feats, batch["num_frames"], cfg.frames, train=True, generator=sample_gen)
            q, fb = train_q.heads(rows, train=True, generator=sample_gen)  # (B, 2)
            qt, qm = train_q.gather(q, device)  # (B, 2, T, Dt), (B, 2, T)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                out = objective("rec", video, vmask, qt, qm)
            loss, parts = rec_loss(out, rows)
            optimise(loss)
            scheduler.step()
            step += 1
            rec_steps += 1
            sums += torch.tensor(
                [float(loss.detach()), parts["verb"], parts.get("noun", 0.0), parts.get("action", 0.0), 0.0, fb],
                dtype=torch.float64,
            )

            if qa_on and rec_steps % cfg.qa_every == 0:
                kind = qa_kinds[int(torch.randint(len(qa_kinds), (1,), generator=sample_gen))]
                qk = train_q.template(kind, len(rows), train=True, generator=sample_gen)  # (B,)
                qkt, qkm = train_q.gather(qk, device)  # (B, T, Dt), (B, T)
                with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                    logits = objective("qa", video, vmask, qkt, qkm, cand[QA_TARGET[kind]])  # (B, K)
                lq = qa_loss(kind, logits, rows)
                optimise(cfg.qa_weight * lq)
                qa_steps += 1
                qa_total += 1
                sums[4] += float(lq.detach())

            if progress is not None and d.main:
                progress(step, total_steps, {"epoch": epoch + 1, "epochs": cfg.epochs, "loss": float(loss.detach())})

        if d.world > 1:
            dist.all_reduce(sums)
            sums /= d.world
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "task": cfg.task.value,
            "question_source": cfg.question_source.value,
            "train_loss": float(sums[0] / max(rec_steps, 1)),
            "train_loss_verb": float(sums[1] / max(rec_steps, 1)),
            "rec_steps": rec_steps,
            "qa_steps": qa_steps,
            "question_fallbacks": int(sums[5]),
        }
        if has_nouns:
            row["train_loss_noun"] = float(sums[2] / max(rec_steps, 1))
        if action_pairs:
            row["train_loss_action"] = float(sums[3] / max(rec_steps, 1))
        if qa_on:
            row["train_loss_qa"] = float(sums[4] / max(qa_steps, 1))

        # Validation on rank 0 only (the unwrapped model holds the synchronised weights); others get the metrics.
        metrics = None
        if d.main and val_cache is not None:
            scores, vfb = predict_logits(
                model, val_dataset, val_q, device, max(cfg.batch_size, 64), cfg.frames, cfg.num_workers
            )
            metrics = validation_metrics(scores, val_labels)
            metrics["val_question_fallbacks"] = vfb
        metrics = _broadcast(metrics, d)
        if metrics:
            row.update(metrics)
        row["time_s"] = round(time.perf_counter() - t0, 3)
        improved = metrics is not None and not math.isnan(metrics[metric_name]) and (
            best_metric is None or metrics[metric_name] > best_metric
        )
        if improved:
            best_metric = float(metrics[metric_name])
        history.append(plain(row))
        epochs_run += 1

        if d.main:
            state = dict(static)
            state.update(
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict() if scaler.is_enabled() else None,
                epoch=epoch + 1,
                step=step,
                qa_steps=qa_total,
                rng=_rng_state(sample_gen),
                best_metric=best_metric,
                history=history,
            )
            atomic_torch_save(state, last_path)
            if improved:
                atomic_copy(last_path, best_path)
            _write_metrics_csv(history, out_dir / "metrics.csv")
            if writer is not None:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                        writer.add_scalar(key, value, epoch + 1)
                writer.flush()
            if progress is not None:
                progress(step, total_steps, {"epoch": epoch + 1, "epochs": cfg.epochs, "metrics": dict(row)})

    if writer is not None:
        writer.close()
    if d.world > 1:
        dist.barrier()
    return TrainResult(
        best_metric=best_metric,
        last_checkpoint=last_path if d.main and last_path.exists() else None,
        best_checkpoint=best_path if d.main and best_path.exists() else None,
        history=history,
        best_metric_name=metric_name,
        model=model,
    )
