"""Cost of the fusion kinds against sequence length: parameters, FLOPs, latency and peak memory.

One *training step* of the whole model is measured, as `mambavl train` runs it: the forward with the verb and
the noun question (both go through the fusion as one batch of 2B), a cross-entropy loss on the heads, backward.
The total sequence length L counts question tokens T (fixed) plus video tokens F = L - T; every fusion kind is built
from the same preset (same width, depth, input dims), only `fusion` differs.

FLOPs (`flops_*`, one multiply-add = 2 FLOPs, torch's convention)
    ``torch.utils.flop_counter.FlopCounterMode`` counts matrix products, convolutions and attention kernels (forward
    and backward as they run). It does not see the selective scan (a numba kernel on CPU, mamba-ssm's on CUDA), so
    while counting, every scan call is routed to an implementation the counter cannot see and its cost is added
    from a formula (`scan_flops`), using the shapes of the actual calls. Per batch row b, channel d, position t and
    state n the recurrence does

        Δ_t·A_dn (1) · exp(·) (2) · Δ_t·B_tn·u_t (2) · ā·h + b̄ (2) · Σ_n C_tn·h_n (2)  =  9 FLOPs

    i.e. ``9·Bt·L·Din·N`` forward (exp counted as 2 FLOPs: its range reduction and scale, a lower bound of what it
    costs; the per-channel work outside the state dimension — softplus, the D skip, the gate — is elementwise and
    left out, as torch's counter leaves out every elementwise op). Backward is counted as twice the forward, the
    convention torch's counter applies to matrix products (two products per product: grad input, grad weight).
    torch 2.x does not count the CPU flash-attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) that
    `nn.MultiheadAttention` uses on CPU; a formula for it (torch's own sdpa formula) is passed to the counter, so the
    transformer's quadratic attention term is counted on every device.

Latency (`latency_s`): median wall time of the step over `repeats`, after one warm-up; at each length the fusion
kinds run round-robin (interleaved) so a disturbance on a shared machine hits all of them.

Peak memory (`peak_memory_bytes`, how far the step raises memory above what was allocated just before it: activations,
gradients, workspace; parameters and inputs already exist and are not counted):

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (the caching allocator's own count).
* CPU: torch keeps no CPU allocator statistics, `tracemalloc` does not see torch, and the numba scan allocates
  numpy buffers that no torch profiler sees. So each (fusion, length) runs in a fresh Python process, started with
  ``MALLOC_MMAP_THRESHOLD_`` low so that large buffers are mmap'ed and returned to the OS when freed (the resident
  size then follows live allocations); it resets its resident high-water mark just before the step (Linux
  ``/proc/self/clear_refs``) and reports how far the step raised it (``VmHWM``) above its resident size just before.
  A calibration child allocates a known buffer to check the method; its result is kept with the table. Where the
  mark cannot be reset, ``ru_maxrss`` is used and `memory_trusted` is False when the step did not raise it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mambavl.device import resolve_device
from mambavl.errors import InputError, available_memory_bytes
from mambavl.fuse import scan as scan_mod
from mambavl.fuse.model import FusionKind
from mambavl.fuse.model import create_model
from mambavl.progress import Progress, or_none
from mambavl.tables import markdown_table


# FLOPs of the scan recurrence per (batch row, channel, position, state), derived in the module docstring.
SCAN_FWD_FLOPS_PER_STATE = 9
# Backward of the scan counted as twice its forward (torch's convention for matrix products).
SCAN_BWD_FACTOR = 2
# Below glibc's default dynamic mmap threshold (up to 32 MiB) so freed tensor buffers leave the resident set at once.
MMAP_THRESHOLD = str(128 * 1024)
_CHILD_FLAG = "--efficiency-child"


class MemoryMethod(str, Enum):
    """How peak memory is measured: auto (cuda on a CUDA device, rss on CPU), rss, cuda, none."""

    AUTO = "auto"
    RSS = "rss"
    CUDA = "cuda"
    NONE = "none"


@dataclass
class EfficiencyConfig:
    """What to measure. `lengths` are total tokens per fused sequence (question + video); `fusions` are
    `FusionKind` values; `d_model` / `n_layers` override the preset (None = the preset's). `batch_size` clips per
    step (each clip is fused twice, verb and noun question). `out_dir` None: measure only, write nothing."""

    out_dir: str | None = None
    lengths: tuple[int, ...] = (256, 1024, 4096)
    fusions: tuple[str, ...] = ("mamba", "transformer", "concat")
    preset: str = "small"
    d_model: int | None = None
    n_layers: int | None = None
    batch_size: int = 2
    question_tokens: int = 32
    video_dim: int = 512
    text_dim: int = 512
    num_verbs: int = 97
    num_nouns: int = 300
    device: str = "cpu"
    repeats: int = 3
    memory: MemoryMethod = MemoryMethod.AUTO
    plot: bool = True
    seed: int = 0
    extra: dict = field(default_factory=dict)  # further ModelConfig overrides (e.g. scan_layout)
    # Memory the run may use, bytes; None = MEMORY_SHARE of what the device has available now (`available_memory`).
    # The run is refused before it starts when its estimated peak (`estimate_step_bytes`) exceeds it.
    memory_budget: int | None = None

    def __post_init__(self) -> None:
        self.lengths = tuple(int(n) for n in self.lengths)
        self.fusions = tuple(str(getattr(f, "value", f)) for f in self.fusions)
        try:
            self.memory = MemoryMethod(self.memory)
        except ValueError:
            raise InputError(
                f"efficiency: memory {self.memory!r} is not one of {[m.value for m in MemoryMethod]}"
            ) from None

        known = [k.value for k in FusionKind]
        for f in self.fusions:
            if f not in known:
                raise InputError(f"efficiency: fusion {f!r} is not one of {', '.join(known)}")
        if not self.fusions:
            raise InputError("efficiency: no fusion kinds given")
        if not self.lengths:
            raise InputError("efficiency: no lengths given")
        for n in self.lengths:
            if n <= self.question_tokens:
                raise InputError(
                    f"efficiency: length {n} must exceed the {self.question_tokens} question tokens "
                    "(the total counts question + video tokens)"
                )
        for name in ("batch_size", "question_tokens", "repeats", "video_dim", "text_dim", "num_verbs"):
            if getattr(self, name) < 1:
                raise InputError(f"efficiency: {name}={getattr(self, name)!r} must be >= 1")


# ----------------------------------------------------------------------------------------------------------------
# memory guard: estimate before running, refuse what cannot fit

# Share of the available memory a run may plan to use (the rest: the OS, other jobs, the estimate's error).
MEMORY_SHARE = 0.8
# Bytes of one float32 element (the steps run in float32).
BYTES_PER_ELEMENT = 4


def estimate_step_bytes(fusion: str, batch_size: int, total: int, d_model: int, n_layers: int, d_state: int,
                        expand: int, n_heads: int, video_dim: int, bytes_per_element: int = BYTES_PER_ELEMENT) -> int:
    """Estimated peak memory growth of one training step (activations and gradients kept for the backward), bytes.

    Bt = 2 x batch sequences (each clip is fused with the verb and the noun question) of L = `total` tokens:
    inputs and projections Bt·L·(2·video_dim + 2·d_model) elements; per layer, mamba Bt·L·(22·d_inner + 4·d_state)
    (projections, conv, Δ/B/C, gate, output and their gradients; the CPU scan checkpoints its states), transformer
    Bt·L·16·d_model plus 4·Bt·heads·L² for self-attention (scores, probabilities, dropout mask and their gradient:
    the quadratic term), concat nothing more. Calibrated on this machine's RSS measurements (docs/benchmarks.md:
    mamba / transformer / concat at 2080 tokens, batch 2, d_model 128: measured 330 / 1978 / 43 MiB, estimated
    402 / 2283 / 41 MiB), so it errs on the high side by up to ~25 %."""
    bt, length, d_inner = 2 * batch_size, total, expand * d_model
    elements = bt * length * (2 * video_dim + 2 * d_model)
    if fusion == "mamba":
        elements += n_layers * bt * length * (22 * d_inner + 4 * d_state)
    elif fusion == "transformer":
        elements += n_layers * (bt * length * 16 * d_model + 4 * bt * n_heads * length * length)
    return int(elements * bytes_per_element)


def available_memory(device: torch.device) -> int:
    """Bytes the device can give now: CUDA's free memory, else MemAvailable of /proc/meminfo (Linux), else the
    physical pages the OS reports free."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_memory_bytes()


def memory_plan(cfg: EfficiencyConfig, device: torch.device) -> dict[str, Any]:
    """The estimated peak of the run (its largest step, `estimate_step_bytes`) against its budget; InputError naming
    the options to lower when it does not fit. Returns {"estimates": {(fusion, length): bytes}, "peak", "budget",
    "available"}."""
    configs = {f: efficiency_model(cfg, f, 64, torch.device("cpu")).cfg for f in cfg.fusions}
    estimates = {
        (f, n): estimate_step_bytes(f, cfg.batch_size, n, int(mc.d_model), int(mc.n_layers), int(mc.d_state),
                                    int(mc.expand), int(mc.n_heads), cfg.video_dim)
        for f, mc in configs.items() for n in cfg.lengths
    }
    available = available_memory(device)
    budget = cfg.memory_budget if cfg.memory_budget is not None else int(MEMORY_SHARE * available)
    (fusion, length), peak = max(estimates.items(), key=lambda kv: kv[1])
    if peak > budget:
        raise InputError(
            f"efficiency: one training step of {fusion} at {length} tokens needs about {_fmt_bytes(peak)} "
            f"(estimated from batch {cfg.batch_size}, {length} tokens, d_model {configs[fusion].d_model}, "
            f"{configs[fusion].n_layers} layers), more than the {_fmt_bytes(budget)} this run may use "
            + ("(--memory-budget)" if cfg.memory_budget is not None else
               f"({MEMORY_SHARE:.0%} of the {_fmt_bytes(available)} available)")
            + ". Lower --lengths (the longest sets the peak"
            + (", and the transformer's grows with its square" if fusion == "transformer" else "")
            + "), --batch-size or --d-model, or leave that fusion out of --fusions")
    return {"estimates": estimates, "peak": peak, "budget": budget, "available": available}


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def flag_noise(rows: list[dict]) -> None:
    """Mark latencies whose noise is as large as what they report. For each fusion, from one length to the next
    the table reports a change of median latency; when the spread (max - min over repeats) of either length is at
    least that change, or latency *fell* with length (more work cannot take less time: load noise), the longer
    row gets `latency_noise` (a reason), else None. `latency_spread_s`: the row's spread (None with one run)."""
    for r in rows:
        runs = r.get("latency_runs") or []
        r["latency_spread_s"] = float(max(runs) - min(runs)) if len(runs) > 1 else None
        r["latency_noise"] = None
    for fusion in dict.fromkeys(r["fusion"] for r in rows):
        mine = sorted((r for r in rows if r["fusion"] == fusion), key=lambda r: r["total_tokens"])
        for a, b in zip(mine, mine[1:]):
            change = b["latency_s"] - a["latency_s"]
            spreads = [x["latency_spread_s"] for x in (a, b) if x["latency_spread_s"] is not None]
            if change <= 0:
                b["latency_noise"] = (f"latency fell from {a['total_tokens']} to {b['total_tokens']} tokens: "
                                      "load noise (more work cannot take less time)")
            elif spreads and max(spreads) >= change:
                b["latency_noise"] = (f"spread over repeats {max(spreads):.3g} s >= the change {change:.3g} s from "
                                      f"{a['total_tokens']} tokens")
            elif not spreads:
                b["latency_noise"] = "one run per length: spread unknown (use --repeats 3 or more)"


# ----------------------------------------------------------------------------------------------------------------
# model and step


def efficiency_model(cfg: EfficiencyConfig, fusion: str, max_tokens: int, device: torch.device) -> torch.nn.Module:
    """The preset's model with `fusion`, a position table long enough for `max_tokens` video tokens, in train mode
    (dropout as in training) on `device`."""

    torch.manual_seed(cfg.seed)
    overrides = dict(cfg.extra)
    overrides.update(
        fusion=fusion, d_model=cfg.d_model, n_layers=cfg.n_layers, video_dim=cfg.video_dim, text_dim=cfg.text_dim,
        num_verbs=cfg.num_verbs, num_nouns=cfg.num_nouns, max_frames=max(64, max_tokens),
    )
    model, _ = create_model(cfg.preset, **overrides)
    return model.to(device).train()


def make_batch(cfg: EfficiencyConfig, total: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Random inputs of one step at total length `total`: video (B, F, Dv), video_mask (B, F), q_tokens
    (B, 2, T, Dt), q_mask (B, 2, T), verb / noun targets (B,)."""
    g = torch.Generator().manual_seed(cfg.seed * 100003 + total)
    b, t = cfg.batch_size, cfg.question_tokens
    f = total - t
    video = torch.randn(b, f, cfg.video_dim, generator=g)  # (B, F, Dv)
    vmask = torch.ones(b, f, dtype=torch.bool)  # (B, F)
    q = torch.randn(b, 2, t, cfg.text_dim, generator=g)  # (B, 2, T, Dt)
    qmask = torch.ones(b, 2, t, dtype=torch.bool)  # (B, 2, T)
    verb = torch.randint(cfg.num_verbs, (b,), generator=g)
    noun = torch.randint(max(cfg.num_nouns, 1), (b,), generator=g)
    return tuple(x.to(device) for x in (video, vmask, q, qmask, verb, noun))


def train_step(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], backward: bool = True) -> Callable[[], None]:
    """A callable running one step: forward with both questions, cross-entropy on verb (and noun) heads, backward."""
    video, vmask, q, qmask, verb, noun = batch

    def run() -> None:
        model.zero_grad(set_to_none=True)
        out = model(video, vmask, q, qmask)
        loss = F.cross_entropy(out["verb"], verb)
        if "noun" in out:
            loss = loss + F.cross_entropy(out["noun"], noun)
        if backward:
            loss.backward()

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs


def scan_flops(bt: int, din: int, length: int, d_state: int) -> int:
    """Forward FLOPs of one selective scan over u (Bt, Din, L) with state size N: 9·Bt·L·Din·N (module docstring)."""
    return SCAN_FWD_FLOPS_PER_STATE * bt * length * din * d_state


@dataclass
class ScanCall:
    """Shape of one selective-scan call seen while counting: u (bt, din, length), A (..., d_state)."""

    bt: int
    din: int
    length: int
    d_state: int

    @property
    def flops(self) -> int:
        return scan_flops(self.bt, self.din, self.length, self.d_state)


@contextlib.contextmanager
def record_scans(model: torch.nn.Module) -> Iterator[list[ScanCall]]:
    """While active, every selective scan of `model` is recorded (shapes) and run by an implementation the FLOP
    counter cannot see (numba on CPU when importable, else the plain reference loop, whose elementwise ops the counter
    ignores), so the scan's FLOPs are counted once, by formula, never twice. The model's scan implementation is
    passed to it (`MambaVL.use_scan`) and restored on exit; no module is patched."""
    invisible = scan_mod.selective_scan_ref
    if "cpu" in scan_mod.available_impls():
        invisible = scan_mod.selective_scan_cpu
    calls: list[ScanCall] = []

    def counted(u, delta, A, B, C, *args, A_index=None):
        bt, din, length = u.shape
        calls.append(ScanCall(int(bt), int(din), int(length), int(A.shape[-1])))
        fn = invisible if u.device.type == "cpu" else scan_mod.selective_scan_ref
        return fn(u, delta, A, B, C, *args, A_index=A_index)

    previous = model.use_scan(counted) if hasattr(model, "use_scan") else None
    try:
        yield calls
    finally:
        if hasattr(model, "use_scan"):
            model.use_scan(previous)


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kw) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _custom_flop_mapping() -> dict:
    """Formulas for kernels torch's counter misses: the CPU flash attention and its backward."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return mapping


def count_flops(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """FLOPs of one step on CPU: torch-counted forward / backward, the scan's forward by formula, and totals.

    Returns dict(torch_forward, torch_backward, scan_forward, scan_calls, forward, train_step) where forward =
    torch_forward + scan_forward and train_step = forward + torch_backward + 2·scan_forward.
    """
    from torch.utils.flop_counter import FlopCounterMode

    video, vmask, q, qmask, verb, noun = batch
    mapping = _custom_flop_mapping()
    model.zero_grad(set_to_none=True)
    with record_scans(model) as calls:
        with FlopCounterMode(display=False, custom_mapping=mapping) as fwd_counter:
            out = model(video, vmask, q, qmask)
            loss = F.cross_entropy(out["verb"], verb)
            if "noun" in out:
                loss = loss + F.cross_entropy(out["noun"], noun)
        n_fwd_calls = len(calls)
        with FlopCounterMode(display=False, custom_mapping=mapping) as bwd_counter:
            loss.backward()
    model.zero_grad(set_to_none=True)
    scan_fwd = sum(c.flops for c in calls[:n_fwd_calls])
    torch_fwd = int(fwd_counter.get_total_flops())
    torch_bwd = int(bwd_counter.get_total_flops())
    forward = torch_fwd + scan_fwd
    return {
        "torch_forward": torch_fwd,
        "torch_backward": torch_bwd,
        "scan_forward": scan_fwd,
        "scan_calls": n_fwd_calls,
        "forward": forward,
        "train_step": forward + torch_bwd + SCAN_BWD_FACTOR * scan_fwd,
    }


# ----------------------------------------------------------------------------------------------------------------
# latency and memory


def _interleaved(fns: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call, round-robin over `fns` (the starting callable rotates), after one warm-up round."""
    names = list(fns)
    for n in names:
        fns[n]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            gc.collect()
            _sync(device)
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


def _status_bytes(field_name: str) -> int:
    """A `VmRSS` / `VmHWM` line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field_name}")


def _reset_hwm() -> bool:
    """Reset the resident high-water mark to the current resident size (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_growth(fn: Callable[[], object]) -> tuple[int, bool]:
    """Run `fn`; return (peak resident bytes above the resident size just before it, trustworthy).

    The high-water mark (`VmHWM`) is reset just before the call, so the peak is the call's own. Where it cannot be
    reset the process-lifetime mark (`ru_maxrss`) is used, and the value is trustworthy only if the call raised it
    (otherwise an earlier phase, e.g. imports, peaked higher and hides the call's peak).
    """
    gc.collect()
    if _reset_hwm():
        before = _status_bytes("VmRSS")
        fn()
        return max(0, _status_bytes("VmHWM") - before), True
    before = _status_bytes("VmRSS")
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    fn()
    after_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(0, after_max - before), after_max > before_max


def cuda_peak_growth(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes the CUDA caching allocator held above its allocation just before `fn`."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def _child_main(spec: dict) -> dict:
    """In a fresh process: peak RSS growth of one step (or of a calibration allocation)."""
    torch.set_num_threads(int(spec.get("threads", 1)))
    if spec["kind"] == "calibration":
        nbytes = int(spec["bytes"])

        def alloc() -> float:
            buf = torch.ones(nbytes // 4, dtype=torch.float32)
            return float(buf[-1])

        peak, trusted = rss_peak_growth(alloc)
        return {"peak_bytes": peak, "trusted": trusted, "expected_bytes": nbytes}
    cfg = EfficiencyConfig(**{**spec["config"], "memory": "none", "plot": False, "out_dir": None})
    dev = torch.device("cpu")
    total = int(spec["length"])
    model = efficiency_model(cfg, spec["kind"], total, dev)
    # Warm-up at a short length: first-call costs (numba compilation or cache load, thread pools, lazy imports) are
    # paid here, not counted; the measured step at full length then sets a new high-water mark of its own.
    train_step(model, make_batch(cfg, cfg.question_tokens + 8, dev))()
    peak, trusted = rss_peak_growth(train_step(model, make_batch(cfg, total, dev)))
    return {"peak_bytes": peak, "trusted": trusted}


def _run_child(spec: dict, timeout: float = 900) -> dict:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    cmd = [sys.executable, "-m", "mambavl.analysis.efficiency", _CHILD_FLAG, json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"memory measurement child failed ({res.returncode}): {res.stderr[-3000:]}")
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    return json.loads(lines[-1])


def _config_for_child(cfg: EfficiencyConfig) -> dict:
    d = asdict(cfg)
    d["memory"] = cfg.memory.value
    d["lengths"] = list(cfg.lengths)
    d["fusions"] = list(cfg.fusions)
    return d


def rss_calibration(megabytes: int = 64) -> dict:
    """Check the CPU method: a fresh process allocates `megabytes` MiB; returns expected_bytes, peak_bytes, trusted."""
    return _run_child({"kind": "calibration", "bytes": megabytes * 2**20})


# ----------------------------------------------------------------------------------------------------------------
# the measurement


def _params(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def measure_efficiency(cfg: EfficiencyConfig, progress: Progress | None = None) -> list[dict]:
    """Measure every (fusion, length) of `cfg`; write table / JSON / plot into `cfg.out_dir` when set.

    Returns one dict per (fusion, length), ordered by length then fusion, with: fusion, total_tokens,
    question_tokens, video_tokens, batch_size, d_model, n_layers, params (whole model), fusion_params (the fusion
    module), flops_forward, flops_train_step, flops_torch_forward, flops_torch_backward, flops_scan_forward,
    scan_calls, latency_s (median), latency_runs (all repeats, s), peak_memory_bytes (None when not measured),
    memory_method, memory_trusted, device.

    Over 80 lines on purpose: the measurement schedule (FLOPs, then interleaved latency, then memory, per length)
    is kept in one place so that the order that makes the timings comparable is visible.
    """
    dev = resolve_device(cfg.device)
    method = cfg.memory
    if method == MemoryMethod.AUTO:
        method = MemoryMethod.CUDA if dev.type == "cuda" else MemoryMethod.RSS
    if method == MemoryMethod.CUDA and dev.type != "cuda":
        raise InputError("efficiency: memory=cuda needs a CUDA device (--device cuda)")
    plan = memory_plan(cfg, dev)  # before anything is built or run: refuse what cannot fit
    lengths = sorted(set(cfg.lengths))
    max_len = max(lengths)
    progress = or_none(progress)
    # one unit per measurement: FLOPs, latency (and memory with RSS) at each length
    progress.start(len(lengths) * (2 + (1 if method == MemoryMethod.RSS else 0)))

    def tick(msg: str) -> None:
        progress.advance(1, message=msg)

    models = {f: efficiency_model(cfg, f, max_len, dev) for f in cfg.fusions}
    # FLOPs are device-independent: count on a CPU copy so the scan can be routed to a kernel the counter ignores.
    cpu_models = models if dev.type == "cpu" else {f: efficiency_model(cfg, f, max_len, torch.device("cpu"))
                                                   for f in cfg.fusions}
    sizes = {}
    for f, m in models.items():
        sizes[f] = {"params": _params(m), "fusion_params": _params(getattr(m, "fusion", None)),
                    "d_model": int(m.cfg.d_model), "n_layers": int(m.cfg.n_layers)}

    rows: dict[tuple[str, int], dict] = {}
    for total in lengths:
        cpu_batch = make_batch(cfg, total, torch.device("cpu"))
        for f in cfg.fusions:
            flops = count_flops(cpu_models[f], cpu_batch)
            rows[(f, total)] = {
                "fusion": f,
                "total_tokens": total,
                "question_tokens": cfg.question_tokens,
                "video_tokens": total - cfg.question_tokens,
                "batch_size": cfg.batch_size,
                **sizes[f],
                "flops_forward": flops["forward"],
                "flops_train_step": flops["train_step"],
                "flops_torch_forward": flops["torch_forward"],
                "flops_torch_backward": flops["torch_backward"],
                "flops_scan_forward": flops["scan_forward"],
                "scan_calls": flops["scan_calls"],
                "device": str(dev),
                "memory_method": method.value,
                "peak_memory_bytes": None,
                "memory_trusted": None,
                "estimated_memory_bytes": plan["estimates"][(f, total)],
            }
        tick(f"FLOPs at {total} tokens")
        batch = cpu_batch if dev.type == "cpu" else make_batch(cfg, total, dev)
        times = _interleaved({f: train_step(models[f], batch) for f in cfg.fusions}, cfg.repeats, dev)
        for f in cfg.fusions:
            rows[(f, total)]["latency_s"] = float(statistics.median(times[f]))
            rows[(f, total)]["latency_runs"] = [float(t) for t in times[f]]
        if method == MemoryMethod.CUDA:
            for f in cfg.fusions:
                rows[(f, total)]["peak_memory_bytes"] = cuda_peak_growth(train_step(models[f], batch), dev)
                rows[(f, total)]["memory_trusted"] = True
        tick(f"latency at {total} tokens")
        if method == MemoryMethod.RSS:
            base = _config_for_child(cfg)
            for f in cfg.fusions:
                m = _run_child({"kind": f, "length": total, "config": base, "threads": torch.get_num_threads()})
                rows[(f, total)]["peak_memory_bytes"] = int(m["peak_bytes"])
                rows[(f, total)]["memory_trusted"] = bool(m["trusted"])
            tick(f"memory at {total} tokens")
    del models, cpu_models

    result = [rows[(f, n)] for n in lengths for f in cfg.fusions]
    flag_noise(result)
    if cfg.out_dir is not None:
        calibration = rss_calibration() if method == MemoryMethod.RSS else None
        write_report(cfg, result, Path(cfg.out_dir), calibration)
    progress.finish()
    return result


# ----------------------------------------------------------------------------------------------------------------
# report


def _fmt_flops(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def _fmt_s(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def _fmt_latency(row: dict) -> str:
    spread = row.get("latency_spread_s")
    text = _fmt_s(row["latency_s"]) + (f" ± {_fmt_s(spread / 2)}" if spread is not None else "")
    return text + (" (noisy)" if row.get("latency_noise") else "")


def noise_notes(rows: list[dict]) -> list[str]:
    """One line per latency flagged by `flag_noise`."""
    return [f"{r['fusion']} at {r['total_tokens']} tokens: {r['latency_noise']}" for r in rows
            if r.get("latency_noise")]


def _fmt_mem(row: dict) -> str:
    b = row.get("peak_memory_bytes")
    if b is None:
        return "-"
    return f"{b / 2**20:.1f} MiB" + ("" if row.get("memory_trusted") else " (?)")


def efficiency_markdown(rows: list[dict]) -> str:
    """The result rows as a markdown table (with the noise notes)."""
    head = ("fusion", "tokens (q+video)", "params", "FLOPs fwd", "FLOPs train step", "of which scan (fwd)",
            "latency fwd+bwd", "peak memory")
    lines = markdown_table(head, ((
        r["fusion"], f"{r['total_tokens']} ({r['question_tokens']}+{r['video_tokens']})", f"{r['params'] / 1e6:.2f} M",
        _fmt_flops(r["flops_forward"]), _fmt_flops(r["flops_train_step"]), _fmt_flops(r["flops_scan_forward"]),
        _fmt_latency(r), _fmt_mem(r)) for r in rows))
    notes = noise_notes(rows)
    if notes:
        lines += ["", "(noisy): the latency's spread over repeats is as large as the change it reports, or it fell "
                      "with length; compare these rows only after a quieter or longer run (--repeats):"]
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def machine_info() -> dict:
    """Where the numbers were measured."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }

    info["scan_impls"] = scan_mod.available_impls()
    return info


def write_report(cfg: EfficiencyConfig, rows: list[dict], out: Path, calibration: dict | None = None) -> dict:
    """efficiency.json, efficiency.md and (cfg.plot) efficiency.png into `out`; returns the JSON payload."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": _config_for_child(cfg),
        "machine": machine_info(),
        "memory_calibration": calibration,
        "scan_flops_formula": f"{SCAN_FWD_FLOPS_PER_STATE}*Bt*L*Din*N forward, backward {SCAN_BWD_FACTOR}x forward",
        "rows": rows,
    }
    tmp = out / "efficiency.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out / "efficiency.json")
    m = payload["machine"]
    text = [
        "# Fusion efficiency",
        "",
        f"One training step (forward with the verb and the noun question, loss, backward) of preset `{cfg.preset}`, "
        f"batch {cfg.batch_size} clips, {cfg.question_tokens} question tokens, device `{rows[0]['device']}`, "
        f"torch {m['torch']}, {m['torch_threads']} threads, load average {m['load_average_1min']}.",
        "",
        efficiency_markdown(rows),
        "FLOPs: torch's FlopCounterMode (matmuls, convolutions, attention incl. the CPU flash kernel) plus the "
        f"selective scan by formula ({payload['scan_flops_formula']}). Latency: median of {cfg.repeats} runs, "
        "fusion kinds interleaved; ± half the range over repeats. Memory: peak growth during the step above the "
        "memory allocated before it "
        f"(method `{rows[0]['memory_method']}`; `(?)` = the step did not set the process's high-water mark).",
    ]
    if calibration is not None:
        text += ["", f"Memory calibration: allocating {calibration['expected_bytes'] / 2**20:.1f} MiB measured as "
                     f"{calibration['peak_bytes'] / 2**20:.1f} MiB."]
    (out / "efficiency.md").write_text("\n".join(text) + "\n")
    if cfg.plot:
        plot_efficiency(rows, out / "efficiency.png")
    return payload


def plot_efficiency(rows: list[dict], path: Path) -> None:
    """Three log-log panels against total tokens: train-step FLOPs, latency, peak memory (when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fusions = list(dict.fromkeys(r["fusion"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (
        ("flops_train_step", "FLOPs per training step", 1.0),
        ("latency_s", "forward+backward time (s)", 1.0),
        ("peak_memory_bytes", "peak memory growth (MiB)", 1 / 2**20),
    )
    for ax, (key, label, scale) in zip(axes, panels):
        for f, style in zip(fusions, ("o-", "s--", "^:", "d-.")):
            pts = [(r["total_tokens"], r[key] * scale) for r in rows if r["fusion"] == f and r.get(key)]
            if pts:
                xs, ys = zip(*pts)
                ax.loglog(xs, ys, style, label=f, base=2)
        ax.set_xlabel("total tokens (question + video)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.suptitle(f"Fusion cost against sequence length ({rows[0]['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def growth_exponent(rows: list[dict], fusion: str, key: str) -> float:
    """Slope of log(key) against log(total_tokens) between the shortest and the longest length of `fusion`:
    ~1 for linear cost, approaching 2 for attention-dominated cost."""
    pts = sorted((r["total_tokens"], r[key]) for r in rows if r["fusion"] == fusion and r.get(key))
    if len(pts) < 2:
        return float("nan")
    (n0, y0), (n1, y1) = pts[0], pts[-1]
    return math.log(y1 / y0) / math.log(n1 / n0)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == _CHILD_FLAG:
    print(json.dumps(_child_main(json.loads(sys.argv[2]))))
