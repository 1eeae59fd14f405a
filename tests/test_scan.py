"""The fast selective scans (numba `cpu`, torch `chunked`) against the sequential reference: outputs and gradients
of every input, float32 and float64, fixed seeds (mamba-ssm's test recipe), plus gradcheck of the cpu backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mambavl.errors import InputError
from mambavl.fuse import scan

FAST = {"cpu": scan.selective_scan_cpu, "chunked": scan.selective_scan_chunked}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(
    bt, din, n, length, dtype, seed, *, D=True, z=True, bias=True, per_channel=False, groups=0, softplus=True
):
    """Inputs like a Mamba block's: A negative; delta around softplus's knee when the scan applies softplus, else
    already positive (a negative delta makes exp(delta*A) > 1 and the state explode). Missing options are None."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    bc_shape = (bt, din, n, length) if per_channel else (bt, n, length)
    x = {
        "u": t(bt, din, length),
        "delta": t(bt, din, length, scale=0.5, shift=-1.0) if softplus else 0.05 + 0.5 * torch.rand(
            bt, din, length, generator=g, dtype=torch.float64
        ).to(dtype),
        "A": -(0.5 + torch.rand(*((groups,) if groups else ()), din, n, generator=g, dtype=torch.float64)).to(dtype),
        "B": t(*bc_shape),
        "C": t(*bc_shape),
        "D": t(din) if D else None,
        "z": t(bt, din, length) if z else None,
        "delta_bias": t(din, scale=0.1) if bias else None,
    }
    return {k: (v.requires_grad_(True) if v is not None else None) for k, v in x.items()}


def run(fn, x, grad_out, **kw):
    """Output and the gradients of every given input (None for absent ones)."""
    out = fn(**x, **kw)
    leaves = [v for v in x.values() if v is not None]
    grads = iter(torch.autograd.grad(out, leaves, grad_out))
    return out.detach(), {k: (next(grads) if v is not None else None) for k, v in x.items()}


def assert_close(got, ref, rtol, what):
    """max |got - ref| <= rtol * max(|ref|, 1): relative to the tensor's scale (sums over L grow with L)."""
    got, ref = got.detach(), ref.detach()
    scale = max(float(ref.abs().max()), 1.0) if ref.numel() else 1.0
    err = float((got.to(ref.dtype) - ref).abs().max()) if ref.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} > {rtol:g} * {scale:.3g}"


RTOL = {torch.float32: 2e-5, torch.float64: 1e-10}
SHAPES = [  # (Bt, Din, N, L): L=1, odd lengths, a multiple of the cpu checkpoint interval, and long sequences
    (1, 4, 4, 1),
    (2, 16, 4, 7),
    (1, 4, 16, 64),
    (2, 8, 16, 300),
    (2, 16, 8, 130),
]
OPTIONS = [  # (D, z, delta_bias, delta_softplus)
    (False, False, False, False),
    (True, True, False, False),
    (False, False, True, True),
    (True, True, True, True),
]


OPTION_IDS = ["plain", "D_z", "bias_softplus", "all"]
# Every option set on the short shapes; the long one (the slow reference) with no options and with all of them.
GRID = [
    pytest.param(shape, opt, id=f"{'x'.join(map(str, shape))}-{oid}")
    for shape in SHAPES
    for opt, oid in zip(OPTIONS, OPTION_IDS)
    if shape[3] < 300 or oid in ("plain", "all")
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,options", GRID)
def test_fast_scans_match_reference(shape, options, dtype):
    D, z, bias, softplus = options
    x = make_inputs(*shape, dtype, seed=sum(shape), D=D, z=z, bias=bias, softplus=softplus)
    grad_out = torch.randn(shape[0], shape[1], shape[3], generator=torch.Generator().manual_seed(7), dtype=dtype)
    ref_out, ref_grads = run(scan.selective_scan_ref, x, grad_out, delta_softplus=softplus)
    assert ref_out.dtype == dtype and ref_out.shape == (shape[0], shape[1], shape[3])
    for name, fn in FAST.items():
        out, grads = run(fn, x, grad_out, delta_softplus=softplus)
        assert out.dtype == dtype
        assert_close(out, ref_out, RTOL[dtype], f"{name} output")
        for k in NAMES:
            if ref_grads[k] is None:
                assert grads[k] is None
                continue
            assert grads[k].shape == x[k].shape and grads[k].dtype == dtype
            assert_close(grads[k], ref_grads[k], RTOL[dtype] * 5, f"{name} d{k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", ["per_channel_BC", "grouped_A", "both"])
def test_per_channel_B_C_and_grouped_A(variant, dtype):
    """B/C per channel (Bt, Din, N, L) and a per-position A chosen from groups by A_index (the disjoint-A joint scan)."""
    per_channel = variant in ("per_channel_BC", "both")
    groups = 2 if variant in ("grouped_A", "both") else 0
    bt, din, n, length = 2, 6, 5, 150
    x = make_inputs(bt, din, n, length, dtype, seed=3, per_channel=per_channel, groups=groups)
    kw = {"delta_softplus": True}
    if groups:
        kw["A_index"] = (torch.arange(length) >= 37).long()  # question positions use A[0], video positions A[1]
    grad_out = torch.randn(bt, din, length, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ref_out, ref_grads = run(scan.selective_scan_ref, x, grad_out, **kw)
    for name, fn in FAST.items():
        out, grads = run(fn, x, grad_out, **kw)
        assert_close(out, ref_out, RTOL[dtype], f"{name} output")
        for k in NAMES:
            assert_close(grads[k], ref_grads[k], RTOL[dtype] * 5, f"{name} d{k}")
    if groups:  # a grouped A whose groups are equal is the plain scan
        same = dict(x, A=torch.stack([x["A"][1], x["A"][1]]).detach())
        plain = dict(x, A=x["A"][1].detach())
        assert_close(
            scan.selective_scan_ref(**same, **kw), scan.selective_scan_ref(**plain, delta_softplus=True), 1e-12, "groups"
        )


def test_grouped_A_differs_from_rescaled_delta():
    """A per position is not emulated by scaling delta (why the scan takes grouped A): the results differ."""
    x = make_inputs(1, 3, 4, 20, torch.float64, seed=5, D=False, z=False, bias=False, softplus=False)
    x = {k: (v.detach() if v is not None else None) for k, v in x.items()}
    A2 = torch.stack([x["A"], 2.0 * x["A"] + 0.1])
    idx = (torch.arange(20) >= 10).long()
    grouped = scan.selective_scan_cpu(**dict(x, A=A2), A_index=idx)
    assert not torch.allclose(grouped, scan.selective_scan_cpu(**x), atol=1e-6)
    assert torch.allclose(grouped, scan.selective_scan_ref(**dict(x, A=A2), A_index=idx), atol=1e-12)


def test_cpu_backward_recomputes_across_many_checkpoints(monkeypatch):
    """Chunked state recomputation in the cpu backward with a small interval (many chunks, a ragged last one)."""
    monkeypatch.setattr(scan, "_CKPT", 5)
    x = make_inputs(2, 4, 3, 23, torch.float64, seed=11)
    grad_out = torch.randn(2, 4, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref_out, ref_grads = run(scan.selective_scan_ref, x, grad_out, delta_softplus=True)
    out, grads = run(scan.selective_scan_cpu, x, grad_out, delta_softplus=True)
    assert_close(out, ref_out, 1e-12, "output")
    for k in NAMES:
        assert_close(grads[k], ref_grads[k], 1e-11, f"d{k}")


@pytest.mark.parametrize("variant", ["shared", "grouped_per_channel"])
def test_gradcheck_cpu_function(variant):
    grouped = variant != "shared"
    x = make_inputs(1, 3, 2, 9, torch.float64, seed=2, per_channel=grouped, groups=2 if grouped else 0)
    idx = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1]) if grouped else None
    keys = [k for k in NAMES if x[k] is not None]

    def f(*args):
        return scan.selective_scan_cpu(**dict(zip(keys, args)), delta_softplus=True, A_index=idx)

    assert torch.autograd.gradcheck(f, tuple(x[k] for k in keys), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_chunk_sizes(chunk):
    x = make_inputs(2, 4, 3, 50, torch.float64, seed=chunk)
    ref = scan.selective_scan_ref(**x, delta_softplus=True)
    assert_close(scan.selective_scan_chunked(**x, delta_softplus=True, chunk_size=chunk), ref, 1e-12, "output")


def test_chunked_stable_for_strong_decay():
    """delta*A summed over a chunk reaches -1e4: the segsum form must not overflow (no exp of large positives)."""
    x = make_inputs(1, 4, 4, 80, torch.float32, seed=0, bias=False)
    x = {k: (v.detach() if v is not None else None) for k, v in x.items()}
    x["delta"] = 5.0 + 25.0 * torch.rand(1, 4, 80, generator=torch.Generator().manual_seed(0))  # (1, 4, 80)
    x["A"] = -50.0 * torch.ones(4, 4)
    ref = scan.selective_scan_ref(**x)
    for fn in FAST.values():
        out = fn(**x)
        assert torch.isfinite(out).all()
        assert_close(out, ref, 2e-5, fn.__name__)


def test_zero_delta_passes_state_unchanged():
    """Positions with delta = 0 (padding) neither change the state nor feed it (what the model's masks rely on)."""
    x = make_inputs(1, 3, 4, 12, torch.float64, seed=4, z=False, bias=False, softplus=False)
    x = {k: (v.detach() if v is not None else None) for k, v in x.items()}
    keep = torch.ones(12, dtype=torch.bool)
    keep[4:7] = False
    padded = dict(x, delta=x["delta"] * keep)
    short = {k: (v[..., keep] if k in ("u", "delta", "B", "C") else v) for k, v in x.items()}
    for fn in (scan.selective_scan_ref, *FAST.values()):
        out, last = fn(**padded, return_last_state=True)
        out_s, last_s = fn(**short, return_last_state=True)
        assert_close(out[..., keep], out_s, 1e-12, "outputs at kept positions")
        assert_close(last, last_s, 1e-12, "last state")


def test_return_last_state():
    x = make_inputs(2, 4, 3, 70, torch.float32, seed=9)
    ref_out, ref_last = scan.selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert ref_last.shape == (2, 4, 3)
    for fn in FAST.values():
        out, last = fn(**x, delta_softplus=True, return_last_state=True)
        assert_close(out, ref_out, 2e-5, "out")
        assert_close(last, ref_last, 2e-5, "last")
        out.sum().backward()  # the last state carries no gradient, but the output still does
        assert x["u"].grad is not None
        x["u"].grad = None


def test_dispatch_and_available_impls():
    impls = scan.available_impls()
    assert {"reference", "chunked", "cpu"} <= set(impls)
    x = make_inputs(1, 4, 3, 10, torch.float64, seed=1, softplus=False)
    ref = scan.selective_scan_ref(**x)
    for impl in ["auto", *impls]:
        if impl == "cuda":
            continue
        assert_close(scan.selective_scan(**x, impl=impl), ref, 1e-12, impl)
    assert scan.resolve_impl("auto", torch.device("cpu")) == scan.ScanImpl.CPU
    with pytest.raises(InputError, match="not one of"):
        scan.selective_scan(**x, impl="magic")


def test_cuda_impl_without_mamba_ssm_says_how_to_install():
    if scan._mamba_ssm_importable():
        pytest.skip("mamba-ssm is installed here")
    x = make_inputs(1, 4, 3, 10, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match=r"mambavl\[cuda\]"):
        scan.selective_scan_cuda(**x)
    assert "cuda" not in scan.available_impls()


def test_bad_shapes_name_the_argument():
    x = make_inputs(1, 4, 3, 10, torch.float32, seed=1)
    with pytest.raises(InputError, match="delta"):
        scan.selective_scan_ref(**dict(x, delta=x["delta"][..., :5]))
    with pytest.raises(InputError, match="B must be"):
        scan.selective_scan_cpu(**dict(x, B=x["B"][:, :2]))
    with pytest.raises(InputError, match="A_index"):
        scan.selective_scan_chunked(**dict(x, A=torch.stack([x["A"], x["A"]])))
    with pytest.raises(InputError, match="A_index values"):
        scan.selective_scan_cpu(**dict(x, A=torch.stack([x["A"], x["A"]])), A_index=torch.full((10,), 2))


@pytest.mark.parametrize("variant", ["shared", "per_channel_grouped"])
def test_cpu_float32_close_to_float64_definition(variant):
    """float32 inputs are computed in float32 (a float64 reference of the same inputs bounds the error), with the
    gradient sums over positions, rows and channels (dA, dB, dC, dD, d delta_bias) accumulated accurately: 64
    channels and 200 positions, where float32 sums of that many terms would show."""
    grouped = variant != "shared"
    bt, din, n, length = 2, 64, 16, 200
    x = make_inputs(bt, din, n, length, torch.float32, seed=21, per_channel=grouped, groups=2 if grouped else 0)
    kw = {"delta_softplus": True, "A_index": (torch.arange(length) % 3 == 0).long() if grouped else None}
    grad_out = torch.randn(bt, din, length, generator=torch.Generator().manual_seed(3))
    x64 = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in x.items()}
    ref_out, ref_grads = run(scan.selective_scan_ref, x64, grad_out.double(), **kw)
    out, grads = run(scan.selective_scan_cpu, x, grad_out, **kw)
    assert out.dtype == torch.float32
    assert_close(out, ref_out, 2e-6, "output")
    for k in NAMES:
        assert grads[k].dtype == torch.float32 and grads[k].shape == x[k].shape
        assert_close(grads[k], ref_grads[k], 1e-5, f"d{k}")


def test_cpu_reads_strided_inputs_like_a_mamba_block():
    """u, delta, z as (B, D, L) views of (B, L, D) tensors and B, C as views of one (B, L, R + 2N) projection (the
    layouts a Mamba block passes, read in place): same outputs and gradients as contiguous copies."""
    bt, din, n, length = 2, 8, 16, 37
    x = make_inputs(bt, din, n, length, torch.float32, seed=8)
    g = torch.Generator().manual_seed(4)
    proj = torch.randn(bt, length, 3 + 2 * n, generator=g)  # (B, L, R + 2N)
    strided = {k: v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
               for k, v in x.items() if k in ("u", "delta", "z")}
    strided["B"] = proj[..., 3:3 + n].transpose(1, 2).detach().requires_grad_(True)  # (B, N, L), stride 1 over N
    strided["C"] = proj[..., 3 + n:].transpose(1, 2).detach().requires_grad_(True)
    assert not strided["u"].is_contiguous() and not strided["B"].is_contiguous()
    strided.update({k: x[k] for k in ("A", "D", "delta_bias")})
    contiguous = {k: v.detach().contiguous().requires_grad_(True) for k, v in strided.items()}
    grad_out = torch.randn(bt, din, length, generator=g)
    out_s, grads_s = run(scan.selective_scan_cpu, strided, grad_out, delta_softplus=True)
    out_c, grads_c = run(scan.selective_scan_cpu, contiguous, grad_out, delta_softplus=True)
    assert_close(out_s, out_c, 1e-6, "output")
    for k in NAMES:
        assert_close(grads_s[k], grads_c[k], 1e-6, f"d{k}")


def test_cpu_mixed_dtypes_follow_the_reference_rule():
    """A float64 A with float32 u computes in float64 (the reference's rule); each result comes back in its input's
    dtype; half-precision inputs are computed in float32."""
    x = make_inputs(1, 4, 3, 11, torch.float32, seed=6)
    x["A"] = x["A"].detach().double().requires_grad_(True)
    grad_out = torch.randn(1, 4, 11, generator=torch.Generator().manual_seed(5))
    ref_out, ref_grads = run(scan.selective_scan_ref, x, grad_out, delta_softplus=True)
    out, grads = run(scan.selective_scan_cpu, x, grad_out, delta_softplus=True)
    assert out.dtype == torch.float32
    assert_close(out, ref_out, 1e-6, "output")
    for k in NAMES:
        assert grads[k].dtype == x[k].dtype
        assert_close(grads[k], ref_grads[k], 1e-5, f"d{k}")
    half = {k: (v.detach().bfloat16() if v is not None else None) for k, v in x.items()}
    out_h = scan.selective_scan_cpu(**half, delta_softplus=True)
    assert out_h.dtype == torch.bfloat16
    ref_h = scan.selective_scan_ref(**half, delta_softplus=True)
    assert_close(out_h.float(), ref_h.float(), 2e-2, "bfloat16 output")


def test_cpu_scan_without_grad_stores_nothing():
    """Under no_grad (evaluation) the forward keeps no checkpoints: the result carries no graph."""
    x = make_inputs(1, 4, 16, 9, torch.float32, seed=2)
    with torch.no_grad():
        out = scan.selective_scan_cpu(**x, delta_softplus=True)
    assert out.grad_fn is None
    assert_close(out, scan.selective_scan_ref(**x, delta_softplus=True).detach(), 2e-5, "output")


@pytest.mark.parametrize("case", ["one_channel_per_channel_BC", "B_shared_C_per_channel", "many_channels"])
def test_cpu_backward_layouts_of_B_C(case):
    """The cpu backward's sums of dB/dC over channels (shared B/C) and its per-channel writes, mixed in one call, with
    a single channel, and over enough channels (and several work units) that the channel sums are flushed often."""
    bt, din, n, length = {"one_channel_per_channel_BC": (1, 1, 4, 70), "B_shared_C_per_channel": (2, 5, 3, 67),
                          "many_channels": (3, 80, 16, 9)}[case]
    x = make_inputs(bt, din, n, length, torch.float64, seed=12, per_channel=case == "one_channel_per_channel_BC")
    if case == "B_shared_C_per_channel":
        x["C"] = x["C"].detach()[:, None].expand(bt, din, n, length).contiguous().requires_grad_(True)
    grad_out = torch.randn(bt, din, length, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    ref_out, ref_grads = run(scan.selective_scan_ref, x, grad_out, delta_softplus=True)
    out, grads = run(scan.selective_scan_cpu, x, grad_out, delta_softplus=True)
    assert_close(out, ref_out, 1e-12, "output")
    for k in NAMES:
        assert_close(grads[k], ref_grads[k], 1e-11, f"d{k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("width", ["full", "narrow"])
@pytest.mark.parametrize("variant", ["model", "grouped_per_channel"])
def test_cpu_whole_channel_blocks_match_reference(monkeypatch, dtype, width, variant):
    """The kernels' fast path (a block of `_DB` channels at d_state 16, trip counts known at compile time) next to a
    partial block, and the narrow blocks used when a small batch would leave threads idle; the model's call (token-
    major views, softplus outside the scan) and grouped A with per-channel B/C. Several chunks, a ragged last one."""
    block = scan._DB if width == "full" else scan._DB_NARROW
    monkeypatch.setattr(scan, "_block_width", lambda bt, din: block)
    bt, din, n, length = 2, scan._DB + 3, 16, 37
    grouped = variant != "model"
    x = make_inputs(bt, din, n, length, dtype, seed=21, per_channel=grouped, groups=2 if grouped else 0,
                    bias=grouped, softplus=grouped)
    kw = {"delta_softplus": grouped}
    if grouped:
        kw["A_index"] = (torch.arange(length) >= 11).long()
    else:  # u, delta, z as a Mamba block passes them: transposed views of token-major tensors
        x = {k: (v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
                 if k in ("u", "delta", "z") else v) for k, v in x.items()}
    grad_out = torch.randn(bt, length, din, generator=torch.Generator().manual_seed(4), dtype=dtype).transpose(1, 2)
    ref_out, ref_grads = run(scan.selective_scan_ref, x, grad_out, **kw)
    out, grads = run(scan.selective_scan_cpu, x, grad_out, **kw)
    assert_close(out, ref_out, RTOL[dtype], "output")
    for k in NAMES:
        assert (grads[k] is None) == (ref_grads[k] is None), k
        if ref_grads[k] is not None:
            assert_close(grads[k], ref_grads[k], RTOL[dtype] * 5, f"d{k}")


def test_cpu_empty_length_gives_the_initial_state():
    """L = 0: no work unit runs; the output is empty and the last state is the initial (zero) state, as the
    reference gives it (the kernel's state buffer is never written then, so it must not be left uninitialised)."""
    x = make_inputs(2, 5, 4, 0, torch.float32, seed=1)
    x = {k: (v.detach() if v is not None else None) for k, v in x.items()}
    for _ in range(3):
        garbage = np.full(2 * 4 * 5, 7.0, np.float32)  # freed just before the call: numpy's allocator reuses it
        del garbage
        out, last = scan.selective_scan_cpu(**x, delta_softplus=True, return_last_state=True)
        ref_out, ref_last = scan.selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
        assert out.shape == ref_out.shape == (2, 5, 0)
        assert last.shape == ref_last.shape == (2, 5, 4)
        assert torch.equal(last, ref_last) and not last.any()
