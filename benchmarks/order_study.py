"""Order-defined verbs: does the order of frames reach the heads? One study table over seeds.

Data: `make_order_cache` (features only, no decoding): six verbs that are three reversed-time pairs of motions
(left/right, lift/lower, grow/shrink) with random start and speed and a still distractor, five nouns; the mean frame
cannot tell a verb from its mirror. A training cache and a held-out reversed-pairs cache (other clips, every clip
next to itself played backwards: an order-blind model is right on at most one of each pair) are written. Variants
(`mambavl.analysis.ablate`): full (the default), paper, video-only, transformer, and the linear probes on the
ordered frames and on their mean,
each trained once per seed with `mambavl train`'s defaults (40 epochs here, the step floor, AdamW lr 1e-3);
mean ± sd over seeds and the paired difference to video-only, on the reversed pairs.

    python benchmarks/order_study.py --seeds 3 --out order-study          # the table in docs/model.md
    python benchmarks/order_study.py --seeds 3 --out raw --set standardize_video=false    # features as cached
    python benchmarks/order_study.py --smoke                              # seconds: keeps the script running

Headline: the default's verb top-1 on the reversed pairs minus the frame-mean probe's (points; > 0 means the order
of frames reaches the heads).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from _common import base_parser, headline, machine_line, setup_threads, write_json

from mambavl.analysis.ablate import AblationConfig, run_ablation
from mambavl.cache.synthetic import make_order_cache

VARIANTS = ("full", "paper", "video-only", "transformer", "probe-concat", "probe-mean")


def _value(text: str):
    """A --set value as `mambavl ablate --set` reads it: JSON (numbers, booleans), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    ap = base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--n-train", type=int, default=240)
    ap.add_argument("--n-val", type=int, default=240)
    ap.add_argument("--out", type=str, default=None, help="study folder (runs are reused on a second call)")
    ap.add_argument("--variants", type=str, default=",".join(VARIANTS), help="comma-separated ablation names")
    ap.add_argument("--set", action="append", default=[], help="model override key=value for every run")
    args = ap.parse_args(argv)
    setup_threads(args.threads)
    if args.smoke:
        args.seeds, args.epochs, args.n_train, args.n_val = 1, 1, 24, 12
    overrides = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.smoke:
        overrides.setdefault("d_model", 16)
    root = Path(args.out or tempfile.mkdtemp(prefix="order-study-"))
    root.mkdir(parents=True, exist_ok=True)
    train_cache = make_order_cache(root / "train.h5", n=args.n_train, seed=0)
    pairs_cache = make_order_cache(root / "pairs.h5", n=args.n_val, seed=1, reversed_pairs=True)
    cfg = AblationConfig(train_cache=str(train_cache), val_cache=str(pairs_cache), out_dir=str(root / "study"),
                         presets=tuple(args.variants.split(",")), epochs=args.epochs, seeds=args.seeds, device="cpu",
                         min_steps=50 if args.smoke else 1000, model_overrides=overrides)
    result = run_ablation(cfg)
    rows = {r["name"]: r["metrics"] for r in result["rows"]}
    print(result["markdown"])
    print(machine_line())
    if "full" not in rows or "probe-mean" not in rows:
        write_json(args.json, {"rows": rows})
        return
    gap = rows["full"]["verb_top1"]["mean"] - rows["probe-mean"]["verb_top1"]["mean"]
    write_json(args.json, {"rows": rows, "gap_vs_mean_probe": gap})
    print(headline("order_gap_verb_top1", gap, " points", "> 0", gap > 0))


if __name__ == "__main__":
    main()
