"""Stage 2 training on planted-structure caches written through the real cache writer (tiny, CPU, seconds)."""

from __future__ import annotations

import contextlib
import csv
import warnings
import dataclasses
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mambavl.cache.synthetic import make_planted_cache
from mambavl.errors import InputError
from mambavl.fuse import presets
from mambavl.fuse.model import MambaVL, create_model
from mambavl.runtime import TrainedModel, predict_scores
from mambavl.train import MIN_BATCH, StepPlan, TrainConfig, lr_factor, param_groups, plan_steps, question_warning, train

# A small, fast model: the planted classes are learnable by it in a few epochs.
TINY = {"d_model": 32, "n_layers": 1}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("caches")
    return {
        "train": make_planted_cache(d / "train.h5", n=160, seed=0, anticipation=True),
        "val": make_planted_cache(d / "val.h5", n=80, seed=1, anticipation=True),
        "tiny": make_planted_cache(d / "tiny.h5", n=24, seed=2, anticipation=True),
        "no_annotation": make_planted_cache(d / "noann.h5", n=24, seed=3, annotation_questions=False),
        "other_encoder": make_planted_cache(d / "other.h5", n=24, seed=4, structure_seed=99),
    }


def _cfg(caches, out, **kw) -> TrainConfig:
    """A fast run on the tiny cache (validated on itself); tests override what they exercise."""
    values = dict(
        train_cache=str(caches["tiny"]),
        val_cache=str(caches["tiny"]),
        out_dir=str(out),
        model_overrides=dict(TINY),
        epochs=2,
        batch_size=8,
        lr=3e-3,
        frames=6,
        min_steps=0,  # the tiny cache's own budget; the step floor has its own tests
    )
    values.update(kw)
    return TrainConfig(**values)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_planted_cache_is_learned_and_logged(caches, tmp_path):
    out = tmp_path / "run"
    result = train(_cfg(caches, out, train_cache=str(caches["train"]), val_cache=str(caches["val"]), epochs=4,
                        batch_size=32))
    final = result.history[-1]
    labels = np.asarray(make_planted_labels(caches["val"]))
    majority = 100.0 * np.bincount(labels).max() / len(labels)  # the best a class-prior guess can do
    # 6 verbs / 5 nouns: chance is 17 % / 20 %, the majority class ~40 %; the planted structure is learnable
    assert final["val_verb_top1"] > max(80.0, 1.5 * majority)
    assert final["val_noun_top1"] > 80.0
    assert final["val_action_top1"] > 60.0
    assert final["val_verb_top5"] >= final["val_verb_top1"]
    assert final["train_loss"] < result.history[0]["train_loss"]

    # best.pt follows the best action top-1; last.pt is the last epoch
    best_epoch = max(result.history, key=lambda r: r["val_action_top1"])
    assert result.best_metric == pytest.approx(best_epoch["val_action_top1"])
    assert result.best_metric_name == "val_action_top1"
    assert TrainedModel.load(result.best_checkpoint).progress.epoch == best_epoch["epoch"]
    assert TrainedModel.load(result.last_checkpoint).progress.epoch == 4

    # QA steps alternate with recognition steps: one after every qa_every (2) recognition steps
    for row in result.history:
        assert row["rec_steps"] == math.ceil(160 / 32)
        assert row["qa_steps"] == row["rec_steps"] // 2
        assert row["question_source"] == "templates" and row["task"] == "recognition"

    rows = _read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    for column in ("step", "lr", "train_loss", "train_loss_qa", "val_verb_top1", "val_verb_top5", "val_noun_top1",
                   "val_noun_top5", "val_action_top1", "val_action_top5", "time_s", "question_source"):
        assert column in rows[0]
    # the learning rate follows warm-up then cosine: it falls over the last epochs
    assert float(rows[-1]["lr"]) < float(rows[1]["lr"])
    assert (out / "train_config.json").is_file()

    # predict_scores (the evaluation entry point) reproduces the validation of the last epoch
    run = TrainedModel.load(result.last_checkpoint)
    model = run.model()
    scores = predict_scores(model, caches["val"], question_source="templates", frames=run.train_config.frames)
    verb_top1 = 100.0 * np.mean(scores["verb"].argmax(1) == labels[scores["indices"]])
    assert verb_top1 == pytest.approx(final["val_verb_top1"], abs=1e-4)
    assert scores["noun"].shape == (80, 5)
    assert scores["action"].shape[1] == len(run.vocab.action_pairs)


def make_planted_labels(path):
    from mambavl.cache.reader import open_cache

    return open_cache(path).labels()["verb_class"]


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_trains_one_step(caches, tmp_path, name):
    # batch = the whole tiny cache: one recognition step, then one QA step (qa_every=1) unless the preset drops QA
    cfg = TrainConfig(train_cache=str(caches["tiny"]), val_cache=None, out_dir=str(tmp_path / name), preset=name,
                      epochs=1, batch_size=24, qa_every=1, frames=4, min_steps=0)
    # the paper layout with template questions is told that it cannot use them (see the question_warning test)
    with pytest.warns(UserWarning, match="cannot use") if name == "paper" else contextlib.nullcontext():
        result = train(cfg)
    row = result.history[0]
    assert row["rec_steps"] == 1
    assert row["qa_steps"] == (0 if name == "no-qa" else 1)
    assert math.isfinite(row["train_loss"])
    assert result.best_checkpoint is None and result.best_metric is None  # no validation cache
    run, training = TrainedModel.load_with_state(result.last_checkpoint)
    assert run.train_config.preset == name
    # the optimizer took a step on the weights that were saved
    assert int(training.optimizer["state"][0]["step"]) >= 1


def test_preset_training_settings_yield_to_explicit_values(caches, tmp_path):
    assert TrainConfig("a", None, "o", preset="no-qa").qa_weight == 0.0
    assert TrainConfig("a", None, "o", preset="no-qa", qa_weight=0.5).qa_weight == 0.5
    assert TrainConfig("a", None, "o", preset="paper").warmup_epochs == 2
    assert TrainConfig("a", None, "o", preset="small").qa_weight == 1.0
    with pytest.raises(InputError, match="preset"):
        TrainConfig("a", None, "o", preset="nope")


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(caches, tmp_path):
    full = train(_cfg(caches, tmp_path / "full", epochs=3))
    cfg = _cfg(caches, tmp_path / "split", epochs=3)
    first = train(cfg, stop_after_epochs=1)
    assert len(first.history) == 1 and TrainedModel.load(first.last_checkpoint).progress.epoch == 1
    resumed = dataclasses.replace(cfg, resume=True)
    second = train(resumed, stop_after_epochs=1)
    assert len(second.history) == 2
    final = train(resumed)
    assert len(final.history) == 3

    a, b = full.model.state_dict(), final.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the saved checkpoints agree too, optimizer moments included
    ca, ta = TrainedModel.load_with_state(full.last_checkpoint)
    cb, tb = TrainedModel.load_with_state(final.last_checkpoint)
    for key, state in ta.optimizer["state"].items():
        assert torch.equal(state["exp_avg"], tb.optimizer["state"][key]["exp_avg"])
    assert ca.progress.step == cb.progress.step and ca.progress.best_metric == cb.progress.best_metric
    for ra, rb in zip(full.history, final.history):
        assert ra["train_loss"] == rb["train_loss"] and ra["val_action_top1"] == rb["val_action_top1"]


def test_resume_refuses_changed_settings_and_existing_runs(caches, tmp_path):
    cfg = _cfg(caches, tmp_path / "run", epochs=2)
    train(cfg, stop_after_epochs=1)
    with pytest.raises(InputError, match="already holds a run"):
        train(cfg)
    with pytest.raises(InputError, match="lr"):
        train(dataclasses.replace(cfg, resume=True, lr=0.1))
    with pytest.raises(InputError, match="cannot resume"):
        train(dataclasses.replace(cfg, out_dir=str(tmp_path / "empty"), resume=True))


def test_qa_weight_zero_runs_no_qa_steps(caches, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = MambaVL.qa_embed

    def counting(self, h):
        calls["n"] += 1
        return original(self, h)

    monkeypatch.setattr(MambaVL, "qa_embed", counting)
    result = train(_cfg(caches, tmp_path / "noqa", qa_weight=0.0, val_cache=None))
    assert calls["n"] == 0
    assert all(r["rec_steps"] == 3 and r["qa_steps"] == 0 for r in result.history)
    assert all("train_loss_qa" not in r for r in result.history)

    result = train(_cfg(caches, tmp_path / "qa3", epochs=1, qa_every=3, batch_size=3, val_cache=None))
    assert result.history[0]["rec_steps"] == 8
    assert result.history[0]["qa_steps"] == 2 == calls["n"]


def test_annotation_protocol(caches, tmp_path):
    cfg = TrainConfig(train_cache=str(caches["no_annotation"]), val_cache=None, out_dir=str(tmp_path / "a"),
                      question_source="annotation", model_overrides=TINY, epochs=1, min_steps=0)
    with pytest.raises(InputError) as err:
        train(cfg)
    assert str(err.value) == (
        f"cache {caches['no_annotation']} has no annotation questions (extract with --questions templates,annotation)"
    )

    result = train(_cfg(caches, tmp_path / "b", question_source="annotation", epochs=1))
    assert result.history[0]["question_source"] == "annotation"
    assert result.history[0]["question_fallbacks"] == 0
    run = TrainedModel.load(result.last_checkpoint)
    assert run.question_source == "annotation" and run.train_config.question_source == "annotation"


def test_anticipation_trains_on_the_anticipation_window(caches, tmp_path, monkeypatch):
    import mambavl.train.loop as train_module

    windows = []
    real = train_module.SegmentDataset

    class Recording(real):
        def __init__(self, cache, window="recognition", **kw):
            windows.append(window)
            super().__init__(cache, window=window, **kw)

    monkeypatch.setattr(train_module, "SegmentDataset", Recording)
    result = train(_cfg(caches, tmp_path / "ant", task="anticipation", epochs=1))
    assert windows and set(windows) == {"anticipation"}
    assert result.history[0]["task"] == "anticipation"
    assert "val_verb_top1" in result.history[0]
    run = TrainedModel.load(result.last_checkpoint)
    model = run.model()
    assert run.spec.window == "anticipation" and run.task == "anticipation"
    scores = predict_scores(model, caches["tiny"], window="anticipation", frames=6)
    assert scores["verb"].shape == (24, 6)

    with pytest.raises(InputError, match="no anticipation window"):
        train(TrainConfig(train_cache=str(caches["no_annotation"]), val_cache=None, out_dir=str(tmp_path / "x"),
                          task="anticipation", model_overrides=TINY, epochs=1, min_steps=0))


def test_checkpoint_contents_and_loading(caches, tmp_path):
    result = train(_cfg(caches, tmp_path / "run", epochs=1))
    ckpt = torch.load(result.last_checkpoint, weights_only=True)  # plain containers only
    for key in ("kind", "format", "model_config", "train_config", "vocab", "features", "weights", "progress",
                "training", "package_version"):
        assert key in ckpt, key
    for key in ("epoch", "step", "best_metric"):
        assert key in ckpt["progress"], key
    for key in ("optimizer", "scheduler", "rng"):
        assert key in ckpt["training"], key
    run, training = TrainedModel.load_with_state(result.last_checkpoint)
    assert set(training.rng) >= {"torch", "numpy", "python", "generator"}
    assert run.vocab.verbs == [f"verb{i}" for i in range(6)]
    pairs = {tuple(p) for p in run.vocab.action_pairs}
    from mambavl.cache.reader import open_cache

    lab = open_cache(caches["tiny"]).labels()
    assert pairs == set(zip(lab["verb_class"].tolist(), lab["noun_class"].tolist()))
    assert run.model_config.num_actions == len(pairs)
    assert run.features.encoder == "planted"

    model = TrainedModel.load(result.best_checkpoint).model()
    assert not model.training
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key])

    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a mambavl checkpoint"):
        TrainedModel.load(bogus)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(InputError, match="not a mambavl checkpoint"):
        TrainedModel.load(foreign)
    with pytest.raises(InputError, match="not found"):
        TrainedModel.load(tmp_path / "missing.pt")


def test_val_cache_must_match_the_train_encoder(caches, tmp_path):
    with pytest.raises(InputError, match="model"):
        train(_cfg(caches, tmp_path / "run", val_cache=str(caches["other_encoder"])))


def test_param_groups_and_schedule():
    model, _ = create_model("paper", video_dim=8, text_dim=8, num_verbs=3, num_nouns=2)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay_ids}
    assert any(n.endswith("A_log") for n in names) and any(n.endswith(".D") or n == "D" for n in names)
    assert all(p.ndim >= 2 and not getattr(p, "_no_weight_decay", False) for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))

    assert lr_factor(0, 100, 10, 0.03) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.03) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.03) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, 0.03) == pytest.approx(0.03)
    assert lr_factor(55, 100, 10, 0.03) == pytest.approx(0.03 + 0.97 * 0.5)


def test_cli_train_and_resume(caches, tmp_path):
    from mambavl.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    common = ["--train-cache", str(caches["tiny"]), "--val-cache", str(caches["tiny"]), "--out", str(out)]
    tiny = ["--set", "d_model=32", "--set", "n_layers=1", "--frames", "6", "--batch-size", "8", "--min-steps", "0"]
    res = runner.invoke(app, ["train", *common, *tiny, "--epochs", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    run = TrainedModel.load(out / "last.pt")
    assert run.train_config.model_overrides == TINY and run.train_config.epochs == 1

    # a second run into the same folder is refused; so is --resume with a conflicting option
    res = runner.invoke(app, ["train", *common, *tiny, "--epochs", "1", "--quiet"])
    assert res.exit_code == 2 and "already holds a run" in res.output
    res = runner.invoke(app, ["train", "--out", str(out), "--resume", "--lr", "0.5"])
    assert res.exit_code == 2 and "--lr" in res.output

    # an interrupted 2-epoch run is finished by `--resume` with the run's own settings (progress output on)
    out2 = tmp_path / "cli2"
    cfg = _cfg(caches, out2)
    train(cfg, stop_after_epochs=1)
    res = runner.invoke(app, ["train", "--out", str(out2), "--resume", "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    assert "epoch 2" in res.output
    assert [r["epoch"] for r in _read_csv(out2 / "metrics.csv")] == ["1", "2"]

    res = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--train-cache", str(caches["tiny"]),
                              "--set", "nonsense"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "y"), "--train-cache", str(tmp_path / "none.h5")])
    assert res.exit_code == 2 and "does not exist" in res.output


# ----------------------------------------------------------------------------------------------------------------
# the step floor (min_steps) and the question-blind warning


def test_plan_steps_keeps_large_data_and_adapts_small_data():
    # enough steps already: nothing changes (EK-100 scale, or min_steps off)
    assert plan_steps(67000, 64, 20, 1000) == StepPlan(64, 1, 1047)
    assert plan_steps(72, 64, 20, 0) == StepPlan(64, 1, 2)
    # 72 clips at batch 64: 2 steps per epoch, 40 in 20 epochs -> batch 8 (9 steps per pass), 6 passes per epoch
    plan = plan_steps(72, 64, 20, 1000)
    assert plan == StepPlan(8, 6, 54) and plan.steps_per_epoch * 20 >= 1000
    # an explicit small batch is kept; only passes are added (the demo: 240 clips, batch 8, 8 epochs -> 1200 steps)
    assert plan_steps(240, 8, 8, 1000) == StepPlan(8, 5, 150)
    # the batch shrinks only as far as needed, never below MIN_BATCH nor above the requested batch
    assert plan_steps(2000, 64, 2, 100) == StepPlan(40, 1, 50)
    assert plan_steps(3, 64, 1, 1000).batch_size == MIN_BATCH
    assert plan_steps(3, 2, 1, 1000).batch_size == 2
    for rows, batch, epochs, floor in [(1, 1, 1, 1), (36, 64, 20, 1000), (500, 32, 3, 777), (10, 4, 7, 50)]:
        p = plan_steps(rows, batch, epochs, floor)
        assert p.steps_per_epoch == p.passes * math.ceil(rows / p.batch_size)
        assert p.steps_per_epoch * epochs >= floor


def test_min_steps_runs_several_passes_per_epoch(caches, tmp_path):
    # tiny cache: 24 rows, batch 8 -> 3 steps per pass; a floor of 7 steps in 1 epoch needs 3 passes (9 steps)
    result = train(_cfg(caches, tmp_path / "floor", epochs=1, min_steps=7, val_cache=None, qa_weight=0.0))
    row = result.history[0]
    assert (row["rec_steps"], row["passes"], row["batch_size"], row["step"]) == (9, 3, 8, 9)
    plain = train(_cfg(caches, tmp_path / "plain", epochs=1, val_cache=None, qa_weight=0.0))
    assert (plain.history[0]["rec_steps"], plain.history[0]["passes"]) == (3, 1)
    with pytest.raises(InputError, match="min_steps"):
        _cfg(caches, tmp_path / "bad", min_steps=-1)


def test_parallel_layout_with_template_questions_is_video_only_plus_a_bias(caches, tmp_path):
    torch.manual_seed(0)
    video = torch.randn(3, 6, 16)  # three different clips
    q = torch.randn(1, 2, 5, 12).expand(3, 2, 5, 12)  # the same verb and noun question for every clip
    dims = dict(video_dim=16, text_dim=12, num_verbs=4, num_nouns=3, d_model=16, n_layers=1)
    paper, paper_cfg = create_model("paper", **dims)
    joint, joint_cfg = create_model("small", **dims)
    with torch.no_grad():
        out = paper.eval()(video, None, q, None)
        diff = out["h_verb"] - out["h_noun"]  # (3, d): the question terms alone
        assert torch.allclose(diff, diff[:1].expand_as(diff), atol=1e-5)
        assert not torch.allclose(out["h_verb"][0], out["h_verb"][1])  # the video term does differ
        out = joint.eval()(video, None, q, None)
        diff = out["h_verb"] - out["h_noun"]
        assert not torch.allclose(diff, diff[:1].expand_as(diff), atol=1e-5)  # the joint scan mixes them
    assert "parallel layout" in question_warning(paper_cfg, "templates")
    assert question_warning(paper_cfg, "annotation") is None and question_warning(joint_cfg, "templates") is None

    # train says so, once, for the paper preset with template questions, and not for the default
    with pytest.warns(UserWarning, match="cannot use its questions"):
        train(_cfg(caches, tmp_path / "paper", preset="paper", epochs=1, val_cache=None))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train(_cfg(caches, tmp_path / "small", epochs=1, val_cache=None))
