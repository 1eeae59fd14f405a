"""evaluate(): submission format, subset files, metrics.json, plots, CLI — on a trained tiny checkpoint."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mambavl import evaluate as E
from mambavl.errors import InputError

# ----------------------------------------------------------------------------------------------------------------
# pieces that need no model


def test_submission_recognition_format_matches_official():
    verb = np.array([[1.5, -2.25, 0.125], [0.0, 1e-5, 3.0]], dtype=np.float32)
    noun = np.array([[0.5, 0.25], [7.0, -1.0]], dtype=np.float32)
    text = E.submission_text(["P01_101_0", "P01_101_1"], verb, noun, "action_recognition",
                             {"sls_pt": 2, "sls_tl": 3, "sls_td": 4})
    sub = json.loads(text)
    # utils/challenge.py:make_action_recognition_submission
    assert {k: sub[k] for k in ("version", "challenge", "sls_pt", "sls_tl", "sls_td")} == {
        "version": "0.2", "challenge": "action_recognition", "sls_pt": 2, "sls_tl": 3, "sls_td": 4}
    assert list(sub["results"]) == ["P01_101_0", "P01_101_1"]
    entry = sub["results"]["P01_101_0"]
    assert set(entry) == {"verb", "noun"}
    assert entry["verb"] == {"0": 1.5, "1": -2.25, "2": 0.125}
    assert sub["results"]["P01_101_1"]["verb"]["1"] == pytest.approx(1e-5)
    # Scores read back as the same float32 values.
    back = np.array([[sub["results"][n]["noun"][str(j)] for j in range(2)] for n in sub["results"]], np.float32)
    np.testing.assert_array_equal(back, noun)


def test_submission_anticipation_has_top100_actions():
    rng = np.random.default_rng(0)
    verb = rng.normal(size=(3, 12)).astype(np.float32)
    noun = rng.normal(size=(3, 20)).astype(np.float32)
    sub = json.loads(E.submission_text(["a", "b", "c"], verb, noun, "action_anticipation",
                                       {"sls_pt": 1, "sls_tl": 3, "sls_td": 3}))
    assert sub["challenge"] == "action_anticipation" and sub["version"] == "0.2"
    actions = sub["results"]["b"]["action"]
    assert len(actions) == 100
    best = max(actions, key=actions.get)
    v, n = (int(x) for x in best.split(","))
    assert (v, n) == (int(verb[1].argmax()), int(noun[1].argmax()))


def test_submission_rejects_non_finite_scores():
    with pytest.raises(ValueError, match="non-finite"):
        E.submission_text(["a"], np.array([[np.nan, 1.0]]), None, "action_recognition", {})


def test_write_submission_zip_holds_test_json(tmp_path):
    files = E.write_submission(tmp_path, '{"version": "0.2"}')
    with zipfile.ZipFile(files["submission_zip"]) as z:
        assert z.namelist() == ["test.json"]
        assert json.loads(z.read("test.json")) == {"version": "0.2"}
    assert json.loads(Path(files["submission_json"]).read_text()) == {"version": "0.2"}


def test_locate_and_load_subset_files(ek100_dir, tmp_path):
    cfg = E.EvalConfig(checkpoint="x.pt", cache="c.h5", out_dir=str(tmp_path), ek100_dir=str(ek100_dir))
    found, notes = E.locate_subset_files(cfg, {"annotation_file": "EPIC_100_validation.csv"})
    assert found["unseen_ids"].name == "EPIC_100_unseen_participant_ids_validation.csv"
    assert notes == []
    subsets = E.load_subsets(found)
    assert subsets["unseen_ids"] == {"P18", "P32"}
    assert len(subsets["tail_verbs"]) == 86 and len(subsets["tail_nouns"]) == 228
    found, _ = E.locate_subset_files(cfg, {"annotation_file": "EPIC_100_test_timestamps.csv"})
    assert E.load_subsets(found)["unseen_ids"] == {"P33", "P34", "P36"}
    # Unknown split and no explicit list: the unseen subset is skipped with a note, not an error.
    found, notes = E.locate_subset_files(cfg, {"annotation_file": "my_clips.csv"})
    assert found["unseen_ids"] is None and any("split" in n for n in notes)


def test_subset_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "tail.csv"
    bad.write_text("verb\nthree\n")
    with pytest.raises(InputError, match="tail.csv: row 1"):
        E.load_subsets({"tail_verbs": bad})
    cfg = E.EvalConfig(checkpoint="x.pt", cache="c.h5", out_dir=str(tmp_path), tail_nouns=str(tmp_path / "nope.csv"))
    with pytest.raises(InputError, match="nope.csv"):
        E.locate_subset_files(cfg, {})
    with pytest.raises(InputError, match="question_source"):
        E.EvalConfig(checkpoint="x.pt", cache="c.h5", out_dir="o", question_source="narration")
    with pytest.raises(InputError, match="split"):
        E.EvalConfig(checkpoint="x.pt", cache="c.h5", out_dir="o", split="train")


# ----------------------------------------------------------------------------------------------------------------
# end to end on planted caches and a briefly trained checkpoint

# A tiny model on the pure-torch scan: no JIT warm-up, a few seconds of training on one core.
TINY = {"d_model": 16, "n_layers": 1, "scan_impl": "chunked"}
UNSEEN = "P02"
TAIL_VERBS = {4, 5}
TAIL_NOUNS = {3, 4}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mambavl.cache.synthetic import make_planted_cache
    from mambavl.train import TrainConfig, train

    d = tmp_path_factory.mktemp("eval")
    caches = {
        "train": make_planted_cache(d / "train.h5", n=120, seed=0, anticipation=True),
        "val": make_planted_cache(d / "val.h5", n=60, seed=1, anticipation=True, invalid_rows=2),
        "test": make_planted_cache(d / "test.h5", n=20, seed=2, labelled=False),
        "noann": make_planted_cache(d / "noann.h5", n=20, seed=3, annotation_questions=False),
        "other": make_planted_cache(d / "other.h5", n=20, seed=4, structure_seed=99),
    }
    (d / "unseen.csv").write_text(f"participant_id\n{UNSEEN}\n")
    (d / "tail_verbs.csv").write_text("verb\n" + "\n".join(map(str, sorted(TAIL_VERBS))) + "\n")
    (d / "tail_nouns.csv").write_text("noun\n" + "\n".join(map(str, sorted(TAIL_NOUNS))) + "\n")
    # Trained with the paper's narration-derived questions, so evaluating it reports that protocol.
    result = train(TrainConfig(train_cache=str(caches["train"]), val_cache=None, out_dir=str(d / "run"),
                               question_source="annotation", model_overrides=TINY, epochs=4, batch_size=16, lr=1e-2,
                               warmup_epochs=0, frames=4, qa_weight=0, min_steps=0))
    return {"dir": d, "ckpt": str(result.last_checkpoint), **{k: str(v) for k, v in caches.items()}}


def _cfg(setup, out, **kw) -> E.EvalConfig:
    d = setup["dir"]
    # the planted val cache has two invalid rows: its submission is knowingly incomplete
    values = dict(checkpoint=setup["ckpt"], cache=setup["val"], out_dir=str(out), device="cpu",
                  unseen_ids=str(d / "unseen.csv"), tail_verbs=str(d / "tail_verbs.csv"),
                  tail_nouns=str(d / "tail_nouns.csv"), sls_pt=1, sls_tl=3, sls_td=3, allow_incomplete=True)
    values.update(kw)
    return E.EvalConfig(**values)


def _labels(cache_path):
    """Labels read straight from the HDF5 file (independent of the reader)."""
    import h5py

    with h5py.File(cache_path, "r") as f:
        return {
            "verb": f["verb_class"][()].astype(int),
            "noun": f["noun_class"][()].astype(int),
            "participant": [p.decode() if isinstance(p, bytes) else str(p) for p in f["participant_id"][()]],
            "narration_id": [p.decode() if isinstance(p, bytes) else str(p) for p in f["narration_id"][()]],
            "valid": f["valid"][()].astype(bool),
        }


def test_evaluate_labelled_split(setup, tmp_path):
    out = tmp_path / "ev"
    res = E.evaluate(_cfg(setup, out))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"] == res["metrics"]
    assert saved["question_source"] == "annotation" and saved["question_source_from"] == "checkpoint"
    assert "narration" in saved["question_source_warning"]
    assert saved["segments"] == {"cache": 60, "evaluated": 58, "invalid_or_failed": 2}
    assert "segments_warning" in saved
    assert saved["checkpoint"]["sha256"] == E.sha256_file(setup["ckpt"])
    assert saved["cache"]["attrs"]["encoder"] == "planted"

    lab = _labels(setup["val"])
    valid = lab["valid"]
    v, n = lab["verb"][valid], lab["noun"][valid]
    part = np.asarray(lab["participant"])[valid]
    m = saved["metrics"]
    assert m["all"]["verb"]["n"] == 58
    assert m["unseen"]["verb"]["n"] == int((part == UNSEEN).sum()) > 0
    tv, tn = np.isin(v, list(TAIL_VERBS)), np.isin(n, list(TAIL_NOUNS))
    assert m["tail"]["verb"]["n"] == tv.sum() and m["tail"]["noun"]["n"] == tn.sum()
    assert m["tail"]["action"]["n"] == (tv | tn).sum()
    assert set(saved["official"]) >= {"all_action_accuracy_at_5", "unseen_verb_accuracy_at_1",
                                      "tail_action_accuracy_at_1"}

    # The submission's scores reproduce the reported accuracies (independent recomputation from the JSON).
    sub = json.loads((out / "submission.json").read_text())
    ids = list(np.asarray(lab["narration_id"])[valid])
    assert list(sub["results"]) == ids
    vs = np.array([[sub["results"][i]["verb"][str(c)] for c in range(6)] for i in ids])
    ns = np.array([[sub["results"][i]["noun"][str(c)] for c in range(5)] for i in ids])
    vhit, nhit = vs.argmax(1) == v, ns.argmax(1) == n
    assert m["all"]["verb"]["top1"] == pytest.approx(100 * vhit.mean(), abs=1e-3)
    assert m["all"]["noun"]["top1"] == pytest.approx(100 * nhit.mean(), abs=1e-3)
    assert m["all"]["action"]["top1"] == pytest.approx(100 * (vhit & nhit).mean(), abs=1e-3)
    assert m["unseen"]["verb"]["top1"] == pytest.approx(100 * vhit[part == UNSEEN].mean(), abs=1e-3)
    with zipfile.ZipFile(out / "submission.zip") as z:
        assert json.loads(z.read("test.json")) == sub

    # per_class.csv: one row per class, supports add up, support-weighted class accuracy = overall accuracy.
    import csv

    with open(out / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    verb_rows = [r for r in rows if r["task"] == "verb"]
    assert len(verb_rows) == 6 and len(rows) == 11
    support = np.array([int(r["support"]) for r in verb_rows])
    assert support.tolist() == np.bincount(v, minlength=6).tolist()
    top1 = np.array([float(r["top1"]) if r["top1"] else 0.0 for r in verb_rows])
    assert (support * top1).sum() / support.sum() == pytest.approx(m["all"]["verb"]["top1"], abs=1e-3)
    assert {r["bucket"] for r in rows} <= {"head", "mid", "tail"}
    assert saved["frequency_buckets"]["source"].startswith("training cache")
    assert sum(b["n"] for b in saved["frequency_buckets"]["verb"].values()) == 58
    # chance levels beside the numbers (planted: 6 verbs, 5 nouns; actions = verb and noun both right)
    assert saved["chance"]["verb"]["top5"] == pytest.approx(500 / 6, abs=1e-3)
    assert saved["chance"]["action"]["classes"] == 30 and saved["dataset"]["kind"] == "ek100"

    for name in ("verb_per_class", "noun_per_class", "head_tail", "verb_confusion", "noun_confusion"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_question_override_and_refusals(setup, tmp_path):
    res = E.evaluate(_cfg(setup, tmp_path / "t", question_source="templates", plots=False, submission=False))
    assert res["question_source"] == "templates" and res["question_source_from"] == "override"
    assert "question_source_warning" not in res
    assert res["trained_question_source"] == "annotation"
    assert not (tmp_path / "t" / "submission.json").exists()
    # The checkpoint's protocol needs annotation questions the cache does not have.
    with pytest.raises(InputError, match="no 'annotation' questions"):
        E.evaluate(_cfg(setup, tmp_path / "x", cache=setup["noann"]))
    # Another encoder: refused, naming the attribute.
    with pytest.raises(InputError, match="attribute 'model'"):
        E.evaluate(_cfg(setup, tmp_path / "y", cache=setup["other"]))
    with pytest.raises(InputError, match="anticipation window"):
        E.evaluate(_cfg(setup, tmp_path / "z", cache=setup["test"], task="anticipation"))


def test_unlabelled_test_split_writes_submission_only(setup, tmp_path):
    out = tmp_path / "test"
    res = E.evaluate(_cfg(setup, out, cache=setup["test"], question_source="templates"))
    assert res["metrics"] is None and "no labels" in res["note"]
    assert not (out / "per_class.csv").exists()
    sub = json.loads((out / "submission.json").read_text())
    assert len(sub["results"]) == 20 and sub["challenge"] == "action_recognition"
    assert json.loads((out / "metrics.json").read_text())["metrics"] is None


def test_anticipation_metrics_and_submission(setup, tmp_path):
    out = tmp_path / "ant"
    res = E.evaluate(_cfg(setup, out, task="anticipation", question_source="templates", plots=False))
    assert res["task"] == "anticipation" and res["window"] == "anticipation"
    m = res["metrics"]
    assert set(m) == {"all", "unseen", "tail"}
    for entry in m["all"].values():
        assert 0 <= entry["recall@5"] <= 100 and entry["classes"] >= 1
    assert "all_action_mean_top5_recall" in res["official"]
    sub = json.loads((out / "submission.json").read_text())
    assert sub["challenge"] == "action_anticipation"
    entry = next(iter(sub["results"].values()))
    assert len(entry["action"]) == 30  # all 6 x 5 pairs (fewer than 100)
    assert all("," in k for k in entry["action"])


def test_cli_evaluate(setup, tmp_path):
    from typer.testing import CliRunner

    from mambavl.cli import app

    runner = CliRunner()
    d = setup["dir"]
    args = ["evaluate", "--checkpoint", setup["ckpt"], "--cache", setup["val"], "--device", "cpu",
            "--unseen-ids", str(d / "unseen.csv"), "--tail-verbs", str(d / "tail_verbs.csv"),
            "--tail-nouns", str(d / "tail_nouns.csv"), "--no-plots"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "top1" in res.output and "unseen" in res.output and "action" in res.output
    assert "warning" in res.output and "narration" in res.output
    assert (tmp_path / "a" / "metrics.json").is_file()
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--questions", "templates", "--quiet"])
    assert res.exit_code == 0 and res.output == ""
    res = runner.invoke(app, ["evaluate", "--checkpoint", setup["ckpt"], "--cache", setup["noann"],
                              "--out", str(tmp_path / "c"), "--device", "cpu"])
    assert res.exit_code == 2 and "annotation" in res.output


def test_submission_needs_every_row_and_the_declared_levels(setup, tmp_path):
    # the val cache misses two rows (failed extraction): refused before scoring, naming them
    with pytest.raises(InputError, match=r"2 of 60 segments have no features .* Missing narration_ids: "
                                         r".*--allow-incomplete"):
        E.evaluate(_cfg(setup, tmp_path / "a", allow_incomplete=False))
    assert not (tmp_path / "a" / "submission.zip").exists()
    res = E.evaluate(_cfg(setup, tmp_path / "b", plots=False))  # allowed: written, the missing ids recorded
    lab = _labels(setup["val"])
    missing = [str(x) for x in np.asarray(lab["narration_id"])[~lab["valid"]]]
    assert res["submission"]["missing_ids"] == missing and len(missing) == 2
    # no levels: the unlabelled split is refused, a labelled one gets metrics and a note, no submission
    with pytest.raises(InputError, match="--sls-pt, --sls-tl, --sls-td"):
        E.evaluate(_cfg(setup, tmp_path / "c", cache=setup["test"], question_source="templates",
                        sls_pt=None, sls_tl=None, sls_td=None))
    res = E.evaluate(_cfg(setup, tmp_path / "d", plots=False, sls_tl=None))
    assert res["metrics"] and "--sls-tl" in res["submission_note"] and not (tmp_path / "d" / "submission.json").exists()
    from typer.testing import CliRunner

    from mambavl.cli import app

    r = CliRunner().invoke(app, ["evaluate", "--checkpoint", setup["ckpt"], "--cache", setup["test"], "--out",
                            str(tmp_path / "e"), "--device", "cpu", "--questions", "templates", "--quiet"])
    assert r.exit_code == 2 and "supervision levels" in r.output
