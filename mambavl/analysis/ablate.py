"""Ablation study: train several variants under one budget and several seeds, and compare them in one table.

Every trained run uses `mambavl.train.train` on the same caches, with the same epochs (early stopping off), step
floor (`min_steps`), batch size, learning rate, schedule, frames, question protocol and seeds; only what the
variant names differs.
`ABLATIONS` maps each name to a `Variant` (a preset to train, or a linear probe):

| name | what changes against `full` |
| --- | --- |
| full | the `small` preset: joint scan over [question ; video], shared A, QA objective (our default) |
| paper | the authors' layout: separate video and text scans sharing A, pooled outputs summed |
| video-only | no question input at all (the reference of the paired differences) |
| no-qa | same model as full, trained without the QA objective (`qa_weight = 0`) |
| disjoint-A | a separate state matrix A for question and video tokens |
| transformer | cross-attention fusion of the same width and depth instead of the scan |
| concat | MLP on [pooled video ; pooled question] |
| predicted | `small`, asked self-questions: template + top-k candidates of a cross-fitted video-only first pass |
| probe-concat | logistic regression on the K ordered frame tokens, concatenated (`mambavl.analysis.probe`) |
| probe-mean | logistic regression on the mean of the K frame tokens (order-blind) |
| zero-shot | no training: mean frame feature vs the answer texts, cosine (`mambavl.analysis.zeroshot`; by name) |

Presets may carry training fields (`mambavl.fuse.presets`, "train" part). Only the fields that *define* an
ablation (`ABLATION_TRAIN_FIELDS`: the QA objective's weight and cadence) are applied; schedule fields such as the
paper preset's 2 warm-up epochs are not (`SCHEDULE_FIELDS` are set to the study's values after the preset), so every
run has the same budget and schedule. A new variant is one more `ABLATIONS` entry: a preset plus the `TrainConfig`
fields that define it (`Variant.train`, e.g. another question source).

Reported per run: top-1 / top-5 accuracy of verb, noun and action (EK-100 style: verb and noun both right) on the
validation cache **at the last epoch** (no selection on the validation set), the best validation action top-1 over
epochs (selection on the validation set, for reference), recognition steps, parameters, and wall-clock time. With
several seeds the table shows mean ± sample standard deviation over seeds, and the *paired* difference to
video-only: for each seed, variant minus video-only trained with that seed, then mean ± sd of those differences
(the seed fixes initialisation, sample order and frame draws alike, so pairing removes the part of the spread both
runs share). Probes are deterministic: every seed gives the same probe result.

Runs live in `out_dir/runs/<name>/seed<k>/`; a finished run found there is reused and an interrupted one is resumed,
so an ablation can be stopped and restarted (and seeds or variants can be trained by separate processes into the
same folder, then gathered by one more call).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mambavl.analysis.probe import ProbeConfig, ProbeInput, run_probe
from mambavl.analysis.zeroshot import zero_shot_scores
from mambavl.cache.reader import open_cache, releases_caches
from mambavl.errors import InputError
from mambavl.evaluate import compute_metrics
from mambavl.extract.questions import QuestionSource
from mambavl.fuse.presets import PRESETS, PRESET_DESCRIPTIONS, preset_train_overrides
from mambavl.progress import Progress, or_none, part
from mambavl.runtime import TrainedModel, plain, same_run
from mambavl.tables import markdown_table
from mambavl.train import TrainConfig, train


@dataclass(frozen=True)
class Variant:
    """One row of an ablation: a preset to train (with the TrainConfig fields that define the variant), or a
    linear probe (`probe` set, `preset` None)."""

    preset: str | None = None
    train: dict = field(default_factory=dict)
    probe: ProbeInput | None = None
    description: str | None = None
    zero_shot: bool = False  # no training: the validation cache scored against its answer texts


# Ablation name -> what it trains. "full" is our default model; "video-only" is the reference of paired differences.
ABLATIONS: dict[str, Variant] = {
    "full": Variant("small"),
    "paper": Variant("paper"),
    "video-only": Variant("video-only"),
    "no-qa": Variant("no-qa"),
    "disjoint-A": Variant("disjoint-A"),
    "transformer": Variant("transformer"),
    "concat": Variant("concat"),
    "predicted": Variant("small", train={"question_source": QuestionSource.PREDICTED},
                         description="small, asked about the top-k candidates of a cross-fitted video-only first pass "
                                     "(self-questioning)"),
    "probe-concat": Variant(probe=ProbeInput.CONCAT, description="logistic regression on the K ordered frame tokens, "
                                                                 "concatenated"),
    "probe-mean": Variant(probe=ProbeInput.MEAN, description="logistic regression on the mean of the K frame tokens "
                                                             "(order-blind)"),
    "zero-shot": Variant(zero_shot=True, description="no training: each segment's mean frame feature against "
                                                     "the answer texts (cosine); a floor unless the towers are a "
                                                     "CLIP pair"),
}
# zero-shot is asked for by name: it needs image and text towers of one width, which most caches do not have
DEFAULT_ABLATIONS: tuple[str, ...] = tuple(k for k in ABLATIONS if k != "zero-shot")
# The variant every other is compared with, seed by seed.
REFERENCE = "video-only"
# TrainConfig fields a preset's "train" part may set inside an ablation: they define the ablation (no-qa).
ABLATION_TRAIN_FIELDS = ("qa_weight", "qa_every")
# TrainConfig fields every run of a study shares, whatever its preset says (TrainConfig lets a preset fill fields
# left at their defaults, so these are set after construction).
SCHEDULE_FIELDS = ("warmup_epochs", "min_lr_ratio")
# Columns of the table: validation metrics at the last epoch (percent).
METRICS = ("verb_top1", "verb_top5", "noun_top1", "noun_top5", "action_top1", "action_top5")


@dataclass
class AblationConfig:
    """One ablation study. `presets` are names of `ABLATIONS` or any model preset; `seeds` runs per preset with
    seeds `seed, seed+1, ...`; `model_overrides` (ModelConfig fields) and `train_overrides` (TrainConfig fields)
    apply to every run, e.g. a smaller d_model for a quick study. `candidates_k` and `candidate_folds` apply to the
    runs asked predicted questions only (the others do not read them, so runs made without them stay reusable)."""

    train_cache: str
    val_cache: str
    out_dir: str
    presets: tuple[str, ...] = DEFAULT_ABLATIONS
    epochs: int = 10
    seeds: int = 1
    seed: int = 0
    question_source: QuestionSource = QuestionSource.TEMPLATES
    batch_size: int = 64
    lr: float = 1e-3
    frames: int = 8
    min_steps: int = 1000
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.03
    device: str = "auto"
    model_overrides: dict = field(default_factory=dict)
    train_overrides: dict = field(default_factory=dict)
    candidates_k: int = 5
    candidate_folds: int = 5

    def __post_init__(self) -> None:
        self.train_cache, self.val_cache, self.out_dir = str(self.train_cache), str(self.val_cache), str(self.out_dir)
        self.presets = tuple(self.presets)
        try:
            self.question_source = QuestionSource(self.question_source)
        except ValueError:
            raise InputError(
                f"ablation: question source {self.question_source!r} is not one of "
                f"{[q.value for q in QuestionSource]}"
            ) from None
        if not self.presets:
            raise InputError("ablation: no presets given")
        if len(set(self.presets)) != len(self.presets):
            raise InputError(f"ablation: presets listed twice in {list(self.presets)}")

        for name in self.presets:
            if name not in ABLATIONS and name not in PRESETS:
                raise InputError(
                    f"ablation: unknown preset {name!r}; choose from {', '.join(dict.fromkeys([*ABLATIONS, *PRESETS]))}"
                )
        if self.min_steps < 0:
            raise InputError(f"ablation: min_steps={self.min_steps!r} must be >= 0")
        for name in ("epochs", "seeds", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"ablation: {name}={getattr(self, name)!r} must be >= 1")
        for name in ("train_cache", "val_cache"):
            if not Path(getattr(self, name)).is_file():
                raise InputError(f"ablation: {name} {getattr(self, name)} not found")
        reserved = {"train_cache", "val_cache", "out_dir", "preset", "model_overrides", "seed", "resume"}
        clash = sorted(reserved & set(self.train_overrides))
        if clash:
            raise InputError(f"ablation: train_overrides may not set {', '.join(clash)}")


def variant_of(name: str) -> Variant:
    """The variant an ablation name stands for (any other preset name trains that preset)."""
    return ABLATIONS.get(name) or Variant(name)


def preset_of(name: str) -> str | None:
    """The model preset an ablation name trains (None for a probe)."""
    return variant_of(name).preset


def describe(name: str, model_overrides: dict | None = None) -> str:
    """One line on what an ablation (or preset) is; sizes the study overrides (`model_overrides`, e.g. d_model 64)
    are written with the study's values, not the preset's."""
    variant = variant_of(name)
    if variant.description:
        text = variant.description
    elif name == "full":
        text = "our default: " + PRESET_DESCRIPTIONS.get("small", "small preset")
    else:
        text = PRESET_DESCRIPTIONS.get(variant.preset, variant.preset)
    for key, value in (model_overrides or {}).items():
        text = re.sub(rf"\b{re.escape(str(key))} \d+", f"{key} {value}", text)
    return text


def noise_flag(stat: dict | None, seeds: int) -> str:
    """How far a difference (`mean_std` over seeds) can be read: "1 seed" (no spread measured), "within noise"
    (|mean| <= 2 standard errors, 2 * sd / sqrt(n): zero is inside the rough 95 % interval) or "" (outside it)."""
    if stat is None or stat.get("mean") is None:
        return ""
    if seeds < 2 or stat.get("n", 0) < 2:
        return "1 seed"
    return "within noise" if abs(stat["mean"]) <= 2 * stat["std"] / math.sqrt(stat["n"]) else ""


def run_train_config(cfg: AblationConfig, name: str, seed: int, run_dir: Path, resume: bool = False):
    """The TrainConfig of one run: the shared budget, the preset, and the preset's ablation-defining fields."""

    variant = variant_of(name)
    if variant.preset is None:
        raise InputError(f"ablation: {name!r} is a probe, not a trained run")
    preset = variant.preset
    extra = {k: v for k, v in preset_train_overrides(preset).items() if k in ABLATION_TRAIN_FIELDS}
    values: dict[str, Any] = dict(
        train_cache=cfg.train_cache, val_cache=cfg.val_cache, out_dir=str(run_dir), preset=preset,
        model_overrides=dict(cfg.model_overrides), question_source=cfg.question_source, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr=cfg.lr, frames=cfg.frames, min_steps=cfg.min_steps, seed=seed,
        device=cfg.device, resume=resume,
        patience=0,  # every run trains the whole budget: the table reports the last epoch, not a selected one
    )
    values.update(cfg.train_overrides)
    values.update(extra)
    values.update(variant.train)
    if QuestionSource(values["question_source"]) == QuestionSource.PREDICTED:
        values.update(candidates_k=cfg.candidates_k, candidate_folds=cfg.candidate_folds)
    tcfg = TrainConfig(**values)
    for key in SCHEDULE_FIELDS:
        setattr(tcfg, key, cfg.train_overrides.get(key, getattr(cfg, key)))
    return tcfg


def _metrics_from_history(history: list[dict]) -> dict[str, float | None]:
    last = history[-1] if history else {}
    out: dict[str, float | None] = {}
    for m in METRICS:
        v = last.get("val_" + m)
        out[m] = None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
    best_key = "val_action_top1" if last.get("val_action_top1") is not None else "val_verb_top1"
    vals = [(h.get(best_key), h.get("epoch")) for h in history if h.get(best_key) is not None]
    if vals:
        best, epoch = max(vals, key=lambda x: x[0])
        out["best_" + best_key[4:]] = float(best)
        out["best_epoch"] = int(epoch)
    return out


# TrainConfig fields that may differ between a stored run and this study without making the run another one.
def run_settings(run: TrainedModel) -> dict[str, Any]:
    """The settings a trained run really had (from its checkpoint, not from its preset's description): width, depth,
    state size, expansion, layout and A sharing, question use, QA weight."""
    mc, tc = run.model_config, run.train_config
    return {"d_model": mc.d_model, "n_layers": mc.n_layers, "d_state": mc.d_state, "expand": mc.expand,
            "fusion": plain(mc.fusion), "scan_layout": plain(mc.scan_layout), "shared_A": bool(mc.shared_A),
            "use_question": bool(mc.use_question), "qa_weight": tc.qa_weight}


def settings_text(settings: dict[str, Any]) -> str:
    """"d_model 64, 1 layer(s), d_state 16, expand 2, ..." from `run_settings` (what the table says a row was)."""
    if not settings:
        return "-"
    parts = [f"d_model {settings['d_model']}", f"{settings['n_layers']} layer(s)", f"d_state {settings['d_state']}",
             f"expand {settings['expand']}", f"fusion {settings['fusion']}"]
    if settings["fusion"] == "mamba":
        parts += [f"{settings['scan_layout']} scan", "shared A" if settings["shared_A"] else "separate A"]
    if not settings["use_question"]:
        parts.append("no question")
    parts.append(f"QA weight {settings['qa_weight']:g}")
    return ", ".join(parts)


def _run_one(cfg: AblationConfig, name: str, seed: int, progress: Progress | None = None) -> dict:
    """Train (or reuse a finished / resume an interrupted) run; return its metrics, steps, params and time."""
    run_dir = Path(cfg.out_dir) / "runs" / name / f"seed{seed}"
    last = run_dir / "last.pt"
    tcfg = run_train_config(cfg, name, seed, run_dir, resume=last.is_file())
    if last.is_file():
        stored = TrainedModel.load(last)
        differs = same_run(stored.train_config, tcfg)
        if differs is not None:
            raise InputError(
                f"{run_dir} holds a run with another {differs!r} ({plain(getattr(stored.train_config, differs))!r}, "
                f"this study wants {plain(getattr(tcfg, differs))!r}); choose another --out or remove that run"
            )
        if stored.progress.epoch >= cfg.epochs or stored.progress.stopped_early is not None:
            info_path = run_dir / "ablation_run.json"
            info = json.loads(info_path.read_text()) if info_path.is_file() else {}
            history = list(stored.progress.history)
            return {
                "seed": seed, "run_dir": str(run_dir), "params": sum(int(t.numel()) for t in stored.weights.values()),
                "metrics": _metrics_from_history(history), "steps": int(history[-1].get("step", 0)) if history else 0,
                "train_time_s": info.get("train_time_s", float(sum(h.get("time_s", 0.0) for h in history))),
                "reused": True, "settings": run_settings(stored),
            }
    t0 = time.perf_counter()
    result = train(tcfg, progress=progress)
    settings = run_settings(TrainedModel.load(last)) if last.is_file() else {}
    elapsed = time.perf_counter() - t0
    if tcfg.resume:
        # Part of the run happened earlier: count the epochs' own timings instead of this call's wall time.
        elapsed = float(sum(h.get("time_s", 0.0) for h in result.history))
    params = sum(p.numel() for p in result.model.parameters())
    (run_dir / "ablation_run.json").write_text(json.dumps({"train_time_s": elapsed, "params": params}) + "\n")
    return {"seed": seed, "run_dir": str(run_dir), "params": params, "metrics": _metrics_from_history(result.history),
            "steps": int(result.history[-1]["step"]), "train_time_s": elapsed, "reused": False, "settings": settings}


def _run_probe(cfg: AblationConfig, name: str) -> dict:
    """Fit a probe variant once (probes are deterministic); the result stands for every seed."""
    res = run_probe(ProbeConfig(cfg.train_cache, cfg.val_cache, input=variant_of(name).probe, frames=cfg.frames))
    metrics: dict[str, float | None] = {}
    for m in METRICS:
        v = res["metrics"].get("val_" + m)
        metrics[m] = None if v is None or math.isnan(v) else float(v)
    return {"run_dir": None, "params": res["params"], "metrics": metrics, "steps": None,
            "train_time_s": res["train_time_s"], "reused": False}


def _run_zero_shot(cfg: AblationConfig) -> dict:
    """Score the validation cache zero-shot (deterministic, no parameters); the result stands for every seed."""
    t0 = time.perf_counter()
    cache = open_cache(cfg.val_cache)
    scored, pairs, _ = zero_shot_scores(cache)
    found = compute_metrics(scored, cache.labels(), "recognition", {}, (1, 5), [tuple(p) for p in pairs.tolist()])
    metrics: dict[str, float | None] = {}
    for m in METRICS:
        task, k = m.split("_")
        metrics[m] = found["metrics"]["all"].get(task, {}).get(k)
    return {"run_dir": None, "params": 0, "metrics": metrics, "steps": None,
            "train_time_s": time.perf_counter() - t0, "reused": False}


def mean_std(values: list[float | None]) -> dict[str, float | None]:
    """{"mean", "std", "n"} of the values that are not None: sample standard deviation (n - 1), 0 for one value;
    mean and std None when there is no value."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = float(statistics.stdev(vals)) if len(vals) > 1 else 0.0
    return {"mean": float(statistics.fmean(vals)), "std": std, "n": len(vals)}


def paired_differences(runs: list[dict], reference: list[dict], metrics: tuple[str, ...] = METRICS) -> dict:
    """Per metric, mean ± sd over seeds of (run - reference run of the same seed); seeds missing from either side
    or metrics that are None are left out. runs / reference: per-seed dicts with "seed" and "metrics"."""
    ref = {r["seed"]: r["metrics"] for r in reference}
    out = {}
    for m in metrics:
        diffs = [r["metrics"].get(m) - ref[r["seed"]][m] for r in runs
                 if r["seed"] in ref and r["metrics"].get(m) is not None and ref[r["seed"]].get(m) is not None]
        out[m] = mean_std(diffs)
    return out


@releases_caches
def run_ablation(cfg: AblationConfig, progress: Progress | None = None) -> dict:
    """Train (or fit) every variant of `cfg` for every seed and write `ablation.md` and `ablation.json` into
    `cfg.out_dir`.

    Returns dict(config, rows, reference, markdown, paths) where each row is dict(name, preset, description, params,
    steps, train_time_s {mean, std, n}, metrics {metric: {mean, std, n}}, paired {metric: {mean, std, n}} (against
    `reference`, video-only, when it is in the study), runs [per-seed dict(seed, run_dir, params, metrics, steps,
    train_time_s, reused)]). Metrics are validation accuracies in percent at the last epoch (None where the data
    has no nouns).
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    progress = or_none(progress)
    progress.start(len(cfg.presets) * len(seeds))  # one unit per training run (or probe, once per seed)
    rows = []
    for name in cfg.presets:
        runs = []
        probe = _run_probe(cfg, name) if variant_of(name).probe is not None else None
        probe = _run_zero_shot(cfg) if variant_of(name).zero_shot else probe
        for seed in seeds:
            progress.advance(0, message=f"{'fitting' if probe else 'training'} {name} (seed {seed})")
            steps = part(progress, f"{name} seed {seed} steps")
            runs.append({**probe, "seed": seed} if probe else _run_one(cfg, name, seed, steps))
            m = runs[-1]["metrics"]
            summary = ", ".join(f"{k} {v:.1f}" for k, v in m.items() if k.endswith("top1") and v is not None)
            progress.advance(1, message=f"{name} (seed {seed}) done: {summary}")
        metric_names = list(METRICS) + sorted({k for r in runs for k in r["metrics"] if k.startswith("best_")})
        rows.append({
            "name": name,
            "preset": preset_of(name),
            "description": describe(name, cfg.model_overrides),
            "settings": runs[0].get("settings") or {},
            "params": runs[0]["params"],
            "steps": runs[0]["steps"],
            "train_time_s": mean_std([r["train_time_s"] for r in runs]),
            "metrics": {m: mean_std([r["metrics"].get(m) for r in runs]) for m in metric_names},
            "runs": runs,
        })
    reference = next((r for r in rows if r["name"] == REFERENCE), None)
    for r in rows:
        r["paired"] = paired_differences(r["runs"], reference["runs"]) if reference is not None else None
    md = ablation_markdown(cfg, rows)
    config = asdict(cfg)
    config["question_source"] = cfg.question_source.value
    payload = {"config": config, "reference": REFERENCE if reference is not None else None, "rows": rows}
    tmp = out / "ablation.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out / "ablation.json")
    (out / "ablation.md").write_text(md)
    return {**payload, "markdown": md, "paths": {"json": str(out / "ablation.json"), "markdown": str(out / "ablation.md")}}


def _cell(stat: dict | None, seeds: int, digits: int = 1, sign: bool = False) -> str:
    if stat is None or stat["mean"] is None:
        return "-"
    fmt = f"{'+' if sign else ''}.{digits}f"
    if seeds > 1:
        return f"{stat['mean']:{fmt}} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:{fmt}}"


def ablation_markdown(cfg: AblationConfig, rows: list[dict]) -> str:
    """The ablation table in markdown (with a header saying what was compared and how)."""
    has_nouns = any(r["metrics"]["noun_top1"]["mean"] is not None for r in rows)
    shown = [m for m in METRICS if has_nouns or m.startswith("verb")]
    key = "action_top1" if has_nouns else "verb_top1"
    paired = any(r.get("paired") for r in rows)
    head = (["name", "params", "steps"] + [m.replace("_", " ") for m in shown]
            + ([f"Δ {key.replace('_', ' ')} vs {REFERENCE} (paired)"] if paired else []) + ["time (s)"])
    lines = [
        "# Ablation",
        "",
        f"Same budget for every run: {cfg.epochs} epochs"
        + (f" and at least {cfg.min_steps} recognition steps, batch {cfg.batch_size} (smaller on small data, see "
           "`min_steps`)" if cfg.min_steps else f" (no step floor), batch {cfg.batch_size}")
        + f", lr {cfg.lr} ({cfg.warmup_epochs} warm-up "
        f"epochs, cosine to {cfg.min_lr_ratio}x), {cfg.frames} frames, questions `{cfg.question_source.value}`, "
        f"seed(s) {', '.join(str(cfg.seed + k) for k in range(cfg.seeds))}"
        + (f", model overrides {cfg.model_overrides}" if cfg.model_overrides else "")
        + (f", training overrides {cfg.train_overrides}" if cfg.train_overrides else "")
        + ". Validation accuracy (%) at the last epoch"
        + (" — mean ± sd over seeds" if cfg.seeds > 1 else "")
        + (f"; Δ: per seed, variant minus {REFERENCE} of the same seed" + (", mean ± sd" if cfg.seeds > 1 else "")
           if paired else "") + ".",
        "",
    ]

    def cells(r: dict) -> list[str]:
        out = [r["name"], f"{r['params'] / 1e6:.3f} M", "-" if r["steps"] is None else str(r["steps"])]
        out += [_cell(r["metrics"][m], cfg.seeds) for m in shown]
        if paired:
            stat = r["paired"][key] if r.get("paired") else None
            flag = noise_flag(stat, cfg.seeds) if r["name"] != REFERENCE else ""  # the reference: 0 by definition
            out.append(_cell(stat, cfg.seeds, sign=True) + (f" ({flag})" if flag else ""))
        return out + [_cell(r["train_time_s"], cfg.seeds)]

    lines += markdown_table(head, (cells(r) for r in rows))
    lines += ["", _noise_note(cfg.seeds, paired), ""]
    lines += markdown_table(("name", "what it is", "settings of its runs"),
                            ((r["name"], r["description"], settings_text(r.get("settings") or {})) for r in rows))
    return "\n".join(lines) + "\n"


def _noise_note(seeds: int, paired: bool) -> str:
    """The sentence under the table on how far its differences can be read."""
    if seeds < 2:
        return ("**One seed**: no seed-to-seed spread was measured, so a difference of a few points between rows may "
                "be noise (on small validation sets one clip is several points); run `--seeds 3` or more before "
                "reading a difference as an effect.")
    return (f"Spread over {seeds} seeds: ± is the sample standard deviation."
            + (" A paired Δ marked *within noise* is within 2 standard errors of zero (2 sd / √seeds): not "
               "distinguishable from no effect at this number of seeds." if paired else ""))
