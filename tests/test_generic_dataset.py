"""A generic clip CSV (video,start,stop,label; any label set) through the same extract / train / evaluate commands."""

from __future__ import annotations

import csv
import json

from typer.testing import CliRunner

from mambavl.cache.reader import open_cache
from mambavl.cli import app
from mambavl.data.synthetic import make_kitchen_dataset
from mambavl.runtime import TrainedModel

TINY = ["--model", "mambavl-tiny-clip", "--pretrained", "none", "--pooling", "grid", "--frames", "6", "--size", "64",
        "--questions", "templates", "--device", "cpu", "--quiet"]


def test_generic_clips_extract_train_evaluate(tmp_path):
    ds = make_kitchen_dataset(tmp_path / "data", n_train=24, n_val=12, n_test=0, generic_csv=True)
    run = CliRunner()
    labels = sorted({row["label"] for row in csv.DictReader(open(ds.generic_csv))})
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(labels) + "\n")
    for split, path in (("train", ds.generic_csv), ("val", ds.generic_val_csv)):
        # one label list for both splits (the validation file need not contain every label)
        res = run.invoke(app, ["extract", str(path), "--videos", str(ds.videos), "--out", str(tmp_path / f"{split}.h5"),
                               "--verb-classes", str(labels_file), *TINY])
        assert res.exit_code == 0, res.output + repr(res.exception)
    cache = open_cache(tmp_path / "train.h5")
    assert list(cache.verb_keys) == labels and len(cache.noun_keys) == 0  # one label set, no nouns

    res = run.invoke(app, ["train", "--train-cache", str(tmp_path / "train.h5"), "--val-cache", str(tmp_path / "val.h5"),
                           "--out", str(tmp_path / "run"), "--epochs", "2", "--batch-size", "8", "--device", "cpu",
                           "--set", "d_model=32", "--min-steps", "20", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    best = TrainedModel.load(tmp_path / "run" / "best.pt")
    assert best.vocab.verbs == labels and best.vocab.nouns == []
    # 24 clips at batch 8: 3 steps per pass, 6 in 2 epochs; the step floor of 20 makes each epoch 4 passes
    history = TrainedModel.load(tmp_path / "run" / "last.pt").progress.history
    assert [(h["passes"], h["rec_steps"]) for h in history] == [(4, 12), (4, 12)]
    assert best.selection_metric == "val_verb_top1"

    res = run.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--cache",
                           str(tmp_path / "val.h5"), "--out", str(tmp_path / "eval"), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    overall = metrics["metrics"]["all"]
    assert metrics["n"] == 12 and 0 <= overall["verb"]["top1"] <= 100 and "noun" not in overall
    history = best.progress.history[-1]
    assert overall["verb"]["top1"] == history["val_verb_top1"] or abs(overall["verb"]["top1"]
                                                                        - history["val_verb_top1"]) < 1e-3
    rows = list(csv.DictReader(open(tmp_path / "eval" / "per_class.csv")))
    assert [r["class_key"] for r in rows if r["task"] == "verb"] == labels  # every label of the list, in order
    assert not [r for r in rows if r["task"] == "noun"]
