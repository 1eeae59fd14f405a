"""Aten ops per default training step (per component) and the step's time against a plain nn.TransformerEncoder.

    python benchmarks/step_ops.py --threads 2                # ops per step, then interleaved step times
    python benchmarks/step_ops.py --threads 2 --compile      # also the step with the non-scan parts compiled
    python benchmarks/step_ops.py --smoke                    # tiny sizes, seconds

The default training step as `mambavl train` takes it with its defaults (`TrainConfig`: AdamW, batch 64, a QA step
after every 2nd recognition step): one recognition step (`Objective("rec")` on the verb and the noun question,
`recognition_loss`, `Optimizer.step`, the schedule) plus half a QA step (`Objective("qa")` on one question,
`qa_loss_share`, `Optimizer.step`, the loss read for the log). Sizes are the EK-100 defaults: preset "small"
(d_model 128, 2 layers), 512-d video and text features, 97 verbs, 300 nouns, 3,806 actions, 32 video tokens and
16 question tokens (questions padded to 16, 4-16 real tokens), 97 verb answers for the QA step.

Ops: the torch profiler (CPU) records two recognition steps and one QA step after warm-up; every `aten::` event
counts, nested ones included (`aten::linear` and the `aten::addmm` it calls are two), and the total is halved.
Components, by where an op sits in the profiler's event tree: forward (the objective's call), loss, backward
(anything under an autograd engine node), optimizer (under `Optimizer.step`/`zero_grad`, torch's optimizer
hooks), other (the finite-loss check, gradient clipping, the schedule, logging reads). The selective scan's numba
kernels dispatch no aten ops; its wrapper's copies and casts do.

Time: the whole default step of MambaVL against the same step of a model whose fusion is a plain
`nn.TransformerEncoder` (pre-norm, same d_model / n_layers, 4 heads, 4*d_model feed-forward, the preset's dropout)
over [question ; video] with the padded tokens masked, pooled over the video tokens; everything else (embeddings,
heads, loss, optimiser) is the same. Both run interleaved in one process, median of repeats, ratio of medians.

Target: <= 2000 aten ops per default training step.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    base_parser,
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
from torch import nn  # noqa: E402

TARGET_OPS = 2000
COMPONENTS = ("forward", "loss", "backward", "optimizer", "other")


class PlainEncoderFusion(nn.Module):
    """A plain `nn.TransformerEncoder` with the fusion interface: self-attention over [question ; video] (padded
    tokens masked), masked mean over the video positions -> (B, d)."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, dropout: float):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, video, video_mask=None, question=None, question_mask=None):
        t = question.shape[1]
        x = torch.cat([question, video], dim=1)  # (B, T + F, d)
        mask = torch.cat([question_mask, video_mask], dim=1)  # (B, T + F)
        y = self.norm(self.encoder(x, src_key_padding_mask=~mask))[:, t:]  # (B, F, d)
        m = video_mask[..., None].to(y.dtype)
        return (y * m).sum(1) / m.sum(1).clamp(min=1.0)


def build(kind: str, args, compile_fusion: bool = False):
    """The model (preset "small" at the given sizes; fusion replaced for "encoder") and what a step needs."""
    from mambavl.fuse.model import create_model
    from mambavl.runtime import TrainConfig
    from mambavl.train.objective import Objective
    from mambavl.train.schedule import Optimizer

    torch.manual_seed(0)
    model, mcfg = create_model(
        "small", video_dim=args.dim, text_dim=args.dim, num_verbs=args.verbs, num_nouns=args.nouns,
        num_actions=args.actions, d_model=args.d_model, n_layers=args.n_layers,
    )
    if kind == "encoder":
        model.fusion = PlainEncoderFusion(mcfg.d_model, mcfg.n_layers, mcfg.n_heads, mcfg.dropout)
    if compile_fusion:
        model.compile_fusion()
    model.train()
    cfg = TrainConfig(train_cache="-", val_cache=None, out_dir="-", batch_size=args.batch)
    opt = Optimizer(model, cfg, total_steps=10_000, warmup_steps=100, device=torch.device("cpu"))
    return Objective(model), opt, cfg


def make_batch(args) -> dict:
    from mambavl.runtime import Labels
    from mambavl.train.distributed import StepPart

    g = torch.Generator().manual_seed(0)
    b, t = args.batch, args.q_tokens
    lengths = torch.randint(4, t + 1, (b, 2), generator=g)  # (B, 2) real tokens per question
    n = 4 * b  # label table rows; the batch takes the first B
    labels = Labels(
        verb=torch.randint(args.verbs, (n,), generator=g), noun=torch.randint(args.nouns, (n,), generator=g),
        action=torch.randint(-1, args.actions, (n,), generator=g),
        all_nouns=[np.array([i % args.nouns]) for i in range(n)],
    )
    rows = torch.arange(b)
    return {
        "video": torch.randn(b, args.video_tokens, args.dim, generator=g),
        "vmask": torch.ones(b, args.video_tokens, dtype=torch.bool),
        "q": torch.randn(b, 2, t, args.dim, generator=g),
        "qm": torch.arange(t)[None, None, :] < lengths[..., None],
        "answers": torch.randn(args.verbs, args.dim, generator=g),
        "labels": labels,
        "rows": rows,
        "part": StepPart.whole(rows.numpy(), rows, torch.full((b,), args.video_tokens)),
    }


def step_fns(objective, opt, cfg, batch):
    """(recognition step, QA step) as `mambavl.train.loop.recognition_step` / `qa_step` take them."""
    from torch.profiler import record_function

    from mambavl.train.objective import qa_loss_share, recognition_loss

    dev = torch.device("cpu")

    def rec() -> float:
        with record_function("bench.forward"), opt.autocast():
            out = objective("rec", batch["video"], batch["vmask"], batch["q"], batch["qm"])
        with record_function("bench.loss"):
            loss = recognition_loss(out, batch["rows"], batch["part"], batch["labels"], cfg.label_smoothing, dev)
        opt.step(loss.total)
        opt.schedule()
        return float(loss.total.detach())  # the progress line's loss

    def qa() -> float:
        with record_function("bench.forward"), opt.autocast():
            logits = objective("qa", batch["video"], batch["vmask"], batch["q"][:, 0], batch["qm"][:, 0],
                               batch["answers"])
        with record_function("bench.loss"):
            lq = qa_loss_share("verb", logits, batch["rows"], batch["part"], batch["labels"], dev)
        opt.step(cfg.qa_weight * lq)
        return float(lq.detach())

    return rec, qa


def _component(event) -> str:
    e = event.cpu_parent
    while e is not None:
        name = e.name
        if name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        if name.startswith("Optimizer.step") or name.startswith("Optimizer.zero_grad"):
            return "optimizer"
        if name == "bench.forward":
            return "forward"
        if name == "bench.loss":
            return "loss"
        e = e.cpu_parent
    return "other"


def count_ops(rec, qa) -> tuple[dict[str, float], Counter]:
    """Aten ops of one default step (2 recognition + 1 QA step, halved) per component, and the ops by name."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # warm-up: optimiser state, numba kernels, lazy inits
        rec(), qa()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        rec(), rec(), qa()
    per = dict.fromkeys(COMPONENTS, 0.0)
    names: Counter = Counter()
    for ev in prof.events():
        if ev.name.startswith("aten::"):
            per[_component(ev)] += 0.5
            names[ev.name] += 0.5
    per["total"] = sum(per[c] for c in COMPONENTS)
    return per, names


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--video-tokens", type=int, default=32)
    p.add_argument("--q-tokens", type=int, default=16)
    p.add_argument("--dim", type=int, default=512, help="video and text feature dim")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--verbs", type=int, default=97)
    p.add_argument("--nouns", type=int, default=300)
    p.add_argument("--actions", type=int, default=3806)
    p.add_argument("--compile", action="store_true", help="also time the step with the fusion's non-scan parts "
                   "compiled (MambaVL.compile_fusion) and report the compile time")
    p.add_argument("--top", type=int, default=12, help="how many op names to list")
    args = p.parse_args()
    if args.smoke:
        args.batch, args.video_tokens, args.q_tokens, args.dim, args.d_model = 4, 4, 4, 16, 16
        args.verbs, args.nouns, args.actions, args.repeats = 5, 7, 9, args.repeats or 2
    args.repeats = args.repeats or 15
    threads = setup_threads(args.threads)
    print(machine_line())
    batch = make_batch(args)

    kinds = ["mamba", "encoder"]
    steps = {}
    for kind in kinds:
        objective, opt, cfg = build(kind, args)
        steps[kind] = step_fns(objective, opt, cfg, batch)
    ops, names = {}, {}
    for kind in kinds:
        ops[kind], names[kind] = count_ops(*steps[kind])
    rows = [[kind] + [f"{ops[kind][c]:.0f}" for c in (*COMPONENTS, "total")] for kind in kinds]
    print_table(["model", *COMPONENTS, "total"], rows, title="aten ops per default training step (rec + 1/2 QA)")
    top = [[n, f"{c:.1f}"] for n, c in names["mamba"].most_common(args.top)]
    print_table(["op (mamba)", "per step"], top, title="most frequent ops, MambaVL")

    compile_s = None
    if args.compile:
        objective, opt, cfg = build("mamba", args, compile_fusion=True)
        rec, qa = step_fns(objective, opt, cfg, batch)
        t0 = time.perf_counter()
        rec(), qa()
        compile_s = time.perf_counter() - t0
        steps["mamba-compiled"] = (rec, qa)
        kinds.append("mamba-compiled")
        print(f"compile (first rec + QA step of the compiled model): {compile_s:.1f} s")
        ops["mamba-compiled"], names["mamba-compiled"] = count_ops(rec, qa)
        row = [f"{ops['mamba-compiled'][c]:.0f}" for c in (*COMPONENTS, "total")]
        print_table(["model", *COMPONENTS, "total"], [["mamba-compiled", *row]], title="aten ops, compiled fusion")

    def default_step(rec, qa):
        state = {"k": 0}

        def run() -> None:  # rec, rec + QA, rec, rec + QA, ...: on average one default step per call
            rec()
            state["k"] += 1
            if state["k"] % 2 == 0:
                qa()
        return run

    fns = {k: default_step(*steps[k]) for k in kinds}
    times = interleaved(fns, args.repeats * 2, warmup=2)
    base = median(times["encoder"])
    rows = [[k, fmt_s(median(times[k])), f"{spread(times[k]):.0%}", f"{median(times[k]) / base:.3f}"] for k in kinds]
    print_table(["model", "step (median)", "spread", "vs encoder"], rows,
                title=f"default training step, median of {args.repeats * 2} (interleaved, torch threads {threads})")
    ratio = median(times["mamba"]) / base
    write_json(args.json, {"ops": ops, "op_names": {k: dict(v) for k, v in names.items()}, "times_s": times,
                           "ratio_mamba_vs_encoder": ratio, "compile_s": compile_s, "args": vars(args),
                           "machine": machine_line()})
    print(headline("aten_ops_per_default_step", ops["mamba"]["total"], "", f"<= {TARGET_OPS}",
                   ops["mamba"]["total"] <= TARGET_OPS, f"step time vs nn.TransformerEncoder {ratio:.3f}x"))


if __name__ == "__main__":
    main()
