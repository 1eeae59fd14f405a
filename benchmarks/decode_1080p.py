"""Segment decode at EK-100's resolution: the project's decode against bare ffmpeg on 1920x1080 H.264 at 59.94 fps.

    python benchmarks/decode_1080p.py --workdir /tmp/mambavl-bench        # 2 sources x 3 s, a few minutes on 2 cores
    python benchmarks/decode_1080p.py --smoke --workdir /tmp/x             # tiny sources, seconds

Sources are made by the benchmark with the same ffmpeg the project uses (cached in --workdir): ffmpeg's `testsrc2`
pattern with temporal noise (so that every frame carries detail, as camera footage does), 1920x1080, 60000/1001 fps,
libx264 High profile, B-frames, a keyframe every --gop frames, --bitrate (default 16 Mbit/s). Segments: windows of
--segment-seconds at offsets that do not fall on keyframes, 16 frames sampled uniformly, scaled and cropped to 224.

Compared per segment, each with ffmpeg's own decoder threads off (`-threads 1`) and on (ffmpeg's default, one per
core), interleaved, median of repeats:

  bare_ffmpeg   `ffmpeg -threads T -ss S -t D -i FILE -f null -`: decodes the window (from the keyframe before S)
                and throws the frames away: the decoder's own cost, the floor of any decode of those frames
  project       `mambavl.extract.decode.decode_video_segment(..., threads=T)`: the extraction's decode (subprocess,
                seek, fps filter picking the 16 frames, scale + crop, raw RGB over a pipe)
  pyav          a candidate: PyAV in this process (seek, decode, pick the 16 frames, swscale only those)

Cost is CPU seconds (this process + its children, user + sys), so the numbers hold on a loaded machine where wall
time does not; frames/s per core = frames of the window / CPU seconds. Wall time is printed beside it.
Seek cost: the same window length decoded by bare ffmpeg from a keyframe-aligned start vs from mid-GOP starts.

Headline (--part bare): project / bare_ffmpeg CPU per segment with ffmpeg threads on, target <= 1.2x.

Part "plan" (the default runs both parts; its ratios make the headline): decoding only the pictures the 16 samples
need (`mambavl.extract.packet_plan`: unneeded non-reference pictures and runs before a keyframe left out, unneeded
reference pictures decoded as all-skip stand-ins) against the plain decode of the whole window, side by side, on
two more sources of --plan-source-seconds: GOP 60 with B-frames (x264 superfast, -bf 2) and all-P (-bf 0), windows
of --plan-segment-seconds (a spread like EK-100's segment lengths), ffmpeg threads 1, CPU time including the plan's
own packet scan in this process. Frames are checked bit-identical. Targets: <= 0.6x with B-frames, <= 1.0x all-P.

    python benchmarks/decode_1080p.py --part plan --workdir /tmp/mambavl-bench
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    base_parser,
    fmt_s,
    headline,
    machine_line,
    median,
    print_table,
    spread,
    write_json,
)

import av  # noqa: E402
import numpy as np  # noqa: E402

from mambavl.data.media import ffmpeg_binary  # noqa: E402
from mambavl.extract.decode import (  # noqa: E402
    FfmpegDecoder,
    SamplingConfig,
    decode_video_segment,
    probe_video,
    sample_times,
)

RATE = Fraction(60000, 1001)


def make_source(path: Path, seconds: float, width: int, height: int, gop: int, bitrate: str, seed: int,
                bframes: int = 2) -> Path:
    """An H.264 1080p59.94-like test video (written once; reused when present)."""
    if path.is_file():
        return path
    tmp = path.with_suffix(".partial.mp4")
    cmd = [ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
           f"testsrc2=size={width}x{height}:rate={RATE.numerator}/{RATE.denominator}:duration={seconds}",
           "-vf", f"noise=alls=6:allf=t:all_seed={seed}", "-c:v", "libx264", "-preset", "superfast",
           "-profile:v", "high", "-pix_fmt", "yuv420p", "-b:v", bitrate, "-maxrate", bitrate, "-bufsize", bitrate,
           "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0", "-bf", str(bframes), str(tmp)]
    subprocess.run(cmd, check=True)
    tmp.replace(path)
    return path


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + sys), seconds."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def bare_ffmpeg(path: Path, start: float, dur: float, threads: int) -> None:
    cmd = [ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-threads", str(threads), "-ss", f"{start:.6f}",
           "-t", f"{dur:.6f}", "-i", str(path), "-f", "null", "-"]
    subprocess.run(cmd, check=True, capture_output=True)


def pyav_decode(path: Path, start: float, stop: float, cfg: SamplingConfig, threads: int) -> np.ndarray:
    """The candidate: seek to the keyframe before the first sample, decode, keep the frame displayed at each sample
    time, swscale only those (short side to cfg.size) and centre-crop. Returns (F, S, S, 3) uint8."""
    times = sample_times(start, stop, cfg)  # (F,)
    picks: list = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO" if threads != 1 else "SLICE"
        stream.thread_count = threads
        fps = float(stream.average_rate)
        container.seek(int(max(0.0, times[0] - 1.0 / fps) / stream.time_base), stream=stream, backward=True)
        prev = None
        k = 0
        for frame in container.decode(stream):
            t = float(frame.pts * stream.time_base)
            while k < len(times) and t > times[k] + 1e-9 and prev is not None:
                picks.append(prev)
                k += 1
            if k == len(times):
                break
            prev = frame
        while k < len(times) and prev is not None:
            picks.append(prev)
            k += 1
        w, h = stream.codec_context.width, stream.codec_context.height
    size = cfg.size
    sw, sh = (round(w * size / h), size) if w > h else (size, round(h * size / w))
    out = np.empty((len(picks), size, size, 3), np.uint8)
    x0, y0 = (sw - size) // 2, (sh - size) // 2
    for i, fr in enumerate(picks):
        img = fr.reformat(width=sw, height=sh, format="rgb24", interpolation="BICUBIC").to_ndarray()
        out[i] = img[y0:y0 + size, x0:x0 + size]
    return out


def measure(fns: dict, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Round-robin over fns (rotating the order), recording wall and CPU seconds of each call."""
    names = list(fns)
    for n in names:  # warm-up: page cache, probe cache, imports
        fns[n]()
    out = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            c0, w0 = cpu_seconds(), time.perf_counter()
            fns[n]()
            out[n]["wall"].append(time.perf_counter() - w0)
            out[n]["cpu"].append(cpu_seconds() - c0)
    return out


def plan_part(args, work: Path, repeats: int) -> dict:
    """Planned (only the needed packets) vs plain decode of the same windows; returns the results."""
    seconds = [float(x) for x in args.plan_segment_seconds.split(",")]
    cfg = SamplingConfig(num_frames=args.frames, size=args.size)
    plain, planned = FfmpegDecoder(skip_unneeded=False), FfmpegDecoder(skip_unneeded=True)
    out = {}
    for kind, bframes in (("bframes_gop60", 2), ("all_p_gop60", 0)):
        src = make_source(work / f"plan_{kind}_{args.width}x{args.height}_{args.bitrate}_{args.plan_source_seconds:g}s"
                          ".mp4", args.plan_source_seconds, args.width, args.height, 60, args.bitrate, 7, bframes)
        probe = probe_video(src)
        windows, start = [], 0.37
        for k in range(64):
            seg = seconds[k % len(seconds)]
            if start + seg > probe.duration - 0.05:
                break
            windows.append((start, start + seg))
            start += seg * 0.55 + 0.31  # overlapping, starts anywhere in the GOP
        frames = sum((b - a) * probe.fps for a, b in windows)
        for a, b in windows:  # the same frames, bit for bit
            x = decode_video_segment(src, a, b, cfg, 1, plain)[0]
            if not np.array_equal(x, decode_video_segment(src, a, b, cfg, 1, planned)[0]):
                raise SystemExit(f"planned decode differs from the plain one on {src.name} [{a:.3f}, {b:.3f}]")
        fns = {f"plain, {kind}": lambda s=src, w=windows: [decode_video_segment(s, a, b, cfg, 1, plain) for a, b in w],
               f"planned, {kind}": lambda s=src, w=windows: [decode_video_segment(s, a, b, cfg, 1, planned)
                                                            for a, b in w]}
        res = measure(fns, repeats)
        cpu = {k: median(v["cpu"]) for k, v in res.items()}
        wall = {k: median(v["wall"]) for k, v in res.items()}
        ratio = cpu[f"planned, {kind}"] / cpu[f"plain, {kind}"]
        rows = [[k, fmt_s(cpu[k] / len(windows)), f"{spread(res[k]['cpu']):.0%}", f"{frames / cpu[k]:.0f}",
                 fmt_s(wall[k] / len(windows)), f"{cpu[k] / cpu[f'plain, {kind}']:.3f}x"] for k in fns]
        print_table(["decode", "CPU / segment", "spread", "window frames/s per core", "wall / segment", "CPU vs plain"],
                    rows, title=f"{kind}: {len(windows)} windows of {args.plan_segment_seconds} s "
                    f"({frames / len(windows):.0f} frames on average) -> {args.frames} frames, ffmpeg threads 1, "
                    f"median of {repeats}; frames bit-identical")
        out[kind] = {"windows": len(windows), "window_frames": frames, "cpu_s": cpu, "wall_s": wall,
                     "raw": res, "planned_vs_plain": ratio}
    return out


def main() -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--workdir", type=str, required=True, help="folder for the generated sources (kept for re-runs)")
    p.add_argument("--sources", type=int, default=2, help="generated videos")
    p.add_argument("--source-seconds", type=float, default=3.0, help="length of each generated video")
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--gop", type=int, default=30, help="frames between keyframes in the generated videos")
    p.add_argument("--bitrate", type=str, default="16M", help="H.264 bitrate of the generated videos")
    p.add_argument("--segment-seconds", type=float, default=1.5, help="length of each decoded window")
    p.add_argument("--frames", type=int, default=16, help="frames sampled per segment")
    p.add_argument("--size", type=int, default=224, help="output frame size (scale short side + centre crop)")
    p.add_argument("--part", choices=("bare", "plan", "all"), default="all",
                   help="bare: project vs bare ffmpeg and PyAV; plan: planned vs plain decode; all: both")
    p.add_argument("--plan-source-seconds", type=float, default=12.0, help="length of the two plan-part sources")
    p.add_argument("--plan-segment-seconds", type=str, default="1,2,4",
                   help="window lengths of the plan part, cycled (comma-separated seconds)")
    args = p.parse_args()
    if args.smoke:
        args.width, args.height, args.source_seconds, args.segment_seconds, args.sources = 320, 180, 1.2, 0.5, 1
        args.frames, args.size = 4, 64
        args.plan_source_seconds, args.plan_segment_seconds = 3.0, "0.5,1.5"
    repeats = args.repeats or (1 if args.smoke else 3)
    print(machine_line())
    version = subprocess.run([ffmpeg_binary(), "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(" ".join(version.split()[:3]) + f"; PyAV {av.__version__}")

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    plan = plan_part(args, work, repeats) if args.part in ("plan", "all") else None
    if args.part == "plan":
        write_json(args.json, {"args": vars(args), "machine": machine_line(), "plan": plan})
        plan_headline(plan)
        return
    t0 = time.perf_counter()
    sources = [make_source(work / f"src{i}_{args.width}x{args.height}_g{args.gop}_{args.bitrate}_"
                           f"{args.source_seconds:g}s.mp4", args.source_seconds, args.width, args.height, args.gop,
                           args.bitrate, i) for i in range(args.sources)]
    probe = probe_video(sources[0])
    mbps = sources[0].stat().st_size * 8 / probe.duration / 1e6
    print(f"{len(sources)} sources {probe.width}x{probe.height} at {probe.fps:.2f} fps, {probe.duration:.2f} s, "
          f"{mbps:.1f} Mbit/s, keyframe every {args.gop} frames (made/reused in {time.perf_counter() - t0:.1f} s)")

    # windows starting mid-GOP (the common case: segment starts are anywhere), and the same lengths keyframe-aligned
    gop_s = args.gop / probe.fps
    seg = args.segment_seconds
    mid, aligned = [], []
    for src in sources:
        start = 0.45 * gop_s
        while start + seg < probe.duration - 0.05:
            mid.append((src, start))
            aligned.append((src, round((start - 0.45 * gop_s) / gop_s) * gop_s))
            start += max(seg, gop_s) * 1.1
    window_frames = seg * probe.fps
    cfg = SamplingConfig(num_frames=args.frames, size=args.size)
    print(f"{len(mid)} windows of {seg:g} s ({window_frames:.0f} frames) -> {args.frames} frames at "
          f"{args.size}x{args.size}; {repeats} repeats, interleaved")

    def batch(fn, windows):
        return lambda: [fn(src, s) for src, s in windows]

    fns = {}
    for threads, label in ((1, "threads 1"), (0, "threads auto")):
        fns[f"bare_ffmpeg, {label}"] = batch(lambda src, s, t=threads: bare_ffmpeg(src, s, seg, t), mid)
        fns[f"project, {label}"] = batch(lambda src, s, t=threads: decode_video_segment(src, s, s + seg, cfg, t), mid)
        fns[f"pyav, {label}"] = batch(lambda src, s, t=threads: pyav_decode(src, s, s + seg, cfg, t), mid)
    fns["bare_ffmpeg aligned, threads 1"] = batch(lambda src, s: bare_ffmpeg(src, s, seg, 1), aligned)

    # same frames picked by the candidate as by the project (scalers may differ in rounding)
    a = decode_video_segment(mid[0][0], mid[0][1], mid[0][1] + seg, cfg)[0]
    b = pyav_decode(mid[0][0], mid[0][1], mid[0][1] + seg, cfg, 0)
    pyav_diff = float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
    print(f"pyav vs project on window 0: mean |difference| {pyav_diff:.2f} grey levels of 255 (same frames picked "
          "when small; the scalers differ in rounding)")

    res = measure(fns, repeats)
    n = len(mid)
    cpu = {k: median(v["cpu"]) / n for k, v in res.items()}   # CPU s per segment
    wall = {k: median(v["wall"]) / n for k, v in res.items()}
    rows = []
    for k in fns:
        ref = "bare_ffmpeg, " + k.split(", ")[1] if k.startswith(("project", "pyav")) else k
        rows.append([k, fmt_s(cpu[k]), f"{spread(res[k]['cpu']):.0%}", f"{window_frames / cpu[k]:.0f}",
                     fmt_s(wall[k]), f"{cpu[k] / cpu[ref]:.3f}x" if ref in cpu else "-"])
    print_table(["decode", "CPU / segment", "spread", "frames/s per core", "wall / segment", "CPU vs bare"], rows,
                title=f"{n} windows of {window_frames:.0f} frames, median of {repeats}")

    ratio = cpu["project, threads auto"] / cpu["bare_ffmpeg, threads auto"]
    ratio_1 = cpu["project, threads 1"] / cpu["bare_ffmpeg, threads 1"]
    pyav_ratio = cpu["pyav, threads auto"] / cpu["bare_ffmpeg, threads auto"]
    seek = cpu["bare_ffmpeg, threads 1"] - cpu["bare_ffmpeg aligned, threads 1"]
    per_frame = cpu["bare_ffmpeg aligned, threads 1"] / window_frames
    print(f"seek cost: a mid-GOP start costs {fmt_s(seek)} CPU more than a keyframe-aligned one "
          f"(~{seek / per_frame:.0f} frames decoded and dropped; half a GOP is {args.gop / 2:.0f})")
    print(f"threads: ffmpeg's own threads cost {cpu['bare_ffmpeg, threads auto'] / cpu['bare_ffmpeg, threads 1']:.2f}x "
          f"the CPU of one thread for bare decode, and cut its wall time "
          f"{wall['bare_ffmpeg, threads 1'] / wall['bare_ffmpeg, threads auto']:.2f}x")
    print(f"project_vs_bare_threads1={ratio_1:.3f}x pyav_vs_bare={pyav_ratio:.3f}x "
          f"bare_frames_per_s_per_core={window_frames / cpu['bare_ffmpeg, threads 1']:.0f}")
    write_json(args.json, {
        "args": vars(args), "machine": machine_line(), "mbps": mbps, "windows": n, "window_frames": window_frames,
        "cpu_per_segment": cpu, "wall_per_segment": wall, "raw": res, "seek_cost_cpu_s": seek,
        "project_vs_bare": ratio, "project_vs_bare_threads1": ratio_1, "pyav_vs_bare": pyav_ratio,
        "pyav_mean_abs_diff": pyav_diff,
        "bare_frames_per_s_per_core": window_frames / cpu["bare_ffmpeg, threads 1"], "plan": plan,
    })
    if plan is not None:
        print(f"project_decode_vs_bare_ffmpeg_1080p={ratio:.3f}x (target <= 1.2x)")
        plan_headline(plan)
        return
    print(headline("project_decode_vs_bare_ffmpeg_1080p", ratio, "x", "<= 1.2x", ratio <= 1.2,
                   f"(CPU per segment, ffmpeg threads auto; threads 1: {ratio_1:.3f}x; pyav {pyav_ratio:.3f}x)"))


def plan_headline(plan: dict) -> None:
    b, p = plan["bframes_gop60"]["planned_vs_plain"], plan["all_p_gop60"]["planned_vs_plain"]
    print(headline("planned_vs_plain_decode_bframes_gop60", b, "x", "<= 0.6x", b <= 0.6 and p <= 1.0,
                   f"(all-P GOP 60: {p:.3f}x, target <= 1.0x; CPU per segment, 16 samples, frames bit-identical)"))


if __name__ == "__main__":
    main()
