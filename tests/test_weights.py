"""`--pretrained PATH` formats for every encoder family (open_clip, timm, VideoMAE, Hugging Face text): plain,
wrapped and DDP state dicts, safetensors, TorchScript archives, a folder holding one checkpoint; refusals (pickled
module, crafted pickle, truncated, empty, missing, other architecture, several checkpoints) name the file and the
reason, exit 2, and write nothing. The inputs are generated here, in the shapes people have on disk."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mambavl.cli import app
from mambavl.data.synthetic import make_kitchen_dataset
from mambavl.errors import InputError
from mambavl.extract import weights as W
from mambavl.extract.encoders import EncoderConfig, build_encoder, file_sha256

TEXT = dict(text_model="mambavl-tiny-clip", text_pretrained="none")
FAMILIES = {
    "clip": dict(kind="clip", model="mambavl-tiny-clip"),
    "timm": dict(kind="timm", model="test_efficientnet", **TEXT),
    "videomae": dict(kind="videomae", model="videomae-tiny", **TEXT),
}


def _module(enc, family):
    return {"clip": lambda: enc.clip, "timm": lambda: enc.net, "videomae": lambda: enc.videomae}[family]()


def _cfg(family, pretrained):
    return EncoderConfig(**FAMILIES[family], pretrained=str(pretrained), device="cpu")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def source(request, tmp_path_factory):
    """(family, module with weights unlike the seeded init, its state dict, folder of files in every format)."""
    family = request.param
    enc = build_encoder(_cfg(family, "none"))
    net = _module(enc, family)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    d = tmp_path_factory.mktemp(f"weights-{family}")
    torch.save(sd, d / "plain.pt")
    torch.save({"epoch": 3, "optimizer": {}, "state_dict": {"module." + k: v for k, v in sd.items()}}, d / "ddp.pt")
    torch.save({"model": {"_orig_mod." + k: v for k, v in sd.items()}}, d / "compiled.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "weights.safetensors"))
    (d / "folder").mkdir()
    shutil.copy(d / "plain.pt", d / "folder" / "open_clip_pytorch_model.bin")
    (d / "folder" / "config.json").write_text(json.dumps({"model": FAMILIES[family]["model"]}))
    if family in ("clip", "timm"):  # OpenAI's original CLIP files are TorchScript archives
        torch.jit.save(torch.jit.script(net), str(d / "scripted.pt"))
    torch.save(net, d / "fullmodel.pt")  # a pickled module
    raw = (d / "plain.pt").read_bytes()
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (d / "empty.pt").write_bytes(b"")
    return family, sd, d


@pytest.mark.parametrize("name", ["plain.pt", "ddp.pt", "compiled.pth", "weights.safetensors", "folder",
                                  "scripted.pt"])
def test_every_format_loads_the_same_weights(source, name):
    family, sd, d = source
    if not (d / name).exists():
        pytest.skip(f"{family}: no TorchScript archive of this family in the test (scripting is not needed)")
    enc = build_encoder(_cfg(family, d / name))
    loaded = _module(enc, family).state_dict()
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd), f"{family} {name}: weights differ from the file"
    prov = enc.provenance()
    assert prov["pretrained"] == name and len(prov["checkpoint_sha256"]) == 64


@pytest.mark.parametrize("name,reason", [
    ("fullmodel.pt", "pickled Python object"),
    ("truncated.pt", "truncated"),
    ("empty.pt", "empty"),
    ("nope.pt", "not found"),
])
def test_unreadable_files_are_refused_naming_file_and_reason(source, name, reason):
    family, _, d = source
    with pytest.raises(InputError, match=reason) as info:
        build_encoder(_cfg(family, d / name))
    assert name in str(info.value)


def test_other_architecture_names_the_first_mismatching_key(source, tmp_path):
    family, sd, _ = source
    bad = dict(sd)
    key = next(k for k, v in sd.items() if v.ndim == 2)
    bad[key] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "badshape.pt")
    with pytest.raises(InputError, match=rf"badshape.pt do not fit .*first mismatching key '{key}' has shape \(3, 3\)"):
        build_encoder(_cfg(family, tmp_path / "badshape.pt"))
    other = {k: v for k, v in sd.items() if k != key}
    torch.save(other, tmp_path / "missing.pt")
    with pytest.raises(InputError, match=rf"first mismatching key '{key}' is missing from the file"):
        build_encoder(_cfg(family, tmp_path / "missing.pt"))


def test_folder_with_several_checkpoints_is_refused(tmp_path):
    for name in ("a.pt", "b.pt"):
        torch.save({"w": torch.zeros(1)}, tmp_path / name)
    with pytest.raises(InputError, match="several checkpoints"):
        W.read_state_dict(tmp_path)
    (tmp_path / "a.pt").unlink()
    (tmp_path / "b.pt").unlink()
    with pytest.raises(InputError, match="holds no checkpoint"):
        W.read_state_dict(tmp_path)


class _Payload:
    """Unpickling this would create a file: a checkpoint that runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="evil.pt: holds a pickled Python object"):
        W.read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_hf_text_encoder_weights_file_over_a_folder_config(tmp_path):
    """--text-encoder hf: a tiny BERT folder (config + the MiniLM tokenizer), weights from a separate DDP file."""
    from transformers import BertConfig, BertModel

    folder = tmp_path / "tiny-bert"
    shutil.copytree(W.packaged_path("pkg:all-minilm-l6-v2"), folder,
                    ignore=shutil.ignore_patterns("*.safetensors", "config*.json", "1_Pooling", "modules.json"))
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    config.save_pretrained(folder)
    torch.manual_seed(1)
    net = BertModel(config)
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, tmp_path / "bert.pt")
    cfg = dict(model="mambavl-tiny-clip", pretrained="none", device="cpu", text_encoder="hf",
               text_model=str(folder), max_question_tokens=8)
    enc = build_encoder(EncoderConfig(**cfg, text_pretrained=str(tmp_path / "bert.pt")))
    tokens, mask, pooled = enc.encode_text(["What is the person doing?", "Which object?"])
    ids = enc.text.tokenizer(["What is the person doing?"], return_tensors="pt")
    with torch.no_grad():
        hidden = net.eval()(**ids).last_hidden_state[0]  # (L, 32)
    assert tokens.shape == (2, 8, 32) and mask[0].sum() == 8 and mask[1].sum() == 5  # [CLS] which object ? [SEP]
    assert torch.allclose(tokens[0], hidden[:8], atol=1e-5)
    assert torch.allclose(pooled[0], hidden.mean(0), atol=1e-5)
    assert torch.equal(tokens[1, 5:], torch.zeros(3, 32))
    prov = enc.provenance()
    assert prov["text_encoder"] == "hf" and prov["text_model"] == "tiny-bert" and prov["text_pretrained"] == "bert.pt"
    assert prov["text_checkpoint_sha256"] == file_sha256(tmp_path / "bert.pt") and prov["text_dim"] == 32
    torch.save(net, tmp_path / "bert-module.pt")
    with pytest.raises(InputError, match="bert-module.pt: holds a pickled Python object"):
        build_encoder(EncoderConfig(**cfg, text_pretrained=str(tmp_path / "bert-module.pt")))


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory):
    return make_kitchen_dataset(tmp_path_factory.mktemp("kitchen"), n_train=2, n_val=1, n_test=1,
                                segments_per_video=2)


def test_cli_bad_weights_exit_2_and_nothing_written(kitchen, tmp_path):
    from mambavl.extract.encoders import load_clip

    sd = load_clip("mambavl-tiny-clip", "none", torch.device("cpu")).state_dict()
    key = next(k for k in sd if "proj" in k)
    torch.save({**sd, key: torch.zeros(3, 3)}, tmp_path / "badshape.pt")
    torch.save(load_clip("mambavl-tiny-clip", "none", torch.device("cpu")), tmp_path / "fullmodel.pt")
    for name, says in (("badshape.pt", f"first mismatching key '{key}'"), ("fullmodel.pt", "pickled Python object"),
                       ("missing.pt", "not found")):
        out = tmp_path / f"{name}.h5"
        r = CliRunner().invoke(app, ["extract", str(kitchen.val_csv), "--videos", str(kitchen.videos), "--out",
                                     str(out), "--model", "mambavl-tiny-clip", "--pretrained",
                                     str(tmp_path / name), "--frames", "2", "--size", "64", "--quiet"])
        assert r.exit_code == 2, r.output
        assert name in r.output and says in r.output
        assert not out.exists()
