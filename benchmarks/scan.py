"""Selective-scan speed: the portable fast scans against the sequential reference (and mamba-ssm's CUDA kernel).

    python benchmarks/scan.py                 # B=2, D=256, N=16, L=2048 on CPU, forward and forward+backward
    python benchmarks/scan.py --cuda          # also the GPU kernels (mamba-ssm's, Triton's) vs the portable scan
    python benchmarks/scan.py --smoke         # tiny sizes, seconds
    git show HEAD~1:mambavl/fuse/scan.py > /tmp/scan_before.py
    python benchmarks/scan.py --against /tmp/scan_before.py   # also: that version's selective_scan_cpu vs this one

A second table gives `selective_scan_cpu` in ns per state update (wall time / (B*D*N*L)) at B=64 D=512 N=16 L=48
and B=2 D=1024 N=16 L=4096: float32 inputs laid out as a Mamba block passes them (u, delta, z transposed views of
token-major tensors), the same values as contiguous (B, D, L) tensors, and float64; forward and forward+backward
(targets, float32 token-major: <= 6 ns forward on 2 threads, forward+backward <= 3x forward).

With --against FILE, a third table times another version of mambavl/fuse/scan.py (loaded from FILE beside this one)
against the current module, interleaved in one process at the per-update sizes (float32, token-major): wall and
process CPU time per state update (CPU time is what other jobs on a shared machine do not inflate), and the
largest difference between the two versions' outputs and gradients. Runs of the whole script one after the other
are too noisy on a shared machine to compare versions.

Compared (mambavl.fuse.scan, mamba-ssm argument conventions: u, delta (B, D, L); A (D, N); B, C (B, N, L)):
  reference  `selective_scan_ref`      the definition: a Python loop over L
  cpu        `selective_scan_cpu`      numba-fused forward and backward (what `impl="auto"` picks on CPU)
  chunked    `selective_scan_chunked`  pure torch, any device
and with --cuda on a GPU (each against the float64 reference, and timed against `chunked`):
  cuda       `selective_scan_cuda`     mamba-ssm's kernel, when it imports
  triton     `selective_scan_triton`   the project's Triton kernels, when Triton imports
All paths get the full argument set the MambaVL block uses (D skip, z gate, delta_bias, delta_softplus) and run
interleaved in one process; we report medians and the ratio of medians. Accuracy: max abs error of the output
against the reference (target <= 1e-4) and of every input gradient, relative to that gradient's largest entry.

Headline: the smaller of the forward and forward+backward speed-ups of `selective_scan_cpu` over the reference,
target >= 3x, with the accuracy target met. With --cuda on a CUDA machine the headline is mamba-ssm's kernel (or,
without mamba-ssm, the Triton kernels) over the portable scan on the same GPU (target >= 5x, equal outputs); without
CUDA that branch is skipped with a message, or, with TRITON_INTERPRET=1, run on CPU tensors in Triton's interpreter
as a dry run of the code path (tiny, timings meaningless).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
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

import torch  # noqa: E402

from mambavl.fuse import scan as scan_mod  # noqa: E402

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(b: int, d: int, n: int, length: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs shaped and scaled like a Mamba block's (mamba-ssm's test recipe): A negative, delta pre-softplus."""
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = {
        "u": t(b, d, length),  # (B, D, L)
        "delta": 0.5 * torch.rand(b, d, length, generator=g) - 1.0,  # (B, D, L), softplus -> ~0.3..0.5
        "A": -0.5 - torch.rand(d, n, generator=g),  # (D, N)
        "B": t(b, n, length),  # (B, N, L)
        "C": t(b, n, length),  # (B, N, L)
        "D": t(d),  # (D,)
        "z": t(b, d, length),  # (B, D, L)
        "delta_bias": 0.1 * t(d),  # (D,)
    }
    return {k: v.to(device) for k, v in x.items()}


def call(fn, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return fn(
        x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True
    )


def forward_fn(fn, x):
    def run():
        with torch.no_grad():
            out = call(fn, x)
        if out.is_cuda:
            torch.cuda.synchronize()
        return out

    return run


def fwd_bwd_fn(fn, x, grad_out):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in x.items()}

    def run():
        for v in leaves.values():
            v.grad = None
        out = call(fn, leaves)
        out.backward(grad_out)
        if out.is_cuda:
            torch.cuda.synchronize()
        return {k: v.grad.detach().clone() for k, v in leaves.items()}

    return run


def accuracy(fn, ref_out, ref_grads, x, grad_out) -> tuple[float, float, str]:
    """(max abs output error, worst relative gradient error, name of that gradient)."""
    out = forward_fn(fn, x)()
    err = float((out.float() - ref_out.float()).abs().max())
    grads = fwd_bwd_fn(fn, x, grad_out)()
    worst, worst_name = 0.0, ""
    for k in GRAD_NAMES:
        scale = float(ref_grads[k].abs().max()) or 1.0
        e = float((grads[k].float() - ref_grads[k].float()).abs().max()) / scale
        if e >= worst:
            worst, worst_name = e, k
    return err, worst, worst_name


def cpu_benchmark(args) -> tuple[str, dict]:
    b, d, n, length = args.batch, args.dim, args.state, args.length
    x = make_inputs(b, d, n, length, "cpu")
    grad_out = torch.randn(b, d, length, generator=torch.Generator().manual_seed(1))  # (B, D, L)
    impls = {"reference": scan_mod.selective_scan_ref, "cpu": scan_mod.selective_scan_cpu}
    if hasattr(scan_mod, "selective_scan_chunked"):
        impls["chunked"] = scan_mod.selective_scan_chunked

    ref_out = forward_fn(impls["reference"], x)()
    ref_grads = fwd_bwd_fn(impls["reference"], x, grad_out)()
    acc = {k: accuracy(f, ref_out, ref_grads, x, grad_out) for k, f in impls.items() if k != "reference"}

    fwd = interleaved({k: forward_fn(f, x) for k, f in impls.items()}, repeats=args.repeats, warmup=1)
    both = interleaved({k: fwd_bwd_fn(f, x, grad_out) for k, f in impls.items()}, repeats=args.repeats, warmup=1)

    rows, results = [], {}
    for k in impls:
        tf, tb = median(fwd[k]), median(both[k])
        sf, sb = median(fwd["reference"]) / tf, median(both["reference"]) / tb
        out_err, grad_err, grad_name = acc.get(k, (0.0, 0.0, "-"))
        results[k] = dict(
            forward_s=tf, fwd_bwd_s=tb, forward_speedup=sf, fwd_bwd_speedup=sb, max_abs_err=out_err,
            max_rel_grad_err=grad_err, worst_grad=grad_name, forward_times=fwd[k], fwd_bwd_times=both[k],
        )
        rows.append([
            k, fmt_s(tf), f"{spread(fwd[k]):.0%}", f"{sf:.1f}x", fmt_s(tb), f"{spread(both[k]):.0%}", f"{sb:.1f}x",
            "-" if k == "reference" else f"{out_err:.1e}",
            "-" if k == "reference" else f"{grad_err:.1e} ({grad_name})",
        ])
    print_table(
        ["impl", "forward", "spread", "speedup", "fwd+bwd", "spread", "speedup", "max abs err", "max rel grad err"],
        rows,
        title=f"selective scan on CPU, B={b} D={d} N={n} L={length}, median of {args.repeats} (interleaved)",
    )
    for k in impls:
        if k in ("reference", "cpu"):
            continue
        r = results[k]
        ok = min(r["forward_speedup"], r["fwd_bwd_speedup"]) >= 3 and r["max_abs_err"] <= 1e-4
        print(
            f"{k}: speed-up fwd {r['forward_speedup']:.1f}x, fwd+bwd {r['fwd_bwd_speedup']:.1f}x, "
            f"err {r['max_abs_err']:.1e} -> {'meets' if ok else 'misses'} the >= 3x target"
        )
    r = results["cpu"]
    speed = min(r["forward_speedup"], r["fwd_bwd_speedup"])
    ok = speed >= 3 and r["max_abs_err"] <= 1e-4 and r["max_rel_grad_err"] <= 1e-4
    line = headline(
        "scan_speedup_vs_reference", speed, "x", ">= 3x, err <= 1e-4", ok,
        f"(selective_scan_cpu; fwd {r['forward_speedup']:.1f}x, fwd+bwd {r['fwd_bwd_speedup']:.1f}x, "
        f"max abs err {r['max_abs_err']:.1e})",
    )
    return line, results


# (B, D, N, L): a training batch of the paper's setting (64 clips, d_inner 512, 48 tokens) and a long sequence at
# batch 2, where the parallelism has to come from the channels.
UPDATE_SIZES = ((64, 512, 16, 48), (2, 1024, 16, 4096))


def token_major(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same values with u, delta, z as transposed views of contiguous (B, L, D) tensors: what a Mamba block
    passes (its projections are token-major), and the layout `selective_scan_cpu` reads in place."""
    return {k: v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z") else v for k, v in x.items()}


def per_update_benchmark(args) -> dict:
    """ns per state update (wall time / (B*D*N*L)) of `selective_scan_cpu`, run interleaved: float32 inputs laid out
    as a Mamba block passes them (token-major views, "f32"), the same values as contiguous (B, D, L) tensors (one
    transposing copy of u, delta, z per call, "f32 (B,D,L)"), and float64 (the float64 path); forward,
    forward+backward and their ratio."""
    sizes = ((1, 8, 4, 64), (1, 8, 4, 130)) if args.smoke else UPDATE_SIZES
    rows, results = [], {}
    for b, d, n, length in sizes:
        x = make_inputs(b, d, n, length, "cpu")
        inputs = {"f32": token_major(x), "f32 (B,D,L)": x, "f64": token_major({k: v.double() for k, v in x.items()})}
        g = torch.randn(b, length, d, generator=torch.Generator().manual_seed(1)).transpose(1, 2)  # (B, D, L)
        grads = {"f32": g, "f32 (B,D,L)": g.contiguous(), "f64": g.double()}
        fn = scan_mod.selective_scan_cpu
        fwd = interleaved({k: forward_fn(fn, v) for k, v in inputs.items()}, repeats=args.repeats, warmup=1)
        both = interleaved({k: fwd_bwd_fn(fn, v, grads[k]) for k, v in inputs.items()}, repeats=args.repeats,
                           warmup=1)
        updates = b * d * n * length
        for k in inputs:
            tf, tb = median(fwd[k]), median(both[k])
            key = f"B{b}_D{d}_N{n}_L{length}_{k.replace(' ', '_')}"
            results[key] = dict(forward_ns_per_update=tf / updates * 1e9, fwd_bwd_ns_per_update=tb / updates * 1e9,
                                fwd_bwd_over_fwd=tb / tf, forward_times=fwd[k], fwd_bwd_times=both[k])
            r = results[key]
            rows.append([
                f"{b}x{d}x{n}x{length}", k, f"{r['forward_ns_per_update']:.2f}", f"{spread(fwd[k]):.0%}",
                f"{r['fwd_bwd_ns_per_update']:.2f}", f"{spread(both[k]):.0%}", f"{r['fwd_bwd_over_fwd']:.2f}x",
            ])
    print_table(
        ["B x D x N x L", "inputs", "fwd ns/update", "spread", "fwd+bwd ns/update", "spread", "fwd+bwd / fwd"],
        rows,
        title=f"selective_scan_cpu per state update, {torch.get_num_threads()} threads, median of {args.repeats} "
        "(the three input kinds interleaved)",
    )
    return results


def load_scan_module(path: str):
    """Another version of mambavl/fuse/scan.py, imported from `path` under its own name beside the current one (its
    numba kernels compile separately). Raises SystemExit naming the file when it cannot be imported or has no
    `selective_scan_cpu`."""
    spec = importlib.util.spec_from_file_location("mambavl_scan_against", path)
    if spec is None or not Path(path).is_file():
        raise SystemExit(f"--against {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # numba's on-disk cache finds the kernels' module by name when it loads them
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # any failure of the other version's import is reported, not raised
        del sys.modules[spec.name]
        raise SystemExit(f"--against {path}: cannot import it ({type(e).__name__}: {e})") from e
    if not hasattr(module, "selective_scan_cpu"):
        raise SystemExit(f"--against {path}: defines no selective_scan_cpu")
    return module


def against_benchmark(args, other) -> dict:
    """`selective_scan_cpu` of `other` (the module from `args.against`, "before") vs the current one ("after"),
    interleaved: forward and forward+backward per state update, in wall and in process CPU time, float32
    token-major inputs; and the largest relative difference between the versions' outputs and gradients."""
    versions = {"before": other.selective_scan_cpu, "after": scan_mod.selective_scan_cpu}
    sizes = ((1, 8, 4, 64), (1, 8, 4, 130)) if args.smoke else UPDATE_SIZES
    rows, results = [], {}
    for b, d, n, length in sizes:
        x = token_major(make_inputs(b, d, n, length, "cpu"))
        g = torch.randn(b, length, d, generator=torch.Generator().manual_seed(1)).transpose(1, 2)
        outs = {k: fwd_bwd_fn(f, x, g)() | {"out": forward_fn(f, x)()} for k, f in versions.items()}
        diff = max(
            ((outs["before"][k] - outs["after"][k]).abs().max() / outs["before"][k].abs().max().clamp_min(1e-30)).item()
            for k in outs["after"]
        )
        cpu: dict[str, list[float]] = {}

        def cpu_timed(name, fn):
            def run():
                t0 = time.process_time()
                fn()
                cpu.setdefault(name, []).append(time.process_time() - t0)

            return run

        fns = {}
        for k, f in versions.items():
            fns[f"fwd {k}"] = cpu_timed(f"fwd {k}", forward_fn(f, x))
            fns[f"both {k}"] = cpu_timed(f"both {k}", fwd_bwd_fn(f, x, g))
        wall = interleaved(fns, repeats=args.repeats, warmup=1)
        cpu = {k: v[-args.repeats:] for k, v in cpu.items()}  # the timed rounds, not the warm-up
        updates = b * d * n * length
        size = f"{b}x{d}x{n}x{length}"
        results[size] = {"max_rel_diff": diff}
        for k in versions:
            fw, bw = median(wall[f"fwd {k}"]) / updates * 1e9, median(wall[f"both {k}"]) / updates * 1e9
            fc, bc = median(cpu[f"fwd {k}"]) / updates * 1e9, median(cpu[f"both {k}"]) / updates * 1e9
            results[size][k] = dict(fwd_ns=fw, fwd_bwd_ns=bw, ratio=bw / fw, fwd_cpu_ns=fc, fwd_bwd_cpu_ns=bc,
                                    ratio_cpu=bc / fc)
            rows.append([size, k, f"{fw:.2f}", f"{bw:.2f}", f"{bw / fw:.2f}x", f"{fc:.2f}", f"{bc:.2f}",
                         f"{bc / fc:.2f}x", f"{diff:.1e}" if k == "after" else ""])
    print_table(
        ["B x D x N x L", "version", "fwd (wall)", "fwd+bwd (wall)", "ratio (wall)", "fwd (CPU)", "fwd+bwd (CPU)",
         "ratio (CPU)", "max rel diff"],
        rows,
        title=f"selective_scan_cpu: {args.against} (before) vs this checkout (after), float32 token-major, ns per "
        f"state update, {torch.get_num_threads()} threads, median of {args.repeats} (interleaved)",
    )
    return results


def gpu_impls() -> dict:
    """The implementations of the --cuda branch: the portable `chunked` scan, mamba-ssm's kernel when it imports, the
    Triton kernels when Triton imports (CUDA, or its interpreter on CPU tensors)."""
    impls = {"chunked": scan_mod.selective_scan_chunked}
    try:
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401

        impls["cuda"] = scan_mod.selective_scan_cuda
    except ImportError as e:
        print(f"mamba-ssm is not importable ({e}); install the `cuda` extra for its kernel.")
    if "triton" in scan_mod.available_impls():
        impls["triton"] = scan_mod.selective_scan_triton
    return impls


def cuda_benchmark(args) -> tuple[str | None, dict]:
    """The GPU kernels (mamba-ssm's, Triton's) vs the portable scan on one GPU, each checked against the float64
    reference; skipped with a message when CUDA is absent, or run on CPU tensors as a dry run of the code path when
    Triton's interpreter is on (TRITON_INTERPRET=1; timings then mean nothing)."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpreting:
        print("\nCUDA branch skipped: torch.cuda.is_available() is False on this machine (no GPU).")
        return None, {"skipped": "no CUDA"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = gpu_impls()
    if len(impls) == 1:
        print("\nCUDA branch skipped: neither mamba-ssm nor triton is importable.")
        return None, {"skipped": "no GPU kernel"}
    b, d, n, length = args.batch, args.dim, args.state, args.length
    if device == "cpu":
        print("\nCUDA branch as a dry run on CPU tensors in Triton's interpreter (no GPU): timings mean nothing.")
        length = min(length, 16)
    x = make_inputs(b, d, n, length, device)
    grad_out = torch.randn(b, d, length, generator=torch.Generator().manual_seed(1)).to(device)
    x64 = {k: v.double() for k, v in x.items()}
    ref_out = forward_fn(scan_mod.selective_scan_ref, x64)()
    ref_grads = fwd_bwd_fn(scan_mod.selective_scan_ref, x64, grad_out.double())()
    acc = {k: accuracy(f, ref_out, ref_grads, x, grad_out) for k, f in impls.items()}
    repeats, warmup = (args.repeats, 1) if args.smoke else (max(args.repeats, 20), 3)
    fwd = interleaved({k: forward_fn(f, x) for k, f in impls.items()}, repeats=repeats, warmup=warmup)
    both = interleaved({k: fwd_bwd_fn(f, x, grad_out) for k, f in impls.items()}, repeats=repeats, warmup=warmup)
    rows, results = [], {}
    for k in impls:
        tf, tb = median(fwd[k]), median(both[k])
        sf, sb = median(fwd["chunked"]) / tf, median(both["chunked"]) / tb
        results[k] = dict(forward_s=tf, fwd_bwd_s=tb, forward_speedup=sf, fwd_bwd_speedup=sb, max_abs_err=acc[k][0],
                          max_rel_grad_err=acc[k][1], worst_grad=acc[k][2])
        rows.append([k, fmt_s(tf), f"{sf:.1f}x", fmt_s(tb), f"{sb:.1f}x", f"{acc[k][0]:.1e}",
                     f"{acc[k][1]:.1e} ({acc[k][2]})"])
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    print_table(["impl", "forward", "vs chunked", "fwd+bwd", "vs chunked", "max abs err", "max rel grad err"], rows,
                title=f"selective scan on {name}, B={b} D={d} N={n} L={length}, float64 reference")
    # the headline: mamba-ssm's kernel when present (the fast path `auto` picks), else the Triton kernels
    fast = "cuda" if "cuda" in impls else "triton"
    r = results[fast]
    speed = min(r["forward_speedup"], r["fwd_bwd_speedup"])
    ok = speed >= 5 and r["max_abs_err"] <= 1e-3
    line = headline(
        "cuda_scan_speedup_vs_portable" if fast == "cuda" else "triton_scan_speedup_vs_portable", speed, "x",
        ">= 5x, equal outputs", ok,
        f"(fwd {r['forward_speedup']:.1f}x, fwd+bwd {r['fwd_bwd_speedup']:.1f}x, max abs err {r['max_abs_err']:.1e})",
    )
    return line, results


def main() -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--cuda", action="store_true", help="also benchmark mamba-ssm's CUDA kernel (needs a GPU)")
    p.add_argument("--against", metavar="FILE", help="another version of mambavl/fuse/scan.py to time interleaved "
                   "against this one (e.g. from `git show REV:mambavl/fuse/scan.py`)")
    args = p.parse_args()
    if args.smoke:
        args.batch, args.dim, args.state, args.length = 1, 8, 4, 64
    args.repeats = args.repeats or (2 if args.smoke else 7)
    other = load_scan_module(args.against) if args.against else None  # a bad file fails before the long runs
    setup_threads(args.threads)
    print(machine_line())
    line, results = cpu_benchmark(args)
    payload = {"args": vars(args), "cpu": results, "per_update": per_update_benchmark(args)}
    for key, r in payload["per_update"].items():
        if key.endswith("_f32"):
            print(
                f"selective_scan_cpu float32 (token-major) at {key[:-4].replace('_', ' ')}: "
                f"{r['forward_ns_per_update']:.2f} ns per state update forward (target <= 6), "
                f"fwd+bwd {r['fwd_bwd_over_fwd']:.2f}x forward (target <= 3x)"
            )
    if args.against:
        payload["against"] = against_benchmark(args, other)
    if args.cuda:
        cuda_line, payload["cuda"] = cuda_benchmark(args)
        if cuda_line is not None:
            print(line)  # keep the CPU result visible; the CUDA headline is the last line
            line = cuda_line
    write_json(args.json, payload)
    print(line)


if __name__ == "__main__":
    main()
