"""`mambavl export`: a checkpoint as a shareable model folder (Hugging Face layout) with its model card.

`export_model` loads the checkpoint (`TrainedModel.load`), writes `to_state()` without the resume state through
`mambavl.runtime.hub.write_folder` (config.json + model.safetensors) and a README.md model card: what the model is,
the features it reads, the training data and cache provenance, the licence the training annotations impose, the
metrics of an evaluation (metrics.json, when one is given or lies next to the checkpoint) with the question
protocol and the evaluation subsets, and the commands that load and evaluate it.

Paths of the machine that trained the model (`out_dir`, `train_cache`, `val_cache`) are exported as file names:
they say nothing on another machine and may name a user's home folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mambavl import __version__
from mambavl.errors import InputError
from mambavl.files import atomic_write_text
from mambavl.runtime import hub
from mambavl.runtime.artifact import TrainedModel
from mambavl.tables import markdown_table

PATH_FIELDS = ("out_dir", "train_cache", "val_cache")
EK100_LICENSE = "cc-by-nc-4.0"
EK100_NOTE = (
    "This model was trained on the EPIC-KITCHENS-100 annotations, which are licensed under CC BY-NC 4.0 "
    "(https://creativecommons.org/licenses/by-nc/4.0/): non-commercial use, with attribution to EPIC-KITCHENS-100 "
    "(Damen et al., \"Rescaling Egocentric Vision\", IJCV 2022). The mambavl code is MIT-licensed."
)
OTHER_NOTE = (
    "The training annotations ({name}) are not recognised as EPIC-KITCHENS-100's (EPIC_100_*.csv): their licence "
    "decides how this model may be used; set the `license` field above accordingly (EPIC-KITCHENS-100 annotations: "
    "CC BY-NC 4.0). The mambavl code is MIT-licensed."
)


def find_metrics(checkpoint: str, metrics: str | os.PathLike | None) -> Path | None:
    """The metrics.json to put in the card: `metrics` when given (InputError when missing), else a metrics.json
    next to the checkpoint file (or inside a model folder), else None."""
    if metrics is not None:
        path = Path(metrics)
        if path.is_dir():
            path = path / "metrics.json"
        if not path.is_file():
            raise InputError(f"--metrics {metrics}: no metrics.json there (`mambavl evaluate --out DIR` writes one)")
        return path
    local = Path(checkpoint)
    beside = (local if local.is_dir() else local.parent) / "metrics.json"
    return beside if hub.parse_hub(checkpoint) is None and beside.is_file() else None


def read_metrics(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "metrics" not in data:
        raise InputError(f"{path}: not a mambavl metrics.json (no 'metrics' entry)")
    return data


def shareable_state(run: TrainedModel) -> dict[str, Any]:
    """`run.to_state()` without the resume state, the machine's paths reduced to file names."""
    state = run.to_state(training=None)
    tc = dict(state["train_config"])
    for name in PATH_FIELDS:
        if tc.get(name):
            tc[name] = Path(str(tc[name])).name
    tc["resume"] = False
    state["train_config"] = tc
    return state


def export_model(checkpoint: str | os.PathLike, out: str | os.PathLike, metrics: str | os.PathLike | None = None,
                 repo: str | None = None) -> dict[str, Any]:
    """Write the model folder `out` for `checkpoint` (a file, a folder, or hf://). `metrics`: a metrics.json (or
    the folder holding one) for the card; `repo` ("ORG/NAME"): the hub id the card's commands use. Returns
    {"out", "files", "metrics"}. InputError for an unreadable checkpoint or metrics file, or a non-empty `out`
    that is not a model folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not hub.is_model_folder(out))):
        raise InputError(f"--out {out}: exists and is not an (empty) model folder; choose another")
    run = TrainedModel.load(checkpoint)
    metrics_path = find_metrics(str(checkpoint), metrics)
    state = shareable_state(run)
    found = read_metrics(metrics_path)
    config = hub.write_folder(state, out)
    atomic_write_text(out / hub.CARD, model_card(run, config, found, repo))
    return {"out": str(out), "files": sorted(p.name for p in out.iterdir() if p.is_file()),
            "metrics": str(metrics_path) if metrics_path else None}


# ----------------------------------------------------------------------------------------------------------------
# the model card


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def card_header(run: TrainedModel) -> tuple[str, bool]:
    """YAML front matter of the card (Hugging Face metadata) and whether the data is EPIC-KITCHENS-100's."""
    ann = run.annotation.get("file", "") or ""
    ek100 = Path(ann).name.upper().startswith("EPIC_100")
    lines = ["---", "library_name: mambavl", f"license: {EK100_LICENSE if ek100 else 'other'}",
             "pipeline_tag: video-classification",
             "tags: [mambavl, action-recognition, state-space-model" + (", epic-kitchens-100]" if ek100 else "]"),
             "---", ""]
    return "\n".join(lines), ek100


def model_section(run: TrainedModel, config: dict[str, Any]) -> list[str]:
    mc, tc = run.model_config, run.train_config
    params = sum(int(t.numel()) for t in run.weights.values())
    files = config["export"]["files"][hub.WEIGHTS]
    rows = [
        ("task", tc.task.value), ("preset", tc.preset),
        ("fusion", f"{mc.fusion.value} ({mc.scan_layout.value} scan, shared A: {mc.shared_A})"),
        ("width / layers / state", f"{mc.d_model} / {mc.n_layers} / {mc.d_state}"), ("parameters", f"{params:,}"),
        ("classes (verbs / nouns / actions)", f"{len(run.vocab.verbs)} / {len(run.vocab.nouns)} / "
                                              f"{len(run.vocab.action_pairs)}"),
        ("questions asked in training", tc.question_source.value),
        ("QA objective", f"weight {tc.qa_weight}"),
        ("self-questioning first pass", "yes" if run.first_pass else "no"),
        ("epochs / steps", f"{run.progress.epoch} / {run.progress.step}"),
        (f"best {run.selection_metric} (validation)", _fmt(run.progress.best_metric)),
        ("written by", f"mambavl {run.package_version} (checkpoint format {config['format']}); exported by "
                       f"mambavl {__version__}"),
        (hub.WEIGHTS, f"{files['bytes']:,} bytes, sha256 {files['sha256']}"),
    ]
    return ["## Model", "", *markdown_table(("field", "value"), rows), ""]


def data_section(run: TrainedModel) -> list[str]:
    f = run.features
    ann = run.annotation
    text_tower = f"{f.text_encoder}: {f.text_model or f.model} ({f.text_pretrained or f.pretrained or 'none'})"
    rows = [
        ("image/video encoder", f"{f.encoder}: {f.model} ({f.pretrained or 'none'}), feature dim {f.feature_dim}"),
        ("text tower", f"{text_tower}, dim {f.text_dim}"),
        ("sampling", f"{f.sampling_mode or '?'}, {f.frames_per_segment} tokens per segment, {f.frame_size} px, "
                     f"pooling {f.tokens_per_frame_pooling or '?'}"),
        ("training annotations", f"{ann.get('file') or '?'} (sha256 {ann.get('sha256') or '?'})"),
        ("training cache", f"{Path(str(run.train_config.train_cache)).name} (cache schema "
                           f"{run.cache_schema_version})"),
    ]
    return ["## Features and training data", "",
            "The model reads cached features of exactly these encoders (`mambavl evaluate` refuses a cache of "
            "others, naming the first difference):", "",
            *markdown_table(("field", "value"), rows), ""]


def metrics_section(metrics: dict[str, Any] | None) -> list[str]:
    """The card's evaluation: one row per (subset, task), the question protocol and the evaluated cache."""
    if not metrics or not metrics.get("metrics"):
        return ["## Evaluation", "", "No evaluation was exported with this model (`mambavl export --metrics "
                "EVAL/metrics.json` adds one); run the evaluation below.", ""]
    tree = metrics["metrics"]
    first = next(iter(next(iter(tree.values())).values()))
    keys = [k for k in first if k not in ("n", "classes")]
    cache = metrics.get("cache") or {}
    attrs = cache.get("attrs") or {}
    lines = ["## Evaluation", "",
             f"Question protocol: **{metrics.get('question_source')}** (trained with "
             f"{metrics.get('trained_question_source', '?')}); task {metrics.get('task')}, window "
             f"{metrics.get('window')}; {metrics.get('segments', {}).get('evaluated', '?')} segments of "
             f"{Path(str(cache.get('path', '?'))).name} (annotations {attrs.get('annotation_file', '?')}, sha256 "
             f"{attrs.get('annotation_sha256', '?')}); mambavl {metrics.get('mambavl_version', '?')}.", ""]
    if metrics.get("question_source_warning"):
        lines += [f"> {metrics['question_source_warning']}", ""]
    lines += markdown_table(("subset", "task", "segments", *keys),
                            ((subset, task, entry.get("n", ""), *(_fmt(entry.get(k)) for k in keys))
                             for subset, by_task in tree.items() for task, entry in by_task.items()))
    lines += ["", "Percent. Subsets: all segments, unseen participants, tail classes (EK-100 conventions); "
                  "action = verb and noun both right.", ""]
    return lines


def usage_section(repo: str | None) -> list[str]:
    ref = f"hf://{repo}" if repo else "hf://ORG/NAME"
    return ["## Use", "",
            "```bash",
            "# with mambavl installed (`pip install .` in its repository);",
            "# evaluate on a feature cache of the validation split, extracted with the encoders above",
            f"mambavl evaluate --checkpoint {ref} --cache val.h5 --out eval",
            f"mambavl predict clip.mp4 --checkpoint {ref}",
            f"mambavl audit-questions --checkpoint {ref} --cache val.h5 --out audit",
            "```", "",
            "```python",
            "from mambavl.runtime import TrainedModel",
            f'run = TrainedModel.load("{ref}")  # or the downloaded folder',
            "model = run.model()  # MambaVL in eval mode",
            "```", "",
            "`--checkpoint` takes this folder, `hf://ORG/NAME` or `hf://ORG/NAME@REVISION`; with `HF_HUB_OFFLINE=1` "
            "only the local Hugging Face cache is read. Loading checks the sha256 that config.json records for "
            "model.safetensors. No file of this folder is a pickle.", ""]


def model_card(run: TrainedModel, config: dict[str, Any], metrics: dict[str, Any] | None,
               repo: str | None = None) -> str:
    """The README.md of an exported model."""
    header, ek100 = card_header(run)
    title = f"# MambaVL — {run.task.value} ({run.train_config.preset})"
    intro = ("MambaVL fuses frozen video features with question tokens by selective state-space scans that share "
             "their state matrix between modalities, trained with an auxiliary question-answering objective "
             "(the mambavl package).")
    licence = EK100_NOTE if ek100 else OTHER_NOTE.format(
        name=run.annotation.get("file") or "not recorded in the checkpoint")
    parts = [header, title, "", intro, "", *model_section(run, config), *data_section(run),
             *metrics_section(metrics), "## Licence", "", licence, "", *usage_section(repo)]
    return "\n".join(parts).rstrip() + "\n"
