"""`--config FILE`: YAML/JSON settings under the command line's options, validated against the config dataclass."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mambavl.cache.build import ExtractConfig
from mambavl.cli.config_file import build_config, read_config_file
from mambavl.errors import InputError
from mambavl.extract.encoders import EncoderKind
from mambavl.runtime import Task, TrainConfig, plain

REQUIRED = {"train_cache": "t.h5", "val_cache": "v.h5", "out_dir": "run"}


def test_yaml_file_under_explicit_options_over_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\nlr: 0.01\ntask: anticipation\nmodel_overrides: {d_model: 32}\n")
    cfg = build_config(TrainConfig, f, {**REQUIRED, "lr": 0.5, "seed": None})
    assert cfg.epochs == 3 and cfg.lr == 0.5 and cfg.task is Task.ANTICIPATION
    assert cfg.model_overrides == {"d_model": 32}
    assert cfg.batch_size == TrainConfig.batch_size and cfg.seed == TrainConfig.seed  # unset: the dataclass's
    # a field without a dataclass default takes the command's value for "not given"
    cfg = build_config(TrainConfig, f, {"train_cache": "t.h5", "out_dir": "run", "val_cache": None},
                       unset={"val_cache": None})
    assert cfg.val_cache is None


def test_a_runs_train_config_json_rebuilds_the_same_config(tmp_path):
    cfg = TrainConfig(train_cache="a.h5", val_cache="b.h5", out_dir="r", preset="paper", epochs=7, lr=3e-3,
                      question_source="predicted", candidates_k=3, model_overrides={"d_model": 48}, frames=4)
    f = tmp_path / "train_config.json"
    f.write_text(json.dumps(plain(dataclasses.asdict(cfg)), indent=2))  # as the run folder's train_config.json
    assert build_config(TrainConfig, f, {}) == cfg


def test_every_train_config_field_is_settable_from_a_file(tmp_path):
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    f = tmp_path / "c.json"
    f.write_text(json.dumps(plain(dataclasses.asdict(TrainConfig(**REQUIRED)))))
    assert set(read_config_file(f, TrainConfig)) == names


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epocs: 3\n")
    with pytest.raises(InputError, match=r"c\.yaml: unknown key 'epocs'; did you mean 'epochs'"):
        build_config(TrainConfig, f, REQUIRED)
    f.write_text("encoder:\n  modle: ViT-B-16\n")  # nested dataclass fields are checked too
    with pytest.raises(InputError, match=r"unknown key 'encoder.modle'; did you mean 'encoder.model'"):
        build_config(ExtractConfig, f, {"annotations": "a.csv", "videos": "v", "out": "o.h5"})


def test_values_are_validated_by_the_dataclass_types_and_checks(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: many\n")
    with pytest.raises(InputError, match=r"c\.yaml: epochs: Input should be a valid integer"):
        build_config(TrainConfig, f, REQUIRED)
    f.write_text("epochs: 0\n")  # the dataclass's own range check
    with pytest.raises(InputError, match=r"epochs=0 is out of range"):
        build_config(TrainConfig, f, REQUIRED)
    f.write_text("task: forecasting\n")
    with pytest.raises(InputError, match=r"task"):
        build_config(TrainConfig, f, REQUIRED)


def test_nested_extract_config_and_dotted_options(tmp_path):
    f = tmp_path / "extract.yaml"
    f.write_text("encoder: {kind: timm, model: resnet50}\nsampling: {num_frames: 8}\nquestions: [templates]\n")
    cfg = build_config(ExtractConfig, f, {"annotations": "a.csv", "videos": "v", "out": "o.h5",
                                          "encoder.model": "resnet18", "sampling.size": 112})
    assert cfg.encoder.kind is EncoderKind.TIMM and cfg.encoder.model == "resnet18"
    assert (cfg.sampling.num_frames, cfg.sampling.size) == (8, 112) and cfg.questions == ("templates",)


@pytest.mark.parametrize("text, match", [
    ("- epochs\n- 3\n", "expected a mapping"),
    ("epochs: [1\n", "cannot be parsed"),
])
def test_bad_files_are_named(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(InputError, match=rf"bad\.yaml.*{match}"):
        build_config(TrainConfig, f, REQUIRED)
    with pytest.raises(InputError, match="not found"):
        build_config(TrainConfig, tmp_path / "missing.yaml", REQUIRED)
