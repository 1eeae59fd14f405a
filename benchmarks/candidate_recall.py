"""Self-questioning's first pass: candidate recall@k on the training rows, cross-fitted vs in-sample, beside the
validation rows' recall.

The second pass of `--questions predicted` is trained on the training rows' candidates and evaluated on candidates of
unseen clips. For it to learn how far to trust them, the training rows' candidates must be as often wrong as the
validation rows'. This script measures, on one planted split (`make_planted_cache`, noise makes the first pass err):

* cross-fitted: `mambavl.train.cross_fit_candidates` (K folds; each training row's candidates come from the fold
  model that did not train on it) and its evaluation first pass (the fold models' mean) on the validation rows;
* in-sample: one video-only model trained on all training rows with the same recipe (`train`, preset `video-only`,
  no QA), its candidates for those same rows and for the validation rows.

It prints a markdown table of recall@k (%) per head and the gap "training minus validation" of each scheme. Headline:
the cross-fitted scheme's largest |training - validation| recall gap over the heads (target <= 5 points), with the
in-sample scheme's beside it.

    python benchmarks/candidate_recall.py                       # the defaults docs/model.md reports
    python benchmarks/candidate_recall.py --noise 6             # a harder split
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from _common import base_parser, headline, machine_line, setup_threads, write_json
import numpy as np
import torch

from mambavl.cache.reader import open_cache
from mambavl.cache.synthetic import make_planted_cache
from mambavl.runtime import FirstPass, cache_candidates, labelled_rows, load_labels
from mambavl.train import TrainConfig, candidate_recall, cross_fit_candidates, train


def main(argv: list[str] | None = None) -> None:
    ap = base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=240, help="training segments of the planted split")
    ap.add_argument("--n-val", type=int, default=120, help="validation segments")
    ap.add_argument("--noise", type=float, default=4.0, help="feature noise of make_planted_cache (higher: harder)")
    ap.add_argument("--epochs", type=int, default=6, help="epochs of every first-pass model")
    ap.add_argument("--min-steps", type=int, default=1000, help="step floor of every first-pass model (0 = off)")
    ap.add_argument("--k", type=int, default=2, help="candidates per head")
    ap.add_argument("--folds", type=int, default=4, help="cross-fitting folds")
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.smoke:
        args.n_train, args.n_val, args.epochs, args.min_steps, args.folds, args.d_model = 32, 16, 1, 0, 2, 16
    setup_threads(args.threads or 1)

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        train_path = make_planted_cache(d / "train.h5", n=args.n_train, seed=args.seed, noise=args.noise)
        val_path = make_planted_cache(d / "val.h5", n=args.n_val, seed=args.seed + 1, noise=args.noise)
        cfg = TrainConfig(train_cache=str(train_path), val_cache=None, out_dir=str(d / "insample"),
                          model_overrides={"d_model": args.d_model, "n_layers": 1}, epochs=args.epochs,
                          batch_size=32, frames=4, min_steps=args.min_steps, seed=args.seed, device="cpu",
                          candidates_k=args.k, candidate_folds=args.folds)
        train_cache, val_cache = open_cache(train_path), open_cache(val_path)
        rows = labelled_rows(train_cache, "recognition", "train")
        val_rows = labelled_rows(val_cache, "recognition", "val")
        labels, val_labels = load_labels(train_cache, {}), load_labels(val_cache, {})
        device = torch.device("cpu")

        def recall(first: FirstPass, cache, r, lab, split):
            table, _ = cache_candidates(first, cache, "recognition", r, device, 64, cfg.frames)
            return candidate_recall(table, r, lab, split)

        t0 = time.perf_counter()
        fitted, table = cross_fit_candidates(cfg, train_cache, rows, labels, device)
        cross = {**candidate_recall(table, rows, labels, "train"), **recall(fitted, val_cache, val_rows, val_labels,
                                                                             "val")}
        t1 = time.perf_counter()
        one = train(dataclasses.replace(cfg, preset="video-only", qa_weight=0.0))
        single = FirstPass([one.model.eval()], "in-sample", args.k)
        insample = {**recall(single, train_cache, rows, labels, "train"),
                    **recall(single, val_cache, val_rows, val_labels, "val")}
        t2 = time.perf_counter()

    print(machine_line())
    print(f"planted split: {args.n_train} train / {args.n_val} val, noise {args.noise}; small preset d_model "
          f"{args.d_model}, 1 layer, {args.epochs} epochs, min_steps {args.min_steps}, k = {args.k}, "
          f"{args.folds} folds, seed {args.seed}; {t1 - t0:.0f} s cross-fitting, {t2 - t1:.0f} s in-sample\n")
    print(f"| recall@{args.k} (%) | verb | noun |")
    print("| --- | --- | --- |")
    for name, scheme in (("cross-fitted", cross), ("in-sample", insample)):
        for split, what in (("train", "training rows"), ("val", "validation rows")):
            v, n = scheme[f"{split}_candidate_recall_verb"], scheme.get(f"{split}_candidate_recall_noun", np.nan)
            print(f"| {what}, {name} | {v:.1f} | {n:.1f} |")
    gaps = {}
    for name, scheme in (("cross-fitted", cross), ("in-sample", insample)):
        gaps[name] = {h: scheme[f"train_candidate_recall_{h}"] - scheme[f"val_candidate_recall_{h}"]
                      for h in ("verb", "noun") if f"val_candidate_recall_{h}" in scheme}
        listed = ", ".join(f"{h} {g:+.1f}" for h, g in gaps[name].items())
        print(f"\n{name}: training minus validation recall = {listed} points")
    write_json(args.json, {"args": vars(args), "cross_fitted": cross, "in_sample": insample, "gaps": gaps})
    worst = max(abs(g) for g in gaps["cross-fitted"].values())
    worst_in = max(abs(g) for g in gaps["in-sample"].values())
    print(headline("cross_fitted_train_val_recall_gap", worst, " points", "<= 5", worst <= 5,
                   f"(in-sample: {worst_in:.1f} points)"))


if __name__ == "__main__":
    main()
