"""Timing and reporting helpers shared by the benchmark scripts.

The benchmarks run on shared machines, so every comparison is measured side by side: the compared callables run
round-robin (interleaved) in one process, several repeats each, and we report medians and ratios of medians. A
background job that slows the machine for a moment then hits both sides instead of biasing one.

Peak memory on CPU (`measure_in_subprocess`): torch keeps no CPU allocator statistics, so each configuration runs in
a fresh Python process that resets its resident-set high-water mark just before the measured call (Linux
/proc/self/clear_refs) and reports how far the call raised it (`VmHWM`) above the resident size just before; where
the mark cannot be reset it falls back to `ru_maxrss`. The child is started with `MALLOC_MMAP_THRESHOLD_` set low
so that large tensor buffers are mmap'ed and returned to the OS when freed; the resident size then follows the live
allocations closely and the high-water mark is the peak of the measured call (activations, gradients, workspace),
not left-overs of earlier work. A calibration row (allocate a known buffer) checks the method in every run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from anywhere, without installing
    sys.path.insert(0, str(REPO))

# OpenMP's default wait policy busy-waits after every parallel region. On a machine whose cores are also busy with
# other work (a shared box, or torch's and numba's thread pools next to each other) a spinning worker holds the core
# that the thread it waits for needs, and every parallel region then costs a scheduler time slice: on a loaded
# 2-core machine a fusion step that takes ~7 ms took ~700 ms with 2 torch threads (and ~270 ms with 1 torch thread
# once numba's OpenMP pool had run). PASSIVE makes idle workers sleep. It must be set before torch or numba start
# their OpenMP runtimes, hence here, at import, before the scripts import torch; an explicit setting in the
# environment wins (`OMP_WAIT_POLICY=ACTIVE python benchmarks/...` measures the runtime default).
OMP_WAIT_POLICY = os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HEADLINE_PREFIX = "headline:"
# Below glibc's default dynamic threshold (up to 32 MiB) so freed tensor buffers leave the resident set at once.
MMAP_THRESHOLD = str(128 * 1024)


def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark takes: --smoke (tiny sizes, seconds; for the test suite), --repeats, --threads."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny sizes that run in seconds (keeps the script from rotting)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per configuration (median is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--json", type=str, default=None, help="also write the results as JSON to this path")
    return p


def setup_threads(threads: int | None) -> int:
    """Set torch's thread count when asked; return the count in use."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each callable `repeats` times, round-robin, after `warmup` untimed rounds.

    Returns name -> list of wall-clock seconds. Round-robin order rotates every round so no callable always runs
    right after the same other one (cache and frequency effects).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            gc.collect()
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: Sequence[float]) -> float:
    """Relative spread (max - min) / median, to flag disturbed measurements."""
    m = median(xs)
    return (max(xs) - min(xs)) / m if m > 0 else 0.0


def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> None:
    """Print an aligned plain-text table (markdown-compatible pipes)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    line = lambda row: "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))


def machine_line() -> str:
    import torch

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs visible, "
        f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', '-')}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min)"
    )


def headline(metric: str, value: float, unit: str, target: str, passed: bool, extra: str = "") -> str:
    """The last line of every benchmark: `headline: <metric>=<value><unit> (target <target>) PASS|MISS`."""
    text = f"{HEADLINE_PREFIX} {metric}={value:.3g}{unit} (target {target}) {'PASS' if passed else 'MISS'}"
    return text + (f" {extra}" if extra else "")


def write_json(path: str | None, payload: dict) -> None:
    """Write `payload` as JSON to `path` (nothing when None) through a temporary file renamed over it, so a run
    stopped mid-write leaves the previous complete file, never a cut one. Values JSON lacks are written as str."""
    if path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, target)


# ---------------------------------------------------------------------------------------------------------------
# peak memory in a fresh process


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    """High-water mark of the resident set of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_growth(fn: Callable[[], object]) -> tuple[int, bool]:
    """Peak resident bytes of one call, and whether the number can be trusted: the measurement `mambavl efficiency`
    uses (resettable VmHWM, else ru_maxrss). Imported lazily: torch must start after OMP_WAIT_POLICY is set."""
    from mambavl.analysis.efficiency import rss_peak_growth

    return rss_peak_growth(fn)


def measure_in_subprocess(script: Path, args: Sequence[str], timeout: float = 900) -> dict:
    """Run `script --child <args>` in a fresh interpreter and return the JSON dict it prints on its last line."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    cmd = [sys.executable, str(script), "--child", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"child {' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    last = [ln for ln in res.stdout.splitlines() if ln.strip()][-1]
    return json.loads(last)
