"""Small inputs that reproduce the faults of real EK-100 pipelines: frame folders numbered at a rate other than the
video's native fps, partial frame folders, videos shorter than their segments, external feature files.

Frames carry a code (0..255) in two grey blocks (`mambavl.data.synthetic.timestamp_frames`), so a test can tell
exactly which frame was decoded with `read_timestamp_code`.
"""

from __future__ import annotations

import csv
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mambavl.data.synthetic import timestamp_frames
from mambavl.extract.decode import ffmpeg_binary

HEADER = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
          "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun",
          "noun_class", "all_nouns", "all_noun_classes"]
VERBS = ("take", "put", "open")
NOUNS = ("plate", "cup", "door")


def hms(t: float) -> str:
    """Seconds -> EK-100's HH:MM:SS.ff."""
    h, m = int(t // 3600), int(t % 3600 // 60)
    return f"{h:02d}:{m:02d}:{t - 3600 * h - 60 * m:05.2f}"


def write_classes(root: Path) -> None:
    """EPIC_100_verb_classes.csv / EPIC_100_noun_classes.csv with three classes each."""
    root.mkdir(parents=True, exist_ok=True)
    for name, keys in (("EPIC_100_verb_classes.csv", VERBS), ("EPIC_100_noun_classes.csv", NOUNS)):
        with open(root / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "key", "instances", "category"])
            w.writerows([i, k, str([k]), "x"] for i, k in enumerate(keys))


def write_video_info(root: Path, rows: Sequence[tuple[str, float, float]]) -> None:
    """EPIC_100_video_info.csv from (video_id, duration, native fps)."""
    with open(root / "EPIC_100_video_info.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "duration", "fps", "resolution"])
        w.writerows([vid, duration, fps, "1920x1080"] for vid, duration, fps in rows)


def write_ek100(path: Path, rows: Sequence[dict], labelled: bool = True) -> Path:
    """An EK-100 annotation CSV; rows: dicts nid, vid, start, stop (seconds), f0, f1 and optional v, n (class ids)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER if labelled else HEADER[:8])
        for r in rows:
            v, n = r.get("v", 0), r.get("n", 0)
            row = [r["nid"], r["vid"].split("_")[0], r["vid"], hms(r["start"]), hms(r["start"]), hms(r["stop"]),
                   r["f0"], r["f1"], f"{VERBS[v]} {NOUNS[n]}", VERBS[v], v, NOUNS[n], n, str([NOUNS[n]]), str([n])]
            w.writerow(row if labelled else row[:8])
    return path


def write_frame_range(directory: Path, first: int, last: int, code: Callable[[int], int],
                      width: int = 64, height: int = 48) -> Path:
    """JPEG frames frame_{first..last}.jpg (EK-100 naming) in one ffmpeg call; frame n shows code(n) % 256."""
    directory.mkdir(parents=True, exist_ok=True)
    table = timestamp_frames(256, width, height)
    frames = table[np.asarray([code(n) % 256 for n in range(first, last + 1)])]
    cmd = [ffmpeg_binary(), "-y", "-nostdin", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{width}x{height}", "-r", "25", "-i", "-", "-q:v", "2", "-start_number", str(first),
           str(directory / "frame_%010d.jpg")]
    subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), check=True, capture_output=True)
    return directory
