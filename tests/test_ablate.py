"""Ablation study on planted-structure caches (real writer, real training, tiny shapes)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mambavl.analysis.ablate import AblationConfig, run_ablation, run_train_config
from mambavl.cache.synthetic import make_planted_cache
from mambavl.cli import app
from mambavl.errors import InputError
from mambavl.progress import Recorder

TINY = {"d_model": 16, "n_layers": 1}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("abl")
    return make_planted_cache(d / "train.h5", n=64, seed=0), make_planted_cache(d / "val.h5", n=32, seed=1)


def _cfg(caches, out, **kw) -> AblationConfig:
    values = dict(train_cache=str(caches[0]), val_cache=str(caches[1]), out_dir=str(out), epochs=2, batch_size=32,
                  lr=3e-3, frames=6, device="cpu", model_overrides=dict(TINY))
    values.update(kw)
    return AblationConfig(**values)


def test_ablation_table_over_seeds_and_restart(caches, tmp_path):
    cfg = _cfg(caches, tmp_path, presets=("full", "video-only"), seeds=2)
    rec = Recorder()
    result = run_ablation(cfg, progress=rec)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["full", "video-only"]
    assert (rec.done, rec.total) == (4, 4)
    for r in rows.values():
        assert len(r["runs"]) == 2 and [x["seed"] for x in r["runs"]] == [0, 1]
        assert r["params"] > 0 and r["train_time_s"]["mean"] > 0
        for m in ("verb_top1", "verb_top5", "noun_top1", "noun_top5", "action_top1", "action_top5"):
            s = r["metrics"][m]
            vals = [x["metrics"][m] for x in r["runs"]]
            assert s["mean"] == pytest.approx(sum(vals) / 2)
            assert s["std"] >= 0
        assert r["metrics"]["verb_top5"]["mean"] >= r["metrics"]["verb_top1"]["mean"]
    # video-only builds no question modules: fewer parameters than the full model
    assert rows["video-only"]["params"] < rows["full"]["params"]
    history = torch.load(rows["full"]["runs"][0]["run_dir"] + "/last.pt", weights_only=True)["history"]
    assert sum(h["qa_steps"] for h in history) > 0
    md = (tmp_path / "ablation.md").read_text()
    assert "| full |" in md and "±" in md and "2 epochs" in md
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["full", "video-only"]

    # A second call reuses the finished runs (no retraining) and gives the same table.
    again = run_ablation(cfg)
    assert all(run["reused"] for r in again["rows"] for run in r["runs"])
    assert again["markdown"] == result["markdown"]
    # ... but refuses to mix in runs made under another budget.
    with pytest.raises(InputError, match="lr"):
        run_ablation(_cfg(caches, tmp_path, presets=("full",), seeds=1, lr=1e-2))


def test_same_budget_for_every_preset(caches, tmp_path):
    cfg = _cfg(caches, tmp_path)
    tcs = {name: run_train_config(cfg, name, 0, tmp_path / name) for name in cfg.presets}
    assert tcs["full"].preset == "small" and tcs["no-qa"].qa_weight == 0.0 and tcs["full"].qa_weight > 0
    # the paper preset's own warm-up is not applied inside an ablation: one schedule for all
    for field in ("epochs", "batch_size", "lr", "frames", "warmup_epochs", "min_lr_ratio", "seed"):
        assert len({getattr(t, field) for t in tcs.values()}) == 1, field


def test_bad_ablation_input(caches, tmp_path):
    with pytest.raises(InputError, match="unknown preset"):
        _cfg(caches, tmp_path, presets=("full", "lstm"))
    with pytest.raises(InputError, match="not found"):
        _cfg(caches, tmp_path, val_cache=str(tmp_path / "missing.h5"))


def test_ablate_cli(caches, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, [
        "ablate", "--train-cache", str(caches[0]), "--val-cache", str(caches[1]), "--out", str(out),
        "--presets", "no-qa,concat", "--epochs", "1", "--batch-size", "32", "--frames", "6", "--device", "cpu",
        "--set", "d_model=16", "--set", "n_layers=1", "--quiet",
    ])
    assert res.exit_code == 0, res.output
    assert "| concat |" in res.output and (out / "ablation.json").is_file()
    # no-qa trains the same model without QA steps
    history = torch.load(out / "runs" / "no-qa" / "seed0" / "last.pt", weights_only=True)["history"]
    assert [h["qa_steps"] for h in history] == [0]
    bad = CliRunner().invoke(app, [
        "ablate", "--train-cache", str(caches[0]), "--val-cache", str(caches[1]), "--out", str(out),
        "--presets", "full,nope", "--quiet",
    ])
    assert bad.exit_code == 2 and "unknown preset" in bad.output
