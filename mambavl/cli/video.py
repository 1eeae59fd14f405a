"""CLI commands that decode video: predict, demo (registered on `mambavl.cli.app`).

Kept apart from `mambavl.cli.tools` (ablate, efficiency: caches only) so that the commands which train and measure
on cached features import none of the decoding libraries. Each command parses its options into the library's config
dataclass, calls the library function with a rich progress bar (stderr, `mambavl.cli.progress`) unless `--quiet`,
and prints a short summary. Bad input (InputError) exits with code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mambavl.cli import app, defaults_from, fail, optional_path, positive
from mambavl.cli.config_file import build_config, precision_option
from mambavl.cli.progress import log_messages, rich_progress
from mambavl.demo import DemoConfig
from mambavl.errors import InputError
from mambavl.predict import PredictConfig


# ----------------------------------------------------------------------------------------------------------------
# predict


@app.command("predict")
@defaults_from(PredictConfig)
def predict_command(
    video: Annotated[Path, typer.Argument(help="Video file (any format ffmpeg reads).")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Trained checkpoint (best.pt / last.pt).")],
    start: Annotated[Optional[float], typer.Option(min=0.0, help="Segment start in seconds (default: 0).")] = None,
    stop: Annotated[Optional[float], typer.Option(callback=positive, help="Segment stop in seconds (default: the end).")] = None,
    cache: Annotated[
        Optional[Path], typer.Option("--cache", help="A cache from the same encoder: its question/answer tables are "
                                                     "reused instead of re-embedding them.")
    ] = None,
    encoder_weights: Annotated[
        Optional[Path], typer.Option("--encoder-weights", help="Local encoder checkpoint, when the training cache was "
                                                               "extracted from one (its sha256 is checked).")
    ] = None,
    text_weights: Annotated[
        Optional[Path], typer.Option("--text-weights", help="Local text encoder weights (file, or a Hugging Face "
                                                            "folder), when the training cache used them (sha256 "
                                                            "checked). Not needed for pkg:NAME weights.")
    ] = None,
    top: Annotated[Optional[int], typer.Option(min=1, help="How many actions / answers to list.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda ...")] = None,
    precision: precision_option("the encoders and the fusion model", "fp16 encoders as extraction, fp32 fusion")
    = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the full result as JSON here.")]
    = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Top actions and the answers to the question bank for one clip, extracting features on the fly."""
    from mambavl.predict import predict_video

    try:
        cfg = build_config(PredictConfig, None, {
            "video": str(video), "checkpoint": str(checkpoint), "cache": optional_path(cache), "start": start,
            "stop": stop, "top": top, "device": device, "encoder_weights": optional_path(encoder_weights),
            "text_weights": optional_path(text_weights), "precision": precision})
        with rich_progress("predict", quiet, log=log_messages("predict")) as progress:
            result = predict_video(cfg, progress=progress)
    except InputError as exc:
        raise fail(str(exc)) from None
    console = Console(width=120)
    heads = result["dataset"]["heads"]
    has_nouns = any(a["noun"] for a in result["actions"])
    table = Table(title=f"{video.name} [{result['start']:.2f}, {result['stop']:.2f}] s — top "
                        f"{'actions' if has_nouns else heads['verb'] + 's'}, from the recognition heads")
    for col in ("rank", heads["verb"], *([heads["noun"]] if has_nouns else []), "score"):
        table.add_column(col)
    for i, a in enumerate(result["actions"], 1):
        table.add_row(str(i), a["verb"], *([a["noun"] or ""] if has_nouns else []), f"{a['score']:.3f}")
    console.print(table)
    if result["qa"]:
        console.print("QA head answers (answer texts scored by the QA head, a separate output trained by the QA "
                      "objective: they can differ from the table above):")
    for kind, qa in result["qa"].items():
        answers = ", ".join(f"{a['answer']} ({a['score']:.2f})" for a in qa["answers"][:3])
        console.print(f"  QA head, [bold]{qa['question']}[/] -> {answers}")
    cand = result.get("candidates")
    if cand:
        for head in ("verb", "noun"):
            if head in cand:
                listed = ", ".join(f"{c['label']} ({c['first_pass_score']:.2f})" for c in cand[head])
                console.print(f"self-questioning: {head} candidates asked about -> {listed}")
    for note in result["notes"]:
        console.print(f"note: {note}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# demo


@app.command("demo")
@defaults_from(DemoConfig, out="out_dir")
def demo_command(
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Report folder (data, caches, runs, eval, audit, ablation).")] = None,
    quick: Annotated[Optional[bool], typer.Option(
        "--quick", help="Smaller data and budgets, no anticipation run (about a minute on 2 cores).")] = None,
    ablation: Annotated[Optional[bool], typer.Option("--ablation/--no-ablation", help="Run the short ablation.")] = None,
    seed: Annotated[Optional[int], typer.Option(
        min=0, help="Seed of the data, the encoder init and the training runs.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, auto.")] = None,
    overwrite: Annotated[Optional[bool], typer.Option(
        "--overwrite", help="Replace the results in a non-empty --out.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """The whole pipeline on generated kitchen clips, no downloads: extract, train, evaluate, audit, ablate."""
    from mambavl.demo import report_markdown, run_demo

    try:
        cfg = build_config(DemoConfig, None, {"out_dir": optional_path(out), "quick": quick, "seed": seed,
                                              "device": device, "ablation": ablation, "overwrite": overwrite})
        out = Path(cfg.out_dir)
        with rich_progress("demo", quiet, log=log_messages("demo")) as progress:
            summary = run_demo(cfg, progress=progress)
    except InputError as exc:
        raise fail(str(exc)) from None
    typer.echo(report_markdown(summary, out), nl=False)
    typer.echo(f"wrote {out / 'README.md'}")
