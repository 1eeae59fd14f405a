"""Self-questioning (`--questions predicted`), the refused class-keyed lookup, and the label-permutation audit."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mambavl.analysis import audit as A
from mambavl.cache.synthetic import make_planted_cache
from mambavl.cli import app
from mambavl.errors import InputError
from mambavl.evaluate import EvalConfig, evaluate
from mambavl.runtime import FirstPass, TrainedModel, candidate_questions, fold_ids, predict_scores, topk_candidates
from mambavl.train import TrainConfig, train

TINY = {"d_model": 16, "n_layers": 1, "scan_impl": "chunked"}
K = 2


def _train_cfg(d, caches, name, **kw):
    values = dict(train_cache=str(caches["train"]), val_cache=str(caches["val"]), out_dir=str(d / name),
                  model_overrides=TINY, epochs=3, batch_size=16, lr=1e-2, warmup_epochs=0, frames=4, device="cpu",
                  min_steps=0)
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A noisy planted split (the first pass is often wrong) and a predicted-questions run on it."""
    d = tmp_path_factory.mktemp("predicted")
    caches = {
        "train": make_planted_cache(d / "train.h5", n=96, seed=0, noise=4.0),
        "val": make_planted_cache(d / "val.h5", n=48, seed=1, noise=4.0),
        "test": make_planted_cache(d / "test.h5", n=10, seed=2, noise=4.0, labelled=False),
    }
    result = train(_train_cfg(d, caches, "run", question_source="predicted", candidates_k=K, candidate_folds=2,
                              candidate_epochs=2))
    return {"dir": d, **caches, "ckpt": str(result.last_checkpoint), "history": result.history}


def test_folds_candidates_and_question_tokens():
    folds = fold_ids(11, 3, seed=0)
    assert sorted(np.bincount(folds).tolist()) == [3, 4, 4]
    np.testing.assert_array_equal(folds, fold_ids(11, 3, seed=0))
    with pytest.raises(ValueError):
        fold_ids(2, 3, seed=0)
    scores = np.array([[0.1, 0.5, 0.5, 0.2], [0.9, 0.0, 0.3, 0.4]])
    assert topk_candidates(scores, 2).tolist() == [[2, 1], [0, 3]]  # ties to the higher class id (official order)
    tokens, mask = torch.randn(2, 3, 8), torch.tensor([[True, True, False], [True, False, False]])
    answers = torch.randn(4, 8)
    qt, qm = candidate_questions(tokens, mask, answers, torch.tensor([[1, 2], [0, 3]]))
    assert qt.shape == (2, 5, 8) and qm.tolist() == [[True, True, False, True, True], [True, False, False, True, True]]
    assert torch.equal(qt[:, :3], tokens) and torch.equal(qt[1, 3:], answers[[0, 3]])


def test_training_records_cross_fitted_candidates(run):
    trained = TrainedModel.load(run["ckpt"])
    first = trained.first_pass
    assert first["origin"] == "cross-fitted" and len(first["states"]) == 2 and first["k"] == K
    assert first["model_config"]["use_question"] is False
    table = trained.train_candidates.numpy()
    assert table.shape == (96, 2, K) and (table >= 0).all()
    row = run["history"][-1]
    for split in ("train", "val"):
        for head in ("verb", "noun"):
            assert 0 < row[f"{split}_candidate_recall_{head}"] <= 100
    # Cross-fitted: training rows' candidates are about as often wrong as the validation rows' (an in-sample first
    # pass would put the answer among the candidates almost always).
    assert row["train_candidate_recall_verb"] < 99
    assert abs(row["train_candidate_recall_verb"] - row["val_candidate_recall_verb"]) < 25


def test_evaluate_reports_candidates_and_qa(run, tmp_path):
    res = evaluate(EvalConfig(checkpoint=run["ckpt"], cache=run["val"], out_dir=str(tmp_path / "ev"), device="cpu",
                              plots=False, submission=False))
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["question_source"] == "predicted"
    cand = saved["candidates"]
    assert cand["k"] == K and cand["first_pass"] == "cross-fitted"
    assert cand["recall_at_k"]["verb"] == pytest.approx(cand["val_recall_at_k"]["verb"], abs=1e-3)
    assert set(cand["train_recall_at_k"]) == {"verb", "noun"}
    assert set(saved["qa"]) == {"verb", "noun", "scene", "action"}
    assert {"top1", "top5"} <= set(saved["qa"]["verb"]) and saved["qa"]["scene"]["mAP"] is not None
    assert res["metrics"]["all"]["verb"]["n"] == 48
    # the test split: no labels, no narration; predicted questions still run
    test = evaluate(EvalConfig(checkpoint=run["ckpt"], cache=run["test"], out_dir=str(tmp_path / "test"),
                               device="cpu", plots=False, sls_pt=1, sls_tl=3, sls_td=3, allow_incomplete=True))
    assert test["metrics"] is None and test["submission"]["segments"] == 10


def test_predicted_scores_depend_on_the_candidates(run):
    trained = TrainedModel.load(run["ckpt"])
    model = trained.model()
    first = trained.first_pass_models()
    a = predict_scores(model, run["val"], question_source="predicted", frames=4, first_pass=first)
    assert a["candidates"].shape == (48, 2, K)
    np.testing.assert_array_equal(a["candidates"][:, 0], topk_candidates(a["first_pass"]["verb"], K))
    # another first pass (one fold model alone) proposes other candidates for some rows: other scores
    other = FirstPass(first.models[:1], "fold 0", K)
    b = predict_scores(model, run["val"], question_source="predicted", frames=4, first_pass=other)
    changed = (a["candidates"] != b["candidates"]).any(axis=(1, 2))
    assert changed.any()
    assert not np.allclose(a["verb"][changed], b["verb"][changed])
    with pytest.raises(InputError, match="first pass"):
        predict_scores(model, run["val"], question_source="predicted", frames=4)


def test_audit_label_permutation(run, tmp_path):
    report = A.audit_questions(A.AuditConfig(checkpoint=run["ckpt"], cache=run["val"], out_dir=str(tmp_path / "a"),
                                             device="cpu"))
    protos = report["protocols"]
    assert list(protos) == ["templates", "annotation", "annotation-shuffled", "predicted"]
    # label-free protocols: bit-identical scores with the labels permuted across segments
    assert protos["templates"]["label_permutation"]["identical"]
    assert protos["predicted"]["label_permutation"]["identical"]
    # the narration-derived questions follow their labels: the leak is proven
    assert not protos["annotation"]["label_permutation"]["identical"]
    assert protos["annotation"]["label_permutation"]["rows_changed"] > 0
    assert any("labels were permuted" in f and "`annotation`" in f for f in report["findings"])
    # static: a predicted question contains its answer exactly when the first pass ranked it in its top k
    leak = protos["predicted"]["leak"]
    assert leak["verb"] == pytest.approx(leak[f"verb_first_pass_top{K}"])
    assert leak["noun"] == pytest.approx(leak[f"noun_first_pass_top{K}"])
    assert leak["verb"] < 1.0
    md = (tmp_path / "a" / "audit.md").read_text()
    assert "labels permuted" in md and "rows changed" in md


def test_audit_catches_a_first_pass_that_reads_labels(run, tmp_path, monkeypatch):
    """A deliberately leaking predicted source: an 'oracle' first pass that slips the true verb into the
    candidates. Only the label-permutation check can see it (the question text is the same template)."""
    import mambavl.runtime.scoring as S

    honest = S.cache_candidates

    def oracle(first_pass, cache, window, rows, *args, **kw):
        table, probs = honest(first_pass, cache, window, rows, *args, **kw)
        verb = np.asarray(cache.labels()["verb_class"])
        table[rows, 0, -1] = np.where(verb[rows] >= 0, verb[rows], table[rows, 0, -1])
        return table, probs

    monkeypatch.setattr(S, "cache_candidates", oracle)
    report = A.audit_questions(A.AuditConfig(checkpoint=run["ckpt"], cache=run["val"], out_dir=str(tmp_path / "o"),
                                             device="cpu", protocols=("predicted",)))
    perm = report["protocols"]["predicted"]["label_permutation"]
    assert not perm["identical"] and perm["rows_changed"] > 0


def _add_file_questions(path, class_keyed: bool):
    """Give a planted cache `file` questions: its annotation questions, flagged as found by class (or by id)."""
    with h5py.File(path, "r+") as f:
        table = f["questions/per_segment/annotation"][()]
        f["questions/per_segment"].create_dataset("file", data=table)
        f["questions/label_keyed"].create_dataset("file", data=np.full(len(table), class_keyed))
        f.attrs["question_sources"] = json.dumps(["templates", "annotation", "file"])
        f.attrs["questions_file"] = "my_questions.csv"


def test_class_keyed_file_questions(run, tmp_path):
    keyed = make_planted_cache(tmp_path / "keyed.h5", n=48, seed=1, noise=4.0)
    _add_file_questions(keyed, class_keyed=True)
    by_id = make_planted_cache(tmp_path / "by_id.h5", n=48, seed=1, noise=4.0)
    _add_file_questions(by_id, class_keyed=False)
    # evaluation refuses questions found by the segment's own class, naming the file
    with pytest.raises(InputError, match=r"my_questions\.csv.*48 evaluated segment.*training rows only"):
        evaluate(EvalConfig(checkpoint=run["ckpt"], cache=str(keyed), out_dir=str(tmp_path / "e"), device="cpu",
                            question_source="file", plots=False))
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", run["ckpt"], "--cache", str(keyed), "--out",
                                   str(tmp_path / "cli"), "--questions", "file", "--device", "cpu", "--quiet"])
    assert res.exit_code == 2 and "my_questions.csv" in res.output
    # keyed by narration_id: allowed
    ok = evaluate(EvalConfig(checkpoint=run["ckpt"], cache=str(by_id), out_dir=str(tmp_path / "ok"), device="cpu",
                             question_source="file", plots=False, submission=False))
    assert ok["question_source"] == "file"
    # training rows may use class-keyed questions
    result = train(TrainConfig(train_cache=str(keyed), val_cache=None, out_dir=str(tmp_path / "t"),
                               question_source="file", model_overrides=TINY, epochs=1, batch_size=16, frames=4,
                               min_steps=0, device="cpu", qa_weight=0))
    assert result.history[0]["question_fallbacks"] == 0
    # the audit measures them, and the label permutation proves the leak
    report = A.audit_questions(A.AuditConfig(checkpoint=run["ckpt"], cache=str(keyed), out_dir=str(tmp_path / "a"),
                                             device="cpu", protocols=("file",)))
    assert not report["protocols"]["file"]["label_permutation"]["identical"]
    report = A.audit_questions(A.AuditConfig(checkpoint=run["ckpt"], cache=str(by_id), out_dir=str(tmp_path / "b"),
                                             device="cpu", protocols=("file",)))
    assert report["protocols"]["file"]["label_permutation"]["identical"]


def test_cli_train_predicted_and_refusals(run, tmp_path):
    # a templates checkpoint has no first pass: predicted evaluation is refused with a clear message
    plain = train(_train_cfg(tmp_path, run, "plain", epochs=1, qa_weight=0))
    # trained without QA: evaluation says so rather than scoring an untrained QA head
    res = evaluate(EvalConfig(checkpoint=str(plain.last_checkpoint), cache=run["val"], out_dir=str(tmp_path / "p"),
                              device="cpu", plots=False, submission=False))
    assert res["qa"] == {} and "qa_weight 0" in res["qa_note"]
    with pytest.raises(InputError, match="first pass"):
        evaluate(EvalConfig(checkpoint=str(plain.last_checkpoint), cache=run["val"], out_dir=str(tmp_path / "x"),
                            question_source="predicted", device="cpu", plots=False))
    # ... but it can be the first pass of a predicted run (the fold models still supply the training rows')
    args = ["train", "--train-cache", str(run["train"]), "--val-cache", str(run["val"]), "--questions", "predicted",
            "--candidates-k", "2", "--candidate-folds", "2", "--candidate-epochs", "1", "--epochs", "1",
            "--min-steps", "0", "--frames", "4", "--batch-size", "32", "--device", "cpu", "--set", "d_model=16",
            "--set", "n_layers=1", "--quiet"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r"), "--candidates-from",
                                   str(plain.last_checkpoint)])
    assert res.exit_code == 0, res.output
    first = TrainedModel.load(tmp_path / "r" / "last.pt").first_pass
    assert first["origin"] == str(plain.last_checkpoint) and len(first["states"]) == 1
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "r" / "last.pt"), "--cache",
                                   str(run["val"]), "--out", str(tmp_path / "e"), "--device", "cpu", "--no-plots"])
    assert res.exit_code == 0, res.output
    assert "QA scene" in res.output and "candidates recall@2" in res.output
    # a predicted checkpoint cannot be a first pass (it would be asked without candidates of its own)
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r2"), "--candidates-from", run["ckpt"]])
    assert res.exit_code == 2 and "needs a first pass of its own" in res.output
    # a model that reads no question cannot be asked about candidates
    res = CliRunner().invoke(app, [*[a for a in args if a != "--quiet"], "--out", str(tmp_path / "r3"), "--preset",
                                   "video-only"])
    assert res.exit_code == 2 and "reads no question" in res.output and not (tmp_path / "r3").exists()
    assert "training 2 video-only first-pass models" in res.output  # the cost is announced
    with pytest.raises(InputError, match="candidate_folds"):
        TrainConfig(train_cache="a", val_cache=None, out_dir="o", question_source="predicted", candidate_folds=1)
    with pytest.raises(InputError, match="candidates_from"):
        TrainConfig(train_cache="a", val_cache=None, out_dir="o", candidates_from="x.pt")


def test_anticipation_candidates_come_from_the_observed_window(tmp_path):
    """Anticipation: the first pass reads the observed window and proposes the next action's verbs and nouns; the
    second pass's heads are asked the next_verb / next_noun templates followed by those candidates."""
    caches = {"train": make_planted_cache(tmp_path / "t.h5", n=48, seed=0, anticipation=True),
              "val": make_planted_cache(tmp_path / "v.h5", n=24, seed=1, anticipation=True)}
    result = train(_train_cfg(tmp_path, caches, "ant", task="anticipation", question_source="predicted", epochs=1,
                              candidates_k=K, candidate_folds=2))
    trained = TrainedModel.load(result.last_checkpoint)
    assert trained.task == "anticipation" and trained.first_pass["k"] == K
    res = evaluate(EvalConfig(checkpoint=str(result.last_checkpoint), cache=str(caches["val"]),
                              out_dir=str(tmp_path / "e"), device="cpu", plots=False, submission=False))
    assert res["window"] == "anticipation" and res["candidates"]["recall_at_k"]["verb"] is not None
    assert set(res["qa"]) == {"next_verb", "next_noun"}
    model = trained.model()
    scores = predict_scores(model, caches["val"], window="anticipation", question_source="predicted", frames=4,
                            first_pass=trained.first_pass_models())
    np.testing.assert_array_equal(scores["candidates"][:, 1], topk_candidates(scores["first_pass"]["noun"], K))


def test_audit_treats_file_questions_of_unknown_keying_as_label_derived(run, tmp_path):
    """A cache that does not record how its file questions were keyed (written before the flag): evaluation refuses
    them, and the audit moves them with the labels, so an unknown keying fails the check instead of hiding a leak."""
    legacy = make_planted_cache(tmp_path / "legacy.h5", n=48, seed=1, noise=4.0)
    _add_file_questions(legacy, class_keyed=False)
    with h5py.File(legacy, "r+") as f:
        del f["questions/label_keyed/file"]
    with pytest.raises(InputError, match="re-extract"):
        evaluate(EvalConfig(checkpoint=run["ckpt"], cache=str(legacy), out_dir=str(tmp_path / "e"), device="cpu",
                            question_source="file", plots=False, submission=False))
    report = A.audit_questions(A.AuditConfig(checkpoint=run["ckpt"], cache=str(legacy), out_dir=str(tmp_path / "a"),
                                             device="cpu", protocols=("file",)))
    assert not report["protocols"]["file"]["label_permutation"]["identical"]
