"""MambaVL model: every preset trains a step, masks make padding irrelevant, the state matrix is really shared (and
carries the question into the video in the joint layout), ablation switches do what they say, configs round-trip."""

from __future__ import annotations

import io
import json

import pytest
import torch

from mambavl.errors import InputError
from mambavl.fuse.block import MambaVLMixer
from mambavl.fuse.model import FusionKind, MambaVL, ModelConfig, ScanLayout, model_config_from_dict
from mambavl.fuse.model import create_model
from mambavl.fuse.presets import PRESETS, preset_train_overrides

DV, DT, V, NN, A = 12, 10, 5, 4, 3
TINY = dict(video_dim=DV, text_dim=DT, num_verbs=V, num_nouns=NN, num_actions=A, d_model=16, dropout=0.0)


def tiny(preset="small", **kw):
    torch.manual_seed(0)
    model, cfg = create_model(preset, **{**TINY, **kw})
    return model.eval(), cfg


def batch(b=2, f=6, t=5, seed=0):
    """video (B, F, Dv) with the 2nd clip padded after 4 frames; questions (B, 2, T, Dt), 1st clip's padded after 3."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(b, f, DV, generator=g)
    vmask = torch.ones(b, f, dtype=torch.bool)
    vmask[1, 4:] = False
    q = torch.randn(b, 2, t, DT, generator=g)
    qmask = torch.ones(b, 2, t, dtype=torch.bool)
    qmask[0, :, 3:] = False
    return video, vmask, q, qmask


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_trains_one_step(preset):
    model, cfg = tiny(preset)
    model.train()
    video, vmask, q, qmask = batch()
    out = model(video, vmask, q, qmask)
    assert out["verb"].shape == (2, V) and out["noun"].shape == (2, NN) and out["action"].shape == (2, A)
    assert out["h_verb"].shape == out["h_noun"].shape == (2, cfg.d_model)
    h = model.fuse(video, vmask, q[:, 2 - 1], qmask[:, 1])
    qa = model.qa_logits(model.qa_embed(h), torch.randn(7, DT))  # (B, 7)
    scene = model.scene_logits(model.qa_embed(h), torch.randn(NN, DT))  # (B, Nn)
    assert qa.shape == (2, 7) and scene.shape == (2, NN)
    loss = sum(o.float().pow(2).mean() for o in out.values()) + qa.mean() + scene.mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{preset}: no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), name
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_heads_absent_without_nouns_or_actions():
    model, _ = tiny(num_nouns=0, num_actions=0)
    out = model(*batch())
    assert set(out) == {"verb", "h_verb", "h_noun"}
    assert model.noun_head is None and model.action_head is None


def test_forward_batches_verb_and_noun_questions():
    model, _ = tiny()
    video, vmask, q, qmask = batch()
    out = model(video, vmask, q, qmask)
    assert torch.allclose(out["h_verb"], model.fuse(video, vmask, q[:, 0], qmask[:, 0]), atol=1e-5)
    assert torch.allclose(out["h_noun"], model.fuse(video, vmask, q[:, 1], qmask[:, 1]), atol=1e-5)
    # Different questions, different fused vectors. (Small at init: mamba's dt init keeps Δ in [1e-3, 1e-1], so
    # the question writes little into the state until training opens it up.)
    assert (out["h_verb"] - out["h_noun"]).abs().max() > 1e-6


PADDING_VARIANTS = {
    "joint": {},
    "parallel": {"scan_layout": "parallel"},
    "disjoint-A": {"shared_A": False},
    "bidirectional": {"bidirectional": True},
    "parallel-bidirectional": {"scan_layout": "parallel", "bidirectional": True},
    "transformer": {"fusion": "transformer"},
    "concat": {"fusion": "concat"},
    "video-only": {"use_question": False},
}


@pytest.mark.parametrize("variant", list(PADDING_VARIANTS))
def test_padding_changes_nothing(variant):
    """Garbage in padded positions and extra padding (more frames / question tokens) leave the outputs unchanged."""
    model, _ = tiny(**PADDING_VARIANTS[variant])
    video, vmask, q, qmask = batch()
    ref = model(video, vmask, q, qmask)
    g = torch.Generator().manual_seed(3)
    video2 = torch.cat([video, torch.randn(2, 3, DV, generator=g)], 1)  # (B, F+3, Dv)
    video2[~torch.cat([vmask, torch.zeros(2, 3, dtype=torch.bool)], 1)] = 1e3  # garbage in every padded frame
    vmask2 = torch.cat([vmask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    q2 = torch.cat([q, torch.randn(2, 2, 4, DT, generator=g)], 2)  # (B, 2, T+4, Dt)
    qmask2 = torch.cat([qmask, torch.zeros(2, 2, 4, dtype=torch.bool)], 2)
    q2[~qmask2] = -1e3
    out = model(video2, vmask2, q2, qmask2)
    for k in ref:
        assert torch.allclose(out[k], ref[k], atol=1e-5, rtol=1e-5), f"{variant}: {k} changed with padding"


def _mixer_inputs(seed=0, t=4, f=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, f, 16, generator=g), torch.randn(2, t, 16, generator=g)


def test_shared_A_is_one_parameter_fed_by_both_modalities():
    model, cfg = tiny()
    a_logs = [n for n, _ in model.named_parameters() if "A_log" in n]
    assert len(a_logs) == cfg.n_layers and all(n.endswith("mixer.A_log") for n in a_logs)
    for layout in ("joint", "parallel"):
        torch.manual_seed(0)
        mixer = MambaVLMixer(16, d_state=4, layout=layout, scan_impl="cpu")
        assert mixer.A("video").data_ptr() != 0 and not hasattr(mixer, "A_log_video")
        video, question = _mixer_inputs()
        # Gradient reaching A_log from the question tokens' outputs alone (the video comes after them in the scan,
        # and in the parallel layout is a separate scan: it cannot contribute)...
        _, q_out = mixer(video, None, question, None)
        (g_q,) = torch.autograd.grad(q_out.pow(2).sum(), mixer.A_log)
        # ...and from the video tokens alone (questions fully masked: delta = 0, no input to the state).
        v_out, _ = mixer(video, None, question, torch.zeros(2, 4, dtype=torch.bool))
        (g_v,) = torch.autograd.grad(v_out.pow(2).sum(), mixer.A_log)
        assert g_q.abs().sum() > 0 and g_v.abs().sum() > 0, layout


def test_joint_state_carries_the_question_into_the_video():
    """Joint: changing the question changes the video tokens' outputs; parallel: it cannot."""
    video, question = _mixer_inputs()
    other = question + torch.randn(question.shape, generator=torch.Generator().manual_seed(9))
    for layout, shared in (("joint", True), ("joint", False), ("parallel", True)):
        torch.manual_seed(0)
        mixer = MambaVLMixer(16, d_state=4, layout=layout, shared_A=shared, scan_impl="cpu")
        v1, _ = mixer(video, None, question, None)
        v2, _ = mixer(video, None, other, None)
        if layout == "joint":
            assert (v1 - v2).abs().max() > 1e-4, f"joint (shared_A={shared}): the question did not reach the video"
        else:
            assert torch.equal(v1, v2)
    # and through the whole model: same clip, different question -> different fused vector
    model, _ = tiny()
    vid, vmask, q, qmask = batch()
    h1 = model.fuse(vid, vmask, q[:, 0], qmask[:, 0])
    h2 = model.fuse(vid, vmask, q[:, 0] + 1.0, qmask[:, 0])
    assert (h1 - h2).abs().max() > 1e-6  # small at init (dt init keeps Δ small), but there


def test_disjoint_A_two_parameters_and_equal_to_shared_when_equal():
    shared, _ = tiny()
    disjoint, cfg = tiny("disjoint-A")
    names = {n for n, _ in disjoint.named_parameters() if "A_log" in n}
    assert names == {f"fusion.layers.{i}.mixer.A_log_{m}" for i in range(cfg.n_layers) for m in ("video", "question")}
    # With both A's copied from the shared model, the disjoint model computes exactly the shared model.
    state = {}
    for k, v in shared.state_dict().items():
        if k.endswith("mixer.A_log"):
            state[k + "_video"] = v.clone()
            state[k + "_question"] = v.clone()
        else:
            state[k] = v
    disjoint.load_state_dict(state)
    video, vmask, q, qmask = batch()
    ref = shared(video, vmask, q, qmask)
    out = disjoint(video, vmask, q, qmask)
    assert torch.allclose(out["verb"], ref["verb"], atol=1e-6)
    with torch.no_grad():  # a different question-side A changes the video-side result (the state carries it)
        disjoint.fusion.layers[0].mixer.A_log_question.add_(0.5)
    assert (disjoint(video, vmask, q, qmask)["verb"] - ref["verb"]).abs().max() > 1e-7


def test_video_only_ignores_questions():
    model, _ = tiny("video-only")
    assert model.question_proj is None
    assert not any("question" in n for n, _ in model.named_parameters())
    video, vmask, q, qmask = batch()
    a = model(video, vmask, q, qmask)
    b = model(video, vmask, torch.randn_like(q), torch.ones_like(qmask))
    c = model(video, vmask)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])


@pytest.mark.parametrize("variant", [{}, {"shared_A": False}, {"scan_layout": "parallel", "bidirectional": True}])
def test_scan_impls_give_the_same_model(variant):
    video, vmask, q, qmask = batch()
    results = {}
    for impl in ("reference", "cpu", "chunked"):
        model, _ = tiny(scan_impl=impl, **variant)
        out = model(video, vmask, q, qmask)
        out["verb"].sum().backward()
        results[impl] = (out["verb"].detach(), model.fusion.layers[0].mixer.D.grad.clone())
    for impl in ("cpu", "chunked"):
        assert torch.allclose(results[impl][0], results["reference"][0], atol=1e-5), impl
        assert torch.allclose(results[impl][1], results["reference"][1], atol=1e-5), impl


def test_no_weight_decay_tags():
    model, _ = tiny(bidirectional=True)
    tagged = {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert {n for n, _ in model.named_parameters() if n.endswith(("A_log", ".D"))} <= tagged
    assert any(n.endswith("A_log") for n in tagged) and any(n.endswith("mixer.D") for n in tagged)
    for n, p in model.named_parameters():
        if n.endswith("bias") or "norm" in n or n == "logit_scale":
            assert n in tagged, n
        if n.endswith("weight") and p.ndim == 2:
            assert n not in tagged, n


def test_mamba_init():
    model, cfg = tiny()
    mixer = model.fusion.layers[0].mixer
    assert torch.allclose(-torch.exp(mixer.A_log[0]), -torch.arange(1, cfg.d_state + 1).float())
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    dt = torch.nn.functional.softplus(mixer.streams["video"].dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6


def test_config_round_trip_through_plain_types():
    _, cfg = tiny("paper", bidirectional=True, scan_impl="chunked")
    plain = cfg.to_dict()
    assert plain["scan_layout"] == "parallel" and plain["fusion"] == "mamba"
    text = json.dumps(plain)  # plain types only
    assert model_config_from_dict(json.loads(text)) == cfg
    buf = io.BytesIO()
    torch.save({"model_config": plain}, buf)
    buf.seek(0)
    back = model_config_from_dict(torch.load(buf, weights_only=True)["model_config"])
    assert back == cfg and back.scan_layout is ScanLayout.PARALLEL and back.fusion is FusionKind.MAMBA
    assert ModelConfig.from_dict(plain) == cfg
    with pytest.raises(InputError, match="valid keys"):
        model_config_from_dict({**plain, "colour": "red"})


def test_checkpoint_state_dict_round_trip():
    model, cfg = tiny("disjoint-A")
    again = MambaVL(model_config_from_dict(cfg.to_dict())).eval()
    again.load_state_dict(model.state_dict())
    args = batch()
    assert torch.equal(model(*args)["verb"], again(*args)["verb"])


def test_create_model_overrides_and_errors():
    _, cfg = create_model("small", d_model=None, n_layers=3, video_dim=DV, text_dim=DT)
    assert cfg.d_model == PRESETS["small"]["d_model"] and cfg.n_layers == 3
    _, cfg = create_model("transformer", fusion=None, video_dim=DV, text_dim=DT, d_model=16)
    assert cfg.fusion is FusionKind.TRANSFORMER
    with pytest.raises(InputError, match="valid keys: .*d_model"):
        create_model("small", d_modle=64)
    with pytest.raises(InputError, match="choose one of .*paper"):
        create_model("huge")
    with pytest.raises(InputError, match="fusion"):
        create_model("small", fusion="lstm")
    with pytest.raises(InputError, match="n_layers"):
        create_model("small", n_layers=0)
    assert preset_train_overrides("no-qa") == {"qa_weight": 0.0}
    assert preset_train_overrides("small") == {}


def test_input_errors():
    model, _ = tiny(max_frames=8)
    video, vmask, q, qmask = batch()
    with pytest.raises(InputError, match="max_frames"):
        model(torch.randn(2, 9, DV), torch.ones(2, 9, dtype=torch.bool), q, qmask)
    with pytest.raises(InputError, match="no question tokens"):
        model(video, vmask)
    with pytest.raises(InputError, match="video must be"):
        model(torch.randn(2, 6, DV + 1), vmask, q, qmask)


def test_qa_head():
    model, _ = tiny()
    video, vmask, q, qmask = batch()
    emb = model.qa_embed(model.fuse(video, vmask, q[:, 0], qmask[:, 0]))
    assert emb.shape == (2, DT) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    cand = torch.randn(4, DT)
    logits = model.qa_logits(emb, cand)
    cos = emb @ torch.nn.functional.normalize(cand, dim=-1).T
    assert torch.allclose(logits, cos / 0.07, atol=1e-4)  # initial temperature 0.07
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert torch.allclose(model.qa_logits(emb, cand), 100 * cos, atol=1e-4)  # capped at 100
