"""CUDA checks on one GPU: the selective-scan kernels (mamba-ssm's, the project's Triton kernels) against the
project's scans (outputs and gradients), AMP training for a few hundred steps, one epoch over an EK-100-sized cache,
and frozen-encoder extraction throughput.

    python benchmarks/gpu_check.py [--json out.json] [--sections scan,train,epoch,compile,encode] [--steps 300]

Meant for a CUDA GPU (`--device cpu --smoke` only checks that the script runs; with TRITON_INTERPRET=1 its scan
section also runs the Triton kernels in Triton's interpreter). The scan section compares every implementation that
runs here (the portable `chunked` scan, the Triton kernels `selective_scan_triton` when Triton imports, mamba-ssm's
`selective_scan_fn` from the `cuda` extra when importable) with the sequential reference `selective_scan_ref` (run
in float64, the definition), on outputs and on the gradients of every input, over a grid of shapes, in float32 and
bfloat16, plus a grouped A with per-channel B, C (not for mamba-ssm's kernel, which has no per-position A); then
times them side by side in bf16 (forward and forward+backward, interleaved repeats, medians) at B 64, D 512, N 16,
L 64 and B 2, D 1024, N 16, L 4096.
The train section trains the `small` preset on a planted-structure cache with bf16 autocast and in float32, same
seed and data, and reports steps/s, the loss curve's ends and validation accuracy of each; the compile section does
the same on CUDA in bf16 with `--compile fusion` and with `--compile cudagraphs` (steps/s include their compile).
Sections run in the order scan, train, epoch, compile, encode and the JSON is rewritten after each one. The epoch
section times one bf16 epoch over a generated cache of EK-100's 67,217 training rows (16 x 512 features), loading included
(target: <= 60 s on one H200-class GPU). The encode section
times a frozen open_clip image tower (random init: weights do not change the cost) on uint8 frames already at the
model's input size, i.e. the GPU side of extraction without decoding (decode is CPU-bound; see
benchmarks/decode_1080p.py).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    base_parser, headline, interleaved, machine_line, median, print_table, write_json,
)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mambavl.fuse import scan as scan_mod  # noqa: E402
from scan import GRAD_NAMES  # noqa: E402  (benchmarks/scan.py)
from scan import make_inputs as scan_inputs  # noqa: E402

# Shapes (batch, d_inner, d_state, length): a tiny one, the model's (d_inner 256 = 2 x d_model 128), a long one.
SHAPES = ((1, 8, 4, 64), (2, 256, 16, 40), (2, 512, 16, 512), (2, 256, 16, 2048))
# Grouped A (two groups, the first 100 positions use A[0]) with B, C per channel: the disjoint-A joint scan's
# arguments, for the implementations that take them (not mamba-ssm's kernel).
GROUPED_SHAPES = ((2, 256, 16, 300),)
# Timed (bf16, forward and forward+backward): a training batch of short clips, and one long sequence.
TIMING_SHAPES = ((64, 512, 16, 64), (2, 1024, 16, 4096))
# --smoke (`--device cpu`: the Triton kernels only under TRITON_INTERPRET=1): every path once, tiny.
SMOKE_SHAPES = ((1, 8, 4, 16),)
# bf16 inputs: the kernels and `chunked` all accumulate in float32, so errors are those of the inputs' rounding.
TOL = {torch.float32: (2e-4, 2e-3), torch.bfloat16: (5e-2, 5e-2)}  # (output abs / max|ref|, grad abs / max|ref|)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_inputs(b, d, n, length, dtype, device="cuda", seed=0, grouped=False):
    """`benchmarks/scan.py`'s inputs (mamba-ssm's test recipe: A negative, delta pre-softplus) on `device` in `dtype`
    (A, D and delta_bias stay fp32, as in a Mamba block); grouped: A (2, D, N) and B, C (B, D, N, L). Returns the
    inputs and the scan's extra keyword arguments (A_index)."""
    keep32 = {"A", "D", "delta_bias"}
    x = scan_inputs(b, d, n, length, "cpu", seed)
    kw = {}
    if grouped:
        g = torch.Generator().manual_seed(seed + 1)
        x["A"] = torch.stack([x["A"], -0.2 - torch.rand(d, n, generator=g)])  # (2, D, N)
        x["B"], x["C"] = torch.randn(2, b, d, n, length, generator=g)  # (B, D, N, L) each
        kw["A_index"] = (torch.arange(length) >= min(100, length // 3)).long().to(device)
    return {k: v.to(device, torch.float32 if k in keep32 else dtype) for k, v in x.items()}, kw


def run(fn, x, grad_out, **kw):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in x.items()}
    out = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"], z=leaves["z"],
             delta_bias=leaves["delta_bias"], delta_softplus=True, **kw)
    out.backward(grad_out.to(out.dtype))
    sync()
    return out.detach().double(), {k: v.grad.detach().double() for k, v in leaves.items()}


def rel_err(a, ref):
    return float((a - ref).abs().max()) / (float(ref.abs().max()) or 1.0)


def scan_impls(kernel, device: str) -> dict:
    """The implementations checked: `chunked`, `triton` where it runs (CUDA and Triton, or Triton's interpreter),
    mamba-ssm's kernel when importable."""
    impls = {"chunked": scan_mod.selective_scan_chunked}
    if "triton" in scan_mod.available_impls() and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        impls["triton"] = scan_mod.selective_scan_triton
    if kernel is not None:
        impls["mamba_ssm"] = kernel
    return impls


def check_case(impls, shape, dtype, device, grouped):
    """Every implementation against the float64 reference on one case: (table rows, check records)."""
    x, kw = make_inputs(*shape, dtype, device, grouped=grouped)
    grad_out = torch.randn(shape[0], shape[1], shape[3], generator=torch.Generator().manual_seed(1)).to(device)
    ref_out, ref_grads = run(scan_mod.selective_scan_ref, {k: v.double() for k, v in x.items()}, grad_out, **kw)
    label = "x".join(map(str, shape)) + (" grouped A, B/C per channel" if grouped else "")
    rows, checks, results = [], [], {}
    for name, fn in impls.items():
        if grouped and name == "mamba_ssm":
            continue  # no per-position A in mamba-ssm's kernel
        out, grads = run(fn, x, grad_out, **kw)
        e_out = rel_err(out, ref_out)
        worst = max(GRAD_NAMES, key=lambda k: rel_err(grads[k], ref_grads[k]))
        e_grad = rel_err(grads[worst], ref_grads[worst])
        results[name] = (out, grads)
        tol_o, tol_g = TOL[dtype]
        ok = e_out <= tol_o and e_grad <= tol_g
        rows.append([str(dtype).split(".")[1], label, f"{name} vs ref", f"{e_out:.1e}", f"{e_grad:.1e} ({worst})",
                     "ok" if ok else "FAIL"])
        checks.append(dict(dtype=str(dtype), shape=shape, grouped=grouped, impl=name, out_rel=e_out, grad_rel=e_grad,
                           worst_grad=worst, ok=ok))
    if "mamba_ssm" in results:  # the portable paths against the kernel they stand in for
        ob, gb = results["mamba_ssm"]
        for name in [k for k in results if k != "mamba_ssm"]:
            oa, ga = results[name]
            worst = max(GRAD_NAMES, key=lambda k: rel_err(ga[k], gb[k]))
            rows.append([str(dtype).split(".")[1], label, f"{name} vs mamba_ssm", f"{rel_err(oa, ob):.1e}",
                         f"{rel_err(ga[worst], gb[worst]):.1e} ({worst})", ""])
    return rows, checks


def time_impls(impls, shape, device, repeats, warmup):
    """bf16 forward and forward+backward medians of every implementation at one shape (interleaved)."""
    x, _ = make_inputs(*shape, torch.bfloat16, device)
    grad_out = torch.randn(shape[0], shape[1], shape[3], device=device, dtype=torch.bfloat16)

    def forward(f):
        with torch.no_grad():
            f(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"], delta_bias=x["delta_bias"],
              delta_softplus=True)
        sync()

    fwd = {k: (lambda f=f: forward(f)) for k, f in impls.items()}
    both = {k: (lambda f=f: run(f, x, grad_out)) for k, f in impls.items()}
    tf = interleaved(fwd, repeats=repeats, warmup=warmup)
    tb = interleaved(both, repeats=repeats, warmup=warmup)
    return {k: dict(fwd_s=median(tf[k]), fwd_bwd_s=median(tb[k])) for k in impls}


def scan_section(args, kernel):
    device = args.device
    impls = scan_impls(kernel, device)
    print(f"scan implementations checked: {', '.join(impls)}")
    rows, checks = [], []
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    for dtype in (torch.float32, torch.bfloat16):
        for shape, grouped in [(s, False) for s in shapes] + [(s, True) for s in
                                                               (SMOKE_SHAPES if args.smoke else GROUPED_SHAPES)]:
            r, c = check_case(impls, shape, dtype, device, grouped)
            rows += r
            checks += c
    print_table(["dtype", "B x D x N x L", "pair", "out err / max|ref|", "worst grad err / max|ref|", ""], rows,
                title=f"selective scan on {device} against the float64 reference")
    timing = {}
    for shape in SMOKE_SHAPES if args.smoke else TIMING_SHAPES:
        timing["x".join(map(str, shape))] = time_impls(impls, shape, device, 2 if args.smoke else args.repeats,
                                                       1 if args.smoke else 3)
    print_table(["B x D x N x L", "impl", "forward", "fwd+bwd"],
                [[s, k, f"{v['fwd_s'] * 1e3:.2f} ms", f"{v['fwd_bwd_s'] * 1e3:.2f} ms"]
                 for s, d in timing.items() for k, v in d.items()], title="bf16 timings (median)")
    return dict(ok=all(c["ok"] for c in checks), kernel=kernel is not None, impls=list(impls), checks=checks,
                timing=timing)


def train_section(args, compiled: bool = False):
    """`small` preset on a planted cache: bf16 autocast and float32 runs (`compiled`: on CUDA, the step compiled
    with `--compile fusion` and replayed as CUDA graphs instead; nothing on CPU), same seed and data."""
    from mambavl.cache.synthetic import make_planted_cache
    from mambavl.runtime import TrainConfig
    from mambavl.train import train

    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    bs = 8 if args.smoke else 64
    n = args.steps * bs // max(args.epochs, 1)
    tr = make_planted_cache(work / "train.h5", n=n, frames=16, dim=512, text_dim=384, num_verbs=20, num_nouns=30,
                            seed=0, noise=1.0)
    va = make_planted_cache(work / "val.h5", n=64 if args.smoke else 1024, frames=16, dim=512, text_dim=384, num_verbs=20, num_nouns=30,
                            seed=1, noise=1.0)
    out = {}
    runs = [("bf16-autocast", "bf16", "off"), ("fp32", "fp32", "off")]
    if compiled:  # the step compiled, and replayed as CUDA graphs (their own section: compiling takes minutes)
        if args.smoke or not str(args.device).startswith("cuda"):
            return {"skipped": "compiled runs need CUDA and full sizes"}
        runs = [("bf16-compile-fusion", "bf16", "fusion"), ("bf16-cudagraphs", "bf16", "cudagraphs")]
    for name, precision, compile_mode in runs:
        cfg = TrainConfig(train_cache=str(tr), val_cache=str(va), out_dir=str(work / name), epochs=args.epochs,
                          batch_size=bs, device=args.device, precision=precision, seed=0, compile=compile_mode,
                          min_steps=0,  # exactly `steps` steps
                          model_overrides={"scan_impl": args.scan_impl})
        sync()
        t0 = time.perf_counter()
        res = train(cfg)
        sync()
        wall = time.perf_counter() - t0
        h = res.history
        steps = args.epochs * (n // bs + (n % bs > 0))
        out[name] = dict(wall_s=wall, steps=steps, steps_per_s=steps / wall, first=h[0], last=h[-1],
                         best=res.best_metric, finite=all(np.isfinite(v) for r in h for v in r.values()
                                                          if isinstance(v, float)))
    def brief(row):
        keys = ("train_loss", "val_verb_top1", "val_noun_top1", "val_action_top1")
        return ", ".join(f"{k} {row[k]:.3g}" for k in keys if isinstance(row.get(k), float))

    print_table(["run", "steps", "steps/s", "epoch 1", f"epoch {args.epochs}"],
                [[k, v["steps"], f"{v['steps_per_s']:.1f}", brief(v["first"]), brief(v["last"])]
                 for k, v in out.items()], title=f"training, small preset, scan_impl={args.scan_impl}")
    return out


EK100_TRAIN_ROWS = 67_217  # EK-100's training segments


def epoch_section(args):
    """One epoch over an EK-100-sized training cache (67,217 rows x 16 frames x 512 features, generated: the cost
    does not depend on the values), `small` preset, batch 64, bf16 autocast, no validation: the wall time of
    `mambavl.train.train`, loading included (HDF5 reads, batches to the device)."""
    from mambavl.cache.synthetic import make_planted_cache
    from mambavl.runtime import TrainConfig
    from mambavl.train import train

    work = Path(tempfile.mkdtemp(prefix="gpu_check_epoch_"))
    rows = 128 if args.smoke else EK100_TRAIN_ROWS
    t0 = time.perf_counter()
    cache = make_planted_cache(work / "train.h5", n=rows, frames=16, dim=512, text_dim=384, num_verbs=97,
                               num_nouns=300, seed=0, noise=1.0)
    made = time.perf_counter() - t0
    cfg = TrainConfig(train_cache=str(cache), val_cache=None, out_dir=str(work / "run"), epochs=1, batch_size=64,
                      device=args.device, precision="bf16", seed=0, min_steps=0, model_overrides={"scan_impl": args.scan_impl})
    sync()
    t0 = time.perf_counter()
    res = train(cfg)
    sync()
    wall = time.perf_counter() - t0
    out = dict(rows=rows, cache_gb=cache.stat().st_size / 1e9, make_cache_s=made, epoch_s=wall,
               rows_per_s=rows / wall, train_loss=res.history[-1].get("train_loss"))
    print_table(["rows", "cache", "made in", "epoch (train, loading included)", "rows/s"],
                [[rows, f"{out['cache_gb']:.2f} GB", f"{made:.0f} s", f"{wall:.1f} s", f"{rows / wall:.0f}"]],
                title=f"one epoch, EK-100-sized cache, small preset, batch 64, bf16 autocast, scan_impl={args.scan_impl}")
    return out


def encode_section(args):
    from mambavl.extract.encoders import EncoderConfig, build_encoder

    out = {}
    for model in ("ViT-B-16",) if args.smoke else ("ViT-B-16", "ViT-L-14"):
        enc = build_encoder(EncoderConfig(model=model, pretrained="none", device=args.device, batch_size=256))
        s = enc.image_size
        shape = (2, 2) if args.smoke else (64, 16)
        frames = np.random.default_rng(0).integers(0, 256, size=(*shape, s, s, 3), dtype=np.uint8)
        enc.encode_segments(frames[:4])  # warm-up (cuDNN autotune, allocator)
        sync()
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            enc.encode_segments(frames)
        sync()
        dt = time.perf_counter() - t0
        out[model] = dict(images_per_s=reps * frames.shape[0] * frames.shape[1] / dt, image_size=s,
                          feature_dim=enc.feature_dim)
        del enc
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print_table(["model", "input", "images/s (uint8 in host memory -> features in host memory)"],
                [[k, v["image_size"], f"{v['images_per_s']:.0f}"] for k, v in out.items()],
                title="frozen image tower throughput, fp16 autocast, batch 256")
    return out


def main() -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--sections", default="scan,train,epoch,compile,encode",
                   help="run in this order, the JSON rewritten after each: scan, train (bf16 / fp32), epoch, compile "
                        "(the compiled and CUDA-graph training runs), encode (needs open_clip)")
    p.add_argument("--steps", type=int, default=300, help="training steps per run (about)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--scan-impl", default="auto")
    p.add_argument("--device", default="cuda", help="cuda (the point); cpu only to try the script")
    args = p.parse_args()
    args.repeats = args.repeats or 20
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (torch.cuda.is_available() is False)")
    cuda = args.device == "cuda"
    print(machine_line(), torch.cuda.get_device_name() if cuda else "cpu", f"torch {torch.__version__}")
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as kernel
    except ImportError as e:
        print(f"mamba-ssm not importable ({e}): checking the portable scan alone")
        kernel = None
    payload = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    sections = args.sections.split(",")
    # the scan and training figures first: the encoder section needs open_clip, which a bare GPU machine may lack
    for name, fn in (("scan", lambda a: scan_section(a, kernel)), ("train", train_section), ("epoch", epoch_section),
                     ("compile", lambda a: train_section(a, compiled=True)), ("encode", encode_section)):
        if name in sections:
            t0 = time.perf_counter()
            try:
                payload[name] = fn(args)
            except Exception as e:  # report and go on: one failing section must not hide the others
                payload[name] = {"error": repr(e)}
                print(f"section {name} failed: {e!r}")
            print(f"[{name}: {time.perf_counter() - t0:.1f} s]")
            write_json(args.json, payload)  # after every section: a run stopped later keeps these
    scan, trained, epoch = payload.get("scan", {}), payload.get("train", {}), payload.get("epoch", {})
    if "epoch_s" in epoch:
        full = epoch["rows"] == EK100_TRAIN_ROWS and cuda
        print(headline("ek100_epoch_bf16_s", epoch["epoch_s"], "s", "<= 60", full and epoch["epoch_s"] <= 60,
                       f"({epoch['rows']} rows on {payload['device']}{'' if full else '; not the full size on CUDA'})"))
    if "ok" in scan:
        print(headline("cuda_scan_matches_reference", float(scan["ok"]), "bool", "== 1", bool(scan["ok"]),
                       f"({', '.join(scan['impls'])} checked)"))
    elif "fp32" in trained:
        amp, fp32 = trained["bf16-autocast"], trained["fp32"]
        ratio = amp["steps_per_s"] / fp32["steps_per_s"]
        print(headline("amp_vs_fp32_train_steps_per_s", ratio, "x", "finite losses in both runs",
                       amp["finite"] and fp32["finite"], f"(on {payload['device']})"))
    else:
        print(headline("gpu_check_sections_ok", 0.0, "", "every asked section ran", False, f"({sections})"))

if __name__ == "__main__":
    main()
