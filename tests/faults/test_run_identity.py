"""A run meets caches that changed under it, and checkpoints of older versions (issue: nothing silently wrong).

* resume after the training cache was re-extracted with the verb classes in another order, or from another
  annotation file: refused (exit 2) naming both files and the first differing class, instead of training head
  output i as another class; evaluation of the run on such a cache is refused likewise;
* a checkpoint written by an earlier mambavl (no scene bias, no text-encoder attribute): evaluated through the
  migration, not a traceback.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from mambavl.cache.synthetic import make_planted_cache
from mambavl.cli import app
from mambavl.train import TrainConfig, train

TINY = {"d_model": 16, "n_layers": 1}
FIXTURES = Path(__file__).resolve().parents[1] / "data" / "checkpoints"
runner = CliRunner()


def _reorder_verbs(path: Path) -> None:
    """Re-extraction with a verb class CSV that lists the same verbs in another order: the class table and the
    labels' ids change together."""
    with h5py.File(path, "a") as f:
        names = [v.decode() if isinstance(v, bytes) else v for v in f["classes/verb"][()]]
        order = names[::-1]
        del f["classes/verb"]
        f.create_dataset("classes/verb", data=np.array(order, dtype=h5py.string_dtype()))
        new_id = {names.index(n): i for i, n in enumerate(order)}
        old = f["verb_class"][()]
        f["verb_class"][...] = np.array([new_id.get(int(v), -1) if v >= 0 else -1 for v in old], dtype=old.dtype)


@pytest.fixture()
def run(tmp_path):
    caches = {s: make_planted_cache(tmp_path / f"{s}.h5", n=n, seed=i, frames=4, dim=16, text_dim=8)
              for i, (s, n) in enumerate((("train", 32), ("val", 16)))}
    cfg = TrainConfig(train_cache=str(caches["train"]), val_cache=str(caches["val"]), out_dir=str(tmp_path / "run"),
                      model_overrides=TINY, epochs=2, frames=4, batch_size=8, min_steps=0, device="cpu")
    train(cfg, stop_after_epochs=1)
    return cfg, caches


def test_resume_refuses_reordered_classes(run):
    cfg, caches = run
    _reorder_verbs(caches["train"])
    result = runner.invoke(app, ["train", "--out", cfg.out_dir, "--resume", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "train cache" in text and str(caches["train"]) in text and "last.pt" in text
    assert "verb 0 is 'verb5' there but 'verb0' here" in text


def test_resume_refuses_another_annotation_file(run):
    cfg, caches = run
    with h5py.File(caches["train"], "a") as f:
        f.attrs["annotation_sha256"] = "0" * 64
        f.attrs["annotation_file"] = "EPIC_100_train_v2.csv"
    result = runner.invoke(app, ["train", "--out", cfg.out_dir, "--resume", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "another annotation file" in text and "EPIC_100_train_v2.csv" in text and "planted.csv" in text


def test_evaluate_refuses_reordered_classes(run, tmp_path):
    cfg, caches = run
    _reorder_verbs(caches["val"])
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(Path(cfg.out_dir) / "last.pt"), "--cache",
                                 str(caches["val"]), "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "verb 0 is 'verb5' there but 'verb0' here" in " ".join(result.output.split())


def test_a_checkpoint_of_an_older_version_evaluates(tmp_path):
    """format 1 from before the scene bias and the text-encoder attribute (harvest case 04's traceback)."""
    val = make_planted_cache(tmp_path / "val.h5", n=16, seed=1, frames=4, dim=16, text_dim=8, anticipation=True)
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(FIXTURES / "format1-83f880d-recognition.pt"),
                                 "--cache", str(val), "--out", str(tmp_path / "eval"), "--device", "cpu",
                                 "--no-submission"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "eval" / "metrics.json").is_file()
