"""Atomic file writes: every file mambavl writes outside the HDF5 cache (checkpoints, metrics, reports, plots) goes
through `atomic_write`, so a crash or a full disk never leaves a half-written file under the final name."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], fsync: bool = False) -> None:
    """write(tmp) into a temporary file beside `path`, optionally fsync it, then rename it to `path`.

    A crash leaves `path` as it was. An OSError (a full disk, a quota, a read-only folder) removes the temporary file
    and propagates. The parent folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` atomically and durably (fsync before the rename)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), fsync=True)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy `src` to `dst` atomically and durably."""
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp), fsync=True)
