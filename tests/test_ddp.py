"""DistributedDataParallel on 2 CPU processes (gloo) launched by torch.distributed.run, one epoch on a tiny cache."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import torch

from mambavl.cache.synthetic import make_planted_cache
from mambavl.runtime import load_checkpoint

WORKER = textwrap.dedent(
    """
    import hashlib, os, sys
    import torch
    torch.set_num_threads(1)
    from mambavl.train import TrainConfig, train

    train_cache, val_cache, out = sys.argv[1:4]
    result = train(TrainConfig(train_cache=train_cache, val_cache=val_cache, out_dir=out, epochs=1, batch_size=4,
                               frames=4, qa_every=1, model_overrides={"d_model": 32, "n_layers": 1}))
    digest = hashlib.sha256()
    for name, tensor in sorted(result.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    rank = os.environ["RANK"]
    # Written beside the run folder, not in it: only rank 0 writes into the run.
    with open(f"{out}.rank{rank}", "w") as f:
        f.write(f"{digest.hexdigest()} {result.last_checkpoint} {result.history[-1]['rec_steps']}")
    """
)


def test_ddp_two_cpu_processes(tmp_path):
    n = 22
    train_cache = make_planted_cache(tmp_path / "train.h5", n=n, seed=0)
    val_cache = make_planted_cache(tmp_path / "val.h5", n=12, seed=1)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(script), str(train_cache), str(val_cache), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    hash0, last0, steps0 = (tmp_path / "run.rank0").read_text().split()
    hash1, last1, steps1 = (tmp_path / "run.rank1").read_text().split()
    # rank 0 owns the run folder; rank 1 reports no checkpoint
    assert last0 == str(out / "last.pt") and last1 == "None"
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file() and (out / "metrics.csv").is_file()
    # each rank trained on its half of the (padded) permutation: ceil(ceil(22 / 2) / 4) = 3 steps
    assert int(steps0) == int(steps1) == math.ceil(math.ceil(n / 2) / 4)
    # gradients were averaged: both ranks end with identical weights, the ones rank 0 saved
    assert hash0 == hash1
    _, ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["step"] == int(steps0)
    assert torch.load(out / "last.pt", weights_only=True)["history"][0]["qa_steps"] == int(steps0)
