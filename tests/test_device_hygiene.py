"""Device hygiene without a GPU: training steps, cache scoring and predict's model path run with the model and the
batches on another device than the CPU, and every tensor created on the wrong device fails the test.

The other device is `meta` as seen from the outside, with real numbers inside: `OnDevice` is a tensor subclass that
says it lives on meta and holds a CPU tensor, and `DeviceCheck` (a TorchDispatchMode) runs every aten op on the
held tensors. It plays the part of a GPU that shares no memory with the host:

* an op that mixes a tensor on the device with a CPU tensor of one or more dimensions raises, as CUDA does (a
  zero-dimensional CPU tensor is a scalar operand, which CUDA accepts too; copies and indexing with CPU indices are
  transfers, which CUDA accepts as well);
* a factory op asked for the device (`torch.zeros(..., device=x.device)`, `.to(device)`) makes a device tensor;
  one asked for nothing makes a CPU tensor, which fails as soon as it meets the device's tensors;
* a random op asked for the device but given a CPU generator raises (CUDA refuses the generator).

Unlike the real meta device (no values) or FakeTensorMode (no data-dependent control flow), the run computes real
numbers, so the loop's finiteness checks, `.item()` and the validation metrics work as on a GPU.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from mambavl.cache.dataset import SegmentDataset
from mambavl.cache.reader import open_cache
from mambavl.cache.synthetic import make_planted_cache
from mambavl.runtime import Asker, TrainedModel, clip_batches, head_logits, predict_scores, present, qa_logits
from mambavl.runtime.task import spec_of_window
from mambavl.train import TrainConfig, train

DEVICE = torch.device("meta")
aten = torch.ops.aten

# Ops that legitimately take a CPU tensor beside device tensors: copies between devices, and indexing a device
# tensor with CPU indices (torch moves them).
TRANSFERS = {aten._to_copy.default, aten.copy_.default, aten.index.Tensor, aten.index_put_.default,
             aten.index_put.default, aten._index_put_impl_.default}


class WrongDevice(AssertionError):
    """A tensor on the CPU met the device's tensors (or a CPU generator drew for the device)."""


class OnDevice(torch.Tensor):
    """A CPU tensor (`elem`) that says it lives on DEVICE."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad)
        out.elem = elem.detach()
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return run_op(func, args, kwargs or {})


def _is_device(value) -> bool:
    return isinstance(value, torch.device) and value.type == DEVICE.type or value == DEVICE.type


def run_op(func, args, kwargs):
    """Run aten op `func` on the CPU tensors the OnDevice arguments hold; outputs of ops on device tensors (or asked
    for the device) come back as OnDevice. WrongDevice for a CPU tensor mixed into an op on device tensors."""
    flat, _ = tree_flatten((args, kwargs))
    on_device = any(isinstance(a, OnDevice) for a in flat)
    asked = _is_device(kwargs.get("device"))
    if on_device and func not in TRANSFERS:
        stray = [a for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, OnDevice) and a.dim() > 0]
        if stray:
            raise WrongDevice(f"{func}: a {tuple(stray[0].shape)} tensor on {stray[0].device} mixed with tensors "
                              f"on {DEVICE}")
    gen = kwargs.get("generator")
    if asked and gen is not None and gen.device.type == "cpu":
        raise WrongDevice(f"{func}: a CPU generator draws for a tensor on {DEVICE}")
    if asked:
        kwargs = {**kwargs, "device": torch.device("cpu")}
    wrappers = {id(a.elem): a for a in flat if isinstance(a, OnDevice)}
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    if func is aten._to_copy.default and "device" in kwargs and not asked:
        return out  # to the CPU
    if not (on_device or asked):
        return out

    def wrap(t):
        if not isinstance(t, torch.Tensor):
            return t
        same = wrappers.get(id(t))  # an in-place op returns its (wrapped) argument
        return same if same is not None else OnDevice(t)

    return tree_map(wrap, out)


def _unwrap(a):
    return a.elem if isinstance(a, OnDevice) else a


class _Ops(TorchDispatchMode):
    """Every aten op inside runs through `run_op` (factory ops included, which no tensor argument would route)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return run_op(func, args, kwargs or {})


# Constructors from Python data build their tensor below the dispatcher (it would arrive as a real, empty meta
# tensor): they are built on the CPU and moved to the device instead.
FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}


class _FromData(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FROM_DATA and _is_device(kwargs.get("device")):
            return OnDevice(func(*args, **{**kwargs, "device": "cpu"}))
        return func(*args, **kwargs)


@contextmanager
def on_device():
    """Run the block with DEVICE emulated (see the module docstring)."""
    with _FromData(), _Ops():
        yield


# ----------------------------------------------------------------------------------------------------------------
# the checker itself


def test_the_check_catches_a_cpu_tensor_and_keeps_the_numbers():
    with on_device():
        x = torch.arange(6.0).to(DEVICE)
        y = (x * 2 + torch.ones(6, device=x.device)).sum()
        assert y.device == DEVICE and float(y) == 36.0
        assert float(x[torch.tensor([1, 2])].sum()) == 3.0  # CPU indices are a transfer
        assert float((x + torch.tensor(1.0)).sum()) == 21.0  # a CPU scalar operand, as CUDA allows
        with pytest.raises(WrongDevice, match="mixed with tensors on meta"):
            x + torch.zeros(6)  # no device=: a CPU tensor
        with pytest.raises(WrongDevice, match="CPU generator"):
            torch.randint(5, (3,), generator=torch.Generator(), device=DEVICE)


# ----------------------------------------------------------------------------------------------------------------
# the runtime on the device


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("hygiene")
    return (make_planted_cache(d / "train.h5", n=32, seed=0, anticipation=True),
            make_planted_cache(d / "val.h5", n=16, seed=1))


def test_training_scoring_and_predict_on_another_device(caches, tmp_path):
    train_cache, val_cache = caches
    cfg = TrainConfig(train_cache=str(train_cache), val_cache=str(val_cache), out_dir=str(tmp_path / "run"),
                      model_overrides={"d_model": 16, "n_layers": 1}, epochs=1, batch_size=16, frames=4, min_steps=0,
                      qa_every=1, device=DEVICE.type, logger="none")
    with on_device():
        result = train(cfg)  # recognition and QA steps, validation, the checkpoint
    assert result.history[-1]["rec_steps"] == 2 and result.history[-1]["qa_steps"] == 2
    assert np.isfinite(result.history[-1]["train_loss"])
    model = result.model
    assert next(model.parameters()).device == DEVICE
    run = TrainedModel.load(result.last_checkpoint)  # written from the device: loads on the CPU
    assert all(w.device.type == "cpu" for w in run.weights.values())

    cache = open_cache(val_cache)
    with on_device():
        scores = predict_scores(model, cache, device=DEVICE, frames=4)  # evaluation's cache scoring
    assert scores["verb"].shape == (16, 6) and np.isfinite(scores["verb"]).all()

    # predict's model path: a freshly encoded clip presented to the model, its heads and its QA answers
    asker = Asker.of_cache(cache, spec_of_window("recognition"), action_answers=run.action_answers)
    with on_device():
        batch = next(iter(clip_batches(SegmentDataset(cache, indices=np.array([0, 1])), 2, 4, DEVICE)))
        clip = present(batch.video.cpu(), batch.mask.sum(1).cpu(), 4, DEVICE)
        heads, _ = head_logits(model, [clip], asker)
        qa = qa_logits(model, [clip], asker)
    assert heads["verb"].shape == (2, 6) and heads["verb"].device.type == "cpu"
    assert set(qa) >= {"verb", "noun", "indices"}


@pytest.mark.parametrize("preset", ["paper", "disjoint-A", "video-only", "transformer", "concat"])
def test_every_fusion_trains_on_another_device(caches, tmp_path, preset):
    """The other layouts and fusions (parallel scans, a grouped A, no question, the baselines): one recognition and
    one QA step on the device, on the anticipation window."""
    cfg = TrainConfig(train_cache=str(caches[0]), val_cache=None, out_dir=str(tmp_path / preset), preset=preset,
                      model_overrides={"d_model": 16}, task="anticipation", epochs=1, batch_size=32, frames=4,
                      min_steps=0, qa_every=1, device=DEVICE.type, logger="none")
    with on_device(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the paper layout's warning about template questions
        result = train(cfg)
    assert result.history[0]["qa_steps"] == 1 and np.isfinite(result.history[0]["train_loss"])


def test_self_questioning_on_another_device(caches, tmp_path):
    """Predicted questions: the cross-fitted first pass trains on the device, and scoring a cache asks each row its
    candidates (first-pass probabilities, candidate tables, candidate questions)."""
    train_cache, val_cache = caches
    cfg = TrainConfig(train_cache=str(train_cache), val_cache=str(val_cache), out_dir=str(tmp_path / "run"),
                      model_overrides={"d_model": 16, "n_layers": 1}, question_source="predicted", candidates_k=2,
                      candidate_folds=2, epochs=1, batch_size=16, frames=4, min_steps=0, device=DEVICE.type,
                      logger="none")
    with on_device():
        result = train(cfg)
    run = TrainedModel.load(result.last_checkpoint)
    with on_device():
        first_pass = run.first_pass_models(DEVICE)
        scores = predict_scores(result.model, open_cache(val_cache), question_source="predicted", device=DEVICE,
                                frames=4, first_pass=first_pass)
    assert scores["candidates"].shape == (16, 2, 2) and np.isfinite(scores["verb"]).all()
