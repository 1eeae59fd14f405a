"""CLI commands around a trained model: demo, ablate, efficiency, predict (registered on `mambavl.cli.app`).

Each command parses its options into the library's config dataclass, calls the library function with a rich
progress bar (stderr, `mambavl.cli.progress`) unless `--quiet`, and prints a short summary. Bad input (InputError)
exits with code 2.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from mambavl.cli import app, fail, optional_path, positive
from mambavl.cli.progress import log_messages, rich_progress
from mambavl.errors import InputError


def _csv(value: str, what: str, cast: Callable[[str], Any] = str) -> tuple:
    """'a,b,c' -> ('a', 'b', 'c') (cast each); a bad item is a BadParameter naming the option."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise typer.BadParameter(f"expected a comma-separated list, got {value!r}", param_hint=what)
    try:
        return tuple(cast(v) for v in items)
    except ValueError:
        raise typer.BadParameter(f"cannot read {value!r} as a list of {cast.__name__}", param_hint=what) from None


def _overrides(items: Optional[list[str]], option: str) -> dict[str, Any]:
    """`key=value` strings -> dict; values read as JSON (numbers, booleans) with text as the fallback."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint=option)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


# ----------------------------------------------------------------------------------------------------------------
# efficiency


@app.command("efficiency")
def efficiency_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for efficiency.md / .json / .png.")],
    lengths: Annotated[str, typer.Option(help="Total tokens per fused sequence (question + video), comma-separated.")]
    = "256,1024,4096",
    fusions: Annotated[str, typer.Option(help="Fusion kinds, comma-separated: mamba, transformer, concat.")]
    = "mamba,transformer,concat",
    preset: Annotated[str, typer.Option(help="Model preset the fusions are built from.")] = "small",
    d_model: Annotated[Optional[int], typer.Option("--d-model", min=1, help="Model width (default: the preset's).")] = None,
    n_layers: Annotated[Optional[int], typer.Option("--n-layers", min=1, help="Fusion depth (default: the preset's).")]
    = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Clips per step.")] = 2,
    question_tokens: Annotated[int, typer.Option("--question-tokens", min=1, help="Question tokens in each sequence.")]
    = 32,
    video_dim: Annotated[int, typer.Option("--video-dim", min=1, help="Feature dim of the video tokens.")] = 512,
    text_dim: Annotated[int, typer.Option("--text-dim", min=1, help="Embedding dim of the question tokens.")] = 512,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, auto.")] = "cpu",
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats per configuration (median reported).")] = 3,
    memory: Annotated[str, typer.Option(help="Peak memory: auto, rss (CPU), cuda, none.")] = "auto",
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Write efficiency.png.")] = True,
    memory_budget: Annotated[Optional[float], typer.Option(
        "--memory-budget", min=0.0, help="GiB the run may use (default: 80 % of the memory available now). A run "
                                         "whose estimated peak exceeds it is refused (exit 2) before it starts.")]
    = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Parameters, FLOPs, latency and peak memory of the fusion kinds against sequence length."""
    from mambavl.analysis.efficiency import EfficiencyConfig, markdown_table, measure_efficiency

    try:
        cfg = EfficiencyConfig(
            out_dir=str(out), lengths=_csv(lengths, "--lengths", int), fusions=_csv(fusions, "--fusions"),
            preset=preset, d_model=d_model, n_layers=n_layers, batch_size=batch_size, question_tokens=question_tokens,
            video_dim=video_dim, text_dim=text_dim, device=device, repeats=repeats, memory=memory, plot=plot,
            memory_budget=None if memory_budget is None else int(memory_budget * 2**30),
        )
        with rich_progress("efficiency", quiet, log=log_messages("efficiency")) as progress:
            rows = measure_efficiency(cfg, progress=progress)
    except InputError as exc:
        raise fail(str(exc)) from None
    typer.echo(markdown_table(rows), nl=False)
    typer.echo(f"wrote {out / 'efficiency.md'}")


# ----------------------------------------------------------------------------------------------------------------
# ablate


@app.command("ablate")
def ablate_command(
    train_cache: Annotated[Path, typer.Option("--train-cache", help="Training feature cache (.h5).")],
    val_cache: Annotated[Path, typer.Option("--val-cache", help="Validation cache (.h5) the runs are compared on.")],
    out: Annotated[Path, typer.Option("--out", help="Folder: ablation.md, ablation.json, runs/<name>/seed<k>/.")],
    presets: Annotated[
        str, typer.Option(help="Variants, comma-separated: full, paper, video-only, no-qa, disjoint-A, transformer, "
                               "concat, predicted, probe-concat, probe-mean, zero-shot (or any preset).")
    ] = "full,paper,video-only,no-qa,disjoint-A,transformer,concat,predicted,probe-concat,probe-mean",
    epochs: Annotated[int, typer.Option(min=1, help="Epochs of every run.")] = 10,
    min_steps: Annotated[
        int, typer.Option("--min-steps", min=0, help="Fewest recognition steps of every run (small data: smaller batch, "
                                              "several passes per epoch); 0 = off.")
    ] = 1000,
    seeds: Annotated[int, typer.Option(min=1, help="Runs per variant (seeds seed, seed+1, ...); >1 gives mean ± sd and "
                                            "paired differences to video-only.")] = 1,
    seed: Annotated[int, typer.Option(min=0, help="First seed.")] = 0,
    questions: Annotated[str, typer.Option(help="Question protocol: templates, annotation, file.")] = "templates",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Batch size of every run.")] = 64,
    lr: Annotated[float, typer.Option(callback=positive, help="Peak learning rate of every run.")] = 1e-3,
    frames: Annotated[int, typer.Option(min=0, help="Frame tokens per clip, sub-sampled from the cache.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Model override for every run, key=value (repeatable).")
    ] = None,
    candidates_k: Annotated[
        int, typer.Option("--candidates-k", min=1, help="predicted: candidates per head (keep it well below the number of "
                                                 "classes, or every clip is asked about nearly all of them).")
    ] = 5,
    candidate_folds: Annotated[
        int, typer.Option("--candidate-folds", min=2, help="predicted: folds of the cross-fitted first pass.")
    ] = 5,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Train the ablation variants (and fit the linear probes) under one budget and several seeds; write a table with
    mean ± sd and paired differences to video-only."""
    from mambavl.analysis.ablate import AblationConfig, run_ablation

    try:
        cfg = AblationConfig(
            train_cache=str(train_cache), val_cache=str(val_cache), out_dir=str(out), presets=_csv(presets, "--presets"),
            epochs=epochs, min_steps=min_steps, seeds=seeds, seed=seed, question_source=questions,
            batch_size=batch_size, lr=lr,
            frames=frames, device=device, model_overrides=_overrides(set_, "--set"),
            candidates_k=candidates_k, candidate_folds=candidate_folds,
        )
        with rich_progress("ablate", quiet, log=log_messages("ablate")) as progress:
            result = run_ablation(cfg, progress=progress)
    except InputError as exc:
        raise fail(str(exc)) from None
    typer.echo(result["markdown"], nl=False)
    typer.echo(f"wrote {result['paths']['markdown']}")


# ----------------------------------------------------------------------------------------------------------------
# predict


@app.command("predict")
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
    top: Annotated[int, typer.Option(min=1, help="How many actions / answers to list.")] = 5,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the full result as JSON here.")]
    = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Top actions and the answers to the question bank for one clip, extracting features on the fly."""
    from mambavl.predict import PredictConfig, predict_video

    try:
        cfg = PredictConfig(video=str(video), checkpoint=str(checkpoint), cache=optional_path(cache),
                            start=start, stop=stop, top=top, device=device,
                            encoder_weights=optional_path(encoder_weights),
                            text_weights=optional_path(text_weights))
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
def demo_command(
    out: Annotated[Path, typer.Option("--out", help="Report folder (data, caches, runs, eval, audit, ablation).")]
    = Path("mambavl-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="Smaller data and budgets, no anticipation run (about two "
                                                         "minutes on 2 cores).")]
    = False,
    ablation: Annotated[bool, typer.Option("--ablation/--no-ablation", help="Run the short ablation.")] = True,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the data, the encoder init and the training runs.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, auto.")] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the results in a non-empty --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """The whole pipeline on generated kitchen clips, no downloads: extract, train, evaluate, audit, ablate."""
    from mambavl.demo import DemoConfig, report_markdown, run_demo

    try:
        cfg = DemoConfig(out_dir=str(out), quick=quick, seed=seed, device=device, ablation=ablation,
                         overwrite=overwrite)
        with rich_progress("demo", quiet, log=log_messages("demo")) as progress:
            summary = run_demo(cfg, progress=progress)
    except InputError as exc:
        raise fail(str(exc)) from None
    typer.echo(report_markdown(summary, out), nl=False)
    typer.echo(f"wrote {out / 'README.md'}")
