"""A run's live logs: TensorBoard event files with every metrics.csv scalar, the learning rate and the step time;
W&B in offline mode; curves.png; train.log with the console's lines; a clear refusal without wandb."""

from __future__ import annotations

import csv
import importlib.util

import pytest
from typer.testing import CliRunner

from mambavl.cache.synthetic import make_planted_cache
from mambavl.cli import app
from mambavl.errors import InputError
from mambavl.runtime import RunLogger
from mambavl.train import TrainConfig, train
from mambavl.train.logs import epoch_line, scalars

TINY = {"d_model": 16, "n_layers": 1, "d_state": 4}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_planted_cache(tmp_path_factory.mktemp("logs") / "tiny.h5", n=24, seed=2)


def _cfg(cache, out, **kw) -> TrainConfig:
    values = dict(train_cache=str(cache), val_cache=str(cache), out_dir=str(out), model_overrides=dict(TINY),
                  epochs=2, batch_size=8, lr=3e-3, frames=4, min_steps=0)
    return TrainConfig(**{**values, **kw})


def _event_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_curves_and_train_log(cache, tmp_path):
    out = tmp_path / "run"
    result = train(_cfg(cache, out))
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    logged = _event_scalars(out / "tensorboard")
    numeric = {k for k, v in rows[0].items() if k not in ("epoch", "step") and v.replace(".", "", 1).isdigit()}
    assert numeric <= set(logged), numeric - set(logged)  # every scalar of metrics.csv
    assert {"lr", "step_time_s", "val_action_top1", "train_loss"} <= set(logged)
    assert [s for s, _ in logged["val_verb_top1"]] == [1, 2]  # one point per epoch
    assert logged["val_verb_top1"][-1][1] == pytest.approx(float(rows[-1]["val_verb_top1"]), abs=1e-4)
    assert (out / "curves.png").stat().st_size > 1000
    log = (out / "train.log").read_text().splitlines()
    assert log[0].startswith("mambavl ") and '"epochs": 2' in log[0]
    assert log[1:3] == [epoch_line(h) for h in result.history]
    assert log[-1].startswith("best val_action_top1: ")


def test_resumed_run_appends_to_its_logs(cache, tmp_path):
    out = tmp_path / "run"
    train(_cfg(cache, out), stop_after_epochs=1)
    train(_cfg(cache, out, resume=True))
    log = (out / "train.log").read_text()
    assert log.count("(resumed)") == 1 and log.count("epoch 1  ") == 1 and log.count("epoch 2  ") == 1
    assert [s for s, _ in _event_scalars(out / "tensorboard")["val_verb_top1"]] == [1, 2]


def test_logger_none_writes_no_event_files(cache, tmp_path):
    out = tmp_path / "run"
    train(_cfg(cache, out, epochs=1, logger="none"))
    assert not (out / "tensorboard").exists() and (out / "metrics.csv").is_file() and (out / "curves.png").is_file()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(_cfg(cache, out, logger=RunLogger.WANDB))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (out / "wandb-run-id.txt").read_text().strip() in runs[0].name


def test_wandb_missing_is_a_clear_error(cache, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(InputError, match=r"logger 'wandb' needs the wandb package"):
        _cfg(cache, tmp_path / "run", logger="wandb")
    res = CliRunner().invoke(app, ["train", "--train-cache", str(cache), "--out", str(tmp_path / "cli"),
                                   "--logger", "wandb", "--quiet"])
    assert res.exit_code == 2 and "needs the wandb package" in res.output


def test_scalars_add_the_step_time():
    row = {"epoch": 3, "step": 30, "lr": 1e-3, "train_loss": 1.5, "rec_steps": 8, "qa_steps": 2, "time_s": 5.0,
           "task": "recognition", "amp": True}
    assert scalars(row) == {"lr": 1e-3, "train_loss": 1.5, "rec_steps": 8.0, "qa_steps": 2.0, "time_s": 5.0,
                            "step_time_s": 0.5}


def test_resume_may_switch_the_logger(cache, tmp_path):
    """The logger is not part of what a run computes: `train --resume --logger none` continues without new events."""
    out = tmp_path / "run"
    train(_cfg(cache, out), stop_after_epochs=1)
    res = CliRunner().invoke(app, ["train", "--out", str(out), "--resume", "--logger", "none", "--quiet"])
    assert res.exit_code == 0, res.output
    assert [s for s, _ in _event_scalars(out / "tensorboard")["val_verb_top1"]] == [1]  # epoch 2 not logged there
    assert "epoch 2  " in (out / "train.log").read_text()
