"""The task spec: one table of what each task asks. Adding a QA kind is three edits — the task spec's kinds, the
kind's answer table in `mambavl.fuse.config.QA_TARGET`, and its template question (`mambavl.extract.questions.TEMPLATES`
and `schema.TEMPLATE_KINDS`, which extraction and the planted caches write) — shown here by a small example kind."""

from __future__ import annotations

import dataclasses

import pytest

from mambavl.cache import schema
from mambavl.cache.synthetic import make_planted_cache
from mambavl.errors import InputError
from mambavl.evaluate import EvalConfig, evaluate
from mambavl.extract import questions as Q
from mambavl.fuse import config as fuse_config
from mambavl.runtime import TASKS, Task, spec_of_window, task_spec
from mambavl.train import TrainConfig, train

TINY = {"d_model": 32, "n_layers": 1}


def test_specs_are_one_table():
    rec, ant = task_spec("recognition"), task_spec(Task.ANTICIPATION)
    assert rec.head_kinds == ("verb", "noun") and ant.head_kinds == ("next_verb", "next_noun")
    assert rec.window == schema.RECOGNITION and ant.window == schema.ANTICIPATION
    assert spec_of_window(schema.ANTICIPATION) is ant
    assert rec.challenge == "action_recognition" and ant.challenge == "action_anticipation"
    assert rec.qa_kinds_for(has_nouns=False) == ("verb",)
    assert rec.qa_kinds_for(has_nouns=True, has_action_answers=False) == ("verb", "noun", "scene")
    assert rec.selection_metric(True) == "val_action_top1" and rec.selection_metric(False) == "val_verb_top1"
    assert rec.is_multi_label("scene") and not ant.is_multi_label("next_verb")
    for spec in TASKS.values():  # every kind a spec names has an answer table and a template question
        for kind in spec.head_kinds + spec.qa_kinds:
            assert kind in fuse_config.QA_TARGET and kind in Q.TEMPLATES and kind in schema.TEMPLATE_KINDS
    with pytest.raises(InputError, match="not one of"):
        task_spec("captioning")


def test_adding_a_qa_kind_is_three_edits(tmp_path, monkeypatch):
    # the example kind: "Which motion do you see?", answered with the verb
    kind = "motion"
    # 1. the task spec: recognition asks it
    rec = TASKS[Task.RECOGNITION]
    monkeypatch.setitem(TASKS, Task.RECOGNITION, dataclasses.replace(rec, qa_kinds=rec.qa_kinds + (kind,)))
    # 2. the QA target: what it is answered with
    monkeypatch.setitem(fuse_config.QA_TARGET, kind, "verb")
    # 3. the extraction templates: its question (and the schema's list of template kinds the caches hold)
    monkeypatch.setitem(Q.TEMPLATES, kind, ("Which motion do you see?",))
    monkeypatch.setattr(schema, "TEMPLATE_KINDS", schema.TEMPLATE_KINDS + (kind,))

    caches = {s: make_planted_cache(tmp_path / f"{s}.h5", n=n, seed=i) for i, (s, n) in
              enumerate((("train", 64), ("val", 32)))}
    result = train(TrainConfig(train_cache=str(caches["train"]), val_cache=str(caches["val"]), out_dir=str(tmp_path / "r"),
                               model_overrides=TINY, epochs=2, frames=4, min_steps=0, qa_every=1, batch_size=16))
    assert result.history[-1]["qa_steps"] > 0
    metrics = evaluate(EvalConfig(checkpoint=str(result.last_checkpoint), cache=str(caches["val"]),
                                  out_dir=str(tmp_path / "eval"), device="cpu", plots=False, submission=False))
    assert kind in metrics["qa"] and metrics["qa"][kind]["answers"] == "verb_class"
    assert metrics["qa"][kind]["n"] == metrics["qa"]["verb"]["n"]
