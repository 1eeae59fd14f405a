"""Every entry point that reads caches closes them when it returns or raises (`mambavl.cache.reader.cache_scope`).

A handle left open until the garbage collector finds it made a cache that had just been trained or evaluated on
unwritable in the same process ("file is already open for read-only"): re-extracting, fixing or appending to it in a
notebook or a test failed depending on when the collector ran. The collector is switched off here, so a leaked
handle fails every time.
"""

from __future__ import annotations

import gc
from pathlib import Path

import h5py
import pytest

from mambavl.analysis.probe import ProbeConfig, run_probe
from mambavl.analysis.zeroshot import ZeroShotConfig, zero_shot_evaluate
from mambavl.cache.reader import cache_scope, open_cache
from mambavl.cache.synthetic import make_planted_cache
from mambavl.errors import InputError
from mambavl.evaluate import EvalConfig, evaluate
from mambavl.runtime import TrainedModel, predict_scores
from mambavl.train import TrainConfig, train


@pytest.fixture()
def no_gc():
    was = gc.isenabled()
    gc.disable()
    yield
    if was:
        gc.enable()


def _writable(*paths: Path) -> None:
    for path in paths:
        with h5py.File(path, "a") as f:  # raises OSError while any read handle of this process is open
            f.attrs["touched"] = 1


@pytest.fixture()
def caches(tmp_path):
    return {s: make_planted_cache(tmp_path / f"{s}.h5", n=n, seed=i, frames=4, dim=16, text_dim=16)
            for i, (s, n) in enumerate((("train", 32), ("val", 16)))}


def _train(caches, tmp_path, **kw):
    cfg = TrainConfig(train_cache=str(caches["train"]), val_cache=str(caches["val"]), out_dir=str(tmp_path / "run"),
                      model_overrides={"d_model": 16, "n_layers": 1}, epochs=1, frames=4, batch_size=8, min_steps=0,
                      device="cpu", **kw)
    return train(cfg)


def test_train_evaluate_probe_zero_shot_leave_no_handle(no_gc, caches, tmp_path):
    result = _train(caches, tmp_path)
    _writable(caches["train"], caches["val"])
    evaluate(EvalConfig(checkpoint=str(result.last_checkpoint), cache=str(caches["val"]),
                        out_dir=str(tmp_path / "eval"), device="cpu"))
    _writable(caches["train"], caches["val"])
    run_probe(ProbeConfig(str(caches["train"]), str(caches["val"])))
    _writable(caches["train"], caches["val"])
    zero_shot_evaluate(ZeroShotConfig(cache=str(caches["val"]), out_dir=str(tmp_path / "zs")))
    _writable(caches["val"])


def test_a_refused_run_leaves_no_handle(no_gc, caches, tmp_path):
    with pytest.raises(InputError, match="anticipation") as refused:
        _train(caches, tmp_path, task="anticipation")  # refused after opening: the caches have no such window
    # the traceback is kept (as an interactive session keeps the last one), and with it the frames that held the
    # opened caches
    assert refused.tb is not None
    _writable(caches["train"], caches["val"])


def test_a_scope_closes_what_was_opened_in_it_and_the_handle_reopens(caches):
    cache = open_cache(caches["train"])
    outer = cache.h5()
    with cache_scope():
        other = open_cache(caches["val"])
        inner = other.h5()
    assert outer.id.valid and not inner.id.valid  # the outer handle predates the scope
    assert other.n == 16 and other.h5().id.valid  # used again: reopened
    cache.close()
    other.close()
    _writable(caches["train"], caches["val"])


def test_nested_scopes_close_their_own_handles_whatever_they_opened(caches):
    train_cache, val_cache = open_cache(caches["train"]), open_cache(caches["val"])
    with cache_scope():
        with cache_scope():
            pass  # an inner scope that opens nothing (an entry point given an already open cache)
        outer = train_cache.h5()  # opened in the outer scope after the inner one ended
        with cache_scope():
            view = val_cache.view()  # two handles on one file (the audit's label-permuted view)
            first, second = val_cache.h5(), view.h5()
        assert not first.id.valid and not second.id.valid
        assert outer.id.valid
    assert not outer.id.valid
    _writable(caches["train"], caches["val"])


def test_a_scope_closes_its_handles_when_the_block_raises(caches):
    cache = open_cache(caches["train"])
    with pytest.raises(RuntimeError, match="inside"):
        with cache_scope():
            cache.h5()
            raise RuntimeError("inside")
    _writable(caches["train"])
    assert cache.n == 32 and cache.h5().id.valid  # reopened on use
    cache.close()


def test_predict_scores_closes_a_cache_it_opened_and_leaves_a_given_one_open(no_gc, caches, tmp_path):
    run = TrainedModel.load(_train(caches, tmp_path).last_checkpoint)
    model = run.model()
    predict_scores(model, str(caches["val"]), frames=4)  # a path: opened and closed here
    _writable(caches["val"])
    cache = open_cache(caches["val"])  # its file is first opened inside the call
    predict_scores(model, cache, frames=4)
    handle = cache._h5  # the handle the call opened: the caller's, so left open (an open walks the whole file)
    assert handle is not None and handle.id.valid
    predict_scores(model, cache, frames=4)
    assert cache._h5 is handle  # not reopened
    cache.close()
    _writable(caches["val"])
