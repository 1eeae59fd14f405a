"""Order of frames must reach the heads: on order-defined verbs (`make_order_cache`), the default model must tell a
clip from its time-reversed copy, which the frame-mean probe (and any order-blind model) cannot."""

from __future__ import annotations

import numpy as np
import pytest

from mambavl.analysis.probe import ProbeConfig, run_probe
from mambavl.cache.reader import open_cache
from mambavl.cache.synthetic import ORDER_VERBS, make_order_cache, reversed_verb
from mambavl.runtime import TrainedModel, predict_scores
from mambavl.train import TrainConfig, train


@pytest.fixture(scope="module")
def order_caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("order")
    return (make_order_cache(d / "train.h5", n=192, seed=0, dim=32, reversed_pairs=True),
            make_order_cache(d / "pairs.h5", n=96, seed=1, dim=32, reversed_pairs=True))


def test_order_cache_pairs_are_time_reversed(tmp_path):
    cache = open_cache(make_order_cache(tmp_path / "pairs.h5", n=12, dim=16, noise=0.0, reversed_pairs=True))
    feats = np.asarray(cache.h5()["features"][()], dtype=np.float32)  # (n, F, D)
    verbs = np.asarray(cache.h5()["verb_class"][()])
    assert list(cache.verb_keys) == [v[0] for v in ORDER_VERBS]
    assert (verbs[1::2] == reversed_verb(verbs[0::2])).all()
    assert np.array_equal(feats[1::2], feats[0::2, ::-1])  # the same frames, in the opposite order


def test_default_model_reads_the_order_of_frames(order_caches, tmp_path):
    """The default preset (joint scan, template questions), trained briefly, must get both clips of many reversed
    pairs right — impossible without the order: an order-blind model scores a clip and its reversal alike, so it
    is right on at most one of each pair — and beat the frame-mean probe clearly."""
    train_cache, pairs = order_caches
    mean_probe = run_probe(ProbeConfig(train_cache, pairs, input="mean"))["metrics"]["val_verb_top1"]
    result = train(TrainConfig(
        train_cache=train_cache, val_cache=pairs, out_dir=tmp_path / "run", model_overrides={"d_model": 32},
        epochs=4, patience=0, batch_size=16, lr=3e-3, min_steps=200, device="cpu", logger="none", seed=0))
    run = TrainedModel.load(result.last_checkpoint)
    scores = predict_scores(run.model(), pairs, window=run.spec.window, question_source=run.question_source,
                            frames=run.train_config.frames)
    order = np.argsort(np.asarray(scores["indices"]))
    right = np.asarray(scores["verb"]).argmax(-1)[order] == np.asarray(open_cache(pairs).h5()["verb_class"][()])
    both = float((right[0::2] & right[1::2]).mean() * 100)  # % of pairs with the clip and its reversal right
    verb = float(right.mean() * 100)
    assert mean_probe <= 50.0
    assert both >= 15.0 and verb >= mean_probe + 10.0, (both, verb, mean_probe)
