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


def test_train_config_json_reruns_the_run(tmp_path):
    """`train --config RUN/train_config.json --out OTHER` trains the same run again: the same metrics (fixed seed),
    and options given on the command line still win."""
    import csv

    from typer.testing import CliRunner

    from mambavl.cache.synthetic import make_planted_cache
    from mambavl.cli import app

    cache = make_planted_cache(tmp_path / "tiny.h5", n=24, seed=2)
    args = ["--train-cache", str(cache), "--val-cache", str(cache), "--epochs", "2", "--batch-size", "8",
            "--lr", "3e-3", "--frames", "4", "--min-steps", "0", "--seed", "3", "--set", "d_model=16",
            "--set", "n_layers=1", "--device", "cpu", "--logger", "none", "--quiet"]
    first = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "a"), *args])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "b"), "--config",
                                     str(tmp_path / "a" / "train_config.json"), "--quiet"])
    assert again.exit_code == 0, again.output

    def curve(run):
        rows = list(csv.DictReader(open(tmp_path / run / "metrics.csv")))
        return [{k: v for k, v in r.items() if k.startswith(("val_", "train_loss", "step", "lr"))} for r in rows]

    assert curve("a") == curve("b") and len(curve("a")) == 2
    a = json.loads((tmp_path / "a" / "train_config.json").read_text())
    b = json.loads((tmp_path / "b" / "train_config.json").read_text())
    assert {k: v for k, v in a.items() if k != "out_dir"} == {k: v for k, v in b.items() if k != "out_dir"}
    # the command line over the file
    third = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "c"), "--config",
                                     str(tmp_path / "a" / "train_config.json"), "--epochs", "1", "--quiet"])
    assert third.exit_code == 0, third.output
    assert json.loads((tmp_path / "c" / "train_config.json").read_text())["epochs"] == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"train_cache: {cache}\nwarmup_epoch: 2\n")
    res = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "d"), "--config", str(bad), "--quiet"])
    assert res.exit_code == 2 and "'warmup_epoch'" in res.output and "did you mean 'warmup_epochs'" in res.output
    # evaluate and ablate take --config files too
    ev = tmp_path / "eval.yaml"
    ev.write_text(f"checkpoint: {tmp_path / 'a' / 'last.pt'}\nplots: false\nsubmission: false\nbatch_size: 5\n")
    res = CliRunner().invoke(app, ["evaluate", "--config", str(ev), "--cache", str(cache), "--out",
                                   str(tmp_path / "e"), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["config"]["batch_size"] == 5 and metrics["config"]["plots"] is False
    ab = tmp_path / "ablate.yaml"
    ab.write_text(f"train_cache: {cache}\nval_cache: {cache}\npresets: [video-only]\nepochs: 1\nmin_steps: 0\n"
                  "batch_size: 8\nframes: 4\nmodel_overrides: {d_model: 16, n_layers: 1}\n")
    res = CliRunner().invoke(app, ["ablate", "--config", str(ab), "--out", str(tmp_path / "ab"), "--device", "cpu",
                                   "--quiet"])
    assert res.exit_code == 0, res.output
    assert "video-only" in (tmp_path / "ab" / "ablation.md").read_text()
