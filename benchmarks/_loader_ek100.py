"""`benchmarks/loader.py --ek100`: reading an EK-100-sized training cache, lazily from HDF5 vs whole in RAM.

    python benchmarks/loader.py --ek100 --workdir /tmp/mambavl-bench --json /tmp/bench/loader_ek100.json
    python benchmarks/loader.py --ek100 --smoke --workdir /tmp/x      # 2,048 rows, seconds

The cache has EK-100's training size, 67,217 segments x 16 frame tokens x 512 (CLIP ViT-B/16 image embeddings) in
float16 = 1.10 GB of features, one HDF5 chunk per segment (the writer's layout), written with the project's
`CacheWriter.write_block`. Free disk and RAM are checked first; the file is deleted at the end (--keep keeps
it). An *epoch read* is what the trainer's DataLoader does in an epoch: a seeded permutation cut into batches of 64,
`SegmentDataset` rows collated into (64, 16, 512) float32 batches, with 0 or 2 workers. Compared, interleaved:

  lazy_h5 wN        SegmentDataset(in_memory=False): each row read from the file (the OS page cache holds it: the
                    file was just written), N DataLoader workers
  in_memory wN      SegmentDataset(in_memory=True): the whole window read once into RAM (float16), rows from there
  load_whole        the one read that in_memory pays when the dataset is built (every epoch after it is free of I/O)

The model is left out: on CPU a model epoch over 67k segments takes far longer than the read, which the ratio to
the small-cache epoch in loader.py's default mode shows; here the question is what the read alone costs at full size
and whether loading the file whole pays. Headline: lazy_h5 epoch read (best of the worker counts) / in_memory epoch
read (best), and the number of epochs after which loading whole has paid for itself.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
from _common import fmt_s, headline, interleaved, machine_line, median, print_table, spread, write_json
from torch.utils.data import DataLoader

from mambavl.cache import schema
from mambavl.cache.dataset import SegmentDataset
from mambavl.cache.reader import fits_in_memory, open_cache
from mambavl.errors import available_memory_bytes
from mambavl.cache.writer import CacheWriter, RowMeta

EK100_TRAIN = 67_217
BLOCK = 4096


def write_cache(path: Path, n: int, frames: int, dim: int) -> float:
    """An n x frames x dim float16 cache (random features, EK-100-like labels); returns seconds taken."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    meta = RowMeta(
        narration_id=[f"P{i % 37 + 1:02d}_{i // 37 % 30 + 1:02d}_{i}" for i in range(n)],
        video_id=[f"P{i % 37 + 1:02d}_{i // 37 % 30 + 1:02d}" for i in range(n)],
        participant_id=[f"P{i % 37 + 1:02d}" for i in range(n)], narration=[""] * n,
        verb_class=rng.integers(0, 97, n).astype(np.int32), noun_class=rng.integers(0, 300, n).astype(np.int32),
        all_noun_classes=[()] * n, start_time=np.zeros(n), stop_time=np.full(n, 3.0),
    )
    attrs = dict(encoder="synthetic", model="ek100-sized", pretrained="none", feature_dim=dim, text_dim=dim,
                 frames_per_segment=frames, decoded_frames=frames)
    with CacheWriter(path, attrs, meta, [f"v{i}" for i in range(97)], [f"n{i}" for i in range(300)]) as w:
        times = np.tile(np.arange(frames, dtype=np.float32), (BLOCK, 1))
        for lo in range(0, n, BLOCK):
            k = min(n, lo + BLOCK) - lo
            # random bit patterns below 0x3C00: finite float16 values in [0, 1), far cheaper to draw than normals
            feats = rng.integers(0, 0x3C00, (k, frames, dim), dtype=np.uint16).view(np.float16)
            w.write_block(lo, feats, times[:k], np.full(k, frames), np.ones(k, dtype=bool), schema.RECOGNITION)
        w.finalize()
    return time.perf_counter() - t0


def epoch_read(ds: SegmentDataset, batch: int, workers: int, seed: int) -> int:
    """One epoch of batches as the trainer draws them; returns rows read."""
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [perm[i:i + batch] for i in range(0, len(perm), batch)]
    loader = DataLoader(ds, batch_sampler=batches, num_workers=workers,
                        generator=torch.Generator().manual_seed(0), persistent_workers=False)
    n = 0
    for b in loader:
        n += int(b["features"].shape[0])  # (B, F, D) float32
    return n


def run(args) -> None:
    n, frames, dim = (2048, 16, 512) if args.smoke else (EK100_TRAIN, 16, 512)
    repeats = args.repeats or (1 if args.smoke else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    nbytes = n * frames * dim * 2
    free_disk = shutil.disk_usage(work).free
    avail = available_memory_bytes()
    print(f"cache {n} x {frames} x {dim} float16 = {nbytes / 1e9:.2f} GB of features; free disk in {work}: "
          f"{free_disk / 1e9:.1f} GB; memory available: {avail / 1e9:.1f} GB; whole-file loading by default "
          f"(at most half the available memory): {'yes' if fits_in_memory(nbytes) else 'no'}")
    if free_disk < 1.5 * nbytes:
        raise SystemExit(f"not enough free disk in {work}: need {1.5 * nbytes / 1e9:.1f} GB")
    if avail < 2 * nbytes:
        raise SystemExit(f"not enough memory for the in-memory variant: need {2 * nbytes / 1e9:.1f} GB available")
    path = work / f"loader_ek100_{n}.h5"
    try:
        if not (args.keep and path.is_file()):
            path.unlink(missing_ok=True)
            t_write = write_cache(path, n, frames, dim)
            print(f"wrote {path.stat().st_size / 1e9:.2f} GB in {t_write:.1f} s "
                  f"({path.stat().st_size / 1e6 / t_write:.0f} MB/s, CacheWriter.write_block, blocks of {BLOCK})")
        cache = open_cache(path)
        rows = cache.valid_indices()
        lazy = SegmentDataset(cache, indices=rows, in_memory=False)
        t0 = time.perf_counter()
        eager = SegmentDataset(cache, indices=rows, in_memory=True)
        print(f"load whole (first, page cache warm from the write): {fmt_s(time.perf_counter() - t0)}")
        batch = args.batch
        fns = {}
        for workers in (0, 2):
            fns[f"lazy_h5 w{workers}"] = lambda w=workers: epoch_read(lazy, batch, w, 0)
            fns[f"in_memory w{workers}"] = lambda w=workers: epoch_read(eager, batch, w, 0)
        fns["load_whole"] = lambda: SegmentDataset(cache, indices=rows, in_memory=True)
        # the two paths return the same batches
        a = next(iter(DataLoader(lazy, batch_sampler=[list(range(0, n, 997))])))["features"]
        b = next(iter(DataLoader(eager, batch_sampler=[list(range(0, n, 997))])))["features"]
        if not torch.equal(a, b):
            raise SystemExit("lazy and in-memory reads disagree")
        times = interleaved(fns, repeats=repeats, warmup=0)
        med = {k: median(v) for k, v in times.items()}
        best_lazy = min((k for k in med if k.startswith("lazy")), key=med.get)
        best_mem = min((k for k in med if k.startswith("in_memory")), key=med.get)
        rows_out = [[k, fmt_s(med[k]), f"{spread(times[k]):.0%}",
                     f"{n / med[k]:,.0f}" if k != "load_whole" else "-",
                     f"{med[k] / med[best_mem]:.2f}x"] for k in fns]
        print_table(["read", "time", "spread", "rows/s", "vs best in_memory epoch"], rows_out,
                    title=f"epoch read of {n} rows in batches of {batch}, median of {repeats} (interleaved)")
        ratio = med[best_lazy] / med[best_mem]
        saved = med[best_lazy] - med[best_mem]
        payback = med["load_whole"] / saved if saved > 0 else float("inf")
        print(f"per row: lazy {fmt_s(med[best_lazy] / n)} ({best_lazy}), in memory {fmt_s(med[best_mem] / n)} "
              f"({best_mem}); loading whole ({fmt_s(med['load_whole'])}) pays back after {payback:.2f} epochs")
        write_json(args.json, {"args": vars(args), "rows": n, "frames": frames, "dim": dim, "feature_bytes": nbytes,
                               "times": times, "median_s": med, "lazy_vs_in_memory": ratio,
                               "load_whole_payback_epochs": payback, "machine": machine_line()})
        cache.close()
        print(headline("ek100_lazy_epoch_read_vs_in_memory", ratio, "x", "report", True,
                       f"({best_lazy} {fmt_s(med[best_lazy])} vs {best_mem} {fmt_s(med[best_mem])}; load whole "
                       f"{fmt_s(med['load_whole'])}, pays back after {payback:.2f} epochs)"))
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
