"""Linear-probe baselines on planted caches: the ordered probe reads motion, the mean probe cannot."""

from __future__ import annotations

import pytest

from mambavl.analysis.probe import ProbeConfig, probe_features, run_probe
from mambavl.cache.reader import open_cache
from mambavl.cache.synthetic import make_planted_cache
from mambavl.errors import InputError


@pytest.fixture(scope="module")
def order_only(tmp_path_factory):
    """Caches whose verbs differ only in the order of frames (no verb appearance), nouns only in appearance."""
    d = tmp_path_factory.mktemp("probe")
    kw = dict(num_verbs=4, num_nouns=3, frames=8, dim=16, verb_appearance=0.0, noise=0.3)
    return make_planted_cache(d / "train.h5", n=160, seed=0, **kw), make_planted_cache(d / "val.h5", n=80, seed=1, **kw)


def test_probe_inputs_shapes_and_order(order_only):
    cache = open_cache(order_only[0])
    rows = cache.valid_indices()[:5]
    concat = probe_features(cache, rows, 4, "concat")
    mean = probe_features(cache, rows, 4, "mean")
    assert concat.shape == (5, 4 * 16) and mean.shape == (5, 16)
    # concat keeps the frames in order; their mean is the mean probe's input
    assert concat.reshape(5, 4, 16).mean(1) == pytest.approx(mean, abs=1e-5)


def test_ordered_probe_reads_motion_and_mean_probe_cannot(order_only):
    concat = run_probe(ProbeConfig(*order_only, input="concat", frames=8))
    mean = run_probe(ProbeConfig(*order_only, input="mean", frames=8))
    for res in (concat, mean):
        m = res["metrics"]
        assert set(m) >= {"val_verb_top1", "val_verb_top5", "val_noun_top1", "val_action_top1", "val_action_top5"}
        assert m["val_noun_top1"] >= 90  # nouns are appearance: both probes see them
        assert m["val_verb_top5"] >= m["val_verb_top1"] and m["val_action_top1"] <= m["val_verb_top1"]
    assert concat["metrics"]["val_verb_top1"] >= 90
    # the frame mean of an order-only verb is noise: the mean probe does no better than the majority class
    majority = 100 * max(open_cache(order_only[1]).labels()["verb_class"].tolist().count(v) for v in range(4)) / 80
    assert mean["metrics"]["val_verb_top1"] <= majority + 12
    assert concat["params"] == (8 * 16 + 1) * (4 + 3) and mean["params"] == (16 + 1) * (4 + 3)
    # deterministic: the same fit twice gives the same numbers
    assert run_probe(ProbeConfig(*order_only, input="concat", frames=8))["metrics"] == concat["metrics"]


def test_probe_refuses_bad_input(order_only, tmp_path):
    with pytest.raises(InputError, match="input"):
        ProbeConfig(*order_only, input="max")
    other = make_planted_cache(tmp_path / "other.h5", n=20, num_verbs=3, num_nouns=3, dim=16, frames=8)
    with pytest.raises(InputError):
        run_probe(ProbeConfig(order_only[0], other))
