"""Generated media: timestamp-coded test videos, and the demo's synthetic "kitchen" dataset.

Everything is drawn in numpy and encoded by the same ffmpeg binary the decoder uses, so tests and the demo need no
downloads.

Timestamp coding: frame k shows two flat blocks whose grey levels are 16*(k % 16)+8 (left) and 16*(k // 16)+8
(right); `read_timestamp_code` recovers k after any scale/crop, robust to lossless or near-lossless coding.

Kitchen dataset: in each action segment an object moves. The NOUN is visual (the object's colour and shape) and the
VERB is its motion (left, right, up, down, grow, shrink), so a frozen image encoder's per-frame features carry the
noun and their order carries the verb. Between actions the next object sits still at its starting place — the
anticipation window sees what comes next. Files follow EK-100's layout and CSV formats exactly.
"""

from __future__ import annotations

import csv
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mambavl.extract.decode import ffmpeg_binary

VERBS = (  # key, instances, motion (dx, dy, dscale) over the action
    ("move-left", ("move-left", "slide-left"), (-1.0, 0.0, 0.0)),
    ("move-right", ("move-right", "slide-right"), (1.0, 0.0, 0.0)),
    ("lift", ("lift", "raise", "lift-up"), (0.0, -1.0, 0.0)),
    ("lower", ("lower", "put-down"), (0.0, 1.0, 0.0)),
    ("grow", ("grow", "enlarge"), (0.0, 0.0, 1.0)),
    ("shrink", ("shrink", "squash"), (0.0, 0.0, -1.0)),
)
NOUNS = (  # key, instances, rgb, shape
    ("tomato", ("tomato", "tomatoes"), (220, 40, 30), "disc"),
    ("lettuce", ("lettuce", "salad"), (40, 200, 60), "square"),
    ("plate", ("plate", "dish"), (235, 235, 235), "disc"),
    ("sponge", ("sponge", "scrubber"), (240, 220, 40), "square"),
    ("pan", ("pan", "frying-pan"), (40, 60, 210), "disc"),
    ("cup", ("cup", "mug"), (40, 210, 220), "square"),
)
HEADER = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp", "stop_timestamp",
          "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun", "noun_class", "all_nouns",
          "all_noun_classes"]
TEST_HEADER = HEADER[:8]


def encode_frames(path: str | Path, frames: np.ndarray, fps: float, lossless: bool = False, gop: int = 12) -> Path:
    """Encode (N, H, W, 3) uint8 RGB frames to an H.264 MP4 at `fps` (lossless: -qp 0, yuv444p)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, h, w, _ = frames.shape
    quality = ["-qp", "0", "-pix_fmt", "yuv444p"] if lossless else ["-crf", "18", "-pix_fmt", "yuv420p"]
    cmd = [ffmpeg_binary(), "-y", "-nostdin", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-c:v", "libx264", "-preset", "veryfast", "-g", str(gop),
           *quality, str(path)]
    proc = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg could not write {path}: {proc.stderr.decode(errors='replace')[-300:]}")
    return path


def timestamp_frames(n: int, width: int = 64, height: int = 48) -> np.ndarray:
    """(n, H, W, 3) frames whose blocks encode the frame index (see module docstring)."""
    frames = np.zeros((n, height, width, 3), np.uint8)
    k = np.arange(n)
    frames[:, :, : width // 2] = ((k % 16) * 16 + 8)[:, None, None, None]
    frames[:, :, width // 2:] = ((k // 16 % 16) * 16 + 8)[:, None, None, None]
    return frames


def read_timestamp_code(frame: np.ndarray) -> int:
    """Frame index encoded by `timestamp_frames`, from a (H, W, 3) frame scaled/cropped around the centre."""
    w = frame.shape[1]
    left = frame[:, int(w * 0.06): int(w * 0.38)].mean()
    right = frame[:, int(w * 0.62): int(w * 0.94)].mean()
    return int(round((left - 8) / 16)) + 16 * int(round((right - 8) / 16))


def make_timestamp_video(path: str | Path, duration: float = 4.0, fps: float = 25.0, width: int = 64,
                         height: int = 48) -> Path:
    """A lossless MP4 whose frame k encodes k (frame k is shown during [k/fps, (k+1)/fps))."""
    return encode_frames(path, timestamp_frames(int(round(duration * fps)), width, height), fps, lossless=True)


def make_frame_dir(directory: str | Path, n: int, width: int = 64, height: int = 48, quality: int = 2) -> Path:
    """An EK-100 rgb_frames folder (frame_0000000001.jpg ...) whose frame number k (1-based) encodes k - 1."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    frames = timestamp_frames(n, width, height)
    cmd = [ffmpeg_binary(), "-y", "-nostdin", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{width}x{height}", "-r", "25", "-i", "-", "-q:v", str(quality), "-start_number", "1",
           str(directory / "frame_%010d.jpg")]
    proc = subprocess.run(cmd, input=frames.tobytes(), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.decode(errors="replace")[-300:])
    return directory


# ---------------------------------------------------------------------------------------------- kitchen dataset
@dataclass
class KitchenDataset:
    root: Path
    videos: Path
    train_csv: Path
    val_csv: Path
    test_csv: Path
    generic_csv: Path | None
    verbs: tuple[str, ...]
    nouns: tuple[str, ...]


def _draw(canvas: np.ndarray, cx: float, cy: float, r: float, rgb, shape: str) -> None:
    h, w, _ = canvas.shape
    yy, xx = np.mgrid[0:h, 0:w]
    if shape == "disc":
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    else:
        inside = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    canvas[inside] = rgb


def _ts(seconds: float, digits: int = 2) -> str:
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{int(h):02d}:{int(m):02d}:{s:0{3 + digits}.{digits}f}"


def make_kitchen_dataset(root: str | Path, n_train: int = 96, n_val: int = 48, n_test: int = 12, seed: int = 0,
                         size: int = 64, fps: float = 12.0, action_seconds: float = 2.0, gap_seconds: float = 1.5,
                         segments_per_video: int = 6, generic_csv: bool = False) -> KitchenDataset:
    """Write the synthetic kitchen dataset under `root` (EK-100 layout + CSVs) and describe it.

    Train participants P01-P04; validation adds P05, who is absent from training (the "unseen" subset). Class
    frequencies are skewed so that the rarest classes form a tail (listed in EPIC_100_tail_*.csv).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    videos = root / "videos"
    pv = 1.0 / np.arange(1, len(VERBS) + 1) ** 0.6
    pn = 1.0 / np.arange(1, len(NOUNS) + 1) ** 0.6
    info_rows, split_rows = [], {"train": [], "val": [], "test": []}
    plan = [("train", n_train, ("P01", "P02", "P03", "P04")), ("val", n_val, ("P02", "P03", "P05")),
            ("test", n_test, ("P06",))]
    video_no: dict[str, int] = {}
    for split, count, parts in plan:
        for start_idx in range(0, count, segments_per_video):
            k = min(segments_per_video, count - start_idx)
            pid = parts[(start_idx // segments_per_video) % len(parts)]
            video_no[pid] = video_no.get(pid, 0) + 1
            vid = f"{pid}_{video_no[pid]:02d}"
            verbs = rng.choice(len(VERBS), size=k, p=pv / pv.sum())
            nouns = rng.choice(len(NOUNS), size=k, p=pn / pn.sum())
            frames, rows = _render_video(rng, vid, pid, verbs, nouns, size, fps, action_seconds, gap_seconds)
            encode_frames(videos / pid / "videos" / f"{vid}.MP4", frames, fps)
            info_rows.append([vid, f"{len(frames) / fps:.6f}", f"{fps}", f"{size}x{size}"])
            split_rows[split].extend(rows)
    root.mkdir(parents=True, exist_ok=True)

    def write(path: Path, header, rows) -> Path:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        return path

    train_csv = write(root / "EPIC_100_train.csv", HEADER, split_rows["train"])
    val_csv = write(root / "EPIC_100_validation.csv", HEADER, split_rows["val"])
    test_csv = write(root / "EPIC_100_test_timestamps.csv", TEST_HEADER, [r[:8] for r in split_rows["test"]])
    write(root / "EPIC_100_verb_classes.csv", ["id", "key", "instances", "category"],
          [[i, v[0], str(list(v[1])), "motion"] for i, v in enumerate(VERBS)])
    write(root / "EPIC_100_noun_classes.csv", ["id", "key", "instances", "category"],
          [[i, n[0], str(list(n[1])), n[3]] for i, n in enumerate(NOUNS)])
    write(root / "EPIC_100_video_info.csv", ["video_id", "duration", "fps", "resolution"], info_rows)
    write(root / "EPIC_100_unseen_participant_ids_validation.csv", ["participant_id"], [["P05"]])
    write(root / "EPIC_100_unseen_participant_ids_test.csv", ["participant_id"], [["P06"]])
    # tail: the classes that make up the rarest ~third of training segments, as EK-100 defines its tail
    for name, col, vocab in (("verbs", 10, VERBS), ("nouns", 12, NOUNS)):
        counts = np.bincount([int(r[col]) for r in split_rows["train"]], minlength=len(vocab))
        order = np.argsort(-counts, kind="stable")
        tail = [int(c) for c in order[len(order) // 2:]]
        write(root / f"EPIC_100_tail_{name}.csv", [name[:-1]], [[c] for c in sorted(tail)])
    generic = None
    if generic_csv:
        rows = [[f"{r[1]}/videos/{r[2]}.MP4", r[4], r[5], r[9]] for r in split_rows["train"] + split_rows["val"]]
        generic = write(root / "clips.csv", ["video", "start", "stop", "label"], rows)
    return KitchenDataset(root, videos, train_csv, val_csv, test_csv, generic,
                          tuple(v[0] for v in VERBS), tuple(n[0] for n in NOUNS))


def _render_video(rng, vid, pid, verbs, nouns, size, fps, action_s, gap_s):
    """Frames of one video (gap, action, gap, action, ...) and its EK-100 CSV rows."""
    frames, rows = [], []
    bg = (rng.normal(60, 6, size=(size, size, 3))).clip(0, 255).astype(np.uint8)  # static kitchen-ish noise
    n_gap, n_act = int(round(gap_s * fps)), int(round(action_s * fps))
    travel = size * 0.3
    for j, (v, n) in enumerate(zip(verbs, nouns)):
        dx, dy, ds = VERBS[v][2]
        rgb, shape = NOUNS[n][2], NOUNS[n][3]
        cx0 = size / 2 - dx * travel / 2 + rng.uniform(-2, 2)
        cy0 = size / 2 - dy * travel / 2 + rng.uniform(-2, 2)
        r0 = size * (0.12 if ds > 0 else 0.2 if ds < 0 else 0.15)
        for _ in range(n_gap):  # the next object waits at its start: what the anticipation window sees
            canvas = bg.copy()
            _draw(canvas, cx0, cy0, r0, rgb, shape)
            frames.append(canvas)
        start_frame = len(frames)
        for i in range(n_act):
            a = i / max(n_act - 1, 1)
            canvas = bg.copy()
            _draw(canvas, cx0 + dx * travel * a, cy0 + dy * travel * a, r0 * (1 + 0.8 * ds * a), rgb, shape)
            frames.append(canvas)
        stop_frame = len(frames)
        start, stop = start_frame / fps, stop_frame / fps
        verb, noun = VERBS[v][0], NOUNS[n][0]
        rows.append([f"{vid}_{j}", pid, vid, _ts(start, 3), _ts(start), _ts(stop), start_frame + 1, stop_frame,
                     f"{verb} {noun}", verb, int(v), noun, int(n), str([noun]), str([int(n)])])
    for _ in range(n_gap):
        frames.append(bg.copy())
    return np.stack(frames), rows
