"""Generated media: timestamp-coded test videos and frame folders, and the demo's synthetic "kitchen" dataset.

Everything is drawn in numpy and encoded by the same ffmpeg binary the decoder uses (raw RGB piped to ffmpeg), so
tests and the demo need no downloads.

Timestamp coding: frame k shows two flat grey blocks, 16*(k % 16)+8 on the left half and 16*(k // 16)+8 on the
right half. Grey carries no chroma, so 4:2:0 subsampling cannot blur it, and 16 levels apart survive any sane
encoder; `read_timestamp_code` recovers k after the decoder's scale + centre crop. Up to 256 frames.

Kitchen dataset: in each action segment one object moves. The NOUN is visual (each object has its own shape and
colour) and the VERB is the motion (move left/right, lift, lower, grow, shrink), so even a randomly initialised image
encoder's per-frame features carry the noun, and their order carries the verb. Between actions the next object sits
still at its starting place, so the anticipation window sees what comes next. Some clips hold a small static second
object (listed in ``all_nouns``) for the scene questions. Each participant has their own "kitchen" background,
so the unseen participants of validation/test are a (mild) domain shift. Files follow EK-100's layout and CSV
formats exactly; a generic clip CSV variant (``video,start,stop,label``) can be written beside them.
"""

from __future__ import annotations

import csv
import math
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mambavl.data.media import ffmpeg_binary
from mambavl.progress import Progress, or_none


# key, instances (synonyms written in the `verb` column), category, motion (dx, dy, dscale) over the action
VERBS = (
    ("move-left", ("move-left", "slide-left", "push-left"), "translate", (-1.0, 0.0, 0.0)),
    ("move-right", ("move-right", "slide-right", "push-right"), "translate", (1.0, 0.0, 0.0)),
    ("lift", ("lift", "raise", "lift-up"), "translate", (0.0, -1.0, 0.0)),
    ("lower", ("lower", "put-down"), "translate", (0.0, 1.0, 0.0)),
    ("grow", ("grow", "enlarge", "inflate"), "scale", (0.0, 0.0, 1.0)),
    ("shrink", ("shrink", "squash"), "scale", (0.0, 0.0, -1.0)),
)
# key, instances, category, rgb, shape: every noun differs from every other in both shape and hue
NOUNS = (
    ("tomato", ("tomato", "tomatoes"), "vegetables", (225, 35, 30), "disc"),
    ("lettuce", ("lettuce", "salad"), "vegetables", (40, 205, 60), "square"),
    ("plate", ("plate", "dish"), "crockery", (240, 240, 240), "ring"),
    ("sponge", ("sponge", "scrubber"), "cleaning equipment", (245, 215, 30), "bar"),
    ("pan", ("pan", "frying-pan", "skillet"), "cookware", (40, 70, 225), "triangle"),
    ("cup", ("cup", "mug"), "crockery", (215, 45, 205), "cross"),
)
# per-participant kitchen colours (muted, so that the saturated objects stand out)
BACKGROUNDS = ((92, 70, 52), (70, 78, 86), (64, 84, 66), (96, 88, 74), (58, 58, 72), (84, 62, 70), (74, 74, 74))
HEADER = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp", "stop_timestamp",
          "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun", "noun_class", "all_nouns",
          "all_noun_classes"]
TEST_HEADER = HEADER[:8]
GENERIC_HEADER = ["video", "start", "stop", "label", "id", "participant"]

# participants per split: validation and test each have one participant absent from training (listed first, so
# that even a tiny split has one of its videos)
TRAIN_PARTICIPANTS = ("P01", "P02", "P03", "P04")
VAL_PARTICIPANTS = ("P05", "P02", "P03")
TEST_PARTICIPANTS = ("P06", "P01")


# ------------------------------------------------------------------------------------------------ encoding
def encode_frames(path: str | Path, frames: np.ndarray, fps: float, lossless: bool = False, gop: int = 12,
                  extra_args: Sequence[str] = ()) -> Path:
    """Encode frames (N, H, W, 3) uint8 RGB to an H.264 MP4 at `fps` (lossless: -qp 0; else crf 18), yuv420p.

    H and W must be even (4:2:0). `extra_args` go to the output (e.g. a ``-vf setpts=...`` for odd timings).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, h, w, _ = frames.shape
    quality = ["-qp", "0"] if lossless else ["-crf", "18"]
    cmd = [ffmpeg_binary(), "-y", "-nostdin", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", f"{fps}", "-i", "-", "-c:v", "libx264", "-preset", "veryfast", "-g", str(gop),
           *quality, "-pix_fmt", "yuv420p", *extra_args, str(path)]
    proc = subprocess.run(cmd, input=np.ascontiguousarray(frames, dtype=np.uint8).tobytes(), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg could not write {path}: {proc.stderr.decode(errors='replace')[-300:]}")
    return path


# ------------------------------------------------------------------------------------------------ timestamp media
def timestamp_frames(n: int, width: int = 64, height: int = 48) -> np.ndarray:
    """(n, H, W, 3) uint8 frames whose two grey blocks encode the frame index 0..n-1 (n <= 256)."""
    if not 1 <= n <= 256:
        raise ValueError(f"timestamp coding holds 1..256 frames, asked for {n}")
    k = np.arange(n)
    frames = np.empty((n, height, width, 3), np.uint8)
    frames[:, :, : width // 2] = ((k % 16) * 16 + 8).astype(np.uint8)[:, None, None, None]
    frames[:, :, width // 2:] = ((k // 16) * 16 + 8).astype(np.uint8)[:, None, None, None]
    return frames


def read_timestamp_code(frame: np.ndarray) -> int:
    """The frame index coded by `timestamp_frames`, read from a (H, W, 3) frame (scaled / centre-cropped is fine:
    the crop keeps the boundary between the blocks in the middle)."""
    w = frame.shape[1]
    left = float(frame[:, int(w * 0.06): int(w * 0.38)].mean())
    right = float(frame[:, int(w * 0.62): int(w * 0.94)].mean())
    return int(round((left - 8) / 16)) + 16 * int(round((right - 8) / 16))


def make_timestamp_video(path: str | Path, duration: float = 4.0, fps: float = 25.0, width: int = 64,
                         height: int = 48, gop: int = 12) -> Path:
    """A lossless H.264 MP4 whose frame k codes k; frame k is displayed during [k/fps, (k+1)/fps).

    `gop` (keyframe interval) with x264's default B-frames makes seeking non-trivial, as in real footage.
    """
    n = int(round(duration * fps))
    return encode_frames(path, timestamp_frames(n, width, height), fps, lossless=True, gop=gop)


def cut_into_chunks(video: str | Path, folder: str | Path, chunk_seconds: int = 15, lossless: bool = True,
                    fps: float | None = None, short_side: int | None = None) -> Path:
    """Cut `video` into the chunked layout of AVION / LaViLa: `folder`/0.MP4, <chunk_seconds>.MP4, … (each chunk
    named by its start second, its timestamps starting at 0), with ffmpeg's segment muxer and keyframes forced at
    the cut points, as docs/extract.md shows. Re-encoded losslessly (``-qp 0``) unless `lossless` is False; at
    `fps` and with the short side scaled to `short_side` when given (AVION: 30 fps, 320 px)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    quality = ["-qp", "0"] if lossless else ["-crf", "18"]
    filters = ([f"fps={fps}"] if fps else []) + (
        [f"scale=w='if(gt(iw,ih),-2,{short_side})':h='if(gt(iw,ih),{short_side},-2)'"] if short_side else [])
    cmd = [ffmpeg_binary(), "-y", "-nostdin", "-loglevel", "error", "-i", str(video), "-map", "0:v:0", "-c:v",
           "libx264", "-preset", "veryfast", *quality, "-pix_fmt", "yuv420p",
           *(["-vf", ",".join(filters)] if filters else []),
           "-force_key_frames", f"expr:gte(t,n_forced*{chunk_seconds})", "-f", "segment",
           "-segment_time", str(chunk_seconds), "-segment_time_delta", "0.01", "-reset_timestamps", "1",
           str(folder / "%d.part.MP4")]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg could not cut {video}: {proc.stderr.decode(errors='replace')[-300:]}")
    for part in folder.glob("*.part.MP4"):  # chunk i starts at i * chunk_seconds
        part.rename(folder / f"{int(part.name.split('.')[0]) * chunk_seconds}.MP4")
    return folder


def make_frame_dir(directory: str | Path, n: int, width: int = 64, height: int = 48, quality: int = 2) -> Path:
    """An EK-100 rgb_frames folder (frame_0000000001.jpg ...) whose 1-based frame number k codes k - 1."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    frames = timestamp_frames(n, width, height)
    cmd = [ffmpeg_binary(), "-y", "-nostdin", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{width}x{height}", "-r", "25", "-i", "-", "-q:v", str(quality), "-start_number", "1",
           str(directory / "frame_%010d.jpg")]
    proc = subprocess.run(cmd, input=frames.tobytes(), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg could not write {directory}: {proc.stderr.decode(errors='replace')[-300:]}")
    return directory


# ------------------------------------------------------------------------------------------------ kitchen dataset
@dataclass
class KitchenDataset:
    """Where `make_kitchen_dataset` put things. Unpacks as ``train_csv, val_csv = make_kitchen_dataset(...)``."""

    root: Path                      # annotation CSVs (EK-100 names) live here
    videos: Path                    # video root: videos/P01/videos/P01_01.MP4
    train_csv: Path
    val_csv: Path
    test_csv: Path                  # EPIC_100_test_timestamps.csv-style, no labels
    generic_csv: Path | None        # clips_train.csv (video,start,stop,label,...) when asked for
    verbs: tuple[str, ...]
    nouns: tuple[str, ...]
    generic_val_csv: Path | None = None

    def __iter__(self) -> Iterator[Path]:
        return iter((self.train_csv, self.val_csv))


@dataclass(frozen=True)
class _Action:
    verb: int
    noun: int
    distractor: int          # noun id of a small static second object, -1 for none
    start: int               # first frame (0-based) of the action
    stop: int                # one past its last frame
    x0: float                # start centre (pixels)
    y0: float
    r0: float                # start radius (pixels)
    dcorner: int             # which corner holds the distractor
    travel: float            # distance moved over the action (pixels; translations)
    scale_delta: float       # radius at the end / radius at the start - 1 (0 for translations)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` in object coordinates (u, v) = (x - cx, y - cy) / r, y pointing down."""
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "ring":
        rr = u * u + v * v
        return (rr <= 1.0) & (rr >= 0.42)
    if shape == "bar":
        return (np.abs(u) <= 1.15) & (np.abs(v) <= 0.45)
    if shape == "triangle":
        return (v <= 0.8) & (v >= -1.0 + 2.0 * np.abs(u))
    if shape == "cross":
        return ((np.abs(u) <= 1.0) & (np.abs(v) <= 0.34)) | ((np.abs(u) <= 0.34) & (np.abs(v) <= 1.0))
    raise ValueError(f"unknown shape {shape!r}")


def _draw(canvas: np.ndarray, grid: tuple[np.ndarray, np.ndarray], cx: float, cy: float, r: float,
          noun: int) -> None:
    """Paint noun `noun` centred at (cx, cy) with radius r (pixels) onto canvas (H, W, 3) in place."""
    yy, xx = grid
    _, _, _, rgb, shape = NOUNS[noun]
    canvas[_shape_mask(shape, (xx - cx) / r, (yy - cy) / r)] = rgb


def _background(rng: np.random.Generator, participant: int, size: int) -> np.ndarray:
    """A participant's static kitchen: base colour, a darker counter band at the bottom, fixed texture. (S, S, 3)"""
    base = np.array(BACKGROUNDS[participant % len(BACKGROUNDS)], np.float32)
    bg = np.broadcast_to(base, (size, size, 3)).copy()
    bg[int(size * 0.78):] *= 0.7
    bg += rng.normal(0.0, 5.0, size=(size, size, 1))
    return bg.clip(0, 255).astype(np.uint8)


def _frame_quantum(fps: float) -> int:
    """Frames per step of a grid whose times print exactly as HH:MM:SS.ff (e.g. 3 frames = 0.25 s at 12 fps)."""
    for q in range(1, 101):
        hundredths = q * 100.0 / fps
        if abs(hundredths - round(hundredths)) < 1e-9:
            return q
    return 1


def _ts(seconds: float, digits: int = 2) -> str:
    """Seconds -> EK-100 ``HH:MM:SS.ff``."""
    seconds = round(seconds, digits)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{int(h):02d}:{int(m):02d}:{s:0{3 + digits}.{digits}f}"


def _class_sequence(rng: np.random.Generator, count: int, k: int, cover: bool) -> np.ndarray:
    """`count` class ids from a long-tailed distribution over k classes (id 0 most frequent, as in EK-100);
    `cover` puts every class in at least once when count >= k, so no class is missing from training."""
    p = 1.0 / np.arange(1, k + 1) ** 0.7
    out = rng.choice(k, size=count, p=p / p.sum())
    if cover and count >= k:
        out[rng.choice(count, size=k, replace=False)] = np.arange(k)
    return out


def _plan_video(rng: np.random.Generator, verbs: np.ndarray, nouns: np.ndarray, size: int, fps: float,
                action_s: float, gap_s: float, order_only: bool = False) -> tuple[list[_Action], int]:
    """Timeline of one video: gap, action, gap, action, ..., gap. Boundaries on the printable time grid.
    `order_only`: each motion runs over a random interval of its axis (random start and length, so random speed),
    drawn without regard to the direction, so a verb and its mirror (left/right, lift/lower, grow/shrink) show the
    same frames in opposite orders."""
    q = _frame_quantum(fps)
    quanta = lambda seconds: max(1, int(round(seconds * fps / q)))  # noqa: E731
    actions, t = [], 0
    for v, n in zip(verbs, nouns):
        t += q * quanta(gap_s * rng.uniform(0.85, 1.25))
        length = q * quanta(action_s * rng.uniform(0.75, 1.25))
        dx, dy, ds = VERBS[v][3]
        if order_only:
            x0, y0, r0, travel, scale_delta = _order_only_motion(rng, dx, dy, ds, size)
        else:
            travel = 0.38 * size
            x0 = size / 2 - dx * travel / 2 + rng.uniform(-0.06, 0.06) * size
            y0 = size * 0.45 - dy * travel / 2 + rng.uniform(-0.06, 0.06) * size
            r0 = size * (0.13 if ds > 0 else 0.24 if ds < 0 else 0.18) * rng.uniform(0.9, 1.1)
            scale_delta = 0.9 if ds > 0 else -0.55 if ds < 0 else 0.0
        distractor = int(rng.choice([m for m in range(len(NOUNS)) if m != n])) if rng.random() < 0.35 else -1
        actions.append(_Action(int(v), int(n), distractor, t, t + length, x0, y0, r0, int(rng.integers(4)), travel,
                               scale_delta))
        t += length
    t += q * quanta(gap_s)
    return actions, t


def _order_only_motion(rng: np.random.Generator, dx: float, dy: float, ds: float, size: int
                       ) -> tuple[float, float, float, float, float]:
    """(x0, y0, r0, travel, scale_delta) of a motion over a random interval: [lo, lo + travel] on the moving axis
    (or radii [r, r * ratio]), run forwards or backwards by the verb's sign; the other axis at a random place."""
    travel = rng.uniform(0.2, 0.45) * size
    lo = rng.uniform(0.15 * size, 0.85 * size - travel)
    cx, cy = rng.uniform(0.3, 0.7, size=2) * size
    r_small, ratio = rng.uniform(0.08, 0.13) * size, rng.uniform(1.5, 2.2)
    if ds:
        r0 = r_small if ds > 0 else r_small * ratio
        return cx, cy, r0, 0.0, ratio - 1.0 if ds > 0 else 1.0 / ratio - 1.0
    start = lo if dx + dy > 0 else lo + travel
    return (start, cy, 0.16 * size, travel, 0.0) if dx else (cx, start, 0.16 * size, travel, 0.0)


def _render(actions: list[_Action], n_frames: int, bg: np.ndarray) -> np.ndarray:
    """Frames (T, S, S, 3) uint8 of one planned video."""
    size = bg.shape[0]
    grid = np.mgrid[0:size, 0:size].astype(np.float32)  # (2, S, S): y, x
    frames = np.repeat(bg[None], n_frames, axis=0)
    corners = ((0.14, 0.14), (0.86, 0.14), (0.14, 0.86), (0.86, 0.86))
    prev_end = 0
    for a in actions:
        dx, dy, _ = VERBS[a.verb][3]
        for f in range(prev_end, a.stop):
            # before the action: the object waits at its start (what anticipation observes); then it moves
            s = 0.0 if f < a.start else (f - a.start) / max(a.stop - a.start - 1, 1)
            if a.distractor >= 0:
                cx, cy = corners[a.dcorner]
                _draw(frames[f], grid, cx * size, cy * size, 0.08 * size, a.distractor)
            scale = 1.0 + a.scale_delta * s
            _draw(frames[f], grid, a.x0 + dx * a.travel * s, a.y0 + dy * a.travel * s, a.r0 * scale, a.noun)
        prev_end = a.stop
    return frames


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_kitchen_dataset(root: str | Path, n_train: int = 96, n_val: int = 48, n_test: int = 12, seed: int = 0,
                         size: int = 64, fps: float = 12.0, action_seconds: float = 2.0, gap_seconds: float = 1.5,
                         segments_per_video: int = 6, generic_csv: bool = False,
                         progress: Progress | None = None, order_only: bool = False) -> KitchenDataset:
    """Write the synthetic kitchen dataset under `root` and describe it.

    Layout: ``root/videos/P01/videos/P01_01.MP4`` (size x size, `fps`, several segments per video with gaps
    between them) and, in `root`: EPIC_100_train.csv, EPIC_100_validation.csv, EPIC_100_test_timestamps.csv,
    EPIC_100_verb_classes.csv, EPIC_100_noun_classes.csv, EPIC_100_video_info.csv,
    EPIC_100_unseen_participant_ids_{validation,test}.csv, EPIC_100_tail_{verbs,nouns}.csv; with `generic_csv`
    also clips_train.csv / clips_val.csv (``video,start,stop,label,id,participant``, label = verb key).
    Train participants P01-P04; validation adds P05 and test P06, absent from training (the "unseen" subsets).
    Class frequencies are long-tailed so that the rarest classes form the tail subset. Deterministic in `seed`.
    `order_only`: every motion runs over a random interval (random start and speed), so the verbs differ only in
    the direction and order of motion and the mean frame cannot tell a verb from its mirror (see `_plan_video`).
    Over 80 lines on purpose: one recipe from the class draws to every CSV, in the order the files are written.
    """
    if min(n_train, n_val, n_test) < 0 or n_train < 1 or segments_per_video < 1 or size < 16 or size % 2:
        raise ValueError("need n_train >= 1, n_val/n_test >= 0, segments_per_video >= 1 and an even size >= 16")
    root = Path(root)
    videos = root / "videos"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    backgrounds = {}
    plan = [("train", n_train, TRAIN_PARTICIPANTS), ("val", n_val, VAL_PARTICIPANTS),
            ("test", n_test, TEST_PARTICIPANTS)]
    jobs = []  # (split, participant, video_id, verbs, nouns)
    video_no: dict[str, int] = {}
    for split, count, participants in plan:
        if count == 0:
            continue
        n_videos = max(math.ceil(count / segments_per_video), min(count, 2 if split != "train" else 1))
        sizes = [count // n_videos + (i < count % n_videos) for i in range(n_videos)]
        verbs = _class_sequence(rng, count, len(VERBS), cover=split == "train")
        nouns = _class_sequence(rng, count, len(NOUNS), cover=split == "train")
        offset = 0
        for i, k in enumerate(sizes):
            pid = participants[i % len(participants)]
            video_no[pid] = video_no.get(pid, 0) + 1
            jobs.append((split, pid, f"{pid}_{video_no[pid]:02d}", verbs[offset:offset + k], nouns[offset:offset + k]))
            offset += k

    split_rows: dict[str, list[list]] = {"train": [], "val": [], "test": []}
    generic_rows: dict[str, list[list]] = {"train": [], "val": [], "test": []}
    info_rows = []
    progress = or_none(progress)
    progress.start(len(jobs))  # one unit per video written
    for split, pid, vid, verbs, nouns in jobs:
        if pid not in backgrounds:
            backgrounds[pid] = _background(np.random.default_rng([seed, int(pid[1:])]), int(pid[1:]), size)
        actions, n_frames = _plan_video(rng, verbs, nouns, size, fps, action_seconds, gap_seconds, order_only)
        rel = Path(pid) / "videos" / f"{vid}.MP4"
        encode_frames(videos / rel, _render(actions, n_frames, backgrounds[pid]), fps)
        info_rows.append([vid, f"{n_frames / fps:.6f}", f"{fps:g}", f"{size}x{size}"])
        for j, a in enumerate(actions):
            start, stop = a.start / fps, a.stop / fps
            verb_text = str(rng.choice(VERBS[a.verb][1]))
            noun_text = str(rng.choice(NOUNS[a.noun][1]))
            all_ids = [a.noun] + ([a.distractor] if a.distractor >= 0 else [])
            all_words = [noun_text] + ([NOUNS[a.distractor][0]] if a.distractor >= 0 else [])
            nid = f"{vid}_{j}"
            split_rows[split].append([
                nid, pid, vid, _ts(max(0.0, start - 0.2), 3), _ts(start), _ts(stop),
                a.start + 1, a.stop,  # 1-based: the frame displayed at `start` .. the last one before `stop`
                f"{verb_text} {noun_text}", verb_text, a.verb, noun_text, a.noun, str(all_words), str(all_ids)])
            generic_rows[split].append([rel.as_posix(), f"{start:.3f}", f"{stop:.3f}", VERBS[a.verb][0], nid, pid])
        progress.advance(1, message=f"{vid} ({split}, {len(actions)} segments)")
    progress.finish()

    train_csv = _write_csv(root / "EPIC_100_train.csv", HEADER, split_rows["train"])
    val_csv = _write_csv(root / "EPIC_100_validation.csv", HEADER, split_rows["val"])
    test_csv = _write_csv(root / "EPIC_100_test_timestamps.csv", TEST_HEADER,
                          [r[: len(TEST_HEADER)] for r in split_rows["test"]])
    _write_csv(root / "EPIC_100_verb_classes.csv", ["id", "key", "instances", "category"],
               [[i, v[0], str(list(v[1])), v[2]] for i, v in enumerate(VERBS)])
    _write_csv(root / "EPIC_100_noun_classes.csv", ["id", "key", "instances", "category"],
               [[i, n[0], str(list(n[1])), n[2]] for i, n in enumerate(NOUNS)])
    _write_csv(root / "EPIC_100_video_info.csv", ["video_id", "duration", "fps", "resolution"], info_rows)
    _write_csv(root / "EPIC_100_unseen_participant_ids_validation.csv", ["participant_id"],
               [[p] for p in VAL_PARTICIPANTS if p not in TRAIN_PARTICIPANTS])
    _write_csv(root / "EPIC_100_unseen_participant_ids_test.csv", ["participant_id"],
               [[p] for p in TEST_PARTICIPANTS if p not in TRAIN_PARTICIPANTS])
    # tail: the less frequent half of the classes by training count (EK-100's tail is the classes that together
    # make up the rarest part of training; with 6 classes "half" keeps every subset populated)
    for name, col, vocab in (("verbs", 10, VERBS), ("nouns", 12, NOUNS)):
        counts = np.bincount([int(r[col]) for r in split_rows["train"]], minlength=len(vocab))
        order = np.argsort(-counts, kind="stable")
        _write_csv(root / f"EPIC_100_tail_{name}.csv", [name[:-1]], [[int(c)] for c in sorted(order[len(vocab) // 2:])])
    generic_train = generic_val = None
    if generic_csv:
        generic_train = _write_csv(root / "clips_train.csv", GENERIC_HEADER, generic_rows["train"])
        generic_val = _write_csv(root / "clips_val.csv", GENERIC_HEADER, generic_rows["val"])
    return KitchenDataset(root, videos, train_csv, val_csv, test_csv, generic_train,
                          tuple(v[0] for v in VERBS), tuple(n[0] for n in NOUNS), generic_val)
