"""Sharing a trained model: `mambavl export` writes the Hugging Face model layout (config.json + model.safetensors +
model card, no pickle), every command that takes --checkpoint reads it as a folder or as hf://ORG/NAME from the
Hugging Face cache, damaged files are refused naming the file, and `mambavl push` uploads through huggingface_hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mambavl.cache.synthetic import make_planted_cache
from mambavl.cli import app
from mambavl.errors import InputError
from mambavl.runtime import TrainedModel, predict_scores

FIXTURES = Path(__file__).parent / "data" / "checkpoints"
CKPT = FIXTURES / "format1-aee739c-predicted.pt"  # carries a first pass, action answers and train candidates
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    d = tmp_path_factory.mktemp("share")
    cache = make_planted_cache(d / "val.h5", n=24, seed=1, frames=4, dim=16, text_dim=8)
    res = CliRunner().invoke(app, ["export", "--checkpoint", str(CKPT), "--out", str(d / "model"), "--repo",
                                   "org/mambavl-tiny"])
    assert res.exit_code == 0, res.output
    return {"dir": d, "cache": cache, "model": d / "model"}


def _scores(run: TrainedModel, cache: Path, source: str) -> dict:
    return predict_scores(run.model(), cache, question_source=source, frames=run.train_config.frames,
                          first_pass=run.first_pass_models())


def _hub_cache(root: Path, folder: Path, repo: str = "org/mambavl-tiny") -> Path:
    """A Hugging Face cache holding `folder` as the main revision of `repo` (huggingface_hub's on-disk layout)."""
    base = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, base / "snapshots" / REV)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(REV)
    return root


def test_export_then_load_scores_bit_identically(shared):
    original, exported = TrainedModel.load(CKPT), TrainedModel.load(shared["model"])
    assert sorted(p.name for p in shared["model"].iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for name in ("weights", "action_answers", "train_candidates", "first_pass"):
        assert getattr(exported, name) is not None, name
    for source in ("templates", "predicted"):  # predicted: the first-pass fold models ask the questions
        a, b = _scores(original, shared["cache"], source), _scores(exported, shared["cache"], source)
        for key in ("verb", "noun", "action"):
            assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), (source, key)
    assert torch.equal(original.action_answers, exported.action_answers)
    assert torch.equal(original.train_candidates, exported.train_candidates)
    assert exported.vocab == original.vocab and exported.features == original.features
    assert exported.model_config == original.model_config and exported.progress == original.progress


def test_the_folder_is_json_and_safetensors_only(shared):
    config = json.loads((shared["model"] / "config.json").read_text())
    assert config["kind"] == "mambavl-checkpoint" and config["format"] == 2 and config["training"] is None
    assert config["weights"]["scene_bias"] == {"$tensor": "weights/scene_bias"}
    assert config["train_config"]["train_cache"] == Path(config["train_config"]["train_cache"]).name
    raw = (shared["model"] / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert "first_pass/states/0/scene_bias" in header and "action_answers" in header
    assert config["export"]["files"]["model.safetensors"]["bytes"] == len(raw)
    card = (shared["model"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mambavl\n")
    assert "mambavl evaluate --checkpoint hf://org/mambavl-tiny" in card and "## Licence" in card


def test_card_reports_the_evaluation_and_ek100_licence(shared, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(shared["model"]), "--cache", str(shared["cache"]),
                              "--out", str(tmp_path / "eval"), "--device", "cpu", "--no-plots", "--quiet"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    config_sha = metrics["checkpoint"]["sha256"]
    assert metrics["checkpoint"]["path"] == str(shared["model"].resolve()) and len(config_sha) == 64
    state = torch.load(CKPT, weights_only=True)
    run = TrainedModel.load(CKPT)
    run.annotation = {"file": "EPIC_100_train.csv", "sha256": "ab" * 32}
    run.save(tmp_path / "best.pt")
    res = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "best.pt"), "--out", str(tmp_path / "m"),
                              "--metrics", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    card = (tmp_path / "m" / "README.md").read_text()
    assert "license: cc-by-nc-4.0" in card and "CC BY-NC 4.0" in card and "EPIC_100_train.csv" in card
    assert "Question protocol: **predicted**" in card and "| all | verb |" in card and "ab" * 32 in card
    assert state["vocab"]["verbs"][0] in json.loads((tmp_path / "m" / "config.json").read_text())["vocab"]["verbs"]


def test_hub_reference_resolves_from_the_offline_cache(shared, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", shared["model"])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = TrainedModel.load(CKPT)
    for ref in ("hf://org/mambavl-tiny", f"hf://org/mambavl-tiny@{REV}", "hf:/org/mambavl-tiny"):
        run = TrainedModel.load(ref)
        assert all(torch.equal(run.weights[k], v) for k, v in original.weights.items()), ref
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", "hf://org/mambavl-tiny", "--cache",
                                   str(shared["cache"]), "--out", str(tmp_path / "eval"), "--device", "cpu",
                                   "--no-plots", "--quiet"])
    assert res.exit_code == 0, res.output
    ident = json.loads((tmp_path / "eval" / "metrics.json").read_text())["checkpoint"]
    assert ident["path"] == "hf://org/mambavl-tiny" and REV in ident["snapshot"]
    with pytest.raises(InputError, match=r"hf://org/absent: cannot get it .*HF_HUB_OFFLINE is set"):
        TrainedModel.load("hf://org/absent")
    with pytest.raises(InputError, match="not a hub reference"):
        TrainedModel.load("hf://no-name")


@pytest.mark.parametrize("damage", ["changed", "truncated", "config"])
def test_damaged_files_are_refused_naming_the_file(shared, tmp_path, damage):
    folder = tmp_path / "model"
    shutil.copytree(shared["model"], folder)
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    if damage == "changed":
        raw[-3] ^= 0xFF  # same size, other bytes: only the sha256 tells
        weights.write_bytes(bytes(raw))
        named, why = weights, "sha256 differs"
    elif damage == "truncated":
        weights.write_bytes(bytes(raw[: len(raw) // 2]))
        named, why = weights, "truncated"
    else:
        text = (folder / "config.json").read_text()
        (folder / "config.json").write_text(text[: len(text) // 2])
        named, why = folder / "config.json", "not valid JSON"
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(folder), "--cache", str(shared["cache"]),
                                   "--out", str(tmp_path / "eval"), "--device", "cpu", "--quiet"])
    assert res.exit_code == 2, res.output
    assert str(named) in res.output and why in res.output


def test_push_uploads_the_folder_through_huggingface_hub(shared, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, **kw: calls.append(("create", kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    res = CliRunner().invoke(app, ["push", str(shared["model"]), "--repo", "org/mambavl-tiny", "--private"])
    assert res.exit_code == 0, res.output
    assert calls[0] == ("create", {"repo_id": "org/mambavl-tiny", "repo_type": "model", "private": True,
                                   "exist_ok": True})
    kind, kw = calls[1]
    assert kind == "upload" and kw["repo_id"] == "org/mambavl-tiny" and kw["folder_path"] == str(shared["model"])
    assert kw["repo_type"] == "model"
    res = CliRunner().invoke(app, ["push", str(shared["model"]), "--repo", "not a repo"])
    assert res.exit_code == 2 and "ORG/NAME" in res.output and len(calls) == 2
