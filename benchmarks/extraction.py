"""Feature extraction: the overlapped pipeline against its slowest stage alone, and segment decode against bare ffmpeg.

    python benchmarks/extraction.py --workdir /tmp/mambavl-bench   # synthetic kitchen videos there, 3 repeats
    python benchmarks/extraction.py --smoke --workdir /tmp/x        # tiny sizes, seconds

Data: the synthetic EK-100-style kitchen dataset (`mambavl.data.synthetic.make_kitchen_dataset`: H.264 MP4s, one
per participant video, several annotated segments each), written once into --workdir. Encoder: the tiny random
CLIP config `mambavl-tiny-clip` (pretrained none) by default, built once and reused, as the tests do.

1. End to end vs the slowest stage. Compared, interleaved, median of repeats:
     end_to_end   `run_extraction(ExtractConfig(...), encoder=enc)` into a fresh cache: annotations, question and
                  answer text tables, decode (thread pool, `decode_workers`) || encode (batches) || write (thread)
     decode_only  `decode_segment` over the same segments in a thread pool of the same size (`decode_workers`)
     encode_only  `FrozenEncoder.encode_segments` on the pre-decoded frames, `segments_per_batch` at a time
   Headline: end_to_end / max(decode_only, encode_only), target <= 1.25x: overlapping the stages should cost
   little more than the slowest of them.
2. Segment decode through the project vs the bare ffmpeg CLI on the same segments, one at a time:
     project      `mambavl.extract.decode.decode_segment` (seek, fps filter picking the frames, scale + crop, pipe)
     bare_ffmpeg  `ffmpeg -ss START -t DUR -i FILE -vf scale,crop -f rawvideo -pix_fmt rgb24 -` (every frame of
                  the window scaled and piped; the user then picks frames in numpy)
   Ratio project / bare_ffmpeg, target <= 1.2x, printed as `decode_vs_bare_ffmpeg=...`.

--gpu runs part 1 on the GPU path: encoder on CUDA in bf16 autocast, --decoder (default auto: NVDEC through
torchcodec when present and verified, frames resized on the GPU) for both end_to_end and decode_only. Without CUDA it
prints "GPU branch skipped: <reason>" and runs the CPU path.

    python benchmarks/extraction.py --gpu --workdir /tmp/mambavl-bench --model ViT-B-16 --size 224 --video-size 1080
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mambavl.data.annotations import load_annotations  # noqa: E402
from mambavl.data.synthetic import make_kitchen_dataset  # noqa: E402
from mambavl.extract.decode import (  # noqa: E402
    SamplingConfig,
    FfmpegDecoder,
    decode_segment,
    ffmpeg_binary,
    locate_source,
)
from mambavl.extract.backends import build_decoder  # noqa: E402
from mambavl.extract.encoders import EncoderConfig, build_encoder  # noqa: E402
from mambavl.cache.build import ExtractConfig, run_extraction  # noqa: E402


def kitchen_dataset(work: Path, args):
    """The synthetic dataset for these settings, generated once per workdir (deterministic in its arguments)."""
    root = work / f"kitchen_n{args.segments}_s{args.video_size}_f{args.video_fps:g}"
    marker = root / ".complete"
    if not marker.is_file():
        if root.exists():
            shutil.rmtree(root)
        make_kitchen_dataset(root, n_train=args.segments, n_val=0, n_test=0, segments_per_video=6,
                             size=args.video_size, fps=args.video_fps)
        marker.write_text("ok\n")
    return root


def bare_ffmpeg_cmd(path: Path, start: float, stop: float, size: int) -> list[str]:
    """What a user would run by hand: input seek, the window's duration, scale the short side + centre crop."""
    vf = f"scale=w='if(gt(iw,ih),-1,{size})':h='if(gt(iw,ih),{size},-1)',crop={size}:{size}"
    return [ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-ss", f"{start:.6f}", "-t", f"{stop - start:.6f}",
            "-i", str(path), "-vf", vf, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]


def bare_decode(cmd: list[str], size: int) -> np.ndarray:
    raw = subprocess.run(cmd, capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, size, size, 3)  # (n, S, S, 3)


def main() -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--workdir", type=str, required=True, help="folder for the synthetic videos and caches (created)")
    p.add_argument("--segments", type=int, default=96, help="annotated segments (6 per video)")
    p.add_argument("--video-size", type=int, default=256, help="synthetic video width = height")
    p.add_argument("--video-fps", type=float, default=30.0)
    p.add_argument("--frames", type=int, default=8, help="frames sampled per segment")
    p.add_argument("--model", type=str, default="mambavl-tiny-clip", help="open_clip config (random init)")
    p.add_argument("--size", type=int, default=64, help="frame size fed to the encoder (the tiny config's: 64)")
    p.add_argument("--decode-workers", type=int, default=2, help="ExtractConfig.decode_workers (its default: 2)")
    p.add_argument("--segments-per-batch", type=int, default=8, help="ExtractConfig.segments_per_batch")
    p.add_argument("--bare-segments", type=int, default=32, help="segments in the decode vs bare ffmpeg comparison")
    p.add_argument("--gpu", action="store_true", help="encoder on CUDA (bf16 autocast) and --decoder; skips on CPU")
    p.add_argument("--decoder", type=str, default="auto", help="decoder of the --gpu run (ffmpeg|torchcodec|...)")
    args = p.parse_args()
    if args.smoke:
        args.segments, args.video_size, args.video_fps, args.frames, args.bare_segments = 6, 64, 12.0, 4, 3
    args.repeats = args.repeats or (1 if args.smoke else 3)
    setup_threads(args.threads)
    print(machine_line())
    version = subprocess.run([ffmpeg_binary(), "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(" ".join(version.split()[:3]))  # "ffmpeg version X"

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    root = kitchen_dataset(work, args)
    csv = root / "EPIC_100_train.csv"
    videos = root / "videos"
    ann = load_annotations(csv)
    segments = ann.segments
    sampling = SamplingConfig(num_frames=args.frames, size=args.size)
    enc_cfg = EncoderConfig(model=args.model, pretrained="none", device="cpu")
    decoder = FfmpegDecoder()
    if args.gpu and not torch.cuda.is_available():
        print("GPU branch skipped: CUDA is not available (the CPU path runs instead)")
        args.gpu = False
    if args.gpu:
        enc_cfg = EncoderConfig(model=args.model, pretrained="none", device="cuda", precision="bf16",
                                batch_size=max(64, args.segments_per_batch * args.frames))
        decoder = build_decoder(args.decoder)
        print(f"GPU path: decoder {decoder.name}, encoder on {torch.cuda.get_device_name()} in bf16 autocast")
    torch.manual_seed(0)
    enc = build_encoder(enc_cfg)
    durations = [s.stop_time - s.start_time for s in segments]
    print(f"{len(segments)} segments ({min(durations):.1f}-{max(durations):.1f} s) in "
          f"{len({s.video_id for s in segments})} videos of {args.video_size}x{args.video_size} at "
          f"{args.video_fps:g} fps; {args.frames} frames per segment at {args.size}x{args.size}; encoder "
          f"{args.model} (feature dim {enc.feature_dim}); decode_workers {args.decode_workers}, "
          f"segments_per_batch {args.segments_per_batch}")

    # ---- 1. end to end vs each stage alone
    out = work / "extraction_bench.h5"
    xcfg = ExtractConfig(annotations=str(csv), videos=str(videos), out=str(out), encoder=enc_cfg, sampling=sampling,
                         decode_workers=args.decode_workers, segments_per_batch=args.segments_per_batch,
                         decoder=decoder.name)

    def end_to_end():
        out.unlink(missing_ok=True)
        s = run_extraction(xcfg, encoder=enc)
        assert s.done == len(segments) and s.failed == 0, s

    def decode_one(seg):
        return decode_segment(videos, seg, seg.start_time, seg.stop_time, sampling, ann.frame_rate(seg.video_id),
                              decoder=decoder)[0]

    def decode_only():
        with ThreadPoolExecutor(max_workers=args.decode_workers) as pool:
            return list(pool.map(decode_one, segments))

    decoded = decode_only()  # (F, S, S, 3) uint8 per segment, the encoder's input

    def encode_only():
        k = args.segments_per_batch
        stack = np.stack if isinstance(decoded[0], np.ndarray) else torch.stack
        return [enc.encode_segments(stack(decoded[i:i + k])) for i in range(0, len(decoded), k)]

    # Check that the stages compute what end to end stores.
    end_to_end()
    from mambavl.cache.reader import open_cache

    stored = open_cache(out).h5()["features"][()]  # (N, F, D) float16
    direct = torch.cat(encode_only()).numpy().astype(np.float16)
    if not args.gpu and not np.array_equal(stored, direct):  # on the GPU, batch composition changes kernels
        raise SystemExit("end_to_end features differ from encode_only(decode_only()): the stages do other work")

    stage_fns = {"end_to_end": end_to_end, "decode_only": decode_only, "encode_only": encode_only}
    t_stage = interleaved(stage_fns, repeats=args.repeats, warmup=0)
    med = {k: median(v) for k, v in t_stage.items()}
    slowest = max(("decode_only", "encode_only"), key=lambda k: med[k])
    ratio = med["end_to_end"] / med[slowest]
    rows = [[k, fmt_s(med[k]), f"{spread(t_stage[k]):.0%}", f"{med[k] / med[slowest]:.3f}x",
             f"{len(segments) / med[k]:.1f}"] for k in stage_fns]
    print_table(["run", "time", "spread", "vs slowest stage", "segments/s"], rows,
                title=f"extraction of {len(segments)} segments, median of {args.repeats} (interleaved); slowest "
                f"stage alone: {slowest}")

    # Fixed costs inside end_to_end that neither stage pays: the question and answer text tables, encoded once per
    # run by the text tower (as `mambavl.cache.build.write_text_tables` does: the question table, then verb, noun
    # and action answers).
    from mambavl.cache.build import resolve_question_sources
    from mambavl.extract.questions import answer_texts, build_question_table

    texts = build_question_table(segments, ann.verbs, ann.nouns,
                         resolve_question_sources(xcfg.questions, None), None)[0]
    pairs = sorted({(s.verb_class, s.noun_class) for s in segments if s.verb_class >= 0 and s.noun_class >= 0})
    answers = [xs for xs in answer_texts(ann.verbs, ann.nouns, pairs) if xs]
    n_text = len(texts) + sum(len(xs) for xs in answers)

    def text_tables():
        enc.encode_text(texts)
        for xs in answers:
            enc.encode_text(xs)

    t_text = median(interleaved({"text": text_tables}, repeats=args.repeats, warmup=1)["text"])
    rest = (med["end_to_end"] - t_text) / med[slowest]
    print(f"fixed per run inside end_to_end: text tables ({n_text} texts: questions, verb/noun/action answers) "
          f"through the text tower {fmt_s(t_text)}; end_to_end without them: {rest:.3f}x the slowest stage")

    # ---- 2. project decode vs bare ffmpeg, one segment at a time
    subset = segments[: args.bare_segments]
    cmds = [bare_ffmpeg_cmd(locate_source(videos, s)[1], s.start_time, s.stop_time, args.size) for s in subset]
    n_bare = [len(bare_decode(c, args.size)) for c in cmds]
    dec_fns = {
        "project": lambda: [decode_one(s) for s in subset],
        "bare_ffmpeg": lambda: [bare_decode(c, args.size) for c in cmds],
    }
    t_dec = interleaved(dec_fns, repeats=max(args.repeats, 3), warmup=1)
    dmed = {k: median(v) for k, v in t_dec.items()}
    d_ratio = dmed["project"] / dmed["bare_ffmpeg"]
    rows = [
        ["project decode_segment", fmt_s(dmed["project"]), f"{spread(t_dec['project']):.0%}",
         fmt_s(dmed["project"] / len(subset)), f"{args.frames}", f"{d_ratio:.3f}x"],
        ["bare ffmpeg CLI", fmt_s(dmed["bare_ffmpeg"]), f"{spread(t_dec['bare_ffmpeg']):.0%}",
         fmt_s(dmed["bare_ffmpeg"] / len(subset)), f"{min(n_bare)}-{max(n_bare)}", "1.000x"],
    ]
    print_table(["decode", "time", "spread", "per segment", "frames out", "vs bare"], rows,
                title=f"segment decode, {len(subset)} segments one at a time, median of {max(args.repeats, 3)} "
                "(interleaved)")
    d_ok = d_ratio <= 1.2
    print(f"decode_vs_bare_ffmpeg={d_ratio:.3f}x (target <= 1.2x) {'PASS' if d_ok else 'MISS'}")

    write_json(args.json, {
        "args": vars(args), "machine": machine_line(), "segments": len(segments), "gpu": bool(args.gpu),
        "decoder": decoder.name, "end_to_end_segments_per_s": len(segments) / med["end_to_end"],
        "stages": {k: {"median_s": med[k], "times": t_stage[k]} for k in stage_fns},
        "slowest_stage": slowest, "end_to_end_vs_slowest": ratio,
        "text_tables_s": t_text, "texts": n_text, "end_to_end_minus_text_vs_slowest": rest,
        "decode": {k: {"median_s": dmed[k], "times": t_dec[k]} for k in dec_fns},
        "decode_vs_bare_ffmpeg": d_ratio, "bare_frames_per_segment": n_bare,
    })
    print(headline("end_to_end_vs_slowest_stage", ratio, "x", "<= 1.25x", ratio <= 1.25,
                   f"(slowest: {slowest}; decode_vs_bare_ffmpeg={d_ratio:.3f}x {'PASS' if d_ok else 'MISS'})"))


if __name__ == "__main__":
    main()
