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


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _plain(label="extract", clock=None, log=None):
    from mambavl.cli.progress import PlainProgress, default_describe, no_log

    out = io.StringIO()
    return PlainProgress(label, default_describe, log or no_log, out, interval=30.0, clock=clock or FakeClock(),
                         heartbeat=False), out


def test_plain_lines_carry_counts_rate_and_eta_every_tenth():
    clock = FakeClock()
    p, out = _plain(clock=clock)
    p.start(100, message="segments")
    for _ in range(25):
        clock.now += 2.0  # 0.5 segments/s
        p.advance(1)
    lines = out.getvalue().splitlines()
    assert lines[0] == "extract: 0/100 (0%), 0/s, ETA ? - segments"
    assert lines[1:] == ["extract: 10/100 (10%), 0.5/s, ETA 0:03:00 - segments",
                         "extract: 20/100 (20%), 0.5/s, ETA 0:02:40 - segments"]
    p.finish()
    assert out.getvalue().splitlines()[-1] == "extract: 100/100 (100%), 2/s, ETA 0:00:00 - segments (done)"


def test_plain_heartbeat_speaks_after_a_silent_interval():
    clock = FakeClock()
    p, out = _plain(clock=clock)
    p.start(4, message="training")
    clock.now += 29.0
    p.tick()
    assert len(out.getvalue().splitlines()) == 1  # not yet silent for the interval
    clock.now += 2.0
    p.tick()
    assert out.getvalue().splitlines()[-1] == "extract: 0/4 (0%), 0/s, ETA ? - training"


def test_plain_lines_show_the_inner_loop_of_a_stage():
    """A stage of a run (the demo's training) reports its steps as a part: the heartbeat line shows them."""
    from mambavl.progress import Stages

    clock = FakeClock()
    p, out = _plain("demo", clock=clock)
    stages = Stages(p, 3)
    stages.enter("training")
    steps = stages.part("steps")
    steps.start(40)
    for _ in range(10):
        clock.now += 3.0
        steps.advance(1, loss=0.5)
    p.tick()
    assert out.getvalue().splitlines()[-1] == \
        "demo: 0/3 (0%), 0/s, ETA ? - training [steps: 10/40 (25%), 0.333/s, ETA 0:01:30]"


def test_commands_print_plain_progress_when_not_on_a_terminal(tmp_path):
    """CliRunner's stderr is no terminal: `mambavl train` prints plain lines (counts, rate, ETA), not a bar."""
    from typer.testing import CliRunner

    from mambavl.cli import app

    cache = make_planted_cache(tmp_path / "c.h5", n=24, seed=2)
    r = CliRunner().invoke(app, ["train", "--train-cache", str(cache), "--out", str(tmp_path / "run"), "--epochs",
                                 "2", "--batch-size", "8", "--frames", "6", "--min-steps", "0", "--set", "d_model=32",
                                 "--set", "n_layers=1"])
    assert r.exit_code == 0, r.output
    plain = [line for line in r.stderr.splitlines() if line.startswith("train: ")]
    assert plain[0].startswith("train: 0/6 (0%)") and plain[-1].startswith("train: 6/6 (100%)")
    assert all("/s, ETA " in line for line in plain) and "━" not in r.stderr
