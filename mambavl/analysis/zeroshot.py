"""Zero-shot baseline: a cache's features scored against its own answer texts, with no training at all.

Each segment's feature is the mean of its valid frame tokens (recognition window); its verb and noun scores are the
cosine similarities with the cache's answer-text embeddings (``answers/verb``, ``answers/noun``, embedded by the
cache's text tower), times 100 (CLIP's logit scale: it only sharpens the softmax of the official action
composition). Verb, noun and action metrics then come from the same code `mambavl evaluate` uses
(`mambavl.evaluate.compute_metrics`: action = the official verb x noun composition), and the action prompts of the
cache (``answers/action``, "take cup") are scored too and reported as ``action_head``.

The number means something only when the image and text towers were trained together: a CLIP image encoder whose
text tower is the same model and weights (`towers`). With other towers (EfficientNet features and MiniLM text) the
spaces are unrelated and the result is a floor, not a baseline: it is computed, and said so. Towers of different
widths cannot be compared at all: refused (InputError).
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mambavl import __version__
from mambavl.cache import schema
from mambavl.cache.reader import CacheFile, open_cache, releases_caches, require_complete
from mambavl.errors import InputError, check_writable
from mambavl.evaluate import (
    Scored,
    cache_identity,
    compute_metrics,
    load_subsets,
    locate_subset_files,
    write_json,
)
from mambavl.extract.spec import FeatureSpec
from mambavl.progress import Progress, or_none

LOGIT_SCALE = 100.0
ROWS_PER_READ = 2048
FLOOR_WARNING = ("the image and text towers are not a matched pair ({why}): their embedding spaces were not trained "
                 "together, so the number is a floor, not a baseline")
PROTOCOL = ("zero-shot: mean of each segment's valid frame features, cosine similarity with the cache's answer-text "
            "embeddings (answers/verb, answers/noun); action = the official verb x noun composition of those scores; "
            "action_head = the action prompts (answers/action); no question, no training")


@dataclass
class ZeroShotConfig:
    """A zero-shot evaluation of `cache` into `out_dir`; the subset options are `EvalConfig`'s."""

    cache: str
    out_dir: str
    ek100_dir: str | None = None
    unseen_ids: str | None = None
    tail_verbs: str | None = None
    tail_nouns: str | None = None
    split: str | None = None
    ks: tuple[int, ...] = (1, 5)
    allow_incomplete: bool = False

    def __post_init__(self) -> None:
        self.cache, self.out_dir = str(self.cache), str(self.out_dir)
        if self.split is not None and self.split not in ("validation", "test"):
            raise InputError(f"zero-shot: split must be 'validation' or 'test', got {self.split!r}")


def towers(spec: FeatureSpec) -> dict[str, Any]:
    """Whether the cache's image and text towers are a matched pair: {"matched", "image", "text", "why"}. Matched:
    a CLIP image encoder, the CLIP text tower of the same model and weights (an unset text model or tag means the
    image model's own tower), and frame features that are the projected embedding (cls pooling)."""
    image = f"{spec.encoder}:{spec.model} ({spec.pretrained or 'none'}), dim {spec.feature_dim}"
    text_model, text_tag = spec.text_model or spec.model, spec.text_pretrained or spec.pretrained
    text = f"{spec.text_encoder}:{text_model} ({text_tag or 'none'}), dim {spec.text_dim}"
    why = ""
    if spec.encoder != "clip" or spec.text_encoder != "clip":
        why = f"image tower {spec.encoder}, text tower {spec.text_encoder}"
    elif (text_model, text_tag, spec.text_checkpoint_sha256) != (spec.model, spec.pretrained, spec.checkpoint_sha256):
        why = f"image {spec.model} ({spec.pretrained}), text {text_model} ({text_tag}): other models or weights"
    elif spec.tokens_per_frame_pooling not in ("", "cls"):
        why = f"frame features are {spec.tokens_per_frame_pooling}-pooled tokens, not the projected image embedding"
    return {"matched": not why, "image": image, "text": text, "why": why}


def pooled_features(cache: CacheFile, rows: np.ndarray) -> np.ndarray:
    """(R, D) float32: the mean of each row's valid frame tokens (the first num_frames of F; the rest is padding).
    `rows` increasing (as `valid_indices` gives them): each block of rows is one contiguous read."""
    f = cache.h5()
    feats, counts = f["features"], f["num_frames"][()].astype(np.int64)
    out = np.zeros((len(rows), feats.shape[2]), np.float32)
    with schema.reading(cache.path):
        for start in range(0, len(rows), ROWS_PER_READ):
            chunk = rows[start:start + ROWS_PER_READ]
            x = feats[chunk[0]:chunk[-1] + 1][chunk - chunk[0]].astype(np.float32)  # (r, F, D); rows increase
            n = np.clip(counts[chunk], 1, x.shape[1])
            keep = np.arange(x.shape[1])[None, :] < n[:, None]  # (r, F)
            out[start:start + len(chunk)] = (x * keep[..., None]).sum(1) / n[:, None]
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def zero_shot_scores(cache: CacheFile) -> tuple[Scored, np.ndarray, dict[str, Any]]:
    """Scores of every valid recognition row: (Scored, the action pairs of its action scores, towers(...)).
    InputError when the image and text widths differ or the cache has no answer table."""
    spec = FeatureSpec.from_attrs(cache.attrs)
    pair = towers(spec)
    answers = cache.answers()
    width = int(cache.h5()["features"].shape[2])
    if width != answers.verb.shape[1]:
        raise InputError(f"cache {cache.path}: features are {width}-d ({pair['image']}) but the answer texts "
                         f"{answers.verb.shape[1]}-d ({pair['text']}): a zero-shot score needs one embedding space")
    rows = np.asarray(cache.valid_indices(schema.RECOGNITION), np.int64)
    video = _unit(pooled_features(cache, rows))  # (N, D)
    verb = LOGIT_SCALE * video @ _unit(answers.verb).T  # (N, V)
    noun = LOGIT_SCALE * video @ _unit(answers.noun).T if len(cache.noun_keys) else None  # (N, Nn)
    action = LOGIT_SCALE * video @ _unit(answers.action).T if len(answers.action) else None  # (N, A)
    return Scored(verb=verb, noun=noun, action=action, rows=rows), answers.action_pairs, pair


@releases_caches
def zero_shot_evaluate(cfg: ZeroShotConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Score a labelled cache zero-shot and write metrics.json into `cfg.out_dir` (``zero_shot: true``, the
    protocol, the towers and, when they are not a matched pair, the warning). Returns the metrics.json content."""
    progress = or_none(progress)
    progress.start(2)
    out_dir = Path(cfg.out_dir)
    check_writable(out_dir, "--out")
    t0 = time.perf_counter()
    cache = open_cache(cfg.cache)
    completeness = require_complete(cache, schema.RECOGNITION, cfg.allow_incomplete, "evaluated")
    scored, pairs, pair = zero_shot_scores(cache)
    labels = cache.labels()
    if not bool(cache.attrs.get("has_labels", True)) or not (np.asarray(labels["verb_class"])[scored.rows] >= 0).any():
        raise InputError(f"cache {cfg.cache} has no labels: a zero-shot evaluation needs a labelled split")
    progress.advance(1, message="metrics")
    found, notes = locate_subset_files(cfg, cache.attrs)
    result: dict[str, Any] = {
        "mambavl_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "zero_shot": True,
        "task": "recognition",
        "window": schema.RECOGNITION,
        "question_source": "none (zero-shot)",
        "protocol": PROTOCOL,
        "towers": pair,
        "cache": cache_identity(cache),
        "cache_completeness": completeness,
        "config": asdict(cfg),
        "segments": {"cache": int(cache.n), "evaluated": int(len(scored.rows)),
                     "invalid_or_failed": int(cache.n - len(scored.rows))},
        "units": "percent",
        "subset_files": {k: (str(v) if v else None) for k, v in found.items()},
    }
    if not pair["matched"]:
        result["towers_warning"] = FLOOR_WARNING.format(why=pair["why"])
    if notes:
        result["subset_notes"] = notes
    result.update(compute_metrics(scored, labels, "recognition", load_subsets(found), cfg.ks,
                                  [tuple(p) for p in pairs.tolist()]))
    result["time_s"] = round(time.perf_counter() - t0, 3)
    result["files"] = {"metrics_json": str(out_dir / "metrics.json")}
    write_json(out_dir / "metrics.json", result)
    progress.advance(1, message="done")
    progress.finish()
    return result
