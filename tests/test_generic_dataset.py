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
    # the generic CSV's own label name: the verb head is "label" in every output (metrics.csv keeps internal names)
    assert metrics["n"] == 12 and 0 <= overall["label"]["top1"] <= 100 and "noun" not in overall
    history = best.progress.history[-1]
    assert abs(overall["label"]["top1"] - history["val_verb_top1"]) < 1e-3
    rows = list(csv.DictReader(open(tmp_path / "eval" / "per_class.csv")))
    assert [r["class_key"] for r in rows if r["task"] == "label"] == labels  # every label of the list, in order
    assert not [r for r in rows if r["task"] in ("noun", "verb")]


def test_generic_cache_outputs_speak_its_own_terms(tmp_path):
    """A generic dataset (one label set) is reported with its own label name and classes: no "verb", no EK-100
    subset-file notes, no head/mid/tail buckets; chance levels beside the numbers (6 classes: top-5 chance 83 %)."""
    from mambavl.cache.synthetic import make_planted_cache

    train = make_planted_cache(tmp_path / "train.h5", n=24, num_nouns=0, seed=0)
    val = make_planted_cache(tmp_path / "val.h5", n=18, num_nouns=0, seed=1)
    assert open_cache(train).attrs["dataset_kind"] == "generic"
    run = CliRunner()
    res = run.invoke(app, ["train", "--train-cache", str(train), "--val-cache", str(val), "--out", str(tmp_path / "r"),
                           "--epochs", "1", "--batch-size", "8", "--min-steps", "0", "--device", "cpu",
                           "--set", "d_model=16", "--set", "n_layers=1", "--frames", "4"])
    assert res.exit_code == 0, res.output
    assert "label_top1" in res.output and "verb" not in res.output
    res = run.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "r" / "last.pt"), "--cache", str(val),
                           "--out", str(tmp_path / "eval"), "--device", "cpu", "--ek100-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    for word in ("verb", "EPIC_100", "tail", "mid", "unseen"):
        assert word not in res.output, (word, res.output)
    assert "chance" in res.output and "83.33" in res.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["dataset"] == {"kind": "generic", "heads": {"verb": "label", "noun": "noun", "action": "action"}}
    assert set(metrics["metrics"]) == {"all"} and set(metrics["metrics"]["all"]) == {"label"}
    assert all("verb" not in k for k in metrics["official"])
    assert "frequency_buckets" not in metrics and "subset_notes" not in metrics and "subset_files" not in metrics
    assert metrics["chance"]["label"] == {"classes": 6, "top1": 16.6667, "top5": 83.3333}
    rows = list(csv.DictReader(open(tmp_path / "eval" / "per_class.csv")))
    assert {r["task"] for r in rows} == {"label"} and "bucket" not in rows[0]
    assert (tmp_path / "eval" / "label_per_class.png").is_file() and not (tmp_path / "eval" / "head_tail.png").exists()


def test_predict_output_names_the_head_of_every_line(monkeypatch, tmp_path):
    """The top-action table comes from the recognition heads, the answers from the QA head: the output says so (they
    can disagree), and a generic dataset's classes are listed under its own label name."""
    import mambavl.predict as P

    result = {"start": 0.0, "stop": 2.0, "notes": [], "candidates": None, "sources": dict(P.SOURCES),
              "dataset": {"kind": "generic", "heads": {"verb": "label", "noun": "noun", "action": "action"}},
              "actions": [{"verb": "stir", "noun": None, "verb_id": 0, "noun_id": None, "score": 0.7}],
              "qa": {"verb": {"question": "What is the person doing?", "target": "verb", "multi_label": False,
                              "answers": [{"answer": "cut", "id": 1, "score": 0.6}]}}}
    monkeypatch.setattr(P, "predict_video", lambda cfg, progress=None: result)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    res = CliRunner().invoke(app, ["predict", str(video), "--checkpoint", str(tmp_path / "x.pt"), "--quiet"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "top labels, from the recognition heads" in out and "verb" not in out
    assert "QA head answers" in out and "can differ from the table above" in out
    assert "QA head, What is the person doing? -> cut (0.60)" in out
