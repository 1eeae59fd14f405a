"""`train --compile off|fusion|cudagraphs`: the fusion compiled with torch.compile trains as the eager one does;
cudagraphs is refused off CUDA (exit 2); the choice is saved and may change on resume.

The CPU tests compile with dynamo's `eager` backend: dynamo captures the same graphs, with the same breaks at the
selective scan, as for inductor, and runs them without inductor's code generation (which takes minutes on a loaded
2-core machine). What they check is this project's part: which modules are compiled, that training runs through
them, and that the numbers match eager. `benchmarks/step_ops.py --compile` runs inductor and compares its
gradients with eager; the CUDA-graph path runs in the GPU check (the `gpu` test below)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from typer.testing import CliRunner

from mambavl.cache.synthetic import make_planted_cache
from mambavl.cli import app
from mambavl.runtime import Compile, TrainedModel
from mambavl.train import TrainConfig, train

TINY = {"model_overrides": {"d_model": 32, "n_layers": 2}, "epochs": 2, "batch_size": 16, "lr": 3e-3, "frames": 6,
        "min_steps": 0, "logger": "none"}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("compile")
    return make_planted_cache(d / "train.h5", n=48, seed=0), make_planted_cache(d / "val.h5", n=32, seed=1)


@pytest.fixture
def compiled_calls(monkeypatch):
    """torch.compile with dynamo's eager backend; records each call's mode."""
    calls, real = [], torch.compile

    def fake(fn, **options):
        calls.append(options.get("mode"))
        return real(fn, backend="eager", **options)

    monkeypatch.setattr(torch, "compile", fake)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


def _run(caches, tmp_path, name, **kw):
    cfg = TrainConfig(train_cache=str(caches[0]), val_cache=str(caches[1]), out_dir=str(tmp_path / name),
                      **{**TINY, **kw})
    return train(cfg).history


def test_compiled_fusion_trains_as_eager(caches, tmp_path, compiled_calls):
    eager = _run(caches, tmp_path, "eager")
    assert compiled_calls == []
    compiled = _run(caches, tmp_path, "compiled", compile="fusion")
    assert compiled_calls == ["default", "default"]  # one compiled region per fusion layer
    for e, c in zip(eager, compiled, strict=True):
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)
        for head in ("verb", "noun", "action"):
            assert abs(c[f"val_{head}_top1"] - e[f"val_{head}_top1"]) <= 100 / 32  # at most one row flips
    # dynamo really ran the layers: frames were compiled (counters of the last run)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    run = TrainedModel.load(tmp_path / "compiled" / "last.pt")
    assert run.train_config.compile is Compile.FUSION
    model = run.model("cpu")  # a compiled run's checkpoint loads into a plain, eager model
    assert not hasattr(model.fusion.layers[0].mix, "_torchdynamo_orig_callable")


def test_cudagraphs_off_cuda_is_exit_2_and_compile_may_change_on_resume(caches, tmp_path, compiled_calls):
    runner = CliRunner()
    out = tmp_path / "run"
    common = ["--train-cache", str(caches[0]), "--out", str(out), "--set", "d_model=32", "--set", "n_layers=1",
              "--frames", "6", "--batch-size", "16", "--min-steps", "0", "--logger", "none", "--quiet"]
    res = runner.invoke(app, ["train", *common, "--epochs", "1", "--compile", "cudagraphs", "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert "compile cudagraphs needs a CUDA device" in res.output
    res = runner.invoke(app, ["train", *common, "--epochs", "1", "--compile", "banana"])
    assert res.exit_code == 2 and "banana" in res.output
    res = runner.invoke(app, ["train", *common, "--epochs", "1", "--compile", "fusion"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "train_config.json").read_text())["compile"] == "fusion"
    res = runner.invoke(app, ["train", "--out", str(out), "--resume", "--epochs", "2", "--compile", "off"])
    assert res.exit_code == 0, res.output
    assert TrainedModel.load(out / "last.pt").train_config.compile is Compile.OFF
    assert compiled_calls == ["default"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cudagraphs_training_matches_eager_on_cuda(caches, tmp_path):
    eager = _run(caches, tmp_path, "eager", device="cuda", precision="fp32")
    graphs = _run(caches, tmp_path, "graphs", device="cuda", precision="fp32", compile="cudagraphs")
    for e, g in zip(eager, graphs, strict=True):
        assert g["train_loss"] == pytest.approx(e["train_loss"], rel=1e-3)
        assert abs(g["val_verb_top1"] - e["val_verb_top1"]) <= 2 * 100 / 32
