"""The Triton selective scan (`selective_scan_triton`) against the sequential reference: the output, the last state
and the gradient of every input, over the argument variants (D, z, delta_bias + softplus or not; B, C shared or per
channel; one A or a grouped A chosen per position; L = 1, odd L, L over one checkpoint chunk, channels over one
block; float64, float32, bfloat16, float16 inputs).

Without a GPU the kernels run in Triton's interpreter on CPU tensors. Triton reads TRITON_INTERPRET when it is
imported (its own `triton.language` helpers are compiled-mode objects otherwise, and fail inside an interpreted
kernel), so the cases run in one child Python started with TRITON_INTERPRET=1 (this file, run as a script), and
each test checks one case's figures. The interpreter is slow (~20 ms per program and position for forward and
backward), hence tiny shapes. On a CUDA machine the GPU-marked tests run the compiled kernels on the same cases
and on larger ones (scripts/gpu-check.sh runs them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
MARK = "TRITON_CASES "

# name -> (Bt, Din, N, L), input dtype, options. per: which of B, C are per channel (Bt, Din, N, L); groups: A is
# (groups, Din, N) with A_index cycling through the groups in runs; block_d / every: the kernels' channel block and
# checkpoint interval (None: their defaults); extremes: some pre-softplus deltas beyond +-20 (softplus's branches).
CASES = {
    "L1_plain": ((1, 4, 3, 1), "float64", dict(D=False, z=False, bias=False, softplus=False)),
    "odd_L_all_options_two_channel_blocks": ((2, 6, 3, 7), "float64", dict(block_d=4)),
    "chunks_per_channel_BC": ((1, 4, 4, 13), "float64", dict(per="BC", every=4, block_d=4)),
    "grouped_A_3_groups_B_per_channel": ((1, 5, 3, 10), "float64", dict(per="B", groups=3, every=4, block_d=4)),
    "grouped_A_C_per_channel_last_state": ((1, 3, 2, 9), "float64", dict(per="C", groups=2, every=4, last=True)),
    "D_z_no_bias_f32": ((2, 4, 4, 9), "float32", dict(bias=False, softplus=False)),
    "bias_softplus_extremes_f32": ((1, 4, 4, 9), "float32", dict(D=False, z=False, extremes=True)),
    "defaults_two_chunks_last_state_f32": ((1, 4, 4, 20), "float32", dict(last=True)),
    "bf16": ((2, 8, 4, 12), "bfloat16", dict(every=5)),
    "fp16_grouped_per_channel": ((1, 4, 4, 10), "float16", dict(per="BC", groups=2, every=4)),
}
# Larger cases for the compiled kernels only (too slow for the interpreter).
GPU_CASES = {
    "gpu_long_f32": ((2, 64, 16, 700), "float32", {}),
    "gpu_many_blocks_grouped_bf16": ((3, 200, 16, 300), "bfloat16", dict(per="B", groups=2)),
}
# max |fast - reference| <= tol * max(|reference|, 1), by input dtype (reference in float64 on the same values).
TOL = {"float64": 1e-12, "float32": 2e-5, "bfloat16": 2e-2, "float16": 4e-3}


def make_inputs(shape, opts, seed=0):
    """float64 inputs like a Mamba block's (A negative, delta around softplus's knee, or positive without softplus);
    absent options are None. Returns (inputs, keyword arguments of the scan)."""
    bt, din, n, length = shape
    g = torch.Generator().manual_seed(seed + sum(shape))
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    softplus = opts.get("softplus", True)
    groups = opts.get("groups", 0)
    per = opts.get("per", "")
    delta = r(bt, din, length, scale=0.5) - 1.0 if softplus else 0.05 + 0.5 * torch.rand(
        bt, din, length, generator=g, dtype=torch.float64)
    if opts.get("extremes"):
        delta[..., 0], delta[..., 1] = 25.0, -25.0
    x = {
        "u": r(bt, din, length), "delta": delta,
        "A": -(0.5 + torch.rand(*((groups,) if groups else ()), din, n, generator=g, dtype=torch.float64)),
        "B": r(*((bt, din, n, length) if "B" in per else (bt, n, length))),
        "C": r(*((bt, din, n, length) if "C" in per else (bt, n, length))),
        "D": r(din) if opts.get("D", True) else None,
        "z": r(bt, din, length) if opts.get("z", True) else None,
        "delta_bias": r(din, scale=0.1) if opts.get("bias", True) else None,
    }
    kw = {"delta_softplus": softplus, "return_last_state": bool(opts.get("last"))}
    if groups:
        kw["A_index"] = (torch.arange(length) // 3) % groups  # runs of 3 positions per group
    return x, kw


def run(fn, x, kw, grad_out):
    """(output, last state or None, gradients of the given inputs) of fn on leaves cloned from x."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in x.items() if v is not None}
    res = fn(**leaves, **{k: v for k, v in x.items() if v is None}, **kw)
    out, last = res if kw["return_last_state"] else (res, None)
    grads = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))))
    return out.detach(), last, grads


def compare(case, device):
    """Errors of the Triton scan against the float64 reference for one case: {quantity: [max abs err, scale]},
    plus the dtypes that differ from the inputs' ("dtype" list)."""
    from mambavl.fuse import scan

    shape, dtype, opts = {**CASES, **GPU_CASES}[case]
    x64, kw = make_inputs(shape, opts)
    keep32 = {"A", "D", "delta_bias"}  # as in a Mamba block: parameters in float32 beside half activations
    dt = getattr(torch, dtype)
    x = {k: (v.to(torch.float32 if k in keep32 and dt in (torch.bfloat16, torch.float16) else dt).to(device)
             if v is not None else None) for k, v in x64.items()}
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    grad_out = torch.randn(shape[0], shape[1], shape[3], generator=torch.Generator().manual_seed(7),
                           dtype=torch.float64).to(dt).to(device)
    ref_out, ref_last, ref_grads = run(scan.selective_scan_ref, {k: v.double() if v is not None else None
                                                                 for k, v in x.items()}, kw, grad_out.double())
    triton_kw = {"block_d": opts.get("block_d"), "checkpoint_every": opts.get("every")}
    out, last, grads = run(lambda **a: scan.selective_scan_triton(**a, **triton_kw), x, kw, grad_out)
    res = {"dtype": [], "output": err(out, ref_out)}
    if out.dtype != x["u"].dtype or out.shape != ref_out.shape:
        res["dtype"].append(f"output {out.dtype} {tuple(out.shape)}")
    if last is not None:
        res["last state"] = err(last, ref_last)
    for k, g in grads.items():
        res[f"d{k}"] = err(g, ref_grads[k])
        if g.dtype != x[k].dtype or g.shape != x[k].shape:
            res["dtype"].append(f"d{k} {g.dtype} {tuple(g.shape)}")
    return res


def err(got, ref):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return [float((got - ref).abs().max()) if ref.numel() else 0.0, max(float(ref.abs().max()), 1.0)]


def dispatch_checks():
    """`impl="triton"` and `available_impls` under the interpreter; the no-grad forward (no checkpoints kept)."""
    from mambavl.fuse import scan

    x, kw = make_inputs((1, 4, 3, 6), {})
    direct = scan.selective_scan_triton(**x, **kw)
    with torch.no_grad():
        no_grad = scan.selective_scan(**x, **kw, impl="triton")
    return {"available": scan.available_impls(), "no_grad_vs_grad": float((no_grad - direct.detach()).abs().max())}


def _child_main() -> None:
    torch.set_num_threads(1)
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install raises more than ImportError
        print(MARK + json.dumps({"skip": f"triton is not importable: {exc!r}"}))
        return
    results = {case: compare(case, "cpu") for case in CASES}
    results["dispatch"] = dispatch_checks()
    print(MARK + json.dumps(results))


@pytest.fixture(scope="module")
def interpreted():
    """Every case's figures from one child Python running the kernels in Triton's interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, __file__], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert res.returncode == 0, f"interpreter run failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    line = [ln for ln in res.stdout.splitlines() if ln.startswith(MARK)]
    assert line, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads(line[-1][len(MARK):])
    if "skip" in results:
        pytest.skip(results["skip"])
    return results


def check(case, res):
    dtype = {**CASES, **GPU_CASES}[case][1]
    assert not res["dtype"], f"{case}: results not in the inputs' dtypes: {res['dtype']}"
    expected = {"output", *(f"d{k}" for k, v in make_inputs(*{**CASES, **GPU_CASES}[case][::2])[0].items()
                            if v is not None)}
    assert expected <= set(res), f"{case}: missing {expected - set(res)}"
    for what, (e, scale) in ((k, v) for k, v in res.items() if k != "dtype"):
        assert e <= TOL[dtype] * scale, f"{case} {what}: max abs err {e:.3g} > {TOL[dtype]:g} * {scale:.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_triton_scan_matches_reference_interpreted(interpreted, case):
    check(case, interpreted[case])
    if CASES[case][2].get("last"):
        assert "last state" in interpreted[case]


def test_triton_dispatch_interpreted(interpreted):
    assert "triton" in interpreted["dispatch"]["available"]
    assert interpreted["dispatch"]["no_grad_vs_grad"] == 0.0


def test_triton_on_cpu_without_interpreter_is_refused():
    pytest.importorskip("triton", reason="triton is not importable here")
    from mambavl.errors import InputError
    from mambavl.fuse import scan

    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        pytest.skip("TRITON_INTERPRET is set in this process")
    x, kw = make_inputs((1, 4, 3, 5), {})
    with pytest.raises(InputError, match="CUDA tensors"):
        scan.selective_scan_triton(**x, **kw)
    with pytest.raises(InputError, match="power of two"):
        scan.selective_scan_triton(**x, **kw, block_d=3)


def _gpu_ready():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton", reason="triton is not importable here")


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES) + list(GPU_CASES))
def test_triton_scan_matches_reference_on_gpu(case):
    _gpu_ready()
    check(case, compare(case, "cuda"))


@pytest.mark.gpu
def test_auto_picks_triton_for_grouped_A_on_gpu():
    _gpu_ready()
    from mambavl.fuse import scan

    assert scan.resolve_impl("auto", torch.device("cuda"), grouped_A=True) == scan.ScanImpl.TRITON
    assert "triton" in scan.available_impls()


if __name__ == "__main__":
    _child_main()
