"""Checkpoints: the model built from a run configuration, and checkpoint files (model weights with the run's
config, vocabularies and cache attributes) saved atomically and loaded with `torch.load(..., weights_only=True)`."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mambavl.cache.reader import CacheFile
from mambavl.device import resolve_device
from mambavl.errors import InputError, TrainingStopped
from mambavl.fuse.model import MambaVL, model_config_from_dict
from mambavl.fuse.presets import create_model
from mambavl.runtime.config import TrainConfig

CHECKPOINT_FORMAT = 1
CHECKPOINT_KIND = "mambavl-checkpoint"

# ModelConfig fields that come from the caches, not from the user.
DATA_FIELDS = ("video_dim", "text_dim", "num_verbs", "num_nouns", "num_actions")


def build_model(cfg: TrainConfig, data_dims: dict) -> tuple[nn.Module, Any]:
    """The preset's model with the user's overrides and the cache-derived dims (video/text dim, class counts)."""
    clash = sorted(set(cfg.model_overrides) & set(DATA_FIELDS))
    if clash:
        raise InputError(f"model override(s) {', '.join(clash)} are set from the cache and cannot be overridden")
    # create_model refuses unknown presets and unknown override keys with InputError
    return create_model(cfg.preset, **data_dims, **cfg.model_overrides)


def load_checkpoint(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Load a mambavl checkpoint (last.pt / best.pt) with `weights_only=True`.

    Returns (model in eval mode on `device`, checkpoint dict). The dict holds "model_config", "train_config",
    "vocab" {"verbs", "nouns", "action_pairs"}, "cache_attrs", "epoch", "step", "best_metric", "history", ...
    Raises InputError for a missing file or one that is not a mambavl checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    dev = resolve_device(device)
    try:
        ckpt = torch.load(path, map_location=dev, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not our checkpoint"
        raise InputError(f"{path}: not a mambavl checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise InputError(f"{path}: not a mambavl checkpoint (no 'kind': {CHECKPOINT_KIND!r} entry)")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: checkpoint format {ckpt.get('format')!r}, this mambavl reads {CHECKPOINT_FORMAT}")
    model = MambaVL(model_config_from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(dev).eval()
    return model, ckpt


def config_from_checkpoint(path: str | os.PathLike) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with (for `--resume`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: not a mambavl checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise InputError(f"{path}: not a mambavl checkpoint")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in ckpt["train_config"].items() if k in known}
    # Checkpoints from before the step floor trained without one: resuming them must keep their schedule.
    values.setdefault("min_steps", 0)
    return TrainConfig(**values)


def question_tokens(cache: CacheFile) -> dict[str, int]:
    """{"question_tokens": T} of the cache's question table ({} when it has none)."""
    try:
        return {"question_tokens": int(cache.questions().tokens.shape[1])}
    except InputError:
        return {}


def _publish(tmp: Path, path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp), fsync it, rename it to `path`. A crash leaves `path` as it was; a failed write (OSError: a full
    disk, a quota) removes `tmp` and raises TrainingStopped saying that `path` is unchanged."""
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        kept = f"{path} is unchanged" if path.exists() else f"no {path.name} was written"
        raise TrainingStopped(f"could not write {path} ({exc.strerror or exc}); {kept}. Free space or choose "
                              "another --out, then resume") from exc


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save into a temporary file beside `path`, then rename: a crash never leaves a half-written file, and a
    failed write (TrainingStopped) leaves the previous file intact."""
    _publish(path.with_name(path.name + ".tmp"), path, lambda tmp: torch.save(obj, tmp))


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` through a temporary file and a rename (TrainingStopped when it cannot be written)."""
    _publish(dst.with_name(dst.name + ".tmp"), dst, lambda tmp: shutil.copyfile(src, tmp))
