"""Multi-view testing: what T temporal clips x S spatial crops cost (extraction time, cache size, evaluation time per
view count) and what averaging the views' softmax does to accuracy.

Two parts, both synthetic and offline:

* cost -- the synthetic kitchen videos (`make_kitchen_dataset`, 64 x 64 px at 12 fps) extracted with the tiny
  random-init CLIP at 1 x 1, 1 x 3, 2 x 1 and 2 x 3 views: seconds per extraction and bytes of the feature datasets;
* effect -- a planted split (`make_planted_cache`) copied into a 2 x 3-view cache (`make_planted_views`) in which
  every view shows the planted features plus its own noise (as crops and clips each see the action imperfectly); a
  small model trained one random view per row, then scored with 1 view (view 0, the single centre crop), the 3
  crops of the first clip, and all 6 views (softmax mean), timed interleaved.

Headline: action top-1 of 6 views minus 1 view (points; target > 0), with the evaluation-time ratio beside it.

    python benchmarks/multiview.py                    # the defaults docs/benchmarks.md reports
    python benchmarks/multiview.py --view-noise 2     # views that agree more
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import base_parser, fmt_s, headline, interleaved, machine_line, median, print_table, setup_threads
from _common import write_json
import h5py

from mambavl import metrics as M
from mambavl.cache import schema
from mambavl.cache.build import ExtractConfig, run_extraction
from mambavl.cache.reader import open_cache
from mambavl.cache.synthetic import make_planted_cache, make_planted_views
from mambavl.data.synthetic import make_kitchen_dataset
from mambavl.extract.decode import SamplingConfig
from mambavl.extract.encoders import EncoderConfig, build_encoder
from mambavl.extract.views import ViewConfig
from mambavl.runtime import predict_scores
from mambavl.train import TrainConfig, train

GRIDS = ((1, 1), (1, 3), (2, 1), (2, 3))
SCORED = {"1 view (centre crop)": [0], "3 views (crops of clip 0)": [0, 1, 2], "6 views (2 x 3)": list(range(6))}


def feature_bytes(path: Path) -> int:
    """Bytes the feature datasets (all views) take in the file."""
    with h5py.File(path, "r") as f:
        names = ["features", schema.VIEW_FEATURES, "anticipation/features"]
        return sum(f[n].id.get_storage_size() for n in names if n in f)


def cost(d: Path, n: int, frames: int) -> list[dict]:
    ds = make_kitchen_dataset(d / "kitchen", n_train=n, n_val=0, n_test=0, segments_per_video=6)
    encoder = build_encoder(EncoderConfig(model="mambavl-tiny-clip", pretrained="none", device="cpu"))
    rows = []
    run_extraction(ExtractConfig(annotations=str(ds.train_csv), videos=str(ds.videos), out=str(d / "warm-up.h5"),
                                 encoder=encoder.cfg, sampling=SamplingConfig(num_frames=frames, size=64)),
                   encoder=encoder)  # untimed: first-call costs (ffmpeg start, encoder warm-up) off the 1 x 1 row
    for temporal, spatial in GRIDS:
        out = d / f"views-{temporal}x{spatial}.h5"
        t0 = time.perf_counter()
        run_extraction(ExtractConfig(annotations=str(ds.train_csv), videos=str(ds.videos), out=str(out),
                                     encoder=encoder.cfg, sampling=SamplingConfig(num_frames=frames, size=64),
                                     views=ViewConfig(temporal, spatial)), encoder=encoder)
        rows.append({"views": f"{temporal} x {spatial}", "seconds": time.perf_counter() - t0,
                     "feature_bytes": feature_bytes(out), "file_bytes": out.stat().st_size})
    return rows


def effect(d: Path, args) -> tuple[dict, dict]:
    planted = dict(noise=0.5, frames=8, dim=32)
    views = dict(temporal=2, spatial=3, signal_views=tuple(range(6)), noise=args.view_noise)
    train_path = make_planted_views(make_planted_cache(d / "t1.h5", n=args.n_train, seed=0, **planted), d / "t.h5",
                                    seed=10, **views)
    val_path = make_planted_views(make_planted_cache(d / "v1.h5", n=args.n_val, seed=1, **planted), d / "v.h5",
                                  seed=11, **views)
    run = train(TrainConfig(train_cache=str(train_path), val_cache=None, out_dir=str(d / "run"),
                            model_overrides={"d_model": args.d_model, "n_layers": 1}, epochs=args.epochs,
                            batch_size=32, frames=8, qa_weight=0, min_steps=args.min_steps, device="cpu"))
    model, cache = run.model.eval(), open_cache(val_path)
    labels = cache.labels()
    accuracy, scored = {}, {}
    for name, chosen in SCORED.items():
        s = predict_scores(model, cache, frames=8, views=chosen)
        rows = s["indices"]
        vt, nt = labels["verb_class"][rows], labels["noun_class"][rows]
        pairs, _ = M.action_scores_from_verb_noun(s["verb"], s["noun"])
        accuracy[name] = {"verb": 100 * M.topk_accuracy(s["verb"], vt, (1,))[1],
                          "noun": 100 * M.topk_accuracy(s["noun"], nt, (1,))[1],
                          "action": 100 * M.action_topk_accuracy(pairs, vt, nt, (1,))[1]}
        scored[name] = (lambda chosen=chosen: predict_scores(model, cache, frames=8, views=chosen))
    times = interleaved(scored, args.repeats, warmup=1)
    return accuracy, times


def main(argv: list[str] | None = None) -> None:
    ap = base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--segments", type=int, default=24, help="kitchen segments extracted per view grid")
    ap.add_argument("--frames", type=int, default=8, help="frames per clip in the extraction")
    ap.add_argument("--n-train", type=int, default=400, help="planted training segments")
    ap.add_argument("--n-val", type=int, default=400, help="planted validation segments")
    ap.add_argument("--view-noise", type=float, default=4.0, help="noise each view adds to the planted features")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--min-steps", type=int, default=300)
    ap.add_argument("--d-model", type=int, default=32)
    args = ap.parse_args(argv)
    if args.smoke:
        args.segments, args.frames, args.n_train, args.n_val, args.epochs, args.min_steps = 6, 4, 32, 16, 1, 0
    args.repeats = args.repeats or (1 if args.smoke else 5)
    setup_threads(args.threads or 1)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        costs = cost(d, args.segments, args.frames)
        accuracy, times = effect(d, args)

    print(machine_line())
    base = costs[0]
    print_table(["views", "extraction", "x 1 x 1", "feature bytes", "x 1 x 1", "file bytes"],
                [[c["views"], fmt_s(c["seconds"]), f"{c['seconds'] / base['seconds']:.2f}", c["feature_bytes"],
                  f"{c['feature_bytes'] / base['feature_bytes']:.2f}", c["file_bytes"]] for c in costs],
                title=f"cost: {args.segments} kitchen segments, {args.frames} frames, 64 px, tiny CLIP (recognition "
                      "window only)")
    first = median(times[next(iter(SCORED))])
    print_table(["scored", "eval time", "x 1 view", "verb top-1", "noun top-1", "action top-1"],
                [[name, fmt_s(median(times[name])), f"{median(times[name]) / first:.2f}",
                  f"{accuracy[name]['verb']:.1f}", f"{accuracy[name]['noun']:.1f}", f"{accuracy[name]['action']:.1f}"]
                 for name in SCORED],
                title=f"effect: planted 2 x 3-view split ({args.n_train} train / {args.n_val} val, view noise "
                      f"{args.view_noise}), trained one random view per row, {args.epochs} epochs; median of "
                      f"{args.repeats} interleaved evaluations")
    write_json(args.json, {"args": vars(args), "cost": costs, "accuracy": accuracy, "times": times})
    names = list(SCORED)
    gain = accuracy[names[-1]]["action"] - accuracy[names[0]]["action"]
    ratio = median(times[names[-1]]) / first
    size = costs[-1]["feature_bytes"] / base["feature_bytes"]
    print(headline("multiview_action_top1_gain_6_vs_1_view", gain, " points", "> 0", gain > 0,
                   f"(evaluation time x{ratio:.2f}, cache features x{size:.2f})"))


if __name__ == "__main__":
    main()
