"""CLI commands that share a trained model (registered on `mambavl.cli.app`).

* ``mambavl export`` — a checkpoint as a folder in the Hugging Face model layout with its model card
  (`mambavl.runtime.export.export_model`);
* ``mambavl push`` — upload such a folder to the Hugging Face Hub (`mambavl.runtime.hub.push_folder`).

`evaluate`, `predict` and `audit-questions` read the folder, or ``hf://ORG/NAME[@REV]``, as ``--checkpoint``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mambavl.cli import app, fail, optional_path
from mambavl.errors import InputError


@app.command("export")
def export_command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint to share (best.pt / last.pt), or a "
                                                                  "model folder.")],
    out: Annotated[Path, typer.Option("--out", help="Model folder to write: config.json, model.safetensors, "
                                                    "README.md (the model card).")],
    metrics: Annotated[
        Optional[Path], typer.Option("--metrics", help="metrics.json of an evaluation (or its folder) for the card; "
                                                       "default: a metrics.json next to the checkpoint.")
    ] = None,
    repo: Annotated[
        Optional[str], typer.Option("--repo", help="ORG/NAME the card's commands load from (hf://ORG/NAME).")
    ] = None,
) -> None:
    """Write a checkpoint as a Hugging Face model folder (json + safetensors, no pickle) with its model card."""
    from mambavl.runtime.export import export_model

    try:
        result = export_model(str(checkpoint), out, metrics=optional_path(metrics), repo=repo)
    except InputError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {result['out']}: {', '.join(result['files'])}"
               + (f" (card metrics from {result['metrics']})" if result["metrics"] else " (no metrics in the card)"))


@app.command("push")
def push_command(
    folder: Annotated[Path, typer.Argument(help="Model folder written by `mambavl export`.")],
    repo: Annotated[str, typer.Option("--repo", help="Hugging Face model repository ORG/NAME (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to upload to (default: main).")] = None,
    message: Annotated[Optional[str], typer.Option("--message", help="Commit message.")] = None,
) -> None:
    """Upload a model folder to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)."""
    from mambavl.runtime.hub import push_folder

    try:
        result = push_folder(folder, repo, private=private, revision=revision, message=message)
    except InputError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"uploaded {folder} to {result['url']}; load it with --checkpoint hf://{repo}")
