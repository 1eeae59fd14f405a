"""CLI commands that train or measure on caches: ablate, efficiency (registered on `mambavl.cli.app`).

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

from mambavl.analysis.ablate import AblationConfig
from mambavl.analysis.efficiency import EfficiencyConfig
from mambavl.cli import app, defaults_from, fail, optional_path, positive
from mambavl.cli.config_file import ConfigOption, build_config
from mambavl.cli.progress import log_messages, rich_progress
from mambavl.errors import InputError


def _csv(value: str | None, what: str, cast: Callable[[str], Any] = str) -> tuple | None:
    """'a,b,c' -> ('a', 'b', 'c') (cast each); None stays None (option not given); a bad item is a BadParameter
    naming the option."""
    if value is None:
        return None
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
@defaults_from(EfficiencyConfig)
def efficiency_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for efficiency.md / .json / .png.")],
    lengths: Annotated[Optional[str], typer.Option(
        help="Total tokens per fused sequence (question + video), comma-separated.")] = None,
    fusions: Annotated[Optional[str], typer.Option(
        help="Fusion kinds, comma-separated: mamba, transformer, concat.")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Model preset the fusions are built from.")] = None,
    d_model: Annotated[Optional[int], typer.Option("--d-model", min=1, help="Model width (default: the preset's).")] = None,
    n_layers: Annotated[Optional[int], typer.Option("--n-layers", min=1, help="Fusion depth (default: the preset's).")]
    = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Clips per step.")] = None,
    question_tokens: Annotated[Optional[int], typer.Option(
        "--question-tokens", min=1, help="Question tokens in each sequence.")] = None,
    video_dim: Annotated[Optional[int], typer.Option("--video-dim", min=1, help="Feature dim of the video tokens.")] = None,
    text_dim: Annotated[Optional[int], typer.Option("--text-dim", min=1, help="Embedding dim of the question tokens.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, auto.")] = None,
    repeats: Annotated[Optional[int], typer.Option(min=1, help="Timed repeats per configuration (median reported).")] = None,
    memory: Annotated[Optional[str], typer.Option(help="Peak memory: auto, rss (CPU), cuda, none.")] = None,
    plot: Annotated[Optional[bool], typer.Option("--plot/--no-plot", help="Write efficiency.png.")] = None,
    memory_budget: Annotated[Optional[float], typer.Option(
        "--memory-budget", min=0.0, help="GiB the run may use (default: 80 % of the memory available now). A run "
                                         "whose estimated peak exceeds it is refused (exit 2) before it starts.")]
    = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Parameters, FLOPs, latency and peak memory of the fusion kinds against sequence length."""
    from mambavl.analysis.efficiency import efficiency_markdown, measure_efficiency

    try:
        cfg = build_config(EfficiencyConfig, None, {
            "out_dir": str(out), "lengths": _csv(lengths, "--lengths", int), "fusions": _csv(fusions, "--fusions"),
            "preset": preset, "d_model": d_model, "n_layers": n_layers, "batch_size": batch_size,
            "question_tokens": question_tokens, "video_dim": video_dim, "text_dim": text_dim, "device": device,
            "repeats": repeats, "memory": memory, "plot": plot,
            "memory_budget": None if memory_budget is None else int(memory_budget * 2**30)})
        with rich_progress("efficiency", quiet, log=log_messages("efficiency")) as progress:
            rows = measure_efficiency(cfg, progress=progress)
    except InputError as exc:
        raise fail(str(exc)) from None
    typer.echo(efficiency_markdown(rows), nl=False)
    typer.echo(f"wrote {out / 'efficiency.md'}")


# ----------------------------------------------------------------------------------------------------------------
# ablate


@app.command("ablate")
@defaults_from(AblationConfig, questions="question_source", set_="model_overrides")
def ablate_command(
    train_cache: Annotated[Optional[Path], typer.Option("--train-cache", help="Training feature cache (.h5).")] = None,
    val_cache: Annotated[Optional[Path], typer.Option(
        "--val-cache", help="Validation cache (.h5) the runs are compared on.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Folder: ablation.md, ablation.json, runs/<name>/seed<k>/.")] = None,
    presets: Annotated[
        Optional[str], typer.Option(help="Variants, comma-separated: full, paper, video-only, no-qa, disjoint-A, "
                                         "transformer, concat, predicted, probe-concat, probe-mean, zero-shot (or any "
                                         "preset).")
    ] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs of every run.")] = None,
    min_steps: Annotated[
        Optional[int], typer.Option("--min-steps", min=0, help="Fewest recognition steps of every run (small data: "
                                                               "smaller batch, several passes per epoch); 0 = off.")
    ] = None,
    seeds: Annotated[Optional[int], typer.Option(min=1, help="Runs per variant (seeds seed, seed+1, ...); >1 gives "
                                                             "mean ± sd and paired differences to video-only.")] = None,
    seed: Annotated[Optional[int], typer.Option(min=0, help="First seed.")] = None,
    questions: Annotated[Optional[str], typer.Option(help="Question protocol: templates, annotation, file.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Batch size of every run.")] = None,
    lr: Annotated[Optional[float], typer.Option(callback=positive, help="Peak learning rate of every run.")] = None,
    frames: Annotated[Optional[int], typer.Option(min=0, help="Frame tokens per clip, sub-sampled from the cache.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda ...")] = None,
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Model override for every run, key=value (repeatable).")
    ] = None,
    candidates_k: Annotated[
        Optional[int], typer.Option("--candidates-k", min=1, help="predicted: candidates per head (keep it well below "
                                                                  "the number of classes, or every clip is asked "
                                                                  "about nearly all of them).")
    ] = None,
    candidate_folds: Annotated[
        Optional[int], typer.Option("--candidate-folds", min=2, help="predicted: folds of the cross-fitted first pass.")
    ] = None,
    config: ConfigOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Train the ablation variants (and fit the linear probes) under one budget and several seeds; write a table with
    mean ± sd and paired differences to video-only."""
    from mambavl.analysis.ablate import run_ablation

    try:
        cfg = build_config(AblationConfig, config, {
            "train_cache": optional_path(train_cache), "val_cache": optional_path(val_cache),
            "out_dir": optional_path(out), "presets": _csv(presets, "--presets"), "epochs": epochs,
            "min_steps": min_steps, "seeds": seeds, "seed": seed, "question_source": questions,
            "batch_size": batch_size, "lr": lr, "frames": frames, "device": device,
            "model_overrides": _overrides(set_, "--set") or None, "candidates_k": candidates_k,
            "candidate_folds": candidate_folds})
        with rich_progress("ablate", quiet, log=log_messages("ablate")) as progress:
            result = run_ablation(cfg, progress=progress)
    except InputError as exc:
        raise fail(str(exc)) from None
    typer.echo(result["markdown"], nl=False)
    typer.echo(f"wrote {result['paths']['markdown']}")
