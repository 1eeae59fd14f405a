"""Ablation study on planted-structure caches (real writer, real training, tiny shapes)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from mambavl.analysis.ablate import (
    ABLATIONS,
    AblationConfig,
    mean_std,
    paired_differences,
    preset_of,
    run_ablation,
    run_train_config,
)
from mambavl.cache.synthetic import make_planted_cache
from mambavl.cli import app
from mambavl.errors import InputError
from mambavl.progress import Recorder
from mambavl.runtime import TrainedModel

TINY = {"d_model": 16, "n_layers": 1}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("abl")
    return make_planted_cache(d / "train.h5", n=64, seed=0), make_planted_cache(d / "val.h5", n=32, seed=1)


def _cfg(caches, out, **kw) -> AblationConfig:
    values = dict(train_cache=str(caches[0]), val_cache=str(caches[1]), out_dir=str(out), epochs=2, batch_size=32,
                  lr=3e-3, frames=6, device="cpu", model_overrides=dict(TINY), min_steps=0)
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
    history = TrainedModel.load(rows["full"]["runs"][0]["run_dir"] + "/last.pt").progress.history
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
    cfg = _cfg(caches, tmp_path, min_steps=50)
    tcs = {name: run_train_config(cfg, name, 0, tmp_path / name) for name in cfg.presets if preset_of(name)}
    assert set(tcs) == {n for n, v in ABLATIONS.items() if v.preset is not None}
    assert tcs["full"].preset == "small" and tcs["no-qa"].qa_weight == 0.0 and tcs["full"].qa_weight > 0
    # self-questioning joins the study: the same model and budget, asked about its first pass's candidates
    assert "predicted" in cfg.presets and tcs["predicted"].preset == "small"
    assert tcs["predicted"].question_source.value == "predicted" and tcs["full"].question_source.value == "templates"
    # the paper preset's own warm-up is not applied inside an ablation: one schedule for all
    for field in ("epochs", "batch_size", "lr", "frames", "min_steps", "warmup_epochs", "min_lr_ratio", "seed"):
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
        "--presets", "no-qa,concat,predicted", "--epochs", "1", "--min-steps", "0", "--batch-size", "32",
        "--frames", "6", "--device", "cpu", "--candidates-k", "2", "--candidate-folds", "2",
        "--set", "d_model=16", "--set", "n_layers=1", "--quiet",
    ])
    assert res.exit_code == 0, res.output
    assert "| concat |" in res.output and "| predicted |" in res.output and (out / "ablation.json").is_file()
    # the candidate settings reach the self-questioning run
    run = TrainedModel.load(out / "runs" / "predicted" / "seed0" / "last.pt")
    assert run.train_config.candidates_k == 2 and run.train_config.candidate_folds == 2
    assert run.first_pass["k"] == 2 and len(run.first_pass["states"]) == 2
    # no-qa trains the same model without QA steps
    history = TrainedModel.load(out / "runs" / "no-qa" / "seed0" / "last.pt").progress.history
    assert [h["qa_steps"] for h in history] == [0]
    bad = CliRunner().invoke(app, [
        "ablate", "--train-cache", str(caches[0]), "--val-cache", str(caches[1]), "--out", str(out),
        "--presets", "full,nope", "--quiet",
    ])
    assert bad.exit_code == 2 and "unknown preset" in bad.output


def test_mean_std_and_paired_differences_by_hand():
    assert mean_std([1.0, 2.0, None, 6.0]) == {"mean": 3.0, "std": pytest.approx(2.6457513), "n": 3}
    assert mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    assert mean_std([None]) == {"mean": None, "std": None, "n": 0}
    ref = [{"seed": 0, "metrics": {"verb_top1": 50.0}}, {"seed": 1, "metrics": {"verb_top1": 70.0}},
           {"seed": 2, "metrics": {"verb_top1": 60.0}}]
    runs = [{"seed": 1, "metrics": {"verb_top1": 75.0}}, {"seed": 0, "metrics": {"verb_top1": 60.0}},
            {"seed": 3, "metrics": {"verb_top1": 10.0}}]  # seed 3 has no reference run: left out
    d = paired_differences(runs, ref, ("verb_top1",))["verb_top1"]
    assert d["n"] == 2 and d["mean"] == pytest.approx(7.5) and d["std"] == pytest.approx(math.sqrt(12.5))
    # pairing removes what the seeds share: unpaired spread is large, the paired one is zero
    shifted = [{"seed": r["seed"], "metrics": {"verb_top1": r["metrics"]["verb_top1"] + 5}} for r in ref]
    assert paired_differences(shifted, ref, ("verb_top1",))["verb_top1"] == {"mean": 5.0, "std": 0.0, "n": 3}


def test_ablation_with_probes_and_paired_differences(caches, tmp_path):
    cfg = _cfg(caches, tmp_path, presets=("full", "video-only", "probe-concat", "probe-mean"), seeds=2, epochs=1,
               min_steps=4)
    result = run_ablation(cfg)
    rows = {r["name"]: r for r in result["rows"]}
    assert result["reference"] == "video-only"
    # trained runs: the step floor applies (64 rows at batch 32: 2 steps per epoch -> batch 16, 4 steps)
    assert rows["full"]["steps"] == 4 and rows["video-only"]["steps"] == 4
    for name in ("full", "probe-concat", "probe-mean"):
        for m in ("verb_top1", "action_top1"):
            by_seed = {r["seed"]: r["metrics"][m] for r in rows[name]["runs"]}
            ref = {r["seed"]: r["metrics"][m] for r in rows["video-only"]["runs"]}
            diffs = [by_seed[s] - ref[s] for s in (0, 1)]
            assert rows[name]["paired"][m]["mean"] == pytest.approx(sum(diffs) / 2)
            assert rows[name]["paired"][m]["std"] == pytest.approx(abs(diffs[0] - diffs[1]) / math.sqrt(2))
    assert rows["video-only"]["paired"]["verb_top1"] == {"mean": 0.0, "std": 0.0, "n": 2}
    # probes: fitted once, deterministic, no steps, the planted verbs are easy for the ordered probe
    for name in ("probe-concat", "probe-mean"):
        runs = rows[name]["runs"]
        assert rows[name]["steps"] is None and runs[0]["metrics"] == runs[1]["metrics"] and runs[0]["run_dir"] is None
        assert rows[name]["metrics"]["verb_top1"]["std"] == 0.0
    assert rows["probe-concat"]["metrics"]["verb_top1"]["mean"] >= 80
    md = result["markdown"]
    assert "| probe-concat |" in md and "Δ action top1 vs video-only (paired)" in md and "at least 4" in md
    assert "| video-only | " in md and "+0.0 ± 0.0" in md
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["rows"][2]["paired"]["verb_top1"]["n"] == 2


def test_ablation_reports_each_runs_steps_as_a_part(caches, tmp_path):
    """The trainings inside an ablation report their steps (a `Part`), so a log never goes silent during a run."""
    rec = Recorder()
    run_ablation(_cfg(caches, tmp_path, presets=("video-only",), epochs=1), progress=rec)
    parts = [e[2] for e in rec.events if "part" in e[2]]
    assert parts and {p["part"] for p in parts} == {"video-only seed 0 steps"}
    assert parts[0]["part_done"] == 0 and parts[-1]["part_done"] == parts[-1]["part_total"] == 2  # 64 rows / 32
    assert rec.done == rec.total == 1  # the parts never advance the ablation's own units


def test_table_labels_runs_with_their_real_settings_and_marks_noise(caches, tmp_path):
    from mambavl.analysis.ablate import describe, noise_flag

    # the preset says d_model 128; a study that overrides it must not print 128
    assert "d_model 128" in describe("full") and "d_model 64" in describe("full", {"d_model": 64})
    assert noise_flag({"mean": 1.0, "std": 0.0, "n": 1}, 1) == "1 seed"
    assert noise_flag({"mean": 1.0, "std": 2.0, "n": 3}, 3) == "within noise"  # 2 * 2 / sqrt(3) = 2.3 > 1
    assert noise_flag({"mean": 5.0, "std": 1.0, "n": 3}, 3) == ""
    result = run_ablation(_cfg(caches, tmp_path, presets=("full", "video-only"), seeds=1))
    md = result["markdown"]
    assert "d_model 16, 1 layer(s), d_state 16" in md and "d_model 128" not in md
    assert "(1 seed)" in md and "**One seed**" in md
    assert result["rows"][0]["settings"]["d_model"] == 16
