"""Training faults: a non-finite loss stops the run naming epoch and step (exit 4) and keeps the last good
checkpoint; a checkpoint that cannot be written (full disk) leaves the previous one intact; a run killed with
SIGKILL (mid-epoch, and while writing last.pt) and resumed ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import dataclasses
import errno
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from mambavl import files as F
from mambavl.cache.synthetic import make_planted_cache
from mambavl.cli import app
from mambavl.errors import TrainingStopped
from mambavl.runtime import TrainedModel
from mambavl.train import TrainConfig, train
from mambavl.train import loop as T

TINY = {"d_model": 32, "n_layers": 1}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_planted_cache(tmp_path_factory.mktemp("train-faults") / "tiny.h5", n=24, seed=2)  # 3 steps/epoch


def _cfg(cache, out, **kw) -> TrainConfig:
    values = dict(train_cache=str(cache), val_cache=str(cache), out_dir=str(out), model_overrides=dict(TINY),
                  epochs=3, batch_size=8, lr=3e-3, frames=6, min_steps=0)
    values.update(kw)
    return TrainConfig(**values)


def _load(path) -> TrainedModel:
    return TrainedModel.load(path)


def _finite(run: TrainedModel) -> bool:
    return all(torch.isfinite(v).all() for v in run.weights.values() if v.is_floating_point())


def _nan_at(monkeypatch, call: int) -> None:
    """Make the `call`-th recognition loss NaN (an injected divergence)."""
    real, calls = T.recognition_loss, [0]

    def rec_loss(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls[0] += 1
        return dataclasses.replace(loss, total=loss.total * float("nan")) if calls[0] == call else loss

    monkeypatch.setattr(T, "recognition_loss", rec_loss)


def test_nonfinite_loss_stops_naming_epoch_and_step_and_keeps_the_checkpoint(cache, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 5)  # epoch 2, step 5
    with pytest.raises(TrainingStopped, match=r"non-finite recognition loss \(nan\) at epoch 2, step 5.*last good "
                                              r"checkpoint .*last.pt is kept"):
        train(_cfg(cache, tmp_path / "run"))
    last, best = _load(tmp_path / "run" / "last.pt"), _load(tmp_path / "run" / "best.pt")
    assert last.progress.epoch == 1 and _finite(last) and _finite(best)
    _nan_at(monkeypatch, 2)
    r = CliRunner().invoke(app, ["train", "--train-cache", str(cache), "--out", str(tmp_path / "cli"), "--epochs",
                                 "2", "--batch-size", "8", "--frames", "6", "--set", "d_model=32", "--set",
                                 "n_layers=1", "--device", "cpu", "--quiet"])
    assert r.exit_code == 4 and "at epoch 1, step 2" in r.output and "no checkpoint was written" in r.output, r.output
    assert not (tmp_path / "cli" / "last.pt").exists()


def test_failed_checkpoint_write_leaves_the_previous_one_intact(cache, tmp_path, monkeypatch):
    real, calls = torch.save, [0]

    def full_disk(obj, path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # epoch 2's last.pt: a few bytes land, then the disk is full
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(F.torch, "save", full_disk)
    with pytest.raises(TrainingStopped, match=r"could not write .*last.pt \(No space left on device\); .*last.pt "
                                              r"is unchanged"):
        train(_cfg(cache, tmp_path / "run"))
    monkeypatch.undo()
    last = _load(tmp_path / "run" / "last.pt")
    assert last.progress.epoch == 1 and _finite(last)
    assert not list((tmp_path / "run").glob("*.tmp"))
    resumed = train(dataclasses.replace(_cfg(cache, tmp_path / "run"), resume=True))  # and the run goes on
    assert resumed.history[-1]["epoch"] == 3


CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from mambavl import files as F
    from mambavl import train
    from mambavl.train import loop as T

    cfg, where, n = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)  # as the test process (conftest): the same reduction order, so the same bits
    calls = [0]

    def die_on_nth(real):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if where == "save" and calls[0] == n:  # half of last.pt.tmp written, then killed
                with open(args[1], "wb") as f:
                    f.write(b"PK\\x03\\x04 half")
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(*args, **kwargs)
            if where == "step" and calls[0] == n:  # killed right after a step, mid-epoch
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapper

    if where == "step":
        T.recognition_step = die_on_nth(T.recognition_step)
    else:
        F.torch.save = die_on_nth(torch.save)
    train.train(train.TrainConfig(**cfg))
""")


def test_sigkill_then_resume_gives_the_uninterrupted_weights(cache, tmp_path):
    reference = train(_cfg(cache, tmp_path / "ref"))
    cfg = _cfg(cache, tmp_path / "run")
    plain = json.dumps({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, default=str)
    for where, n, resume in (("step", 5, False), ("save", 1, True)):  # mid-epoch 2; then while saving epoch 2
        args = json.loads(plain)
        args["resume"] = resume
        child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args), where, str(n)], capture_output=True,
                               text=True, timeout=300)
        assert child.returncode == -9, child.stderr[-2000:]
        assert _load(tmp_path / "run" / "last.pt").progress.epoch == 1  # the last good checkpoint, intact
    resumed = train(dataclasses.replace(cfg, resume=True))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    want, got = reference.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert _load(tmp_path / "run" / "last.pt").weights.keys() == want.keys()
