"""Pickles that would run code are refused, never executed: a crafted checkpoint (evaluate, train --resume) and a
crafted feature .pkl (cache import). The payload would create a marker file when unpickled."""

from __future__ import annotations

import pickle

import numpy as np
import torch
from fault_inputs import write_classes, write_ek100
from typer.testing import CliRunner

from mambavl.cli import app


class _Payload:
    """Unpickling this calls exec(...), which creates `marker`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_payload_really_runs_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # noqa: S301 - proves the payload works
    assert marker.exists()


def test_crafted_checkpoint_is_refused_not_executed(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"kind": "mambavl-checkpoint", "model": _Payload(marker)}, evil)
    r = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(evil), "--cache", str(tmp_path / "c.h5"),
                                 "--out", str(tmp_path / "eval"), "--device", "cpu", "--quiet"])
    assert r.exit_code == 2 and "not a mambavl checkpoint" in r.output, r.output
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"kind": "mambavl-checkpoint", "train_config": _Payload(marker)}, run / "last.pt")
    r = CliRunner().invoke(app, ["train", "--out", str(run), "--resume", "--device", "cpu", "--quiet"])
    assert r.exit_code == 2 and "not a mambavl checkpoint" in r.output, r.output
    assert not marker.exists()


def test_crafted_feature_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "ran"
    write_classes(tmp_path)
    write_ek100(tmp_path / "ann.csv", [dict(nid=f"P09_01_{i}", vid="P09_01", start=float(i), stop=i + 0.8,
                                            f0=25 * i + 1, f1=25 * i + 20) for i in range(2)])
    feats = tmp_path / "feats"
    feats.mkdir()
    with open(feats / "P09_01_0.pkl", "wb") as f:
        pickle.dump(np.ones((2, 4), np.float32), f)  # an ordinary array pickle is fine
    with open(feats / "P09_01_1.pkl", "wb") as f:
        pickle.dump(_Payload(marker), f)
    args = ["cache", "import", "--features", str(feats), "--annotations", str(tmp_path / "ann.csv"), "--out",
            str(tmp_path / "imp.h5"), "--name", "x", "--text-model", "mambavl-tiny-clip", "--text-pretrained", "none"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "P09_01_1.pkl" in r.output and "builtins.exec" in r.output, r.output
    assert not marker.exists() and not (tmp_path / "imp.h5").exists()
    with open(feats / "P09_01_1.pkl", "wb") as f:
        pickle.dump(np.zeros((2, 4), np.float32), f, protocol=2)
    assert CliRunner().invoke(app, args).exit_code == 0
