"""DistributedDataParallel on 2 CPU processes (gloo, launched by torch.distributed.run) against one process with the
same global batch: the same loss curve (recognition and QA steps, the last uneven batch included), the same
validation over the whole split with fallbacks summed, and checkpoint/resume under DDP as in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

from mambavl.cache.synthetic import make_planted_cache
from mambavl.runtime import TrainedModel
from mambavl.train import TrainConfig, train

# Tolerance of the comparison with one process: the same arithmetic, with the gradient of a global batch summed
# in two halves by the all-reduce instead of in one pass, so float32 rounding differs. Measured: epoch losses within
# ~1e-7 relative, weights within 6e-8 after 18 optimiser steps.
RTOL = 1e-5
ATOL_WEIGHTS = 1e-6

PER_RANK_BATCH = 4
N_TRAIN = 21  # global batches of 8: 8, 8, 5 -> the last split 3 / 2 across the ranks


# Dropout off: each rank draws its own dropout masks, so with dropout the runs agree only in distribution.
SETTINGS = dict(epochs=3, frames=4, qa_every=1, question_source="annotation", device="cpu", min_steps=0,
                model_overrides={"d_model": 32, "n_layers": 1, "dropout": 0.0})


def config(train_cache, val_cache, out, batch_size, **kw):
    return TrainConfig(train_cache=str(train_cache), val_cache=str(val_cache), out_dir=str(out),
                       batch_size=batch_size, **SETTINGS, **kw)


WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    torch.set_num_threads(1)
    from mambavl.train import TrainConfig, train

    train_cache, val_cache, out, batch_size, settings = sys.argv[1:6]
    rank = os.environ["RANK"]

    def config(out, **kw):
        return TrainConfig(train_cache=train_cache, val_cache=val_cache, out_dir=out, batch_size=int(batch_size),
                           **json.loads(settings), **kw)

    def digest(model):
        h = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    full = train(config(out))
    # the same run stopped after one epoch and resumed (every rank loads rank 0's checkpoint)
    train(config(out + "_resumed"), stop_after_epochs=1)
    resumed = train(config(out + "_resumed", resume=True))
    with open(f"{out}.rank{rank}.json", "w") as f:  # beside the run folder: only rank 0 writes into the run
        json.dump({"full": digest(full.model), "resumed": digest(resumed.model), "history": full.history,
                   "last": str(full.last_checkpoint)}, f)
    """
)


def _caches(tmp_path):
    train_cache = make_planted_cache(tmp_path / "train.h5", n=N_TRAIN, seed=0)
    val_cache = make_planted_cache(tmp_path / "val.h5", n=11, seed=1)
    for path, rows in ((train_cache, [2, 9, 17]), (val_cache, [0, 5, 10])):
        with h5py.File(path, "r+") as f:  # some rows without their annotation question: they fall back, counted
            table = f["questions/per_segment/annotation"]
            t = table[()]
            t[rows, 1] = -1
            table[...] = t
    return train_cache, val_cache


def _launch(train_cache, val_cache, out, settings: dict) -> tuple[dict, dict]:
    """Run WORKER in 2 gloo processes under torchrun; return what ranks 0 and 1 reported."""
    script = out.parent / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(train_cache), str(val_cache), str(out), str(PER_RANK_BATCH), json.dumps(settings)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tuple(json.loads((out.parent / f"{out.name}.rank{r}.json").read_text()) for r in (0, 1))


@pytest.mark.timeout(1800)  # three trainings in one 2-process launch: ~2-5 min on 2 busy cores
def test_ddp_two_processes_equal_one_process(tmp_path):
    train_cache, val_cache = _caches(tmp_path)
    out = tmp_path / "ddp"
    r0, r1 = _launch(train_cache, val_cache, out, SETTINGS)

    # one process, the same global batch
    single = train(config(train_cache, val_cache, tmp_path / "single", 2 * PER_RANK_BATCH))

    # both ranks hold the same weights; rank 0 alone wrote the run
    assert r0["full"] == r1["full"] and r0["last"] == str(out / "last.pt") and r1["last"] == "None"
    # resuming under DDP replays the uninterrupted DDP run exactly
    assert r0["resumed"] == r0["full"] and r1["resumed"] == r1["full"]

    ddp_hist, one_hist = r0["history"], single.history
    assert len(ddp_hist) == len(one_hist) == 3
    for a, b in zip(ddp_hist, one_hist):
        assert a["rec_steps"] == b["rec_steps"] == 3 and a["qa_steps"] == b["qa_steps"] == 3
        for key in ("train_loss", "train_loss_verb", "train_loss_noun", "train_loss_action", "train_loss_qa"):
            assert np.isclose(a[key], b[key], rtol=RTOL, atol=0), (key, a[key], b[key])
        # validation covered the whole split once: the same metrics, fallbacks summed over ranks, not averaged
        for key in ("val_verb_top1", "val_noun_top1", "val_action_top1", "val_verb_top5"):
            assert np.isclose(a[key], b[key], rtol=RTOL, atol=1e-6), (key, a[key], b[key])
        assert a["val_question_fallbacks"] == b["val_question_fallbacks"] == 3
        assert a["question_fallbacks"] == b["question_fallbacks"] == 3

    run = TrainedModel.load(out / "last.pt")
    model = run.model()
    ref = single.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, ref[name], rtol=0, atol=ATOL_WEIGHTS), name
    assert run.progress.epoch == 3 and run.progress.step == 9
    assert run.progress.history[0]["qa_steps"] == 3


@pytest.mark.timeout(1800)
def test_ddp_self_questioning_equals_one_process(tmp_path):
    """--questions predicted under DDP: the cross-fitted candidates (sent from rank 0) and the run equal one process
    with the same global batch; the first pass travels in the checkpoint, so resuming replays exactly."""
    train_cache, val_cache = _caches(tmp_path)
    settings = dict(SETTINGS, question_source="predicted", candidates_k=2, candidate_folds=2, epochs=2)
    out = tmp_path / "ddp"
    r0, r1 = _launch(train_cache, val_cache, out, settings)
    single = train(TrainConfig(train_cache=str(train_cache), val_cache=str(val_cache), out_dir=str(tmp_path / "one"),
                               batch_size=2 * PER_RANK_BATCH, **settings))
    assert r0["full"] == r1["full"] and r0["resumed"] == r0["full"]
    for a, b in zip(r0["history"], single.history, strict=True):
        for key in ("train_candidate_recall_verb", "train_candidate_recall_noun", "val_candidate_recall_verb"):
            assert a[key] == b[key], key
        for key in ("train_loss", "train_loss_qa", "val_verb_top1"):
            assert np.isclose(a[key], b[key], rtol=RTOL, atol=1e-6), (key, a[key], b[key])
    ddp_run = TrainedModel.load(out / "last.pt")
    one_run = TrainedModel.load(tmp_path / "one" / "last.pt")
    assert torch.equal(ddp_run.train_candidates, one_run.train_candidates)
    for name, tensor in ddp_run.weights.items():
        assert torch.allclose(tensor, one_run.weights[name], rtol=0, atol=ATOL_WEIGHTS), name


def test_process_group_is_joined_once_and_kept(tmp_path):
    """A second run in the same process reuses the group (a destroyed and re-created group under one torchrun launch
    can read its predecessor's stale gloo addresses); a group of another rank or size is refused."""
    script = tmp_path / "join.py"
    script.write_text(textwrap.dedent(
        """
        import torch.distributed as dist
        from mambavl.device import join_process_group
        join_process_group("gloo")
        group = dist.group.WORLD
        join_process_group("gloo")  # already joined: the same group
        assert dist.group.WORLD is group and dist.get_world_size() == 1
        try:
            join_process_group("gloo", rank=0, world_size=2)
        except RuntimeError as exc:
            assert "rank 0 of 1" in str(exc)
        else:
            raise AssertionError("a group of another size was accepted")
        print("ok")
        """))
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
