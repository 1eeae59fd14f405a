"""Training-epoch cost of reading the HDF5 feature cache lazily, against the same epoch from in-memory tensors.

    python benchmarks/loader.py --workdir /tmp/mambavl-bench    # builds the cache there, 3 interleaved epochs each
    python benchmarks/loader.py --smoke --workdir /tmp/x         # tiny sizes, seconds
    python benchmarks/loader.py --ek100 --workdir /tmp/mambavl-bench   # EK-100-sized cache: see loader_ek100.py

A planted-structure cache (`mambavl.cache.synthetic.make_planted_cache`, written through the real cache writer:
float16 features, one HDF5 chunk per row) is built in --workdir. One *epoch* is the recognition + QA loop of
`mambavl.train` for the training defaults (preset "small", batch 64, 8 of the cached frames, QA step after every
2nd recognition step, AdamW, label smoothing), built from the trainer's own pieces: batches from `runtime.batches` over a
seeded permutation, the trainer's `runtime.loader` (a DataLoader with the batches as batch_sampler, num_workers 0),
`subsample`, the question table (`Asker`), `Objective`, `recognition_loss` / `qa_loss_share`, optimiser step. Only where the batches come from differs:

  lazy_h5           SegmentDataset(in_memory=False) -> loader: every row read from the file through h5py
  segment_in_memory SegmentDataset(in_memory=True)  -> loader: the whole window read into RAM at construction
                    (what the trainer picks for caches below 2 GiB); rows still go item by item through collate
  in_memory_tensors the features as one float32 tensor in RAM, a batch = one index_select (no DataLoader):
                    the alternative a user would write by hand

All variants run interleaved (round-robin, median of repeats), each with its own identically initialised model and the
same seeds, so they do the same arithmetic. The file was just written, so its pages are in the OS page cache: this
measures the library path (h5py, per-row reads, collate), not the disk.

lazy_h5_cached_handle is lazy_h5 with the h5py Dataset handle kept across rows (see `CachedHandleDataset`): a
candidate library fix, measured to show what it would change; it is not the headline.

Extra columns: the read alone (iterate the batches and touch them, no model), to show what the epoch hides.
Headline: lazy_h5 epoch / in_memory_tensors epoch, target <= 1.15x.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    base_parser,
    fmt_mib,
    fmt_s,
    headline,
    interleaved,
    machine_line,
    median,
    print_table,
    setup_threads,
    spread,
    write_json,
)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mambavl import runtime as rt  # noqa: E402
from mambavl import train as tr  # noqa: E402
from mambavl.cache import schema  # noqa: E402
from mambavl.cache.dataset import SegmentDataset  # noqa: E402
from mambavl.cache.reader import open_cache  # noqa: E402
from mambavl.cache.synthetic import make_planted_cache  # noqa: E402
from mambavl.data.sampling import subsample  # noqa: E402
from mambavl.train.schedule import mix_seed  # noqa: E402

VARIANTS = ("lazy_h5", "segment_in_memory", "in_memory_tensors", "lazy_h5_cached_handle")


class CachedHandleDataset(SegmentDataset):
    """SegmentDataset(in_memory=False) with one change, a candidate library fix (not the headline): the h5py
    features Dataset is looked up once per process instead of once per row. `SegmentDataset.__getitem__` does
    `self.cache.h5()[prefix + "features"][row]`, and the group lookup builds a new h5py Dataset object each time,
    whose first read recomputes the selection fast-path checks (`Group._get`, `Dataset.__init__`,
    `Dataset._extent_type`); the read of the chunk itself is a small part of the per-row cost."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if getattr(self, "_ds_pid", None) != os.getpid():
            self._ds = self.cache.h5()[self.prefix + "features"]
            self._ds_pid = os.getpid()
        row = int(self.indices[i])
        return {
            "features": torch.from_numpy(np.asarray(self._ds[row], dtype=np.float32)),  # (F, D)
            "num_frames": torch.tensor(int(self.num_frames[row]), dtype=torch.long),
            "index": torch.tensor(row, dtype=torch.long),
        }


class Epoch:
    """The trainer's epoch body (recognition steps, a QA step after every `qa_every`-th) on one model."""

    def __init__(self, cache, rows: np.ndarray, cfg: tr.TrainConfig):
        self.cfg = cfg
        self.device = torch.device("cpu")
        self.rows = rows
        verbs, nouns = list(cache.verb_keys), list(cache.noun_keys)
        pairs = rt.action_vocab(cache, rows)
        self.labels = rt.load_labels(cache, {p: i for i, p in enumerate(pairs)})
        spec = rt.task_spec(cfg.task)
        self.questions = rt.Asker.of_cache(cache, spec, cfg.question_source,
                                           action_answers=rt.action_answers(cache, pairs))
        self.answers = self.questions.answers.to(self.device)
        # the kinds training draws from (action only where the cache can ask it), in the same order
        self.qa_kinds = self.questions.qa_kinds()
        self.spec = spec
        torch.manual_seed(cfg.seed)
        dims = {"video_dim": int(cache.attrs["feature_dim"]), "text_dim": int(cache.attrs["text_dim"]),
                "num_verbs": len(verbs), "num_nouns": len(nouns), "num_actions": len(pairs)}
        self.model, _ = rt.build_model(cfg, dims)
        self.objective = tr.Objective(self.model).train()
        self.optimizer = torch.optim.AdamW(tr.param_groups(self.model, cfg.weight_decay), lr=cfg.lr)
        self.sample_gen = torch.Generator()
        self.epoch = 0
        self.steps = 0

    def positions(self) -> np.ndarray:
        """The seeded permutation of the epoch (as the trainer draws it), positions into `rows`."""
        g = torch.Generator().manual_seed(mix_seed(self.cfg.seed, self.epoch, 0))
        return torch.randperm(len(self.rows), generator=g).numpy()

    def _optimise(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()

    def run(self, batches) -> float:
        """One epoch over an iterable of batches dict(index (B,), features (B, F, D), num_frames (B,))."""
        cfg, lab, q_table = self.cfg, self.labels, self.questions
        torch.manual_seed(mix_seed(cfg.seed, self.epoch, 1, 0))
        self.sample_gen.manual_seed(mix_seed(cfg.seed, self.epoch, 2, 0))
        total, rec_steps = 0.0, 0
        for batch in batches:
            rows = batch["index"].to(torch.long)
            part = tr.StepPart.whole(rows.numpy(), rows, batch["num_frames"])  # one process: the batch whole
            feats = batch["features"].to(device=self.device, dtype=torch.float32)  # (B, F, D)
            video, vmask = subsample(feats, batch["num_frames"], cfg.frames, train=True, generator=self.sample_gen)
            q, _ = q_table.heads(rows, train=True, generator=self.sample_gen)
            qt, qm = q_table.tokens_of(q, rows, self.device)  # (B, 2, T, Dt), (B, 2, T)
            out = self.objective("rec", video, vmask, qt, qm)
            loss = tr.recognition_loss(out, rows, part, lab, cfg.label_smoothing, self.device).total
            self._optimise(loss)
            rec_steps += 1
            total += float(loss.detach())
            if cfg.qa_weight > 0 and rec_steps % cfg.qa_every == 0:
                kind = self.qa_kinds[int(torch.randint(len(self.qa_kinds), (1,), generator=self.sample_gen))]
                qkt, qkm = q_table.qa_question(kind, len(rows), train=True, generator=self.sample_gen,
                                               device=self.device)
                mode = "scene" if self.spec.is_multi_label(kind) else "qa"
                logits = self.objective(mode, video, vmask, qkt, qkm, self.answers.for_kind(kind))  # (B, K)
                lq = tr.qa_loss_share(kind, logits, rows, part, lab, self.device)
                self._optimise(cfg.qa_weight * lq)
            self.steps += 1
        self.epoch += 1
        return total / max(rec_steps, 1)


def tensor_batches(features: torch.Tensor, num_frames: torch.Tensor, rows: np.ndarray, positions: np.ndarray,
                   batch_size: int):
    """The same batches as `loader(SegmentDataset, batches(positions))`, indexed from in-memory tensors."""
    for b in rt.batches(positions, batch_size):
        idx = torch.as_tensor(rows[b], dtype=torch.long)  # (B,) cache rows
        yield {"index": idx, "features": features.index_select(0, idx), "num_frames": num_frames.index_select(0, idx)}


def main() -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--workdir", type=str, required=True, help="folder for the synthetic cache (created)")
    p.add_argument("--rows", type=int, default=2048, help="segments in the cache")
    p.add_argument("--frames", type=int, default=16, help="cached frame tokens per segment")
    p.add_argument("--dim", type=int, default=768, help="feature width (CLIP ViT-B/16 image tokens: 768)")
    p.add_argument("--text-dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=64, help="the trainer's default batch size")
    p.add_argument("--model-frames", type=int, default=8, help="frames the model reads (the trainer's default)")
    p.add_argument("--preset", type=str, default="small")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (the trainer's default: 0)")
    p.add_argument("--ek100", action="store_true", help="instead: read epochs of an EK-100-sized cache (67,217 x 16 x "
                   "512 fp16, 1.1 GB, written to --workdir and deleted after), lazy vs in memory, with workers")
    p.add_argument("--keep", action="store_true", help="--ek100: keep the cache file for a re-run")
    args = p.parse_args()
    if args.ek100:
        import _loader_ek100

        return _loader_ek100.run(args)
    model_overrides = {}
    if args.smoke:
        args.rows, args.frames, args.dim, args.text_dim, args.batch = 96, 4, 32, 24, 16
        args.model_frames = 4
        model_overrides = {"d_model": 32, "n_layers": 1}
    args.repeats = args.repeats or (1 if args.smoke else 3)
    setup_threads(args.threads)
    print(machine_line())

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "loader_bench.h5"
    make_planted_cache(path, n=args.rows, num_verbs=97, num_nouns=300, frames=args.frames, dim=args.dim,
                       text_dim=args.text_dim, seed=0)
    cache = open_cache(path)
    window = schema.RECOGNITION
    rows = rt.labelled_rows(cache, window, "train")
    file_mib = path.stat().st_size / 2**20
    print(f"cache: {len(rows)} rows x {args.frames} frames x {args.dim} float16 ({file_mib:.1f} MiB file); "
          f"epoch: preset {args.preset}{' ' + str(model_overrides) if model_overrides else ''}, batch {args.batch}, "
          f"{args.model_frames} frames, QA step every 2nd step, num_workers {args.num_workers}")

    cfg = tr.TrainConfig(train_cache=str(path), val_cache=None, out_dir=str(work / "unused"), preset=args.preset,
                         model_overrides=model_overrides, batch_size=args.batch, frames=args.model_frames,
                         num_workers=args.num_workers, device="cpu")
    lazy = SegmentDataset(cache, window=window, indices=rows, in_memory=False)
    lazy_cached = CachedHandleDataset(cache, window=window, indices=rows, in_memory=False)
    eager = SegmentDataset(cache, window=window, indices=rows, in_memory=True)
    assert lazy._features is None and eager._features is not None
    feats_t = torch.from_numpy(np.asarray(eager._features, dtype=np.float32))  # (N, F, D) float32, in RAM
    nf_t = torch.from_numpy(eager.num_frames)  # (N,)

    epochs = {k: Epoch(cache, rows, cfg) for k in VARIANTS}

    def loader_batches(ds: SegmentDataset, e: Epoch):
        return rt.loader(ds, rt.batches(e.positions(), args.batch), args.num_workers)

    sources = {
        "lazy_h5": lambda e: loader_batches(lazy, e),
        "segment_in_memory": lambda e: loader_batches(eager, e),
        "in_memory_tensors": lambda e: tensor_batches(feats_t, nf_t, rows, e.positions(), args.batch),
        "lazy_h5_cached_handle": lambda e: loader_batches(lazy_cached, e),
    }
    epoch_fns = {k: (lambda k=k: epochs[k].run(sources[k](epochs[k]))) for k in VARIANTS}

    def read_only(k):
        probe = Epoch.__new__(Epoch)  # positions() needs only cfg, rows, epoch
        probe.cfg, probe.rows, probe.epoch = cfg, rows, 0

        def run():
            n = 0
            for batch in sources[k](probe):
                n += int(batch["features"].shape[0])  # the batch exists as a float32 tensor
            assert n == len(rows)

        return run

    # The same epoch gives the same loss on every path (same seeds, same data): a check that they do the same work.
    losses = {k: epochs[k].run(sources[k](epochs[k])) for k in VARIANTS}
    if max(losses.values()) - min(losses.values()) > 1e-4 * max(1.0, abs(losses["lazy_h5"])):
        raise SystemExit(f"the variants disagree on the epoch loss: {losses}")
    t_epoch = interleaved(epoch_fns, repeats=args.repeats, warmup=0)
    t_read = interleaved({k: read_only(k) for k in VARIANTS}, repeats=max(args.repeats, 3), warmup=1)

    base_e, base_r = median(t_epoch["in_memory_tensors"]), median(t_read["in_memory_tensors"])
    rows_out, results = [], {}
    steps = len(rt.batches(np.arange(len(rows)), args.batch))
    for k in VARIANTS:
        te, trd = median(t_epoch[k]), median(t_read[k])
        results[k] = {"epoch_s": te, "epoch_times": t_epoch[k], "read_s": trd, "read_times": t_read[k],
                      "epoch_ratio": te / base_e, "read_ratio": trd / base_r, "first_epoch_loss": losses[k]}
        rows_out.append([k, fmt_s(te), f"{spread(t_epoch[k]):.0%}", f"{te / base_e:.3f}x", fmt_s(trd),
                         f"{spread(t_read[k]):.0%}", f"{trd / base_r:.1f}x", f"{trd / te:.1%}"])
    print_table(
        ["source", "epoch", "spread", "epoch vs tensors", "read only", "spread", "read vs tensors", "read / epoch"],
        rows_out,
        title=f"one training epoch ({steps} steps + QA steps), median of {args.repeats} (interleaved); read only = "
        f"iterate the batches without the model, median of {max(args.repeats, 3)}",
    )
    print(f"in-RAM copy held by segment_in_memory: {fmt_mib(eager._features.nbytes)} (float16); "
          f"by in_memory_tensors: {fmt_mib(feats_t.numel() * 4)} (float32)")
    lz = results["lazy_h5"]
    lc = results["lazy_h5_cached_handle"]
    print(f"pure read: lazy_h5 / in_memory_tensors = {lz['read_ratio']:.1f}x "
          f"({fmt_s(lz['read_s'])} vs {fmt_s(base_r)}); lazy_h5 / segment_in_memory = "
          f"{lz['read_s'] / results['segment_in_memory']['read_s']:.2f}x; per row: lazy_h5 "
          f"{fmt_s(lz['read_s'] / len(rows))}, lazy_h5_cached_handle {fmt_s(lc['read_s'] / len(rows))}")
    print(f"candidate fix (lazy_h5_cached_handle, not the headline): epoch {lc['epoch_ratio']:.3f}x, "
          f"read alone {lc['read_ratio']:.1f}x of in_memory_tensors")
    # Two cross-checks of the headline, which is a small difference between two noisy epochs: the median of the
    # per-round ratios (each round runs every variant back to back, so slow drifts of the machine cancel), and the
    # ratio the read times predict if reading simply adds to the epoch (1 + extra read time / in-memory epoch).
    paired = median([a / b for a, b in zip(t_epoch["lazy_h5"], t_epoch["in_memory_tensors"])])
    predicted = 1.0 + (lz["read_s"] - base_r) / base_e
    print(f"lazy_h5 / in_memory_tensors epoch: ratio of medians {lz['epoch_ratio']:.3f}x, median of per-round ratios "
          f"{paired:.3f}x, predicted from the read times {predicted:.3f}x")
    results["lazy_h5"].update(paired_epoch_ratio=paired, predicted_epoch_ratio=predicted)
    ratio = lz["epoch_ratio"]
    write_json(args.json, {"args": vars(args), "cache_file_mib": file_mib, "steps": steps, "results": results,
                           "machine": machine_line()})
    print(headline("lazy_h5_epoch_vs_in_memory", ratio, "x", "<= 1.15x", ratio <= 1.15,
                   f"(read alone {lz['read_ratio']:.1f}x; segment_in_memory epoch "
                   f"{results['segment_in_memory']['epoch_ratio']:.3f}x)"))


if __name__ == "__main__":
    main()
