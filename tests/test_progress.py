"""The one progress protocol: library functions report start/advance/finish to any receiver; the CLI renders it."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress as Bar

from mambavl.cache.synthetic import make_planted_cache
from mambavl.cli.progress import RichProgress, log_messages
from mambavl.progress import NO_PROGRESS, Progress, Recorder, Stages
from mambavl.train import TrainConfig, train


def test_receivers_satisfy_the_protocol():
    for receiver in (NO_PROGRESS, Recorder()):
        assert isinstance(receiver, Progress)
    rec = Recorder()
    stages = Stages(rec, 3)
    stages.enter("load")
    stages.enter("predict", rows=5)
    stages.enter("plots")
    stages.done()
    assert rec.total == 3 and rec.done == 3 and rec.finished
    assert [e[2]["message"] for e in rec.events if e[0] == "advance"] == ["load", "predict", "plots", "done"]


def test_training_reports_every_step_and_every_epoch(tmp_path):
    cache = make_planted_cache(tmp_path / "c.h5", n=24, seed=2)
    cfg = TrainConfig(train_cache=str(cache), val_cache=str(cache), out_dir=str(tmp_path / "run"), epochs=2,
                      batch_size=8, frames=6, min_steps=0, model_overrides={"d_model": 32, "n_layers": 1})
    rec = Recorder()
    result = train(cfg, progress=rec, stop_after_epochs=1)
    assert rec.total == 6 and rec.done == 3 and rec.finished  # 24 rows / batch 8 = 3 steps per epoch, 2 epochs
    assert all("loss" in e[2] for e in rec.events if e[0] == "advance" and e[1] == 1)
    epoch_reports = [e[2]["metrics"] for e in rec.events if "metrics" in e[2]]
    assert epoch_reports == result.history

    resumed = Recorder()
    train(TrainConfig(**{**cfg.__dict__, "resume": True}), progress=resumed)
    assert resumed.total == 6 and resumed.done == 6
    assert resumed.events[1] == ("advance", 3, {"resumed": True})


def test_cli_renderer_draws_the_reports():
    out = io.StringIO()
    with Bar(console=Console(file=out, force_terminal=False, width=100)) as bar:
        p = RichProgress(bar, "demo", describe=lambda f: f.get("message"), log=log_messages("demo"))
        p.start(2)
        p.advance(1, message="first half")
        p.advance(1, message="second half")
        task = bar.tasks[p.task]
        assert (task.completed, task.total, task.description) == (2, 2, "second half")
        p.finish()
    assert "demo: first half" in out.getvalue() and "demo: second half" in out.getvalue()
