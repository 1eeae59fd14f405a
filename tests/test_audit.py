"""The question audit detects a checkpoint that reads its answers from narration-derived questions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mambavl.analysis import audit as A
from mambavl.errors import InputError

TINY = {"d_model": 16, "n_layers": 1, "scan_impl": "chunked"}


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    """A noisy planted split (the video alone is a weak cue) whose annotation questions embed the answer, and a
    checkpoint trained on those questions: it learns to read the answer from the question."""
    from mambavl.cache.synthetic import make_planted_cache
    from mambavl.train import TrainConfig, train

    d = tmp_path_factory.mktemp("audit")
    train_cache = make_planted_cache(d / "train.h5", n=120, seed=0, noise=6.0)
    val_cache = make_planted_cache(d / "val.h5", n=60, seed=1, noise=6.0)
    test_cache = make_planted_cache(d / "test.h5", n=12, seed=2, noise=6.0, labelled=False)
    result = train(TrainConfig(train_cache=str(train_cache), val_cache=None, out_dir=str(d / "run"),
                               question_source="annotation", model_overrides=TINY, epochs=8, batch_size=16, lr=1e-2,
                               warmup_epochs=0, frames=4, qa_weight=0, min_steps=0))
    return {"dir": d, "ckpt": str(result.last_checkpoint), "val": str(val_cache), "test": str(test_cache)}


def test_shuffle_permutation_moves_only_rows_with_questions():
    has = np.array([True, False, True, True, False, True, True, True])
    perm = A.shuffle_permutation(has, seed=0)
    assert perm[~has].tolist() == np.flatnonzero(~has).tolist()
    assert sorted(perm[has].tolist()) == np.flatnonzero(has).tolist()
    assert (perm[has] != np.flatnonzero(has)).any()
    np.testing.assert_array_equal(perm, A.shuffle_permutation(has, seed=0))


def test_audit_detects_the_leak(leaky, tmp_path):
    out = tmp_path / "audit"
    report = A.audit_questions(A.AuditConfig(checkpoint=leaky["ckpt"], cache=leaky["val"], out_dir=str(out),
                                             device="cpu"))
    protos = report["protocols"]
    assert list(protos) == ["templates", "annotation", "annotation-shuffled"]
    assert report["trained_question_source"] == "annotation"
    ann, shuf, tpl = (protos[k]["metrics"] for k in ("annotation", "annotation-shuffled", "templates"))
    # Dynamic: the same checkpoint collapses when each segment is asked another segment's question, and without the
    # narration-derived text.
    assert ann["verb_top1"] - shuf["verb_top1"] > 20
    assert ann["verb_top1"] - tpl["verb_top1"] > 15
    assert protos["annotation"]["delta_vs_templates"]["verb_top1"] == pytest.approx(
        ann["verb_top1"] - tpl["verb_top1"], abs=1e-3)
    assert protos["templates"]["delta_vs_templates"]["verb_top1"] == 0
    # Static: every annotation verb question names its own verb; no template does; shuffled ones rarely.
    assert protos["annotation"]["leak"]["verb"] == 1.0 and protos["annotation"]["leak"]["noun"] == 1.0
    assert protos["templates"]["leak"] == {"verb": 0.0, "noun": 0.0}
    assert protos["annotation-shuffled"]["leak"]["verb"] < 0.5
    assert report["shuffle"]["annotation"]["rows_shuffled"] == 60
    assert any("shuffled" in f for f in report["findings"])
    assert any("class keys only" in f for f in report["findings"])  # no class CSV given: the rates undercount

    saved = json.loads((out / "audit.json").read_text())
    assert saved["protocols"]["annotation"]["metrics"] == ann
    md = (out / "audit.md").read_text()
    assert md.count("\n| `") == 3 and "annotation-shuffled" in md and "## Findings" in md


def test_audit_class_instances_and_refusals(leaky, tmp_path):
    # Class CSVs give extra answer words: here verb 0 is also called "stir", so a question asking about stirring
    # would count as a leak; the cache's keys must match the CSV's.
    d = tmp_path
    (d / "verbs.csv").write_text("id,key,instances,category\n" + "".join(
        f"{i},verb{i},\"['verb{i}'{', ' + repr('stir') if i == 0 else ''}]\",x\n" for i in range(6)))
    (d / "nouns.csv").write_text("id,key,instances,category\n" + "".join(
        f"{i},noun{i},\"['noun{i}']\",x\n" for i in range(5)))
    report = A.audit_questions(A.AuditConfig(
        checkpoint=leaky["ckpt"], cache=leaky["val"], out_dir=str(d / "a"), device="cpu",
        verb_classes=str(d / "verbs.csv"), noun_classes=str(d / "nouns.csv"), protocols=("annotation",)))
    assert list(report["protocols"]) == ["templates", "annotation"]
    assert "verbs.csv" in report["answer_words"]
    assert not any("class keys only" in f for f in report["findings"])
    assert report["protocols"]["annotation"]["leak"]["verb"] == 1.0
    (d / "bad.csv").write_text("id,key,instances,category\n0,take,\"['take']\",x\n")
    with pytest.raises(InputError, match="bad.csv"):
        A.audit_questions(A.AuditConfig(checkpoint=leaky["ckpt"], cache=leaky["val"], out_dir=str(d / "b"),
                                        device="cpu", verb_classes=str(d / "bad.csv")))
    with pytest.raises(InputError, match="no labelled"):
        A.audit_questions(A.AuditConfig(checkpoint=leaky["ckpt"], cache=leaky["test"], out_dir=str(d / "c"),
                                        device="cpu"))
    with pytest.raises(InputError, match="unknown protocol"):
        A.AuditConfig(checkpoint="x", cache="y", out_dir="z", protocols=("narration",))


def test_cli_audit(leaky, tmp_path):
    from typer.testing import CliRunner

    from mambavl.cli import app

    res = CliRunner().invoke(app, ["audit-questions", "--checkpoint", leaky["ckpt"], "--cache", leaky["val"],
                                   "--out", str(tmp_path / "cli"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "annotation-shuffled" in res.output and "finding" in res.output
    assert (tmp_path / "cli" / "audit.md").is_file()
    res = CliRunner().invoke(app, ["audit-questions", "--checkpoint", leaky["ckpt"], "--cache", leaky["test"],
                                   "--out", str(tmp_path / "x"), "--device", "cpu"])
    assert res.exit_code == 2 and "no labelled" in res.output
