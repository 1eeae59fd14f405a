"""The embedded default job: the whole pipeline on generated "kitchen" clips, no downloads.

    make_kitchen_dataset  ->  extract (tiny random-init CLIP, recognition + anticipation windows)
      ->  train MambaVL (template questions)  ->  evaluate validation (+ test submission)
      ->  audit a model trained with the paper's annotation questions  ->  short ablation
      ->  report folder (README.md, metrics, plots) and a summary

In the clips the noun is visual (each object has its own shape and colour) and the verb is its motion, so a frozen
encoder with random weights still carries both; chance is 1/6 for verbs and nouns and 1/36 for actions. `quick`
shrinks every stage so the tests can run the demo (well under two minutes on two CPU cores); the default sizes take
a few minutes.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mambavl import __version__
from mambavl import metrics as M
from mambavl.analysis.ablate import AblationConfig, run_ablation
from mambavl.analysis.audit import AuditConfig, audit_questions
from mambavl.cache.build import ExtractConfig, run_extraction
from mambavl.data.synthetic import make_kitchen_dataset
from mambavl.errors import InputError
from mambavl.evaluate import EvalConfig, evaluate
from mambavl.extract.decode import SamplingConfig
from mambavl.extract.encoders import EncoderConfig, build_encoder
from mambavl.files import atomic_write_text
from mambavl.progress import Progress, Stages, part
from mambavl.runtime import Task
from mambavl.runtime.export import export_model
from mambavl.train import TrainConfig, train

TINY_MODEL = "mambavl-tiny-clip"


@dataclass
class DemoSizes:
    n_train: int
    n_val: int
    n_test: int
    frames: int            # decoded (= cached) frames per segment
    model_frames: int      # frame tokens the model consumes (sub-sampled from the cached ones during training)
    epochs: int
    ablation_epochs: int
    anticipation_epochs: int  # 0: skip the anticipation run
    d_model: int


QUICK = DemoSizes(n_train=120, n_val=30, n_test=6, frames=8, model_frames=8, epochs=24, ablation_epochs=2,
                  anticipation_epochs=0, d_model=64)
FULL = DemoSizes(n_train=240, n_val=60, n_test=24, frames=12, model_frames=8, epochs=16, ablation_epochs=8,
                 anticipation_epochs=12, d_model=64)
ABLATIONS = ("full", "no-qa", "disjoint-A", "video-only", "transformer", "concat")


@dataclass
class DemoConfig:
    out_dir: str = "mambavl-demo"
    quick: bool = False
    seed: int = 0
    device: str = "cpu"
    ablation: bool = True
    overwrite: bool = False
    sizes: DemoSizes | None = field(default=None)

    def __post_init__(self) -> None:
        self.out_dir = str(self.out_dir)
        if self.sizes is None:
            self.sizes = QUICK if self.quick else FULL


STAGES = 7


def _fmt(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def recognition_summary(metrics: dict) -> dict[str, float | None]:
    """Flat {verb_top1, noun_top1, action_top1, verb_top5, ...} (percent) of an evaluate() result, overall."""
    overall = (metrics.get("metrics") or {}).get("all") or {}
    out: dict[str, float | None] = {}
    for task in ("verb", "noun", "action"):
        entry = overall.get(task) or {}
        for key in ("top1", "top5"):
            out[f"{task}_{key}"] = entry.get(key)
    return out


def extract_splits(cfg: DemoConfig, ds: Any, folder: Path, progress: Progress | None = None) -> dict[str, Path]:
    """Extract the train / val / test caches of the demo dataset with one tiny random-init CLIP (seeded: the same
    weights every time); annotation questions for the labelled splits. Each split reports as a part of `progress`."""
    encoder = build_encoder(EncoderConfig(model=TINY_MODEL, pretrained="none", device=cfg.device, pooling="grid"))
    sampling = SamplingConfig(num_frames=cfg.sizes.frames, size=64)
    caches = {}
    for split, csv_path in (("train", ds.train_csv), ("val", ds.val_csv), ("test", ds.test_csv)):
        caches[split] = folder / f"{split}.h5"
        run_extraction(ExtractConfig(annotations=str(csv_path), videos=str(ds.videos), out=str(caches[split]),
                                     encoder=encoder.cfg, sampling=sampling, anticipation=True, tau_a=0.5,
                                     tau_o=1.0, questions=("templates", "annotation") if split != "test"
                                     else ("templates",)),
                       progress=part(progress, f"{split} segments"), encoder=encoder)
    return caches


def _summary(cfg: DemoConfig, ds: Any, val: dict, test: dict, audit: dict, anticipation: dict | None,
             ablation: dict | None, ckpt: str, timings: dict[str, float]) -> dict[str, Any]:
    """summary.json of a demo run (chance levels, validation, audit, anticipation, ablation, timings)."""
    sizes = cfg.sizes
    return {
        "mambavl_version": __version__,
        "config": {**asdict(cfg), "sizes": asdict(sizes)},
        "chance_percent": {f"{head}_top{k}": level[f"top{k}"] for head, level in M.chance_levels(
            {"verb": len(ds.verbs), "noun": len(ds.nouns), "action": len(ds.verbs) * len(ds.nouns)}).items()
            for k in (1, 5)},
        "validation": recognition_summary(val),
        "validation_official": val.get("official"),
        "test_submission": test["files"].get("submission_json"),
        "audit": {name: {"action_top1": p["metrics"].get("overall_action_top1", p["metrics"].get("action_top1")),
                         "metrics": p["metrics"], "leak": p.get("leak")}
                  for name, p in audit["protocols"].items()},
        "audit_findings": audit.get("findings", []),
        "anticipation": anticipation.get("official") if anticipation else None,
        "ablation_markdown": ablation["markdown"] if ablation else None,
        "checkpoint": ckpt,
        "seconds": timings,
    }


def prepare_out(cfg: DemoConfig) -> Path:
    """The report folder, created; InputError when it holds anything and `cfg.overwrite` is off (with it, the
    demo's own folders are removed first)."""
    out = Path(cfg.out_dir)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise InputError(f"demo output folder {out} is not empty; choose another --out or pass --overwrite")
        for name in ("data", "caches", "runs", "eval", "ablation", "audit", "anticipation", "model"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_demo(cfg: DemoConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the demo into `cfg.out_dir`; returns the summary also written to summary.json.

    Over 80 lines on purpose: the demo is a script of seven stages (data, extraction, training, evaluation, audit,
    anticipation, ablation), each a few library calls; it reads best as the one sequence a user would type."""

    sizes = cfg.sizes
    out = prepare_out(cfg)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    current: str | None = None
    stage_start = t0
    stages = Stages(progress, STAGES)

    def tick(message: str | None) -> None:
        nonlocal current, stage_start
        now = time.perf_counter()
        if current is not None:
            timings[current] = round(now - stage_start, 1)
        current, stage_start = message, now
        if message is None:
            stages.done()
        else:
            stages.enter(message)

    # 1. data
    tick("generating synthetic kitchen clips")
    ds = make_kitchen_dataset(out / "data", n_train=sizes.n_train, n_val=sizes.n_val, n_test=sizes.n_test,
                              seed=cfg.seed, progress=stages.part("clips"))

    # 2. extraction: one encoder for the three splits (random init, seeded: the same weights every time)
    tick("extracting features (tiny random-init CLIP, 2x2 grid pooling)")
    caches = extract_splits(cfg, ds, out / "caches", stages.progress)

    common = dict(train_cache=str(caches["train"]), val_cache=str(caches["val"]), preset="small",
                  model_overrides={"d_model": sizes.d_model}, batch_size=8, lr=3e-3, frames=sizes.model_frames,
                  seed=cfg.seed, device=cfg.device, warmup_epochs=1.0, label_smoothing=0.0,
                  # The demo keeps its fixed, short budget (the figures of docs/demo.md): no step floor, no early
                  # stopping; the step floor's effect is measured over three seeds in docs/model.md.
                  min_steps=0, patience=0)

    # 3. the main model: template questions (no label of the evaluated clip reaches the model)
    tick("training MambaVL (template questions)")
    main = train(TrainConfig(out_dir=str(out / "runs" / "templates"), epochs=sizes.epochs, **common),
                 progress=stages.part("steps"))

    # 4. evaluation: validation metrics + plots; test split: submission only
    tick("evaluating")
    ckpt = str(main.best_checkpoint or main.last_checkpoint)
    val = evaluate(EvalConfig(checkpoint=ckpt, cache=str(caches["val"]), out_dir=str(out / "eval" / "val"),
                              ek100_dir=str(ds.root), device=cfg.device, train_cache=str(caches["train"])),
                   progress=stages.part("validation"))
    # the submission's supervision levels are the submitter's declaration; the demo's: no pre-training (random
    # encoder weights), the levels of the official baselines for labels and data
    test = evaluate(EvalConfig(checkpoint=ckpt, cache=str(caches["test"]), out_dir=str(out / "eval" / "test"),
                               ek100_dir=str(ds.root), device=cfg.device, plots=False, sls_pt=0, sls_tl=3, sls_td=3),
                    progress=stages.part("test"))
    # the trained model as others would receive it: the Hugging Face layout with its model card
    export_model(ckpt, out / "model", metrics=out / "eval" / "val")

    # 5. the paper's protocol and the leak audit
    tick("training with the paper's annotation questions, auditing questions")
    paper = train(TrainConfig(out_dir=str(out / "runs" / "annotation"), epochs=sizes.epochs,
                              question_source="annotation", **common), progress=stages.part("steps"))
    audit = audit_questions(AuditConfig(checkpoint=str(paper.best_checkpoint or paper.last_checkpoint),
                                        cache=str(caches["val"]), out_dir=str(out / "audit"), ek100_dir=str(ds.root),
                                        device=cfg.device), progress=stages.part("audit"))

    # 6. anticipation (full demo only)
    tick("anticipation")
    anticipation = None
    if sizes.anticipation_epochs:
        ant = train(TrainConfig(out_dir=str(out / "runs" / "anticipation"), epochs=sizes.anticipation_epochs,
                                task=Task.ANTICIPATION, **common), progress=stages.part("steps"))
        anticipation = evaluate(EvalConfig(checkpoint=str(ant.best_checkpoint or ant.last_checkpoint),
                                           cache=str(caches["val"]), out_dir=str(out / "eval" / "anticipation"),
                                           ek100_dir=str(ds.root), device=cfg.device, plots=False),
                                progress=stages.part("evaluation"))

    # 7. ablation
    tick("ablation")
    ablation = None
    if cfg.ablation:
        ablation = run_ablation(AblationConfig(
            train_cache=str(caches["train"]), val_cache=str(caches["val"]), out_dir=str(out / "ablation"),
            presets=ABLATIONS, epochs=sizes.ablation_epochs, seed=cfg.seed, batch_size=8, lr=3e-3,
            frames=sizes.model_frames, min_steps=0, device=cfg.device, model_overrides={"d_model": sizes.d_model},
            train_overrides={"label_smoothing": 0.0}), progress=stages.part("ablation"))

    tick(None)
    summary = _summary(cfg, ds, val, test, audit, anticipation, ablation, ckpt, timings)
    summary["seconds_total"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    atomic_write_text(out / "README.md", report_markdown(summary, out))
    return summary


def report_markdown(summary: dict[str, Any], out: Path) -> str:
    """The report folder's README: what was done, the numbers, and where the files are."""
    s = summary["config"]["sizes"]
    chance = summary["chance_percent"]
    val = summary["validation"]
    lines = [
        "# mambavl demo report",
        "",
        f"mambavl {summary['mambavl_version']}. Generated kitchen clips (the noun is the object's shape and colour, "
        "the verb its motion), six verbs and six nouns; EK-100 file layout and CSV formats. Features from a tiny "
        f"CLIP with random weights (`{TINY_MODEL}`, `--pretrained none`, `--pooling grid`: a random class token "
        f"hardly sees where an object is, the 2x2 grid does), {s['frames']} frames per segment. "
        f"{s['n_train']} training, {s['n_val']} validation and {s['n_test']} test segments. MambaVL `small` "
        f"(d_model {s['d_model']}), {s['epochs']} epochs, trained and evaluated with **template questions** "
        "(no label of a clip reaches the model).",
        "",
        "## Validation (percent)",
        "",
        "| | top-1 | top-5 | chance top-1 | chance top-5 |",
        "|---|---|---|---|---|",
    ]
    for task in ("verb", "noun", "action"):
        lines.append(f"| {task} | {_fmt(val.get(f'{task}_top1'))} | {_fmt(val.get(f'{task}_top5'))} | "
                     f"{chance[f'{task}_top1']:.1f} | {chance[f'{task}_top5']:.1f} |")
    lines += ["", f"Seed {summary['config']['seed']}, one training run: the figures vary with the seed, the torch "
                  "build and the machine (float rounding in training changes which clips end up right); compare runs "
                  "of one machine, and read differences of a few points as noise unless several seeds agree."]
    lines += [
        "",
        "Full metrics (unseen participants, tail classes, per class) in `eval/val/metrics.json` and "
        "`eval/val/per_class.csv`; plots in `eval/val/`. The test split has no labels: "
        "`eval/test/submission.json` is its challenge-format submission. The run's curves (loss and validation "
        "top-1 per epoch) are `runs/templates/curves.png`, its log `runs/templates/train.log`; `model/` is the "
        "trained model exported for sharing (`config.json`, `model.safetensors`, the model card `README.md`): "
        "`mambavl evaluate --checkpoint model ...` and `mambavl push model --repo ORG/NAME` take it.",
        "",
        "## Question audit",
        "",
        "A second model was trained with the paper's protocol (questions written from each clip's narration, the "
        "other label masked) and evaluated under each protocol; `annotation-shuffled` gives every clip another "
        "clip's question. See `audit/audit.md`.",
        "",
    ]
    lines += [f"- {f}" for f in summary.get("audit_findings") or []] or ["- (no findings)"]
    if summary.get("anticipation"):
        lines += ["", "## Anticipation (class-mean top-5 recall, percent)", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in summary["anticipation"].items()]
    if summary.get("ablation_markdown"):
        lines += ["", "## Ablation", "", summary["ablation_markdown"]]
    lines += ["", "## Time (seconds)", ""]
    lines += [f"- {k}: {v}" for k, v in summary["seconds"].items() if v]
    lines += [f"- total: {summary['seconds_total']}", ""]
    return "\n".join(lines)
