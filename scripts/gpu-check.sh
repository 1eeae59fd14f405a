#!/usr/bin/env bash
# The prepared GPU check: one run on a CUDA machine writes gpu-report.json and gpu-report.md under $OUT (or the
# current folder) with the training and scan figures of benchmarks/gpu_check.py (every scan implementation against
# the float64 reference and their timings, bf16 vs fp32 training, an EK-100-sized epoch), the GPU-marked tests,
# decode frames/s per decoder on 1080p H.264 59.94 fps clips and NVDEC's frame-exactness against the CPU decoder,
# encoder images/s (ViT-B-16, ViT-L-14, random init, 224, bf16) and end-to-end extraction segments/s.
#
#   scripts/gpu-check.sh [--smoke] [--budget SECONDS] [--wheelhouse DIR]   run from the repository root (any copy)
#   scripts/gpu-check.sh --make-wheelhouse DIR              on a machine with network: the wheels the check needs
#
# --budget (default 540): wall-clock seconds for the whole check. The training and scan figures run first, alone
# on the GPU, in 60 % of the time left after the set-up; then decode, encoders and end to end in the rest, with the
# GPU-marked tests beside them. `timeout` stops a part when its time runs out and the report names it (exit code
# 124). Results go under $OUT: gpu_check.json after every section of benchmarks/gpu_check.py, workstation.json
# after every section of benchmarks/gpu_workstation.py, gpu-tests.xml and gpu-tests.log when the tests end,
# gpu-check.log throughout; a run stopped from outside keeps what was written (the previous run's files are removed
# at the start). Training and scoring on cached features need none of the decoding libraries (PyAV, ffmpeg-python,
# imageio-ffmpeg) nor open_clip: without them the training and scan figures still run.
#
# The machine it runs on may have no network: it starts from a Python with PyTorch and Triton ($PYTHON, else the
# first of python, python3 that imports torch), installs the project's other dependencies from --wheelhouse DIR (or
# $WHEELHOUSE) with `pip --no-index`, and otherwise uses what is installed; the project itself runs from this
# folder (PYTHONPATH), nothing is built. ffmpeg comes from the imageio-ffmpeg wheel; torchcodec finds FFmpeg's
# shared libraries in PyAV's wheel when the system has none.
# --smoke: tiny sizes on the CPU, a few minutes (tests/test_benchmarks_smoke.py runs it); the scan section's Triton
# kernels then run in Triton's interpreter.
set -uo pipefail

SMOKE=0
BUDGET=540
WHEELHOUSE="${WHEELHOUSE:-}"
MAKE_WHEELHOUSE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --budget) BUDGET="${2:?gpu-check: --budget needs SECONDS}"; shift ;;
    --wheelhouse) WHEELHOUSE="${2:?gpu-check: --wheelhouse needs DIR}"; shift ;;
    --make-wheelhouse) MAKE_WHEELHOUSE="${2:?gpu-check: --make-wheelhouse needs DIR}"; shift ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in
  ''|*[!0-9]*) echo "gpu-check: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2 ;;
esac
BUDGET=$(( 10#$BUDGET ))
if [ "$BUDGET" -lt 1 ]; then echo "gpu-check: --budget must be at least 1 second" >&2; exit 2; fi
command -v timeout > /dev/null || { echo "gpu-check: needs \`timeout\` (GNU coreutils)" >&2; exit 2; }
START=$(date +%s)
DEADLINE=$(( START + BUDGET ))
# seconds left before the deadline, less a reserve (${1:-0} s), never below 1
left() { local s=$(( DEADLINE - $(date +%s) - ${1:-0} )); [ "$s" -lt 1 ] && s=1; echo "$s"; }

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python python3; do
    if command -v "$c" > /dev/null && timeout 60 "$c" -c "import torch" 2> /dev/null; then PY="$c"; break; fi
  done
  [ -z "$PY" ] && PY="$(command -v python || command -v python3 || echo python)"
fi

if [ -n "$MAKE_WHEELHOUSE" ]; then
  # every dependency of the project and its decoders/dev extras except torch itself, as wheels
  mkdir -p "$MAKE_WHEELHOUSE"
  "$PY" -m pip wheel --wheel-dir "$MAKE_WHEELHOUSE" "$REPO[decoders,dev]" && \
    rm -f "$MAKE_WHEELHOUSE"/torch-*.whl "$MAKE_WHEELHOUSE"/triton-*.whl "$MAKE_WHEELHOUSE"/nvidia_*.whl \
          "$MAKE_WHEELHOUSE"/mambavl-*.whl
  exit $?
fi

OUT="${OUT:-$PWD}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# the previous run's results: a part that writes nothing this time must not be reported with old figures
rm -f "$OUT"/gpu_check.json "$OUT"/workstation.json "$OUT"/gpu-tests.xml "$OUT"/gpu-tests.log \
      "$OUT"/gpu-report.json "$OUT"/gpu-report.md
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
LOG="$OUT/gpu-check.log"
: > "$LOG"
say() { echo "gpu-check: $*" | tee -a "$LOG"; }
export PYTHONUNBUFFERED=1

# stopped from outside (Ctrl-C, a job's kill): stop the parts too (`timeout` runs each in its own process group)
TESTS_PID=""
CUR_PID=""
stop_parts() {
  [ -n "$TESTS_PID" ] && kill -TERM "$TESTS_PID" 2> /dev/null
  [ -n "$CUR_PID" ] && kill -TERM "$CUR_PID" 2> /dev/null
  rm -rf "$WORK"
  exit 130
}
trap stop_parts INT TERM
# run_part SECONDS CMD...: CMD under `timeout` (TERM, then KILL 10 s later), in the background so that a signal to
# this script is handled at once; returns CMD's exit code (124: out of time)
run_part() {
  local seconds="$1"
  shift
  timeout -k 10 "$seconds" "$@" &
  CUR_PID=$!
  wait "$CUR_PID"
  local rc=$?
  CUR_PID=""
  return "$rc"
}

if [ "$SMOKE" = 0 ]; then
  if [ -n "$WHEELHOUSE" ] && [ -d "$WHEELHOUSE" ]; then
    say "installing the project's dependencies from $WHEELHOUSE (no network)"
    # the dependency list of pyproject.toml, without torch (already there), read by Python's own toml parser
    "$PY" - "$REPO/pyproject.toml" > "$WORK/requirements.txt" <<'EOF'
import sys, tomllib
meta = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = list(meta["dependencies"]) + meta["optional-dependencies"].get("decoders", []) + ["pytest", "pytest-timeout"]
print("\n".join(r for r in reqs if not r.replace(" ", "").lower().startswith(("torch>", "torch=", "torch<", "torch;"))
                and r.split(">")[0].split("=")[0].strip().lower() != "torch"))
EOF
    run_part "$(left 60)" "$PY" -m pip install --no-index --find-links "$WHEELHOUSE" -r "$WORK/requirements.txt" \
      >> "$LOG" 2>&1 || say "pip install from the wheelhouse failed (see the log); going on with what is installed"
  else
    say "no wheelhouse given: using what is installed"
  fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# torchcodec needs FFmpeg's shared libraries: PyAV's bundled copy serves where the system has none
if ! timeout 60 "$PY" -c "from mambavl.extract.backends import torchcodec_problem as p; import sys; sys.exit(bool(p()))" \
    >> "$LOG" 2>&1; then
  LIBS="$(timeout 60 "$PY" -m mambavl.extract.backends ffmpeg-libs "$WORK/ffmpeg-libs" 2>> "$LOG")" && \
    export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" && say "torchcodec: FFmpeg libraries from PyAV"
fi

# 1. the training and scan figures (benchmarks/gpu_check.py), alone on the GPU: 60 % of what is left
GC_RC=-1
if [ -f "$REPO/benchmarks/gpu_check.py" ]; then
  GC_TIME=$(( $(left 20) * 6 / 10 + 1 ))
  say "training and scan figures (benchmarks/gpu_check.py), ${GC_TIME} s at most"
  if [ "$SMOKE" = 1 ]; then
    # on the CPU the scan section runs the Triton kernels in Triton's interpreter (when Triton is installed)
    TRITON_INTERPRET=1 run_part "$GC_TIME" "$PY" "$REPO/benchmarks/gpu_check.py" --device cpu \
      --sections scan,train,epoch --steps 2 --epochs 1 --smoke --json "$OUT/gpu_check.json" >> "$LOG" 2>&1
  else
    run_part "$GC_TIME" "$PY" "$REPO/benchmarks/gpu_check.py" --json "$OUT/gpu_check.json" >> "$LOG" 2>&1
  fi
  GC_RC=$?
  [ "$GC_RC" = 124 ] && say "benchmarks/gpu_check.py ran out of its ${GC_TIME} s: the sections it finished are kept"
else
  say "benchmarks/gpu_check.py not present: training and scan figures left out"
fi

# 2. the GPU-marked tests in the background (on a CPU machine they skip with their reason; a test file that cannot
# be imported here is reported and the others still run): they load the CPU cores little and the GPU briefly
say "GPU-marked tests (background)"
timeout -k 10 "$(left 20)" "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
  --junitxml "$OUT/gpu-tests.xml" "$REPO/tests/test_decoders.py" $( [ "$SMOKE" = 0 ] && echo "$REPO/tests" ) \
  > "$OUT/gpu-tests.log" 2>&1 &
TESTS_PID=$!

# 3. decode, encoders, end to end, in what is left
say "decode / encoder / end-to-end figures"
SMOKE_ARG=$( [ "$SMOKE" = 1 ] && echo "--smoke" )
run_part "$(left 20)" "$PY" "$REPO/benchmarks/gpu_workstation.py" $SMOKE_ARG --workdir "$WORK/gw" \
  --json "$OUT/workstation.json" >> "$LOG" 2>&1
WS_RC=$?
[ "$WS_RC" = 124 ] && say "benchmarks/gpu_workstation.py ran out of time: the sections it finished are kept"

wait "$TESTS_PID"
TESTS_RC=$?
TESTS_PID=""
[ "$TESTS_RC" = 124 ] && say "the GPU-marked tests ran out of time"

"$PY" - "$WORK" "$OUT" "$TESTS_RC" "$WS_RC" "$GC_RC" "$SMOKE" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
work, out, tests_rc, ws_rc, gc_rc, smoke, seconds = Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:])
report = {"smoke": bool(smoke), "seconds": seconds, "exit_codes": {"tests": tests_rc, "workstation": ws_rc,
          "gpu_check": gc_rc},
          "out_of_time": [k for k, rc in (("tests", tests_rc), ("workstation", ws_rc), ("gpu_check", gc_rc))
                          if rc == 124]}
tests = {"passed": 0, "failed": 0, "skipped": 0, "cases": []}
try:
    cases = list(ET.parse(out / "gpu-tests.xml").iter("testcase")) if (out / "gpu-tests.xml").is_file() else []
except ET.ParseError:  # cut short mid-write
    cases = []
if cases:
    for case in cases:
        kind = "failed" if case.find("failure") is not None or case.find("error") is not None else \
            "skipped" if case.find("skipped") is not None else "passed"
        reason = case.find("skipped").get("message", "") if kind == "skipped" else ""
        tests[kind] += 1
        tests["cases"].append({"name": f"{case.get('classname')}::{case.get('name')}", "result": kind,
                               "reason": reason})
report["gpu_tests"] = tests
for key, name in (("workstation", "workstation.json"), ("train_and_scan", "gpu_check.json")):
    p = out / name
    try:
        report[key] = json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError) as exc:  # cut short mid-write
        report[key] = {"error": f"{name} unreadable: {exc}"}
(out / "gpu-report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
ws = report["workstation"] or {}
md = [f"# GPU check{' (smoke run, CPU, tiny sizes: no figure here means anything)' if smoke else ''}", "",
      f"- machine: {ws.get('machine', '?')}; GPU: {ws.get('gpu', '?')}; {seconds} s in all",
      f"- GPU-marked tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped"]
if report["out_of_time"]:
    md.append(f"- out of time (stopped by the budget): {', '.join(report['out_of_time'])}")
md.append("")
dec = (ws.get("decode") or {}).get("decoders", {})
if dec:
    md += [f"## Decode ({ws['decode']['clip']}; 16 frames per 2 s window)", "",
           "| decoder | window frames/s | sampled frames/s | frame-exact | mean abs diff vs ffmpeg |",
           "|---|---|---|---|---|"]
    for name, r in dec.items():
        md.append(f"| {name} | skipped: {r['skipped']} | | | |" if "skipped" in r else
                  f"| {name} | {r['window_frames_per_s']:.0f} | {r['sampled_frames_per_s']:.0f} | "
                  f"{r.get('frame_exact', 'reference')} | {r.get('mean_abs_diff_vs_ffmpeg', 0):.2f} |")
    md.append("")
if ws.get("encode"):
    md += ["## Encoders (random init)", "", "| model | images/s | dtype | batch |", "|---|---|---|---|"]
    md += [f"| {k} | {v['images_per_s']:.0f} | {v['dtype']} | {v['batch']} |" for k, v in ws["encode"].items()]
    md.append("")
if ws.get("end_to_end"):
    e = ws["end_to_end"]
    md += ["## End-to-end extraction", "", f"encoder {e['encoder']}", "",
           f"- CPU decode (ffmpeg): {e['ffmpeg']['segments_per_s']:.2f} segments/s",
           f"- auto ({e['auto']['decoder_used']}): {e['auto']['segments_per_s']:.2f} segments/s "
           f"({e['auto_vs_ffmpeg']:.2f}x)", ""]
gc = report["train_and_scan"]
md += ["## Training and scan (benchmarks/gpu_check.py)", "",
       "not run (script absent)" if gc_rc == -1 else f"exit {gc_rc}; figures in gpu-report.json", ""]
scan = (gc or {}).get("scan") or {}
if scan.get("checks"):
    bad = [c for c in scan["checks"] if not c["ok"]]
    md += [f"Scan implementations {', '.join(scan['impls'])} against the float64 reference: "
           f"{len(scan['checks']) - len(bad)} of {len(scan['checks'])} checks within tolerance"
           + "".join(f"; FAIL {c['impl']} {c['dtype']} {c['shape']}{' grouped' if c['grouped'] else ''}: out "
                     f"{c['out_rel']:.1e}, d{c['worst_grad']} {c['grad_rel']:.1e}" for c in bad), "",
           "| B x D x N x L | impl | forward ms | fwd+bwd ms |", "|---|---|---|---|"]
    md += [f"| {shape} | {k} | {v['fwd_s'] * 1e3:.2f} | {v['fwd_bwd_s'] * 1e3:.2f} |"
           for shape, row in scan.get("timing", {}).items() for k, v in row.items()]
    md.append("")
elif "error" in scan:
    md += [f"Scan section failed: {scan['error']}", ""]
(out / "gpu-report.md").write_text("\n".join(md))
print(f"gpu-check: wrote {out / 'gpu-report.json'} and {out / 'gpu-report.md'}")
EOF
REPORT_RC=$?
rm -rf "$WORK"
# pytest's 5: no test collected (none marked gpu in the files given) is not a failure
if [ "$REPORT_RC" != 0 ] || [ "$WS_RC" != 0 ] || { [ "$TESTS_RC" != 0 ] && [ "$TESTS_RC" != 5 ]; } || \
   { [ "$GC_RC" != 0 ] && [ "$GC_RC" != -1 ]; }; then
  say "done with failures (gpu_check $GC_RC, tests $TESTS_RC, workstation $WS_RC, report $REPORT_RC); see $LOG"
  exit 1
fi
say "done"
