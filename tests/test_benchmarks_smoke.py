"""The benchmark scripts still run: each one with --smoke (tiny sizes) must exit 0 and end with its headline line.

No timing is asserted (timings live in docs/benchmarks.md); PASS/MISS in the headline is not checked either, since
tiny sizes say nothing about the targets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def run_script(name: str, *args: str, tmp_path: Path, env: dict | None = None) -> list[str]:
    """Run benchmarks/<name> --smoke --threads 1 --json out.json; check the common contract; return its lines.
    `env`: extra environment variables."""
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, str(BENCH / name), "--smoke", "--threads", "1", "--json", str(tmp_path / "out.json"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, f"{name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert lines, f"{name} printed nothing"
    assert lines[-1].startswith("headline: "), f"{name}: last line is not the headline: {lines[-1]!r}"
    assert " PASS" in lines[-1] or " MISS" in lines[-1], f"{name}: headline has no verdict: {lines[-1]!r}"
    assert (tmp_path / "out.json").is_file(), f"{name} did not write its --json results"
    return lines


def test_scan_smoke(tmp_path):
    """Also --against: another version of the scan module (here a copy of this one) timed beside the current one;
    identical code gives identical outputs and gradients."""
    other = tmp_path / "scan_before.py"
    other.write_text((REPO / "mambavl" / "fuse" / "scan.py").read_text())
    lines = run_script("scan.py", "--against", str(other), tmp_path=tmp_path)
    assert lines[-1].startswith("headline: scan_speedup_vs_reference=")
    assert any(ln.startswith(f"selective_scan_cpu: {other} (before) vs this checkout") for ln in lines)
    against = json.loads((tmp_path / "out.json").read_text())["against"]
    assert set(against) == {"1x8x4x64", "1x8x4x130"}
    for size in against.values():
        assert size["max_rel_diff"] == 0.0
        assert all(size[v]["fwd_ns"] > 0 and size[v]["fwd_bwd_cpu_ns"] > 0 for v in ("before", "after"))
    # a second process loads the other version's kernels from numba's on-disk cache, written by the run above
    code = (f"import sys, torch; sys.path.insert(0, {str(BENCH)!r}); import scan; "
            f"m = scan.load_scan_module({str(other)!r}); x = scan.make_inputs(1, 8, 4, 16, 'cpu'); "
            "print(float(scan.call(m.selective_scan_cpu, x).sum()))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]


def test_scan_against_a_file_that_is_not_a_scan_module_fails_first(tmp_path):
    bad = tmp_path / "notes.py"
    bad.write_text("x = 1\n")
    for path, message in ((tmp_path / "missing.py", "not a Python file"), (bad, "defines no selective_scan_cpu")):
        res = subprocess.run([sys.executable, str(BENCH / "scan.py"), "--against", str(path)], capture_output=True,
                             text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
        assert res.returncode != 0 and f"--against {path}: {message}" in res.stderr
        assert "selective scan on CPU" not in res.stdout  # refused before any timing


def test_scan_cuda_branch_skips_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA branch runs instead of skipping")
    lines = run_script("scan.py", "--cuda", tmp_path=tmp_path)
    assert any(ln.startswith("CUDA branch skipped") for ln in lines)
    assert lines[-1].startswith("headline: scan_speedup_vs_reference=")


def test_step_ops_smoke(tmp_path):
    lines = run_script("step_ops.py", tmp_path=tmp_path)
    assert lines[-1].startswith("headline: aten_ops_per_default_step=")
    assert any("aten ops per default training step" in ln for ln in lines)
def triton_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def test_scan_cuda_branch_dry_run_in_triton_interpreter(tmp_path):
    """Without a GPU, --cuda with TRITON_INTERPRET=1 runs the GPU branch's code on CPU tensors (Triton kernels in the
    interpreter): the Triton scan is checked against the float64 reference there and gets the branch's headline."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA branch runs for real")
    if not triton_importable():
        pytest.skip("triton is not installed")
    lines = run_script("scan.py", "--cuda", tmp_path=tmp_path, env={"TRITON_INTERPRET": "1"})
    assert any("dry run" in ln for ln in lines)
    assert lines[-1].startswith("headline: triton_scan_speedup_vs_portable=")
    triton = json.loads((tmp_path / "out.json").read_text())["cuda"]["triton"]
    assert triton["max_abs_err"] <= 1e-4 and triton["max_rel_grad_err"] <= 1e-4


def test_gpu_check_scan_section_on_cpu(tmp_path):
    """The GPU check's scan section on CPU, tiny: every implementation that runs here (the Triton kernels in Triton's
    interpreter when Triton is installed) against the float64 reference, and the timing table."""
    lines = run_script("gpu_check.py", "--device", "cpu", "--sections", "scan", tmp_path=tmp_path,
                       env={"TRITON_INTERPRET": "1"})
    assert lines[-1].startswith("headline: cuda_scan_matches_reference=") and " PASS" in lines[-1]
    scan = json.loads((tmp_path / "out.json").read_text())["scan"]
    expected = {"chunked", "triton"} if triton_importable() else {"chunked"}
    assert set(scan["impls"]) == expected and all(c["ok"] for c in scan["checks"])
    assert {c["impl"] for c in scan["checks"] if c["grouped"]} == expected
    assert set(scan["timing"]["1x8x4x16"]) == expected


def test_fusion_scaling_smoke(tmp_path):
    lines = run_script("fusion_scaling.py", "--plot", str(tmp_path / "fusion.png"), tmp_path=tmp_path)
    assert lines[-1].startswith("headline: mamba_vs_transformer_time_at_")
    assert any(ln.startswith("memory calibration:") for ln in lines)
    assert (tmp_path / "fusion.png").stat().st_size > 0


def test_loader_smoke(tmp_path):
    lines = run_script("loader.py", "--workdir", str(tmp_path / "work"), tmp_path=tmp_path)
    assert lines[-1].startswith("headline: lazy_h5_epoch_vs_in_memory=")
    assert any(ln.startswith("pure read:") for ln in lines)  # the read-only ratio, the extra row
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    assert {"lazy_h5", "in_memory_tensors"} <= set(results)


def test_cli_startup_smoke(tmp_path):
    """Also --against (here this same checkout): every mambavl command runs from both checkouts; a folder that is not
    a checkout is refused before anything runs."""
    lines = run_script("cli_startup.py", "--workdir", str(tmp_path / "work"), "--against", str(REPO),
                       tmp_path=tmp_path)
    assert lines[-1].startswith("headline: cache_inspect_vs_bare_h5py=")
    times = json.loads((tmp_path / "out.json").read_text())["times_s"]
    assert {"mambavl cache inspect (this checkout)", "mambavl cache inspect (--against)", "bare h5py",
            "import torch", "mambavl --version (--against)"} <= set(times)
    assert all(len(v) == 1 and v[0] > 0 for v in times.values())
    res = subprocess.run([sys.executable, str(BENCH / "cli_startup.py"), "--smoke", "--workdir", str(tmp_path / "w2"),
                          "--against", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "not a mambavl checkout" in res.stderr
    assert not (tmp_path / "w2" / "startup.h5").exists()


def test_extraction_smoke(tmp_path):
    lines = run_script("extraction.py", "--workdir", str(tmp_path / "work"), tmp_path=tmp_path)
    assert lines[-1].startswith("headline: end_to_end_vs_slowest_stage=")
    assert any("decode_vs_bare_ffmpeg" in ln for ln in lines)
    out = json.loads((tmp_path / "out.json").read_text())
    assert {"end_to_end", "decode_only", "encode_only"} <= set(out["stages"])


def test_gpu_check_runs_its_training_section_on_cpu(tmp_path):
    """The GPU check script keeps working where no GPU is: its AMP-vs-fp32 training section, on CPU, tiny."""
    lines = run_script("gpu_check.py", "--device", "cpu", "--sections", "train", "--steps", "4", "--epochs", "1",
                       tmp_path=tmp_path)
    assert lines[-1].startswith("headline: amp_vs_fp32_train_steps_per_s=")
    out = json.loads((tmp_path / "out.json").read_text())
    assert {"bf16-autocast", "fp32"} <= set(out["train"])
    assert out["train"]["fp32"]["steps"] == 4


def test_decode_1080p_smoke(tmp_path):
    lines = run_script("decode_1080p.py", "--workdir", str(tmp_path / "work"), tmp_path=tmp_path)
    assert lines[-1].startswith("headline: planned_vs_plain_decode_bframes_gop60=")
    assert any(ln.startswith("seek cost:") for ln in lines)
    assert any(ln.startswith("project_decode_vs_bare_ffmpeg_1080p=") for ln in lines)
    out = json.loads((tmp_path / "out.json").read_text())
    assert {"bare_ffmpeg, threads 1", "project, threads auto", "pyav, threads 1"} <= set(out["cpu_per_segment"])
    assert {"bframes_gop60", "all_p_gop60"} <= set(out["plan"])


def test_loader_ek100_smoke(tmp_path):
    lines = run_script("loader.py", "--ek100", "--workdir", str(tmp_path / "work"), tmp_path=tmp_path)
    assert lines[-1].startswith("headline: ek100_lazy_epoch_read_vs_in_memory=")
    assert not list((tmp_path / "work").glob("*.h5"))  # the cache is deleted after the run
    out = json.loads((tmp_path / "out.json").read_text())
    assert {"lazy_h5 w0", "in_memory w2", "load_whole"} <= set(out["median_s"])


def test_candidate_recall_smoke(tmp_path):
    lines = run_script("candidate_recall.py", tmp_path=tmp_path)
    assert lines[-1].startswith("headline: cross_fitted_train_val_recall_gap=")
    out = json.loads((tmp_path / "out.json").read_text())
    for scheme in ("cross_fitted", "in_sample"):
        assert {"train_candidate_recall_verb", "val_candidate_recall_verb"} <= set(out[scheme])


def test_extraction_gpu_branch_skips_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU branch runs instead of skipping")
    lines = run_script("extraction.py", "--gpu", "--workdir", str(tmp_path / "work"), tmp_path=tmp_path)
    assert any(ln.startswith("GPU branch skipped") for ln in lines)
    assert lines[-1].startswith("headline: end_to_end_vs_slowest_stage=")


def test_gpu_check_script_smoke(tmp_path):
    """scripts/gpu-check.sh --smoke: on CPU, tiny; writes both reports under $OUT with every section present."""
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    res = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), "--smoke", "--budget", "240"],
                         capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu-report.json").read_text())
    assert report["smoke"] and report["exit_codes"]["workstation"] == 0
    ws = report["workstation"]
    assert ws["decode"]["decoders"]["ffmpeg"]["window_frames_per_s"] > 0
    assert {"ffmpeg", "auto"} <= set(ws["end_to_end"]) and ws["end_to_end"]["ffmpeg"]["failed"] == 0
    assert ws["encode"]
    md = (tmp_path / "out" / "gpu-report.md").read_text()
    assert "GPU-marked tests" in md
    scan = report["train_and_scan"]["scan"]  # the scan section, Triton kernels in Triton's interpreter
    assert scan["ok"] and ("triton" in scan["impls"]) == triton_importable()
    assert "checks within tolerance" in md


def test_multiview_smoke(tmp_path):
    lines = run_script("multiview.py", tmp_path=tmp_path)
    assert lines[-1].startswith("headline: multiview_action_top1_gain_6_vs_1_view=")
    assert any("2 x 3" in line for line in lines)


def test_order_study_smoke(tmp_path):
    lines = run_script("order_study.py", tmp_path=tmp_path)
    assert lines[-1].startswith("headline: order_gap_verb_top1=")
    out = json.loads((tmp_path / "out.json").read_text())
    assert {"full", "video-only", "probe-concat", "probe-mean"} <= set(out["rows"])


def test_gpu_check_budget_stops_each_part_and_keeps_the_report(tmp_path):
    """scripts/gpu-check.sh --budget: every part is stopped when its share of the budget runs out (exit 124 in the
    report), the run ends within the budget and still writes both reports under $OUT, and exits 1."""
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    res = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), "--smoke", "--budget", "24"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu-report.json").read_text())
    assert "gpu_check" in report["out_of_time"] and report["exit_codes"]["gpu_check"] == 124
    assert report["seconds"] <= 24
    assert "out of time (stopped by the budget)" in (tmp_path / "out" / "gpu-report.md").read_text()
    bad = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), "--budget", "soon"], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=60)
    assert bad.returncode == 2 and "--budget must be whole seconds" in bad.stderr
