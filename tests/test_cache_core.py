"""Writer/reader round trip, done-flags, resume refusal, lazy vs in-memory reads, fork-safe workers."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mambavl.cache import schema
from mambavl.cache.dataset import SegmentDataset
from mambavl.cache.reader import open_cache
from mambavl.cache.synthetic import make_planted_cache
from mambavl.cache.writer import CacheWriter, RowMeta
from mambavl.errors import InputError


def _rows(n: int) -> RowMeta:
    return RowMeta(
        narration_id=[f"P01_01_{i}" for i in range(n)], video_id=["P01_01"] * n, participant_id=["P01"] * n,
        narration=["take cup"] * n, verb_class=np.zeros(n, np.int32), noun_class=np.ones(n, np.int32),
        all_noun_classes=[(1, 2)] * n, start_time=np.arange(n, dtype=float), stop_time=np.arange(n) + 0.5,
    )


ATTRS = dict(encoder="clip", model="tiny", pretrained="none", feature_dim=4, text_model="tiny", text_dim=3,
             frames_per_segment=3, annotation_sha256="abc")


def test_round_trip_and_padding(tmp_path):
    path = tmp_path / "c.h5"
    with CacheWriter(path, ATTRS, _rows(3), ["take"], ["cup", "plate"]) as w:
        w.write_row(0, np.ones((3, 4)), [0.1, 0.2, 0.3])
        w.write_row(2, np.full((2, 4), 2.0), [1.0, 1.5])  # fps mode: fewer tokens than F, zero padded
        w.record_failure(1, schema.RECOGNITION, "missing video")
        assert w.finalize() is True
    cache = open_cache(path)
    assert cache.valid_indices().tolist() == [0, 2]
    assert cache.failures() == [{"index": 1, "narration_id": "P01_01_1", "window": "recognition",
                                 "reason": "missing video"}]
    ds = SegmentDataset(cache)
    item = ds[1]
    assert item["index"].item() == 2 and item["num_frames"].item() == 2
    assert torch.equal(item["features"][2], torch.zeros(4)) and torch.all(item["features"][:2] == 2.0)
    assert cache.labels()["all_noun_classes"][0].tolist() == [1, 2]
    assert cache.noun_keys == ["cup", "plate"]


def test_resume_refuses_other_attrs_and_keeps_rows(tmp_path):
    path = tmp_path / "c.h5"
    with CacheWriter(path, ATTRS, _rows(2), ["take"], ["cup"]) as w:
        w.write_row(0, np.ones((3, 4)), [0, 1, 2])
    with pytest.raises(InputError, match="'model'"):
        CacheWriter(path, {**ATTRS, "model": "other"}, _rows(2), ["take"], ["cup"])
    with CacheWriter(path, ATTRS, _rows(2), ["take"], ["cup"]) as w:
        assert w.resumed and w.pending_rows() == [1]
        w.write_row(1, np.ones((3, 4)), [0, 1, 2])
        assert w.finalize()
    assert open_cache(path).valid_indices().tolist() == [0, 1]


def test_done_flag_written_after_data(tmp_path, monkeypatch):
    """A crash between the row's data and its flag leaves the row uncounted."""
    path = tmp_path / "c.h5"
    w = CacheWriter(path, ATTRS, _rows(2), ["take"], ["cup"])
    calls = []
    real_flush = w.f.flush

    def crash_on_second_flush():
        calls.append(1)
        real_flush()
        if len(calls) == 1:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(w.f, "flush", crash_on_second_flush)
    with pytest.raises(RuntimeError):
        w.write_row(0, np.ones((3, 4)), [0, 1, 2])
    w.close()
    with h5py.File(path) as f:
        assert not f["valid"][0]


def test_validation_names_attribute(tmp_path):
    path = make_planted_cache(tmp_path / "a.h5", n=10)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(InputError, match="schema_version"):
        open_cache(path)
    other = make_planted_cache(tmp_path / "b.h5", n=10, dim=16)
    ref = make_planted_cache(tmp_path / "c.h5", n=10)
    with pytest.raises(InputError, match="feature_dim"):
        open_cache(other, expect=open_cache(ref).attrs)
    with pytest.raises(InputError, match="does not exist"):
        open_cache(tmp_path / "nope.h5")


def test_lazy_equals_in_memory_and_workers(tmp_path):
    path = make_planted_cache(tmp_path / "p.h5", n=40, anticipation=True, invalid_rows=3)
    cache = open_cache(path)
    eager, lazy = SegmentDataset(cache, in_memory=True), SegmentDataset(cache, in_memory=False)
    assert len(eager) == len(lazy) == 37
    for i in (0, 17, 36):
        assert torch.equal(eager[i]["features"], lazy[i]["features"])
    # h5py handles must be opened per worker, never inherited across fork
    loader = DataLoader(SegmentDataset(cache, in_memory=False), batch_size=8, num_workers=2)
    rows = torch.cat([b["index"] for b in loader])
    assert rows.tolist() == cache.valid_indices().tolist()
    ant = SegmentDataset(cache, window=schema.ANTICIPATION)
    assert not torch.equal(ant[0]["features"], eager[0]["features"])
