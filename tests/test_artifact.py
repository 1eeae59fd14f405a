"""The trained run as a typed artifact: one save, one load, migrations of every checkpoint generation, one same-run
rule, and the vocabulary check that names the first differing class."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from mambavl.cache.synthetic import make_planted_cache
from mambavl.errors import InputError
from mambavl.extract.questions import QuestionSource
from mambavl.runtime import FORMAT, Task, TrainConfig, TrainedModel, Vocabulary, same_run
from mambavl.runtime.artifact import FREE_FIELDS

FIXTURES = Path(__file__).parent / "data" / "checkpoints"
GENERATIONS = sorted(p.stem for p in FIXTURES.glob("format1-*.pt"))


def _probe_inputs():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.probe_inputs()


def test_every_generation_is_kept_as_a_fixture():
    # one checkpoint of each format-1 generation: before the step floor and the scene bias (f8345c2, 83f880d), the
    # first self-questioning runs (17ab0f8), and the last format-1 writer (aee739c) for every task / question source
    assert {"format1-f8345c2-recognition", "format1-83f880d-recognition", "format1-17ab0f8-predicted",
            "format1-aee739c-recognition", "format1-aee739c-anticipation", "format1-aee739c-predicted"} <= set(
        GENERATIONS)


@pytest.mark.parametrize("name", GENERATIONS)
def test_old_checkpoints_load_and_score_as_they_did(name):
    run, training = TrainedModel.load_with_state(FIXTURES / f"{name}.pt")
    assert run.format_read == 1
    expected = np.load(FIXTURES / f"{name}.npz")
    with torch.no_grad():
        out = run.model()(*_probe_inputs())
    assert set(out) == set(expected.files)
    for key in expected.files:
        np.testing.assert_allclose(out[key].numpy(), expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # the migrated fields: what the writing version implied
    assert "scene_bias" in run.weights
    assert run.features.text_encoder == "clip" and run.features.encoder == "planted"
    assert run.progress.epoch == 1 and run.progress.history and training is not None
    assert run.train_config.min_steps == 0 and run.vocab.verbs == [f"verb{i}" for i in range(6)]
    assert run.task == (Task.ANTICIPATION if "anticipation" in name else Task.RECOGNITION)
    if "predicted" in name:
        assert run.question_source == QuestionSource.PREDICTED and run.first_pass_models() is not None
        assert run.train_candidates is not None and run.candidate_recall


def test_migration_fills_the_scene_bias_the_old_model_lacked():
    old = torch.load(FIXTURES / "format1-83f880d-recognition.pt", weights_only=True)
    assert "scene_bias" not in old["model"] and "text_encoder" not in old["cache_attrs"]
    run = TrainedModel.load(FIXTURES / "format1-83f880d-recognition.pt")
    assert float(run.weights["scene_bias"]) == 0.0  # the old scene logits had no bias


def test_save_load_round_trip_is_format_2_and_resumable(tmp_path):
    run, training = TrainedModel.load_with_state(FIXTURES / "format1-aee739c-predicted.pt")
    run.save(tmp_path / "a.pt", training)
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    assert raw["format"] == FORMAT == 2 and raw["kind"] == "mambavl-checkpoint"
    back, back_training = TrainedModel.load_with_state(tmp_path / "a.pt")
    assert back.format_read == 2
    assert back.vocab == run.vocab and back.features == run.features and back.train_config == run.train_config
    assert back.progress == run.progress and back.candidate_recall == run.candidate_recall
    assert torch.equal(back.train_candidates, run.train_candidates)
    for k, v in run.weights.items():
        assert torch.equal(back.weights[k], v), k
    assert back_training.optimizer.keys() == training.optimizer.keys()
    run.save(tmp_path / "b.pt")  # without training state (e.g. a shared model)
    assert TrainedModel.load_with_state(tmp_path / "b.pt")[1] is None


def test_refusals_name_the_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        TrainedModel.load(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((FIXTURES / "format1-aee739c-recognition.pt").read_bytes()[:5000])
    with pytest.raises(InputError, match=f"{truncated}: not a mambavl checkpoint, or damaged"):
        TrainedModel.load(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(InputError, match="no 'kind'"):
        TrainedModel.load(foreign)
    newer = tmp_path / "newer.pt"
    state = torch.load(FIXTURES / "format1-aee739c-recognition.pt", weights_only=True)
    state["format"] = FORMAT + 1
    torch.save(state, newer)
    with pytest.raises(InputError, match=r"format 3 was written by a newer mambavl .* upgrade mambavl"):
        TrainedModel.load(newer)


def test_same_run_names_the_first_differing_field():
    a = TrainConfig(train_cache="t.h5", val_cache="v.h5", out_dir="run")
    assert same_run(a, dataclasses.replace(a)) is None
    # where the run writes, on which device, with how many workers, and where its caches lie are free
    free = dataclasses.replace(a, out_dir="elsewhere", device="cpu", num_workers=3, resume=True,
                               train_cache="moved/t.h5", val_cache=None)
    assert same_run(a, free) is None and set(FREE_FIELDS) >= {"out_dir", "device", "num_workers", "resume"}
    assert same_run(a, dataclasses.replace(a, lr=2e-3)) == "lr"
    assert same_run(a, dataclasses.replace(a, epochs=3, lr=2e-3)) == "epochs"  # declaration order
    # a resumed run may change its budget and early stopping, nothing else
    assert same_run(a, dataclasses.replace(a, epochs=3, patience=0, min_delta=1.0), resuming=True) is None
    assert same_run(a, dataclasses.replace(a, epochs=3, lr=2e-3), resuming=True) == "lr"
    assert same_run(a, dataclasses.replace(a, model_overrides={"d_model": 64})) == "model_overrides"


def test_vocabulary_difference_names_the_first_class():
    v = Vocabulary(["take", "put", "open"], ["cup"])
    assert v.difference(["take", "put", "open"], ["cup"]) is None
    assert v.difference(["put", "take", "open"], ["cup"]) == "verb 0 is 'put' there but 'take' here"
    assert v.difference(["take", "put"], ["cup"]) == "2 verbs there but 3 here"
    assert v.difference(["take", "put", "open"], ["pan"]) == "noun 0 is 'pan' there but 'cup' here"


def test_check_cache_refuses_reordered_classes(tmp_path):
    run = TrainedModel.load(FIXTURES / "format1-aee739c-recognition.pt")
    cache = make_planted_cache(tmp_path / "val.h5", n=8, seed=1, frames=4, dim=16, text_dim=8)
    from mambavl.cache.reader import open_cache

    handle = open_cache(cache)
    run.check_cache(handle, "checkpoint c.pt")  # same encoder and classes: accepted
    run.vocab.verbs[0], run.vocab.verbs[1] = run.vocab.verbs[1], run.vocab.verbs[0]
    with pytest.raises(InputError, match=r"other verb/noun classes .* verb 0 is 'verb0' there but 'verb1' here"):
        run.check_cache(handle, "checkpoint c.pt")


def test_a_cache_of_an_older_version_is_named_as_such(tmp_path):
    import h5py

    from mambavl.cache import schema
    from mambavl.cache.reader import open_cache

    new = make_planted_cache(tmp_path / "new.h5", n=8, seed=1, frames=4, dim=16, text_dim=8)
    old = make_planted_cache(tmp_path / "old.h5", n=8, seed=2, frames=4, dim=16, text_dim=8)
    with h5py.File(new, "a") as f:
        f.attrs["text_encoder"] = "clip"
    with h5py.File(old, "a") as f:
        f.attrs.pop("text_encoder", None)
    a, b = open_cache(new), open_cache(old)
    with pytest.raises(InputError, match=r"old.h5 was written by an older mambavl \(it has no 'text_encoder' "
                                         r"attribute.*re-extract"):
        schema.check_compatible(a.attrs, b.attrs, f"train cache {a.path}", f"val cache {b.path}")
