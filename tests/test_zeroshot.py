"""Zero-shot baseline (`mambavl evaluate --zero-shot`, the ablation's zero-shot row): a cache's mean frame features
scored against its own answer texts. Planted caches whose features live in the answer-text space (the answer
embedding of the true verb + noun, plus noise) must score high; the same features in a rotated space near chance."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from mambavl.analysis.ablate import AblationConfig, run_ablation
from mambavl.analysis.zeroshot import towers
from mambavl.cache.synthetic import make_planted_cache
from mambavl.cli import app
from mambavl.extract.spec import FeatureSpec

CLIP = dict(encoder="clip", model="ViT-B-32", pretrained="openai", text_encoder="clip", text_model="ViT-B-32",
            text_pretrained="openai")
CHANCE = 100 / 6  # six planted verbs


def _planted(path: Path, rotate: bool, attrs: dict | None = None) -> Path:
    """A planted cache whose frame tokens are answers/verb[v] + answers/noun[n] + noise (rotated: the same points
    in a random orthonormal basis, so the text space no longer lines up)."""
    make_planted_cache(path, n=120, frames=4, dim=32, text_dim=32, seed=1)
    rng = np.random.default_rng(0)
    with h5py.File(path, "a") as f:
        v, n = f["verb_class"][()], f["noun_class"][()]
        x = f["answers/verb"][()][v][:, None] + f["answers/noun"][()][n][:, None]  # (N, 1, D)
        x = x + 0.3 * rng.normal(size=(len(v), f["features"].shape[1], 32))  # (N, F, D)
        if rotate:
            x = x @ np.linalg.qr(rng.normal(size=(32, 32)))[0]
        f["features"][...] = x.astype(np.float16)
        for k, val in (attrs or {}).items():
            f.attrs[k] = val
    return path


def _evaluate(args: list[str]):
    return CliRunner().invoke(app, ["evaluate", "--zero-shot", *args])


def test_aligned_spaces_score_high_and_say_zero_shot(tmp_path):
    cache = _planted(tmp_path / "val.h5", rotate=False, attrs=CLIP)
    res = _evaluate(["--cache", str(cache), "--out", str(tmp_path / "zs")])
    assert res.exit_code == 0, res.output
    assert "not a matched pair" not in res.output and "zero-shot" in res.output
    m = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert m["zero_shot"] is True and m["towers"]["matched"] and "cosine" in m["protocol"]
    assert m["metrics"]["all"]["verb"]["top1"] > 90 and m["metrics"]["all"]["noun"]["top1"] > 90
    assert m["metrics"]["all"]["action"]["top1"] > 80 and m["action_head"]["top1"] > 80


def test_misaligned_spaces_score_near_chance_and_are_called_a_floor(tmp_path):
    cache = _planted(tmp_path / "val.h5", rotate=True)  # the planted encoder: not a CLIP pair
    res = _evaluate(["--cache", str(cache), "--out", str(tmp_path / "zs"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "not a matched pair" in res.output and "floor, not a baseline" in res.output
    m = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert not m["towers"]["matched"] and "floor" in m["towers_warning"]
    assert m["metrics"]["all"]["verb"]["top1"] < 2 * CHANCE


def test_refusals(tmp_path):
    other_widths = make_planted_cache(tmp_path / "val.h5", n=20, frames=4, dim=32, text_dim=24)
    res = _evaluate(["--cache", str(other_widths), "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "32-d" in res.output and "24-d" in res.output and "one embedding space" in res.output
    res = _evaluate(["--cache", str(other_widths), "--out", str(tmp_path / "b"), "--checkpoint", "x.pt"])
    assert res.exit_code == 2 and "drop --checkpoint" in res.output
    res = CliRunner().invoke(app, ["evaluate", "--cache", str(other_widths), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--checkpoint is required" in res.output


def test_matched_pair_is_a_clip_image_tower_with_its_own_text_tower():
    assert towers(FeatureSpec(**CLIP))["matched"]
    assert towers(FeatureSpec(encoder="clip", model="ViT-B-32", pretrained="openai"))["matched"]  # the image's own
    assert not towers(FeatureSpec(**{**CLIP, "text_pretrained": "laion2b_s34b_b79k"}))["matched"]
    assert not towers(FeatureSpec(**{**CLIP, "tokens_per_frame_pooling": "grid"}))["matched"]
    mixed = towers(FeatureSpec(encoder="timm", model="tf_efficientnet_lite0", text_encoder="hf",
                               text_model="pkg:all-minilm-l6-v2"))
    assert not mixed["matched"] and "timm" in mixed["why"] and "hf" in mixed["why"]


def test_ablation_has_a_zero_shot_row(tmp_path):
    cache = _planted(tmp_path / "val.h5", rotate=False, attrs=CLIP)
    result = run_ablation(AblationConfig(train_cache=str(cache), val_cache=str(cache), out_dir=str(tmp_path / "ab"),
                                         presets=("zero-shot",), seeds=2))
    (row,) = result["rows"]
    assert row["name"] == "zero-shot" and row["params"] == 0 and row["steps"] is None
    assert row["metrics"]["verb_top1"]["mean"] > 90 and row["metrics"]["verb_top1"]["std"] == 0
    assert "| zero-shot |" in result["markdown"]
