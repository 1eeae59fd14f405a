"""The GPU workstation's figures for scripts/gpu-check.sh: decode frames/s per decoder on 1080p H.264 at 59.94 fps,
NVDEC frame-exactness against the CPU decoder, encoder images/s (ViT-B-16 and ViT-L-14 towers, random init, 224,
bf16), and end-to-end extraction segments/s on generated 1080p clips, CPU decode vs the best decoder here.

    python benchmarks/gpu_workstation.py --workdir /tmp/gw --json gw.json          # on a CUDA machine, minutes
    python benchmarks/gpu_workstation.py --smoke --workdir /tmp/gw --json gw.json  # tiny, on CPU, seconds

Decoders that cannot run here are reported with the reason instead of figures. Clips are made with the project's
ffmpeg (testsrc2 + temporal noise, libx264, B-frames, GOP 60). Decode: 16 frames sampled from each of several
windows of 2 s, the decoder's frames/s of *window* frames (the rate at which footage is consumed) and of sampled
frames, wall time, decode workers side by side as extraction runs them. Exactness: the frames each decoder returns
for the same requests against ffmpeg's: the same frames picked (timestamp-coded clip) and mean |difference| within
the stated tolerance on the 1080p clips. End to end: `run_extraction` on an EK-100-style dataset whose videos are
1080p clips, ffmpeg decode vs `auto`, ViT-B-16 random init in bf16 on the GPU.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, headline, machine_line, write_json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mambavl.data.media import ffmpeg_binary  # noqa: E402
from mambavl.data.synthetic import make_kitchen_dataset, make_timestamp_video, read_timestamp_code  # noqa: E402
from mambavl.extract.backends import PIXEL_TOLERANCE, build_decoder, torchcodec_problem  # noqa: E402
from mambavl.extract.decode import SamplingConfig, decode_video_segment, probe_video, sample_times  # noqa: E402

RATE = "60000/1001"


def make_clip(path: Path, seconds: float, width: int, height: int, rate: str = RATE) -> Path:
    if not path.is_file():
        subprocess.run([ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc2=size={width}x{height}:rate={rate}:duration={seconds}", "-vf",
                        "noise=alls=6:allf=t", "-c:v", "libx264", "-preset", "ultrafast", "-tune", "fastdecode",
                        "-pix_fmt", "yuv420p", "-bf", "2", "-g", "60", "-keyint_min", "60", "-sc_threshold", "0",
                        "-x264-params", "cabac=1:b-adapt=0", "-b:v", "16M", str(path)], check=True)
    return path


def decoders_here() -> dict:
    """name -> decoder or the reason it cannot run."""
    out = {"ffmpeg": build_decoder("ffmpeg")}
    for name, dev in (("torchcodec", "cpu"), ("torchcodec-cuda", "cuda")):
        problem = torchcodec_problem(dev)
        out[name] = problem if problem else build_decoder(name)
    return out


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_section(args, work: Path, decoders: dict) -> dict:
    w, h = (320, 180) if args.smoke else (1920, 1080)
    clips = [make_clip(work / f"clip{i}_{w}x{h}.mp4", args.clip_seconds, w, h) for i in range(args.clips)]
    probe = probe_video(clips[0])
    cfg = SamplingConfig(num_frames=16, size=224 if not args.smoke else 64)
    seg = args.window_seconds
    windows = [(c, s) for c in clips for s in np.arange(0.3, probe.duration - seg - 0.05, seg * 0.9)]
    window_frames = seg * probe.fps * len(windows)
    ts = make_timestamp_video(work / "ts.mp4", duration=4.0, fps=25.0, width=256, height=144)
    ts_cfg = SamplingConfig(num_frames=12, size=32)
    ts_windows = [(0.0, 4.0), (1.03, 2.71), (3.5, 3.99)]
    out = {}
    reference = {}
    for name, dec in decoders.items():
        if isinstance(dec, str):
            out[name] = {"skipped": dec}
            continue
        first = [decode_video_segment(c, s, s + seg, cfg, decoder=dec)[0] for c, s in windows[:2]]  # warm-up
        del first
        sync()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as pool:
            frames = list(pool.map(lambda cs: decode_video_segment(cs[0], cs[1], cs[1] + seg, cfg, decoder=dec)[0],
                                   windows))
        sync()
        dt = time.perf_counter() - t0
        frames = [f.cpu().numpy() if isinstance(f, torch.Tensor) else f for f in frames]
        row = {"windows": len(windows), "workers": args.workers, "seconds": dt,
               "window_frames_per_s": window_frames / dt, "sampled_frames_per_s": 16 * len(windows) / dt}
        if name == "ffmpeg":
            reference = {"frames": frames}
        else:
            diffs = [float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
                     for a, b in zip(frames, reference["frames"])]
            row["mean_abs_diff_vs_ffmpeg"] = max(diffs)
            codes_ok = True
            for a, b in ts_windows:
                got = decode_video_segment(ts, a, b, ts_cfg, decoder=dec)[0]
                got = got.cpu().numpy() if isinstance(got, torch.Tensor) else got
                want = np.floor(sample_times(a, b, ts_cfg) * 25.0 + 1e-6).astype(int)
                codes_ok &= [read_timestamp_code(f) for f in got] == list(want)
            row["frame_exact"] = bool(codes_ok)
            row["within_tolerance"] = max(diffs) <= PIXEL_TOLERANCE
        out[name] = row
    return {"clip": f"{w}x{h} at {probe.fps:.2f} fps, H.264 GOP 60 with B-frames", "decoders": out}


def encoder_section(args) -> dict:
    import open_clip

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = ["mambavl-tiny-clip"] if args.smoke else ["ViT-B-16", "ViT-L-14"]
    if args.smoke:
        from mambavl.extract.encoders import _register_configs

        _register_configs()
    out = {}
    for name in models:
        model = open_clip.create_model(name, pretrained=None).visual.to(dev).eval()
        size = 64 if args.smoke else 224
        batch = 4 if args.smoke else args.encoder_batch
        x = torch.randn(batch, 3, size, size, device=dev)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu",
                                                                                                      enabled=False)
        with torch.inference_mode(), amp:
            for _ in range(2):
                model(x)
            sync()
            t0 = time.perf_counter()
            steps = 2 if args.smoke else 20
            for _ in range(steps):
                model(x)
            sync()
        dt = time.perf_counter() - t0
        out[name] = {"images_per_s": batch * steps / dt, "batch": batch, "size": size,
                     "dtype": "bf16" if dev.type == "cuda" else "fp32", "device": str(dev)}
        del model
    return out


def end_to_end_section(args, work: Path, decoders: dict) -> dict:
    from mambavl.cache.build import ExtractConfig, run_extraction
    from mambavl.extract.encoders import EncoderConfig, build_encoder

    root = work / ("kitchen_smoke" if args.smoke else "kitchen_1080p")
    marker = root / ".complete"
    w, h = (128, 72) if args.smoke else (1920, 1080)
    if not marker.is_file():
        kit = make_kitchen_dataset(root, n_train=args.segments, n_val=0, n_test=0, segments_per_video=6,
                                   fps=60000 / 1001)
        for mp4 in sorted(kit.videos.rglob("*.MP4")):  # same timeline, 1080p pixels
            seconds = probe_video(mp4).duration
            tmp = mp4.with_name("big_" + mp4.name)
            make_clip(tmp, round(seconds, 3), w, h)
            tmp.replace(mp4)
        marker.write_text("ok\n")
    csv, videos = root / "EPIC_100_train.csv", root / "videos"
    cuda = torch.cuda.is_available()
    enc_cfg = EncoderConfig(model="mambavl-tiny-clip" if args.smoke else "ViT-B-16", pretrained="none",
                            device="cuda" if cuda else "cpu", precision="bf16", batch_size=256 if cuda else 16)
    enc = build_encoder(enc_cfg)
    size = enc.image_size
    out = {}
    warm = ExtractConfig(annotations=str(csv), videos=str(videos), out=str(work / "e2e_warm.h5"), encoder=enc_cfg,
                         sampling=SamplingConfig(num_frames=16, size=size), limit=2)
    Path(warm.out).unlink(missing_ok=True)
    run_extraction(warm, encoder=enc)  # first-call costs (kernels, text tables' code paths) outside the timings
    for name in ("ffmpeg", "auto"):
        cfg = ExtractConfig(annotations=str(csv), videos=str(videos), out=str(work / f"e2e_{name}.h5"),
                            encoder=enc_cfg, sampling=SamplingConfig(num_frames=16, size=size),
                            decode_workers=args.workers, decode_threads=1, segments_per_batch=16, decoder=name)
        Path(cfg.out).unlink(missing_ok=True)
        t0 = time.perf_counter()
        summary = run_extraction(cfg, encoder=enc)
        dt = time.perf_counter() - t0
        import h5py

        with h5py.File(cfg.out, "r") as f:
            used = str(f.attrs["decoder"])
        out[name] = {"segments": summary.total, "done": summary.done, "failed": summary.failed, "seconds": dt,
                     "segments_per_s": summary.total / dt, "decoder_used": used}
    out["auto_vs_ffmpeg"] = out["auto"]["segments_per_s"] / out["ffmpeg"]["segments_per_s"]
    out["encoder"] = f"{enc_cfg.model} random init, {'bf16 on CUDA' if cuda else 'CPU'}"
    return out


def main() -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--clips", type=int, default=2)
    p.add_argument("--clip-seconds", type=float, default=12.0)
    p.add_argument("--window-seconds", type=float, default=2.0)
    p.add_argument("--workers", type=int, default=8, help="decode workers side by side (extraction's pool)")
    p.add_argument("--encoder-batch", type=int, default=256)
    p.add_argument("--segments", type=int, default=48, help="segments of the end-to-end run")
    p.add_argument("--sections", default="decode,encode,e2e")
    args = p.parse_args()
    if args.smoke:
        args.clips, args.clip_seconds, args.window_seconds, args.workers, args.segments = 1, 2.0, 0.8, 2, 4
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"GPU: {gpu}")
    decoders = decoders_here()
    result = {"machine": machine_line(), "gpu": gpu, "smoke": args.smoke,
              "pixel_tolerance": PIXEL_TOLERANCE}
    sections = args.sections.split(",")
    if "decode" in sections:
        result["decode"] = decode_section(args, work, decoders)
        for name, row in result["decode"]["decoders"].items():
            print(f"decode {name}: " + (f"skipped ({row['skipped']})" if "skipped" in row else
                  f"{row['window_frames_per_s']:.0f} window frames/s, {row['sampled_frames_per_s']:.0f} sampled/s"
                  + (f", frame-exact {row['frame_exact']}, mean |diff| {row['mean_abs_diff_vs_ffmpeg']:.2f}"
                     if "frame_exact" in row else "")))
        write_json(args.json, result)  # after every section: a run stopped later keeps it
    if "encode" in sections:
        result["encode"] = encoder_section(args)
        for name, row in result["encode"].items():
            print(f"encoder {name}: {row['images_per_s']:.0f} images/s ({row['dtype']}, batch {row['batch']})")
        write_json(args.json, result)  # after every section: a run stopped later keeps it
    ratio = float("nan")
    if "e2e" in sections:
        result["end_to_end"] = e2e = end_to_end_section(args, work, decoders)
        ratio = e2e["auto_vs_ffmpeg"]
        print(f"end to end: ffmpeg {e2e['ffmpeg']['segments_per_s']:.2f} segments/s, auto "
              f"({e2e['auto']['decoder_used']}) {e2e['auto']['segments_per_s']:.2f} segments/s")
    write_json(args.json, result)
    print(headline("end_to_end_auto_vs_cpu_decode", ratio, "x", ">= 5x on one H200", ratio >= 5,
                   "(segments/s; see the json for every figure)"))


if __name__ == "__main__":
    main()
