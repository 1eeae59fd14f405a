"""Fusion cost against sequence length: MambaVL (selective scan) vs transformer fusion of the same width and depth.

    python benchmarks/fusion_scaling.py                       # 256 ... 8192 tokens, time + peak memory, plot
    python benchmarks/fusion_scaling.py --plot docs/img/fusion_scaling.png
    python benchmarks/fusion_scaling.py --smoke               # tiny sizes, seconds

One training step of the fusion alone: `model.fuse(video, video_mask, q_tokens, q_mask)` on a batch, a scalar loss
on the fused vector, backward. The models come from the package factory
(`mambavl.fuse.model.create_model("small", fusion=..., d_model=..., n_layers=...)`, identical d_model / n_layers /
input dims, a position table long enough for the longest video); only `fusion` differs. Both are in training mode
with the preset's dropout (0.1) unless --dropout says otherwise: torch's attention then runs its math path, which
materialises the L x L attention matrix; with --dropout 0 the transformer gets the fused (flash) CPU kernel, the
strongest transformer a user could pick here. The total sequence length is question tokens (fixed) + video tokens.

Time: both fusions run interleaved in this process, median of repeats, ratio of medians (one untimed warm-up round
per length below 4096 tokens).
Peak memory: every (fusion, length) runs in a fresh child process that resets its resident high-water mark just
before the step and reports how far the step raised it above its resident size just before (`VmHWM`; large buffers
mmap'ed via MALLOC_MMAP_THRESHOLD_ so freed memory leaves the resident set). A calibration child allocates a known
buffer to check the method. Parameters, inputs and the interpreter exist before the measured step and are not
counted.

Targets: MambaVL time <= 0.25x the transformer's at 4096 tokens; MambaVL time and memory growth from 1024 to 8192
tokens <= 9x (linear: 8x more tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    HEADLINE_PREFIX,
    base_parser,
    fmt_mib,
    fmt_s,
    interleaved,
    machine_line,
    measure_in_subprocess,
    median,
    peak_growth,
    print_table,
    setup_threads,
    spread,
    write_json,
)

import torch  # noqa: E402

KINDS = ("mamba", "transformer")


def build(kind: str, args) -> torch.nn.Module:
    from mambavl.fuse.model import create_model

    torch.manual_seed(0)
    model, _ = create_model(
        args.preset,
        fusion=kind,
        video_dim=args.video_dim,
        text_dim=args.text_dim,
        d_model=args.d_model,
        n_layers=args.n_layers,
        num_verbs=97,
        num_nouns=300,
        # The learned position table must cover the longest video; it only adds max_frames x d_model parameters.
        max_frames=max(64, args.max_video_tokens),
        dropout=args.dropout,  # None: the preset's (0.1)
    )
    return model.train()


def make_batch(args, total: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(total)
    f = total - args.q_tokens
    video = torch.randn(args.batch, f, args.video_dim, generator=g)  # (B, F, Dv)
    vmask = torch.ones(args.batch, f, dtype=torch.bool)  # (B, F)
    q = torch.randn(args.batch, args.q_tokens, args.text_dim, generator=g)  # (B, T, Dt)
    qmask = torch.ones(args.batch, args.q_tokens, dtype=torch.bool)  # (B, T)
    return video, vmask, q, qmask


def step_fn(model: torch.nn.Module, batch):
    def run():
        model.zero_grad(set_to_none=True)
        h = model.fuse(*batch)  # (B, d)
        h.pow(2).mean().backward()

    return run


def child(args) -> None:
    """One measurement in a fresh process: peak resident growth of one fusion step; prints JSON as the last line."""
    if args.child_kind == "calibration":
        nbytes = args.child_len * 2**20

        def alloc():
            buf = torch.ones(nbytes // 4, dtype=torch.float32)
            return float(buf[-1])

        peak, trusted = peak_growth(alloc)
        print(json.dumps({"peak_bytes": peak, "trusted": trusted, "expected_bytes": nbytes}))
        return
    model = build(args.child_kind, args)
    # Warm-up at a short length: first-call costs (numba compilation, thread pools, lazy imports) are paid here and
    # not counted; the measured step at full length then sets a new high-water mark of its own.
    step_fn(model, make_batch(args, args.q_tokens + 8))()
    batch = make_batch(args, args.child_len)
    peak, trusted = peak_growth(step_fn(model, batch))
    print(json.dumps({"peak_bytes": peak, "trusted": trusted}))


def child_args(args, kind: str, total: int) -> list[str]:
    return [
        "--child-kind", kind, "--child-len", str(total), "--batch", str(args.batch), "--q-tokens", str(args.q_tokens),
        "--video-dim", str(args.video_dim), "--text-dim", str(args.text_dim), "--d-model", str(args.d_model),
        "--n-layers", str(args.n_layers), "--preset", args.preset, "--threads", str(torch.get_num_threads()),
        "--max-video-tokens", str(args.max_video_tokens),
        *(["--dropout", str(args.dropout)] if args.dropout is not None else []),
    ]


def plot(path: str, lengths, res, subtitle: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, style in zip(KINDS, ("o-", "s--")):
        axes[0].loglog(lengths, [res[kind][n]["time_s"] for n in lengths], style, label=kind, base=2)
        mem = [res[kind][n].get("peak_bytes") for n in lengths]
        if all(m is not None for m in mem):
            axes[1].loglog(lengths, [m / 2**20 for m in mem], style, label=kind, base=2)
    for ax, ylabel in zip(axes, ("forward+backward time (s)", "peak memory growth (MiB)")):
        ax.set_xlabel("total tokens (question + video)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Fusion step cost vs sequence length" + (f" ({subtitle})" if subtitle else ""))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main() -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--lengths", type=str, default="256,512,1024,2048,4096,8192", help="total tokens, comma-separated")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--q-tokens", type=int, default=32)
    p.add_argument("--video-dim", type=int, default=512)
    p.add_argument("--text-dim", type=int, default=512)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--preset", type=str, default="small")
    p.add_argument("--dropout", type=float, default=None,
                   help="ModelConfig.dropout for both models (default: the preset's, 0.1). In training mode torch's "
                   "attention with dropout > 0 runs the math path (the L x L matrix materialised); 0 lets the "
                   "transformer use the fused (flash) kernel")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--plot", type=str, default=None, help="write a PNG plot here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-kind", type=str, default="", help=argparse.SUPPRESS)
    p.add_argument("--child-len", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--max-video-tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    setup_threads(args.threads)
    if args.child:
        child(args)
        return
    if args.smoke:
        args.lengths, args.batch, args.q_tokens = "48,96,192", 1, 8
        args.video_dim = args.text_dim = 32
        args.d_model, args.n_layers = 32, 1
    lengths = [int(x) for x in args.lengths.split(",")]
    args.max_video_tokens = max(lengths) - args.q_tokens  # same position table (and parameters) at every length
    args.repeats = args.repeats or (1 if args.smoke else 3)
    print(machine_line())
    print(
        f"fusion step (fuse + backward), batch {args.batch}, {args.q_tokens} question tokens, d_model {args.d_model}, "
        f"{args.n_layers} layers, video/text dims {args.video_dim}/{args.text_dim}, dropout "
        f"{'preset (0.1)' if args.dropout is None else args.dropout}"
    )

    models = {k: build(k, args) for k in KINDS}
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    print("parameters: " + ", ".join(f"{k} {n / 1e6:.2f} M" for k, n in n_params.items()))
    res: dict[str, dict[int, dict]] = {k: {} for k in KINDS}
    for total in lengths:
        batch = make_batch(args, total)
        # Warm-up pays first-call costs (numba, thread pools, per-shape oneDNN primitives: milliseconds). From 4096
        # tokens on a step takes seconds and the transformer's tens of seconds, so the untimed round is skipped
        # there to keep the run within minutes; the first call at each length is then timed like the others.
        warmup = 1 if total < 4096 else 0
        times = interleaved({k: step_fn(m, batch) for k, m in models.items()}, repeats=args.repeats, warmup=warmup)
        for k in KINDS:
            res[k][total] = {"time_s": median(times[k]), "times": times[k]}
        print(
            f"  {total:5d} tokens: mamba {fmt_s(res['mamba'][total]['time_s'])}, "
            f"transformer {fmt_s(res['transformer'][total]['time_s'])}",
            flush=True,
        )
    del models

    calib = None
    if not args.no_memory:
        calib = measure_in_subprocess(Path(__file__), ["--child-kind", "calibration", "--child-len", "256"])
        for total in lengths:
            for k in KINDS:
                m = measure_in_subprocess(Path(__file__), child_args(args, k, total))
                res[k][total].update(peak_bytes=m["peak_bytes"], mem_trusted=m["trusted"])

    rows = []
    for total in lengths:
        rm, rt = res["mamba"][total], res["transformer"][total]
        mem = lambda r: "-" if "peak_bytes" not in r else fmt_mib(r["peak_bytes"]) + ("" if r["mem_trusted"] else "?")  # noqa: E731
        rows.append([
            total, total - args.q_tokens, fmt_s(rm["time_s"]), f"{spread(rm['times']):.0%}", fmt_s(rt["time_s"]),
            f"{spread(rt['times']):.0%}", f"{rm['time_s'] / rt['time_s']:.3f}", mem(rm), mem(rt),
        ])
    print_table(
        ["tokens", "video tokens", "mamba", "spread", "transformer", "spread", "mamba/transf.", "mamba mem", "transf. mem"],
        rows,
        title=f"forward+backward of the fusion, median of {args.repeats} (interleaved); memory = peak growth in a "
        "fresh process",
    )
    if calib is not None:
        print(
            f"memory calibration: allocating {fmt_mib(calib['expected_bytes'])} measured as "
            f"{fmt_mib(calib['peak_bytes'])}"
        )

    # Targets at the nominal lengths, or the closest ones present in a custom (e.g. smoke) run.
    at = min(lengths, key=lambda n: abs(n - 4096))
    lo, hi = min(lengths, key=lambda n: abs(n - 1024)), max(lengths)
    ratio = res["mamba"][at]["time_s"] / res["transformer"][at]["time_s"]
    t_growth = res["mamba"][hi]["time_s"] / res["mamba"][lo]["time_s"]
    m_growth = None
    if "peak_bytes" in res["mamba"][hi] and res["mamba"][lo]["peak_bytes"] > 0:
        m_growth = res["mamba"][hi]["peak_bytes"] / res["mamba"][lo]["peak_bytes"]
    n_growth = hi / lo
    ok_ratio = ratio <= 0.25
    ok_growth = t_growth <= 9 * n_growth / 8 and (m_growth is None or m_growth <= 9 * n_growth / 8)
    t_growth_tr = res["transformer"][hi]["time_s"] / res["transformer"][lo]["time_s"]
    print(f"mamba/transformer time at {at} tokens: {ratio:.3f}x (target <= 0.25x) {'PASS' if ok_ratio else 'MISS'}")
    print(
        f"growth {lo} -> {hi} tokens ({n_growth:.0f}x tokens): mamba time {t_growth:.1f}x, mamba memory "
        f"{'-' if m_growth is None else f'{m_growth:.1f}x'} (target <= {9 * n_growth / 8:.0f}x) "
        f"{'PASS' if ok_growth else 'MISS'}; transformer time {t_growth_tr:.1f}x"
    )
    if args.plot:
        plot(args.plot, lengths, res, f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, dropout "
             f"{'0.1' if args.dropout is None else args.dropout}")
    write_json(
        args.json,
        {"args": vars(args), "params": n_params, "calibration": calib,
         "results": {k: {str(n): v for n, v in r.items()} for k, r in res.items()}},
    )
    mg = "-" if m_growth is None else f"{m_growth:.1f}x"
    print(
        f"{HEADLINE_PREFIX} mamba_vs_transformer_time_at_{at}={ratio:.3f}x (target <= 0.25x) "
        f"{'PASS' if ok_ratio else 'MISS'}; mamba_growth_{lo}_to_{hi} time={t_growth:.1f}x memory={mg} "
        f"(target <= {9 * n_growth / 8:.0f}x) {'PASS' if ok_growth else 'MISS'}"
    )


if __name__ == "__main__":
    main()
