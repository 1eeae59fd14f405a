"""Early stopping on the validation selection metric, and resumed runs that change their budget (epochs, patience):
planted caches, tiny model, CPU."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from mambavl.cache.synthetic import make_planted_cache
from mambavl.errors import InputError
from mambavl.runtime import TrainedModel
from mambavl.train import TrainConfig, lr_factor, train
from mambavl.train.stopping import early_stop, epochs_without_improvement

TINY = {"d_model": 32, "n_layers": 1}
# min_delta 100 (points of %): no epoch after the first can count as an improvement, whatever the model learns, so
# the stopping epoch is known in advance: 1 + patience.
NEVER_BETTER = 100.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_planted_cache(tmp_path_factory.mktemp("caches") / "tiny.h5", n=24, seed=2)


def _cfg(cache, out, **kw) -> TrainConfig:
    values = dict(train_cache=str(cache), val_cache=str(cache), out_dir=str(out), model_overrides=dict(TINY),
                  epochs=2, batch_size=8, lr=3e-3, frames=6, min_steps=0, device="cpu")
    values.update(kw)
    return TrainConfig(**values)


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_epochs_without_improvement_counts_from_the_last_real_rise():
    assert epochs_without_improvement([], 0.0) == 0
    assert epochs_without_improvement([10, 20, 30], 0.0) == 0
    assert epochs_without_improvement([10, 20, 20, 19], 0.0) == 2  # equal is no rise
    # creeping by less than min_delta per epoch: the reference stays at 10 until 10 + 1 is passed
    assert epochs_without_improvement([10, 10.5, 10.9, 11.2, 11.3], 1.0) == 1
    assert epochs_without_improvement([10, float("nan"), None], 0.0) == 2
    hist = [{"epoch": e + 1, "val_verb_top1": v} for e, v in enumerate([50.0, 100.0, 100.0, 100.0])]
    assert early_stop(hist, "val_verb_top1", 3, 0.0) is None
    assert early_stop(hist, "val_verb_top1", 2, 0.0) == {
        "epoch": 4, "best_epoch": 2, "metric": "val_verb_top1", "patience": 2, "min_delta": 0.0,
        "epochs_without_improvement": 2}
    assert early_stop(hist, "val_verb_top1", 0, 0.0) is None  # off
    assert early_stop([{"epoch": 1}], "val_verb_top1", 1, 0.0) is None  # no validation: nothing to stop on


def test_early_stopping_stops_at_the_patience_and_is_recorded(tiny, tmp_path):
    out = tmp_path / "run"
    result = train(_cfg(tiny, out, epochs=6, patience=2, min_delta=NEVER_BETTER))
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert [r["epochs_without_improvement"] for r in result.history] == [0, 1, 2]
    assert result.stopped_early["epoch"] == 3 and result.stopped_early["patience"] == 2
    run = TrainedModel.load(out / "last.pt")
    assert run.progress.epoch == 3 and run.progress.stopped_early == result.stopped_early
    assert run.train_config.patience == 2 and run.train_config.min_delta == NEVER_BETTER
    assert [r["epochs_without_improvement"] for r in _csv(out / "metrics.csv")] == ["0", "1", "2"]
    assert json.loads((out / "train_config.json").read_text())["patience"] == 2

    # resumed with the same settings: it stays stopped (nothing to train)
    again = train(dataclasses.replace(_cfg(tiny, out, epochs=6, patience=2, min_delta=NEVER_BETTER), resume=True))
    assert len(again.history) == 3 and again.stopped_early is not None
    # resumed with more patience: it goes on until the new patience runs out, and the change is recorded
    more = train(_cfg(tiny, out, epochs=6, patience=3, min_delta=NEVER_BETTER, resume=True))
    assert [r["epoch"] for r in more.history] == [1, 2, 3, 4] and more.stopped_early["patience"] == 3
    assert TrainedModel.load(out / "last.pt").progress.changes == [
        {"epoch": 3, "step": 9, "field": "patience", "from": 2, "to": 3}]


def test_without_validation_or_with_patience_zero_the_budget_is_trained(tiny, tmp_path):
    assert len(train(_cfg(tiny, tmp_path / "a", epochs=3, patience=0, min_delta=NEVER_BETTER)).history) == 3
    no_val = train(_cfg(tiny, tmp_path / "b", epochs=3, patience=1, val_cache=None))
    assert len(no_val.history) == 3 and no_val.stopped_early is None


def test_resume_with_fewer_or_more_epochs_replans_the_schedule(tiny, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tiny, out, epochs=4, patience=0, warmup_epochs=0.0)
    train(cfg, stop_after_epochs=1)  # 3 steps of a 12-step cosine
    shorter = train(dataclasses.replace(cfg, epochs=2, resume=True))
    assert [r["epoch"] for r in shorter.history] == [1, 2]
    run = TrainedModel.load(out / "last.pt")
    assert run.train_config.epochs == 2
    assert run.progress.changes == [{"epoch": 1, "step": 3, "field": "epochs", "from": 4, "to": 2}]
    # the cosine goes on from the rate reached at step 3 and ends at the floor at the new last step (6)
    replan = run.progress.lr_replan
    assert replan["step"] == 3 and replan["total_steps"] == 6
    assert replan["factor"] == pytest.approx(lr_factor(3, 12, 0, cfg.min_lr_ratio))
    assert shorter.history[-1]["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    # the step plan (batch, passes) is the run's own
    assert {(r["batch_size"], r["passes"]) for r in shorter.history} == {(8, 1)}

    longer = train(dataclasses.replace(cfg, epochs=4, resume=True))
    assert [r["epoch"] for r in longer.history] == [1, 2, 3, 4]
    run = TrainedModel.load(out / "last.pt")
    assert [(c["from"], c["to"]) for c in run.progress.changes] == [(4, 2), (2, 4)]
    assert run.progress.lr_replan["step"] == 6 and run.progress.lr_replan["factor"] == pytest.approx(
        cfg.min_lr_ratio)
    # other settings still may not change
    with pytest.raises(InputError, match="lr"):
        train(dataclasses.replace(cfg, epochs=5, lr=0.1, resume=True))


def test_cli_resume_with_another_epoch_budget(tiny, tmp_path):
    from mambavl.cli import app

    out = tmp_path / "cli"
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--train-cache", str(tiny), "--val-cache", str(tiny), "--out", str(out),
                              "--set", "d_model=32", "--set", "n_layers=1", "--frames", "6", "--batch-size", "8",
                              "--min-steps", "0", "--epochs", "1", "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    assert TrainedModel.load(out / "last.pt").train_config.patience == 5  # the dataclass's default
    res = runner.invoke(app, ["train", "--out", str(out), "--resume", "--epochs", "3", "--patience", "1",
                              "--min-delta", "100", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "with epochs 3 instead of 1" in res.output and "stopped early after epoch 2" in res.output
    run = TrainedModel.load(out / "last.pt")
    assert run.progress.epoch == 2 and run.train_config.epochs == 3
    assert {c["field"] for c in run.progress.changes} == {"epochs", "patience", "min_delta"}


WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    import mambavl.train.loop as loop
    from mambavl.train import TrainConfig, train

    cache, out = sys.argv[1:3]
    rank = os.environ["RANK"]
    if rank == "1":  # a rank that would never stop on its own: it must still stop with rank 0
        loop.early_stop = lambda *args, **kwargs: None
    result = train(TrainConfig(train_cache=cache, val_cache=cache, out_dir=out, batch_size=4, epochs=5, patience=1,
                               min_delta=100.0, frames=4, min_steps=0, device="cpu",
                               model_overrides={"d_model": 16, "n_layers": 1}))
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"epochs": [r["epoch"] for r in result.history], "stopped": result.stopped_early}, f)
    """
)


@pytest.mark.timeout(600)
def test_ddp_ranks_stop_together(tmp_path):
    cache = make_planted_cache(tmp_path / "c.h5", n=16, seed=0)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(cache), str(out)]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"ddp.rank{r}.json").read_text()) for r in (0, 1))
    assert r0["epochs"] == r1["epochs"] == [1, 2]
    assert r0["stopped"] == r1["stopped"] and r0["stopped"]["epoch"] == 2
