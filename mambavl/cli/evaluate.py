"""CLI commands of the evaluate stage (registered on `mambavl.cli.app`).

* ``mambavl evaluate`` — metrics, per-class table, plots and challenge submission (`mambavl.evaluate.evaluate`);
  with ``--zero-shot`` and no checkpoint, the cache's features against its answer texts
  (`mambavl.analysis.zeroshot.zero_shot_evaluate`);
* ``mambavl audit-questions`` — the same checkpoint under every question protocol, shuffled questions and the
  static leak check (`mambavl.analysis.audit.audit_questions`).

Each command builds a config and calls the library; the rest of this module is presentation (rich tables).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from mambavl.analysis.audit import AuditConfig
from mambavl.cli import app, cache_app, defaults_from, fail, optional_path  # noqa: F401
from mambavl.cli.config_file import ConfigOption, build_config, precision_option
from mambavl.cli.progress import rich_progress
from mambavl.errors import InputError
from mambavl.evaluate import EvalConfig
from mambavl.extract.questions import QuestionSource
from mambavl.runtime import Task

# Options of both commands here, whose defaults (the same in EvalConfig and AuditConfig) help shows from the configs.
BatchSizeOption = Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Segments per forward pass.")]
DeviceOption = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 ...")]

# ----------------------------------------------------------------------------------------------------------------
# presentation


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.2f}"


def _metrics_table(result: dict) -> Any:
    """Rich table: one row per (subset, task) with its segment count and metrics (narrow enough for 80 columns)."""
    metrics = result["metrics"]
    first = next(iter(metrics["all"].values()))
    keys = [k for k in first if k not in ("n", "classes")]
    title = f"{result['task']} — questions: {result['question_source']}"
    if result["question_source"] == "annotation":
        title += " (narration-derived: see warning)"
    table = Table(title=title)
    for name in ("subset", "task", "segments", *keys):
        table.add_column(name, justify="left" if name in ("subset", "task") else "right")
    for subset, by_task in metrics.items():
        for i, (task, entry) in enumerate(by_task.items()):
            table.add_row(subset if i == 0 else "", task, str(entry["n"]), *(_fmt(entry.get(k)) for k in keys),
                          end_section=i == len(by_task) - 1)
    # chance (uniform random ranking) under each head's numbers: with 6 classes top-5 chance is 83 %
    chance = {h: c for h, c in (result.get("chance") or {}).items() if h in metrics["all"]}
    for i, (task, entry) in enumerate(chance.items()):
        cells = []
        for k in keys:
            m = re.search(r"(?:top|@)(\d+)$", k)
            cells.append(_fmt(entry.get(f"top{m.group(1)}")) if m else "")
        table.add_row("chance" if i == 0 else "", task, f"{entry['classes']} cl.", *cells)
    return table


def _audit_table(report: dict) -> Any:
    """Rich table: one row per protocol; each metric cell reads "value (Δ vs templates)"."""
    protos = report["protocols"]
    keys = [k for k in next(iter(protos.values()))["metrics"] if k.endswith(("top1", "recall@5"))]
    table = Table(title=f"question audit (trained with {report['trained_question_source']} questions)")
    table.add_column("protocol", no_wrap=True)
    for k in keys:
        table.add_column(k, justify="right")
    table.add_column("leak v/n", justify="right")
    table.add_column("labels permuted", justify="right")
    for name, p in protos.items():
        row = [name]
        for k in keys:
            d = p["delta_vs_templates"].get(k)
            row.append(_fmt(p["metrics"].get(k)) + ("" if d is None else f" ({d:+.1f})"))
        row.append(f"{_fmt(p['leak'].get('verb'))}/{_fmt(p['leak'].get('noun'))}")
        perm = p.get("label_permutation")
        row.append("–" if perm is None else "identical" if perm["identical"] else f"{perm['rows_changed']} changed")
        table.add_row(*row)
    return table


def _qa_lines(result: dict) -> list[str]:
    """QA accuracy per question kind, and the self-questioning candidates' recall, as short lines."""
    lines = []
    for kind, entry in (result.get("qa") or {}).items():
        scores = ", ".join(f"{k} {_fmt(v)}" for k, v in entry.items() if k.startswith("top") or k == "mAP")
        lines.append(f"QA {kind} ({entry['answers']}, {entry['n']} segments): {scores}")
    if result.get("qa_note"):
        lines.append(f"QA {result['qa_note']}")
    cand = result.get("candidates")
    if cand:
        def fmt(d: dict) -> str:
            return "/".join(_fmt(d.get(t)) for t in ("verb", "noun") if t in d) or "–"
        lines.append(f"candidates recall@{cand['k']} verb/noun: this split {fmt(cand['recall_at_k'])}, training rows "
                     f"{fmt(cand['train_recall_at_k'])} (first pass: {cand['first_pass']})")
    return lines


def _with_progress(label: str, quiet: bool, fn, cfg):
    with rich_progress(label, quiet) as bar:
        return fn(cfg, progress=bar)


# ----------------------------------------------------------------------------------------------------------------
# commands


@app.command("evaluate")
@defaults_from(EvalConfig)
def evaluate_command(
    cache: Annotated[Path, typer.Option("--cache", help="Feature cache to evaluate (.h5).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: metrics.json, per_class.csv, PNGs, submission.")],
    checkpoint: Annotated[
        Optional[Path], typer.Option("--checkpoint", help="Checkpoint (best.pt / last.pt), a model folder "
                                                          "(`mambavl export`) or hf://ORG/NAME[@REV].")
    ] = None,
    zero_shot: Annotated[
        bool, typer.Option("--zero-shot", help="No checkpoint: score each segment's mean feature against the "
                                               "cache's answer-text embeddings (cosine).")
    ] = False,
    questions: Annotated[
        Optional[QuestionSource],
        typer.Option(help="Question protocol; default: the checkpoint's. 'predicted' needs a checkpoint trained with "
                          "it (it carries the first pass); 'annotation' is reported as leaking."),
    ] = None,
    ek100_dir: Annotated[
        Optional[Path], typer.Option("--ek100-dir", help="Folder with EPIC_100_tail_*.csv / unseen-participant CSVs.")
    ] = None,
    split: Annotated[
        Optional[str], typer.Option(help="validation or test (picks the unseen-participant list); default: from the "
                                         "cache's annotation file name.")
    ] = None,
    unseen_ids: Annotated[Optional[Path], typer.Option("--unseen-ids", help="Unseen participant ids CSV.")] = None,
    tail_verbs: Annotated[Optional[Path], typer.Option("--tail-verbs", help="Tail verb classes CSV.")] = None,
    tail_nouns: Annotated[Optional[Path], typer.Option("--tail-nouns", help="Tail noun classes CSV.")] = None,
    train_cache: Annotated[
        Optional[Path], typer.Option("--train-cache", help="Training cache for class frequencies (default: the "
                                                           "checkpoint's, when it still exists).")
    ] = None,
    task: Annotated[Optional[Task], typer.Option(help="recognition or anticipation; default: the checkpoint's.")] = None,
    batch_size: BatchSizeOption = None,
    device: DeviceOption = None,
    precision: precision_option("the fusion model's forward passes", "fp32, the scores training validated with") = None,
    plots: Annotated[Optional[bool], typer.Option("--plots/--no-plots", help="Write PNG plots.")] = None,
    submission: Annotated[Optional[bool], typer.Option("--submission/--no-submission", help="Write submission.json/.zip.")] = None,
    sls_pt: Annotated[Optional[int], typer.Option("--sls-pt", min=0, max=5, help="Submission: your pre-training supervision level 0-5 (https://github.com/epic-kitchens/sls). The three levels are required for a submission.")] = None,
    sls_tl: Annotated[Optional[int], typer.Option("--sls-tl", min=0, max=5, help="Submission: your training-label supervision level 0-5.")] = None,
    sls_td: Annotated[Optional[int], typer.Option("--sls-td", min=0, max=5, help="Submission: your training-data level 0-5.")] = None,
    allow_incomplete: Annotated[Optional[bool], typer.Option("--allow-incomplete", help="Evaluate a cache whose extraction did not finish (its finished rows; recorded in metrics.json as cache_completeness), and write the submission even though some segments failed or were not extracted (the challenge server rejects it).")] = None,
    config: ConfigOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or table.")] = False,
) -> None:
    """Evaluate a checkpoint on a cache: EK-100 metrics, per-class accuracy, plots, challenge submission (or, with
    --zero-shot, the cache's features against its own answer texts)."""
    from mambavl.evaluate import evaluate

    if zero_shot:
        _zero_shot(checkpoint, cache, out, ek100_dir, split, unseen_ids, tail_verbs, tail_nouns,
                   bool(allow_incomplete), quiet)
        return
    if checkpoint is None and config is None:
        raise fail("--checkpoint is required (or --zero-shot, to score the cache against its answer texts)")
    try:
        cfg = build_config(EvalConfig, config, {
            "checkpoint": optional_path(checkpoint), "cache": str(cache), "out_dir": str(out),
            "question_source": questions, "task": task,
            "batch_size": batch_size, "device": device, "ek100_dir": optional_path(ek100_dir),
            "unseen_ids": optional_path(unseen_ids), "tail_verbs": optional_path(tail_verbs),
            "tail_nouns": optional_path(tail_nouns), "split": split, "train_cache": optional_path(train_cache),
            "plots": plots, "submission": submission, "sls_pt": sls_pt, "sls_tl": sls_tl, "sls_td": sls_td,
            "allow_incomplete": allow_incomplete, "precision": precision})
        result = _with_progress("evaluate", quiet, evaluate, cfg)
    except InputError as exc:
        raise fail(str(exc)) from None
    if quiet:
        return

    console = Console()
    if result.get("metrics"):
        console.print(_metrics_table(result))
        for line in _qa_lines(result):
            console.print(line)
    else:
        console.print(result.get("note", "no metrics"))
    for key in ("question_source_warning", "segments_warning", "submission_note"):
        if key in result:
            console.print(f"[yellow]warning:[/] {result[key]}")
    for note in result.get("subset_notes", []) + result.get("metric_notes", []):
        console.print(f"note: {note}")
    console.print(f"wrote {Path(result['files']['metrics_json']).parent}")


def _zero_shot(checkpoint: Optional[Path], cache: Path, out: Path, ek100_dir: Optional[Path],
               split: Optional[str], unseen_ids: Optional[Path], tail_verbs: Optional[Path],
               tail_nouns: Optional[Path], allow_incomplete: bool, quiet: bool) -> None:
    """`mambavl evaluate --zero-shot` (`mambavl.analysis.zeroshot`); refuses --checkpoint with it."""
    if checkpoint is not None:
        raise fail("--zero-shot evaluates the cache's own features and answer texts: drop --checkpoint")
    from mambavl.analysis.zeroshot import ZeroShotConfig, zero_shot_evaluate

    try:
        cfg = ZeroShotConfig(cache=str(cache), out_dir=str(out), ek100_dir=optional_path(ek100_dir), split=split,
                             unseen_ids=optional_path(unseen_ids), tail_verbs=optional_path(tail_verbs),
                             tail_nouns=optional_path(tail_nouns), allow_incomplete=allow_incomplete)
        result = _with_progress("zero-shot", quiet, zero_shot_evaluate, cfg)
    except InputError as exc:
        raise fail(str(exc)) from None
    if "towers_warning" in result:  # said even with --quiet: it changes what the number means
        typer.echo(f"warning: {result['towers_warning']}", err=True)
    if quiet:
        return
    console = Console()
    console.print(_metrics_table(result))
    console.print(f"note: {result['protocol']}")
    if result.get("action_head"):
        console.print(f"action prompts (answers/action) top-1: {_fmt(result['action_head'].get('top1'))}")
    console.print(f"wrote {Path(result['files']['metrics_json']).parent}")


@app.command("audit-questions")
@defaults_from(AuditConfig, seed="shuffle_seed")
def audit_command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint to audit.")],
    cache: Annotated[Path, typer.Option("--cache", help="Labelled feature cache (.h5), e.g. the validation split.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: audit.json, audit.md.")],
    ek100_dir: Annotated[
        Optional[Path], typer.Option("--ek100-dir", help="Folder with EPIC_100_verb_classes.csv / noun_classes.csv "
                                                         "(class instances for the static leak check).")
    ] = None,
    verb_classes: Annotated[Optional[Path], typer.Option("--verb-classes", help="Verb classes CSV.")] = None,
    noun_classes: Annotated[Optional[Path], typer.Option("--noun-classes", help="Noun classes CSV.")] = None,
    seed: Annotated[Optional[int], typer.Option(min=0, help="Seed of the question shuffle (the label permutation uses seed + 1).")] = None,
    task: Annotated[Optional[Task], typer.Option(help="recognition or anticipation; default: the checkpoint's.")] = None,
    batch_size: BatchSizeOption = None,
    device: DeviceOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or table.")] = False,
) -> None:
    """Measure how much accuracy comes from the question text: every protocol, shuffled questions, a
    label-permutation check (scores must not change when the labels are permuted across segments), leak rates."""
    from mambavl.analysis.audit import audit_questions

    try:
        cfg = build_config(AuditConfig, None, {
            "checkpoint": str(checkpoint), "cache": str(cache), "out_dir": str(out), "task": task,
            "batch_size": batch_size, "device": device, "shuffle_seed": seed, "ek100_dir": optional_path(ek100_dir),
            "verb_classes": optional_path(verb_classes), "noun_classes": optional_path(noun_classes)})
        report = _with_progress("audit", quiet, audit_questions, cfg)
    except InputError as exc:
        raise fail(str(exc)) from None
    if quiet:
        return

    console = Console()
    console.print(_audit_table(report))
    for finding in report.get("findings", []):
        console.print(f"[yellow]finding:[/] {finding}")
    console.print(f"wrote {report['files']['audit_md']}")
