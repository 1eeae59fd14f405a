"""Frozen encoders: features equal the underlying model on the same frames; text tokens; local checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mambavl.errors import InputError
from mambavl.extract.encoders import EncoderConfig, build_encoder

TINY = dict(model="mambavl-tiny-clip", pretrained="none", device="cpu")


@pytest.fixture(scope="module")
def enc():
    return build_encoder(EncoderConfig(**TINY, batch_size=5))


def test_clip_features_equal_model_on_same_frames(enc):
    frames = np.random.default_rng(0).integers(0, 256, (3, 4, 64, 64, 3), dtype=np.uint8)
    feats = enc.encode_segments(frames)
    assert feats.shape == (3, 4, enc.feature_dim)
    x = torch.from_numpy(frames.reshape(12, 64, 64, 3)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        direct = enc.clip.encode_image((x - mean) / std).reshape(3, 4, -1)
    assert torch.allclose(feats, direct, atol=1e-5)
    # batch size does not change the result
    one = build_encoder(EncoderConfig(**TINY, batch_size=1)).encode_segments(frames)
    assert torch.allclose(one, feats, atol=1e-5)
    assert not any(p.requires_grad for p in enc.clip.parameters()) and not enc.clip.training


def test_text_tokens_and_pooled(enc):
    tokens, mask, pooled = enc.encode_text(["What is the person doing?", "Which object?"])
    assert tokens.shape == (2, 16, enc.text_dim) and pooled.shape == (2, enc.text_dim)
    ids = enc.text.tokenizer(["What is the person doing?"])
    eot = int(ids.argmax(-1))
    assert mask[0].sum() == eot + 1  # start token, words, end token
    assert torch.allclose(tokens[0, eot], pooled[0], atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(pooled[:1], enc.clip.encode_text(ids), atol=1e-5)


def test_local_checkpoint_path(tmp_path, enc):
    torch.manual_seed(3)
    for p in enc.clip.parameters():
        p.data.add_(torch.randn_like(p) * 0.01)  # weights unlike the seeded random init
    ckpt = tmp_path / "tiny.pt"
    torch.save(enc.clip.state_dict(), ckpt)
    loaded = build_encoder(EncoderConfig(model="mambavl-tiny-clip", pretrained=str(ckpt), device="cpu"))
    frames = np.random.default_rng(1).integers(0, 256, (1, 2, 64, 64, 3), dtype=np.uint8)
    assert torch.allclose(loaded.encode_segments(frames), enc.encode_segments(frames), atol=1e-5)
    prov = loaded.provenance()
    assert prov["pretrained"] == "tiny.pt" and len(prov["checkpoint_sha256"]) == 64
    with pytest.raises(InputError, match="not found"):
        build_encoder(EncoderConfig(model="mambavl-tiny-clip", pretrained=str(tmp_path / "nope.pt")))
    with pytest.raises(InputError, match="unknown open_clip model"):
        build_encoder(EncoderConfig(model="no-such-model", pretrained="none"))


def test_random_init_is_reproducible(enc):
    frames = np.random.default_rng(2).integers(0, 256, (1, 2, 64, 64, 3), dtype=np.uint8)
    fresh = build_encoder(EncoderConfig(**TINY))
    other = enc.encode_segments(frames)
    assert torch.equal(fresh.encode_segments(frames), build_encoder(EncoderConfig(**TINY)).encode_segments(frames))
    assert other.shape == (1, 2, 64)


def test_videomae_tokens():
    from transformers import VideoMAEModel

    v = build_encoder(EncoderConfig(kind="videomae", model="videomae-tiny", pretrained="none",
                                    text_model="mambavl-tiny-clip", text_pretrained="none", device="cpu"))
    frames = np.random.default_rng(0).integers(0, 256, (2, 16, 64, 64, 3), dtype=np.uint8)
    out = v.encode_segments(frames)
    assert out.shape == (2, 8, 64) and v.tokens_per_segment(16) == 8
    assert isinstance(v.videomae, VideoMAEModel)
    x = torch.from_numpy(frames).permute(0, 1, 4, 2, 3).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 1, 3, 1, 1)
    with torch.no_grad():
        hidden = v.videomae(pixel_values=(x - mean) / std).last_hidden_state  # (2, 8 * 16, 64)
    assert torch.allclose(out, hidden.reshape(2, 8, 16, 64).mean(2), atol=1e-5)
    # other clip lengths are resampled to the model's 16 frames
    assert v.encode_segments(frames[:, :10]).shape == (2, 8, 64)


def test_grid_pooling_is_the_quadrant_means_of_projected_patch_tokens(enc):
    grid = build_encoder(EncoderConfig(**TINY, batch_size=5, pooling="grid"))
    assert grid.feature_dim == 4 * enc.feature_dim and grid.provenance()["tokens_per_frame_pooling"] == "grid"
    frames = np.random.default_rng(1).integers(0, 256, (2, 3, 64, 64, 3), dtype=np.uint8)
    feats = grid.encode_segments(frames)  # (2, 3, 4E)
    assert feats.shape == (2, 3, grid.feature_dim)
    # by hand: the ViT's tokens after ln_post, projected, patch grid 4x4 (64 px / 16), quadrant means
    x = grid._prepare(torch.from_numpy(frames.reshape(6, 64, 64, 3)))
    v = grid.clip.visual
    with torch.no_grad():
        tokens = v.ln_post(v.transformer(v._embeds(x)))[:, 1:] @ v.proj  # (6, 16, E)
    t = tokens.reshape(6, 4, 4, -1)
    quads = [t[:, :2, :2], t[:, :2, 2:], t[:, 2:, :2], t[:, 2:, 2:]]  # row-major quadrants
    expect = torch.cat([q.mean((1, 2)) for q in quads], dim=1).reshape(2, 3, -1)
    assert torch.allclose(feats, expect, atol=1e-4)
    # the tower is left as it was (returns the pooled embedding only)
    assert grid.clip.visual.output_tokens is False and grid.clip.encode_image(x).shape == (6, enc.feature_dim)
    with pytest.raises(InputError, match="pooling"):
        EncoderConfig(**TINY, pooling="max")


def test_text_tower_prefix_run_equals_full_context(enc):
    # the tower runs on the shortest prefix holding every real token; a long text in the batch lengthens it
    texts = ["Which object?", "what is the person doing with the " + "very " * 20 + "small thing?"]
    tokens, mask, pooled = enc.encode_text(texts)
    ids = enc.text.tokenizer(texts)
    captured = []
    hook = enc.clip.ln_final.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            full = enc.clip.encode_text(ids)  # the full 77-token context
    finally:
        hook.remove()
    assert enc.text._short_context()
    assert torch.allclose(pooled, full, atol=1e-5)
    assert torch.allclose(tokens, enc.text._project(captured[0][:, :16]), atol=1e-5)
