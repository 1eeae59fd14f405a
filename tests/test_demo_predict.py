"""`mambavl demo --quick` end to end (the CI form of the README's first command), and `mambavl predict` on its
outputs: a clip decoded and encoded on the fly gets the scores evaluation computes from the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mambavl.cli import app
from mambavl.data.annotations import load_annotations
from mambavl.runtime import TrainedModel, predict_scores

# The module's first test also runs the whole `demo --quick` (several trainings, evaluation, audit, ablation): minutes
# on two cores, more on a shared machine, so it gets more than the suite's default per-test limit.
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out, res.output


def test_demo_report_and_accuracy_far_above_chance(demo):
    out, printed = demo
    for rel in ("README.md", "summary.json", "eval/val/metrics.json", "eval/val/per_class.csv",
                "eval/test/submission.json", "audit/audit.md", "ablation/ablation.md", "runs/templates/best.pt",
                "runs/templates/curves.png", "runs/templates/train.log", "model/config.json",
                "model/model.safetensors", "model/README.md"):
        assert (out / rel).is_file(), rel
    summary = json.loads((out / "summary.json").read_text())
    val, chance = summary["validation"], summary["chance_percent"]
    # six verbs and six nouns: chance is 16.7 %; the demo must be far above it
    assert val["verb_top1"] >= 2 * chance["verb_top1"], val
    assert val["noun_top1"] >= 2 * chance["noun_top1"], val
    assert val["action_top1"] >= 3 * chance["action_top1"], val
    assert "## Validation" in printed and "## Ablation" in printed
    # the test split has no labels: a submission and no metrics
    sub = json.loads((out / "eval/test/submission.json").read_text())
    assert sub["challenge"] == "action_recognition" and len(sub["results"]) == summary["config"]["sizes"]["n_test"]


def test_demo_audit_shows_the_annotation_leak(demo):
    out, _ = demo
    audit = json.loads((out / "audit/audit.json").read_text())
    protos = audit["protocols"]
    assert {"templates", "annotation", "annotation-shuffled"} <= set(protos)
    assert protos["annotation"]["leak"]["noun"] > 0.5 and protos["templates"]["leak"]["noun"] == 0
    assert any("annotation" in f for f in audit["findings"])


def test_demo_refuses_a_non_empty_folder(demo):
    out, _ = demo
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--quiet"])
    assert res.exit_code == 2 and "not empty" in res.output


def _verb_probs(result: dict, cached: dict, row: int) -> tuple[np.ndarray, np.ndarray]:
    """Verb probabilities of cache row `row`: from `predict`'s result (V,) and from the cached scores (V,)."""
    i = int(np.flatnonzero(cached["indices"] == row)[0])
    p_cache = np.exp(cached["verb"][i] - cached["verb"][i].max())
    p_cache /= p_cache.sum()
    p_pred = np.zeros_like(p_cache)
    for v in result["verbs"]:
        p_pred[v["id"]] = v["score"]
    return p_pred, p_cache


def test_predict_equals_evaluation_scores_on_the_same_segment(demo, tmp_path):
    out, _ = demo
    ckpt_path = out / "runs/templates/best.pt"
    val = load_annotations(out / "data/EPIC_100_validation.csv")
    seg = val.segments[0]
    video = out / "data/videos" / seg.participant_id / "videos" / f"{seg.video_id}.MP4"
    res = CliRunner().invoke(app, ["predict", str(video), "--checkpoint", str(ckpt_path), "--start",
                                   str(seg.start_time), "--stop", str(seg.stop_time), "--json",
                                   str(tmp_path / "p.json"), "--device", "cpu", "--quiet", "--top", "36"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    printed = " ".join(res.output.split())  # rich wraps the table title
    assert "top actions, from the recognition heads" in printed and "What is the person doing?" in printed
    result = json.loads((tmp_path / "p.json").read_text())
    assert len(result["actions"]) == 36
    scores = [a["score"] for a in result["actions"]]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-4)

    # the same clip through the cache (features stored fp16): evaluation's probabilities
    run = TrainedModel.load(ckpt_path)
    cached = predict_scores(run.model(), out / "caches/val.h5", frames=run.train_config.frames)
    p_pred, p_cache = _verb_probs(result, cached, row=0)
    np.testing.assert_allclose(p_pred, p_cache, atol=2e-2)
    assert int(p_pred.argmax()) == int(p_cache.argmax())


def test_predict_bad_input(demo, tmp_path):
    out, _ = demo
    ckpt = out / "runs/templates/best.pt"
    video = next((out / "data/videos").rglob("*.MP4"))
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "nope.mp4"), "--checkpoint", str(ckpt), "--quiet"])
    assert res.exit_code == 2 and "nope.mp4" in res.output
    res = CliRunner().invoke(app, ["predict", str(video), "--checkpoint", str(ckpt), "--start", "3", "--stop", "1",
                                   "--quiet"])
    assert res.exit_code == 2 and "--start" in res.output


def test_predicted_questions_end_to_end(demo, tmp_path):
    """Self-questioning on caches extracted from video: train (cross-fitted first pass), evaluate, audit, predict;
    `predict` on a clip gives the probabilities evaluation gives for the same segment, and lists the candidates."""
    out, _ = demo
    caches = out / "caches"
    run = tmp_path / "predicted"
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--train-cache", str(caches / "train.h5"), "--val-cache", str(caches / "val.h5"),
                              "--out", str(run), "--questions", "predicted", "--candidates-k", "3",
                              "--candidate-folds", "2", "--candidate-epochs", "3", "--epochs", "3", "--batch-size",
                              "8", "--min-steps", "0", "--lr", "3e-3", "--set", "d_model=32", "--device", "cpu",
                              "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(run / "last.pt"), "--cache", str(caches / "val.h5"),
                              "--out", str(tmp_path / "eval"), "--device", "cpu", "--no-plots"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["question_source"] == "predicted" and metrics["candidates"]["k"] == 3
    assert {"verb", "noun", "scene", "action"} <= set(metrics["qa"])  # action: among the training pairs
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(run / "last.pt"), "--cache", str(caches / "test.h5"),
                              "--out", str(tmp_path / "test"), "--device", "cpu", "--no-plots", "--quiet",
                              "--sls-pt", "1", "--sls-tl", "3", "--sls-td", "3"])
    assert res.exit_code == 0, res.output  # the test split has no narrations: predicted questions still run
    res = runner.invoke(app, ["audit-questions", "--checkpoint", str(run / "last.pt"), "--cache",
                              str(caches / "val.h5"), "--out", str(tmp_path / "audit"), "--device", "cpu"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["protocols"]["predicted"]["label_permutation"]["identical"]
    assert audit["protocols"]["templates"]["label_permutation"]["identical"]
    assert not audit["protocols"]["annotation"]["label_permutation"]["identical"]

    val = load_annotations(out / "data/EPIC_100_validation.csv")
    seg = val.segments[0]
    video = out / "data/videos" / seg.participant_id / "videos" / f"{seg.video_id}.MP4"
    res = runner.invoke(app, ["predict", str(video), "--checkpoint", str(run / "last.pt"), "--start",
                              str(seg.start_time), "--stop", str(seg.stop_time), "--json", str(tmp_path / "p.json"),
                              "--device", "cpu", "--quiet", "--top", "36"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "self-questioning: verb candidates" in res.output and "Which objects are in the scene?" in res.output
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["question_source"] == "predicted" and len(result["candidates"]["verb"]) == 3
    assert all(a["score"] >= 0 for qa in result["qa"].values() for a in qa["answers"])
    trained = TrainedModel.load(run / "last.pt")
    pairs = trained.vocab.action_pairs
    assert len(result["qa"]["action"]["answers"]) == min(36, len(pairs))  # "verb noun" answers, scored
    assert set(result["qa"]) == {"verb", "noun", "scene", "action"}  # a recognition checkpoint's question kinds
    cached = predict_scores(trained.model(), caches / "val.h5", question_source="predicted",
                            frames=trained.train_config.frames, first_pass=trained.first_pass_models())
    row = int(np.flatnonzero(cached["indices"] == 0)[0])
    assert [c["id"] for c in result["candidates"]["verb"]] == cached["candidates"][row, 0].tolist()
    p_pred, p_cache = _verb_probs(result, cached, row=0)
    np.testing.assert_allclose(p_pred, p_cache, atol=2e-2)


def test_predict_and_audit_from_an_exported_model(demo, tmp_path, monkeypatch):
    """The demo's checkpoint exported (`mambavl export`) and read back from a Hugging Face cache as hf://: `predict`
    gives the clip exactly the scores the checkpoint gives, and `audit-questions` reads the same reference."""
    out, _ = demo
    ckpt = out / "runs/templates/best.pt"
    folder = tmp_path / "hub" / "models--org--demo" / "snapshots" / ("0" * 40)
    res = CliRunner().invoke(app, ["export", "--checkpoint", str(ckpt), "--out", str(folder), "--metrics",
                                   str(out / "eval" / "val")])
    assert res.exit_code == 0, res.output
    (folder.parents[1] / "refs").mkdir()
    (folder.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    val = load_annotations(out / "data/EPIC_100_validation.csv")
    seg = val.segments[0]
    video = out / "data/videos" / seg.participant_id / "videos" / f"{seg.video_id}.MP4"
    results = []
    for ref in (str(ckpt), "hf://org/demo"):
        res = CliRunner().invoke(app, ["predict", str(video), "--checkpoint", ref, "--start", str(seg.start_time),
                                       "--stop", str(seg.stop_time), "--json", str(tmp_path / "p.json"), "--device",
                                       "cpu", "--quiet"])
        assert res.exit_code == 0, res.output + repr(res.exception)
        results.append(json.loads((tmp_path / "p.json").read_text()))
    assert results[0]["actions"] == results[1]["actions"] and results[0]["qa"] == results[1]["qa"]
    res = CliRunner().invoke(app, ["audit-questions", "--checkpoint", "hf://org/demo", "--cache",
                                   str(out / "caches/val.h5"), "--out", str(tmp_path / "audit"), "--device", "cpu",
                                   "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["checkpoint"]["path"] == "hf://org/demo"
