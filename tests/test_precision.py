"""`--precision fp32|bf16|fp16|auto`: bf16 autocast training on the CPU lands where fp32 does, the precision is
recorded in the run and in metrics.json, bad values and fp16 on the CPU are exit 2, and the selective scan keeps its
state in float32 under autocast."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from mambavl.cache.synthetic import make_planted_cache
from mambavl.cli import app
from mambavl.device import Precision, autocast, resolve_precision
from mambavl.errors import InputError
from mambavl.extract.encoders import EncoderConfig, build_encoder
from mambavl.fuse.config import ModelConfig
from mambavl.fuse.model import MambaVL
from mambavl.fuse.scan import selective_scan, selective_scan_ref
from mambavl.runtime import TrainedModel
from mambavl.train import TrainConfig, train

CPU = torch.device("cpu")
TINY = ["--set", "d_model=32", "--set", "n_layers=1", "--frames", "6", "--batch-size", "8", "--min-steps", "0",
        "--logger", "none", "--quiet"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("precision")
    return {"train": make_planted_cache(d / "train.h5", n=64, seed=0),
            "val": make_planted_cache(d / "val.h5", n=64, seed=1),
            "tiny": make_planted_cache(d / "tiny.h5", n=16, seed=2)}


def _metrics_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bf16_training_lands_near_fp32(caches, tmp_path):
    """The same run (seed, data, 3 epochs of 4 steps) in fp32 and under bf16 autocast. Measured over seeds 0-2: the
    final training loss differs by at most 0.02 % and validation top-1 of verb, noun and action are identical (64
    rows); the bounds below leave a wide margin (1 % of the loss, 4 of the 64 rows)."""
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(train_cache=str(caches["train"]), val_cache=str(caches["val"]),
                          out_dir=str(tmp_path / precision), model_overrides={"d_model": 32, "n_layers": 1},
                          epochs=3, batch_size=16, lr=3e-3, frames=6, min_steps=0, precision=precision,
                          logger="none")
        runs[precision] = train(cfg).history[-1]
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert bf16["train_loss"] == pytest.approx(fp32["train_loss"], rel=0.01)
    assert bf16["train_loss"] != fp32["train_loss"]  # autocast did run in bf16
    for head in ("verb", "noun", "action"):
        assert abs(bf16[f"val_{head}_top1"] - fp32[f"val_{head}_top1"]) <= 4 * 100 / 64
    assert min(fp32["val_verb_top1"], bf16["val_verb_top1"]) > 40  # both learned (chance: 17 %)


def test_precision_is_recorded_and_may_change_on_resume(caches, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    common = ["--train-cache", str(caches["tiny"]), "--val-cache", str(caches["tiny"]), "--out", str(out)]
    res = runner.invoke(app, ["train", *common, *TINY, "--epochs", "1", "--precision", "bf16"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "train_config.json").read_text())["precision"] == "bf16"
    assert [r["precision"] for r in _metrics_csv(out / "metrics.csv")] == ["bf16"]
    assert TrainedModel.load(out / "last.pt").train_config.precision is Precision.BF16

    # a resume may change the precision (a bf16 run on a GPU goes on in fp32 on a CPU); the change is recorded
    res = runner.invoke(app, ["train", "--out", str(out), "--resume", "--epochs", "2", "--precision", "fp32"])
    assert res.exit_code == 0, res.output
    assert "precision fp32 instead of bf16" in res.output
    run = TrainedModel.load(out / "last.pt")
    assert run.train_config.precision is Precision.FP32
    assert {"field": "precision", "from": "bf16", "to": "fp32"}.items() <= run.progress.changes[-1].items()
    assert [r["precision"] for r in _metrics_csv(out / "metrics.csv")] == ["bf16", "fp32"]

    # from a --config file, as every TrainConfig field; the run's own train_config.json is a valid --config
    conf = tmp_path / "conf.yaml"
    conf.write_text("precision: bf16\n")
    res = runner.invoke(app, ["train", *common[:4], "--out", str(tmp_path / "c"), *TINY, "--epochs", "1",
                              "--config", str(conf)])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c" / "train_config.json").read_text())["precision"] == "bf16"

    # evaluate: auto is fp32; bf16 on request; both in metrics.json
    for flag, want in (([], "fp32"), (["--precision", "bf16"], "bf16")):
        ev = tmp_path / f"eval-{want}"
        res = runner.invoke(app, ["evaluate", "--checkpoint", str(out / "last.pt"), "--cache", str(caches["tiny"]),
                                  "--out", str(ev), "--no-plots", "--quiet", *flag])
        assert res.exit_code == 0, res.output
        metrics = json.loads((ev / "metrics.json").read_text())
        assert metrics["precision"] == want and metrics["config"]["precision"] == (flag[1] if flag else "auto")


def test_bad_precision_is_exit_2(caches, tmp_path):
    runner = CliRunner()
    common = ["--train-cache", str(caches["tiny"]), *TINY]
    res = runner.invoke(app, ["train", *common, "--out", str(tmp_path / "a"), "--precision", "fp8"])
    assert res.exit_code == 2 and "fp8" in res.output
    conf = tmp_path / "conf.yaml"
    conf.write_text("precision: half\n")
    res = runner.invoke(app, ["train", *common, "--out", str(tmp_path / "b"), "--config", str(conf)])
    assert res.exit_code == 2 and "precision" in res.output and str(conf) in res.output
    # fp16 on the CPU: refused before anything runs (emulated there, slower than fp32; bf16 is the CPU's half)
    res = runner.invoke(app, ["train", *common, "--out", str(tmp_path / "c"), "--device", "cpu",
                              "--precision", "fp16"])
    assert res.exit_code == 2 and "fp16 needs a CUDA device" in res.output and "bf16" in res.output
    assert not (tmp_path / "c" / "last.pt").exists()
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--cache", str(caches["tiny"]),
                              "--out", str(tmp_path / "e"), "--precision", "bf17"])
    assert res.exit_code == 2 and "bf17" in res.output


def test_resolve_precision_per_device():
    assert resolve_precision("auto", CPU, on_cuda=Precision.BF16) is Precision.FP32
    assert resolve_precision("bf16", CPU) is Precision.BF16
    with pytest.raises(InputError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)
    with pytest.raises(InputError, match="cpu and cuda only"):
        resolve_precision("bf16", torch.device("meta"))
    assert resolve_precision("fp32", torch.device("meta")) is Precision.FP32
    with pytest.raises(InputError, match="not one of"):
        resolve_precision("fp64", CPU)


def test_encoder_precision(tiny_encoder):
    """Extraction and predict: the image tower under bf16 autocast gives the fp32 features to bf16 rounding (stored
    as the cache stores them: float32 out of the encoder); fp16 on the CPU is refused before weights load."""
    frames = torch.randint(0, 256, (2, 3, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fp32 = tiny_encoder.encode_segments(frames.numpy())
    bf16_encoder = build_encoder(EncoderConfig(model="mambavl-tiny-clip", pretrained="none", device="cpu",
                                               precision="bf16"))
    bf16 = bf16_encoder.encode_segments(frames.numpy())
    assert bf16.dtype == fp32.dtype == torch.float32
    assert not torch.equal(bf16, fp32)
    assert torch.nn.functional.cosine_similarity(bf16.flatten(1), fp32.flatten(1)).min() > 0.99
    with pytest.raises(InputError, match="fp16 needs a CUDA device"):
        build_encoder(EncoderConfig(model="mambavl-tiny-clip", pretrained="none", device="cpu", precision="fp16"))


@pytest.mark.parametrize("impl", ["reference", "chunked", "cpu"])
def test_scan_state_stays_float32_under_autocast(impl):
    """Half inputs inside a bf16 autocast region: every implementation computes exactly what it computes from the
    float32 copies of the same inputs outside autocast (autocast would otherwise put its matmuls in bf16), and
    returns in the input's dtype."""
    g = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 8, 4, 24
    u, delta, z = (torch.randn(b, d, length, generator=g).to(torch.bfloat16) for _ in range(3))
    B, C = (torch.randn(b, n, length, generator=g).to(torch.bfloat16) for _ in range(2))
    A = -torch.rand(d, n, generator=g) - 0.5
    D = torch.randn(d, generator=g)
    with autocast(Precision.BF16, CPU):
        out = selective_scan(u, delta.abs(), A, B, C, D=D, z=z, impl=impl)
    want = selective_scan(u.float(), delta.abs().float(), A, B.float(), C.float(), D=D, z=z.float(), impl=impl)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want.to(torch.bfloat16))


def test_the_model_scans_float32_inputs_under_autocast():
    """Under bf16 autocast the block hands every scan float32 inputs (and its state matrix), and the residual
    streams stay float32 (the projections and heads run in bf16)."""
    model = MambaVL(ModelConfig(video_dim=32, text_dim=24, num_verbs=6, num_nouns=5, num_actions=8, d_model=32,
                                n_layers=2))
    seen = []

    def recording(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, A_index=None):
        seen.append({t.dtype for t in (u, delta, A, B, C, D, z)})
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  A_index=A_index)

    model.use_scan(recording)
    video, q = torch.randn(3, 5, 32), torch.randn(3, 2, 7, 24)
    with autocast(Precision.BF16, CPU):
        out = model(video, torch.ones(3, 5, dtype=torch.bool), q, torch.ones(3, 2, 7, dtype=torch.bool))
    assert seen and all(s == {torch.float32} for s in seen)
    assert out["verb"].dtype == torch.bfloat16 and out["h_verb"].dtype == torch.float32
