"""Extraction under a launcher: ``torchrun --nproc_per_node=G -m mambavl extract ... --out train.h5``.

Each process (rank r of W, from torchrun's RANK / WORLD_SIZE / LOCAL_RANK) extracts shard r/W of the cost-balanced
plan (`mambavl.extract.shards`) into its own resumable file beside the output
(``train.shard-00001-of-00008.h5``) on its own device (``cuda:LOCAL_RANK`` when CUDA is there). When every rank is
done (a collective over a gloo process group, which also carries each rank's outcome, so an error on one rank is
raised on all of them), rank 0 checks the shards (`mambavl.cache.merge.check_shards`: complete, same attributes,
every shard once, no row or narration_id twice, all planned rows present) and merges them into ``--out``, then
deletes the shard files: one cache is left. A crash anywhere leaves the shard files; running the same command again
resumes every shard. Running it again after a finished merge resumes the merged cache itself on rank 0 (retrying
recorded failures) while the other ranks wait.

Without a launcher (WORLD_SIZE unset or 1) nothing here is used. Slurm job arrays do not need it either: each task
runs ``mambavl extract --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT --out train.shard$ID.h5`` and a dependent
job runs ``mambavl cache merge`` (docs/scale.md).
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from mambavl.device import join_process_group
from mambavl.errors import InputError
from mambavl.extract.encoders import FrozenEncoder
from mambavl.progress import Progress
from mambavl.cache.build import ExtractConfig, ExtractSummary, run_extraction
from mambavl.cache.merge import merge_caches
from mambavl.cache.reader import open_cache

# How long ranks wait for each other at the end of their shards: shards are balanced, but a slow node or a long
# tail of segments can keep one rank busy for hours after another has finished.
DEFAULT_TIMEOUT_HOURS = 72.0


@dataclass(frozen=True)
class Launch:
    """This process's place among the launched ones (torchrun's environment variables)."""

    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def launch_from_env(environ=None) -> Launch | None:
    """The launch torchrun (or any launcher setting RANK / WORLD_SIZE / LOCAL_RANK) started; None for one process."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InputError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise InputError(f"RANK={rank} outside 0..WORLD_SIZE-1={world - 1}")
    return Launch(rank, world, local)


def shard_path(out: str | os.PathLike, index: int, count: int) -> Path:
    """Where shard `index` of `count` of the cache `out` is written: ``train.h5`` -> ``train.shard-00001-of-00008.h5``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.shard-{index:05d}-of-{count:05d}{out.suffix or '.h5'}")


def rank_device(device: str, local_rank: int) -> str:
    """This rank's device: "auto"/"cuda" -> cuda:LOCAL_RANK (modulo the visible GPUs) when CUDA is available;
    an explicit "cuda:K" or "cpu" is kept."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    if device == "auto":
        return "cpu"
    return device


def _gather(obj, launch: Launch) -> list:
    box: list = [None] * launch.world
    dist.all_gather_object(box, obj)
    return box


def _raise_first(outcomes: list) -> None:
    for rank, (ok, kind, message) in enumerate(outcomes):
        if not ok:
            cls = InputError if kind == "InputError" else RuntimeError
            raise cls(f"rank {rank}: {message}")


def _outcome(fn):
    try:
        return (True, "", fn())
    except InputError as exc:
        return (False, "InputError", str(exc))
    except Exception as exc:  # reported to every rank, then raised there
        return (False, type(exc).__name__, f"{type(exc).__name__}: {exc}")


def run_distributed_extraction(cfg: ExtractConfig, launch: Launch, progress: Progress | None = None,
                               encoder: FrozenEncoder | None = None,
                               timeout_hours: float = DEFAULT_TIMEOUT_HOURS) -> ExtractSummary:
    """Extract shard launch.rank/launch.world of `cfg` and, on rank 0, merge the shards into `cfg.out`.

    Every rank returns the same summary (of the merged cache). `cfg.shard` must be None: the launch decides it.
    Errors on any rank are raised on every rank (InputError stays InputError, naming the rank).
    """
    if cfg.shard is not None:
        raise InputError("--shard and a torchrun launch both split the work: use one of them")
    t0 = time.perf_counter()
    join_process_group("gloo", _dt.timedelta(hours=timeout_hours), launch.rank, launch.world)
    out = Path(cfg.out)
    merged_before = _gather(out.exists(), launch)[0]  # rank 0's view decides, for every rank
    device = rank_device(cfg.encoder.device, launch.local_rank)
    shards = [shard_path(out, i, launch.world) for i in range(launch.world)]
    if merged_before:
        def work():
            if launch.main:
                return _summary_dict(run_extraction(replace(cfg, encoder=replace(cfg.encoder, device=device)),
                                                    progress, encoder))
            return None
        outcomes = _gather(_outcome(work), launch)
        _raise_first(outcomes)
        result = outcomes[0][2]
    else:
        mine = replace(cfg, out=str(shards[launch.rank]), shard=(launch.rank, launch.world),
                       encoder=replace(cfg.encoder, device=device))
        outcomes = _gather(_outcome(lambda: _summary_dict(run_extraction(mine, progress, encoder))), launch)
        _raise_first(outcomes)
        parts = [o[2] for o in outcomes]

        def merge():
            if not launch.main:
                return None
            merge_caches([str(p) for p in shards], str(out))
            for p in shards:
                p.unlink()
            return _merged_summary(out, parts)
        merged = _gather(_outcome(merge), launch)
        _raise_first(merged)
        result = merged[0][2]
    result["seconds"] = time.perf_counter() - t0
    return ExtractSummary(**{**result, "path": Path(result["path"])})


def _summary_dict(s: ExtractSummary) -> dict:
    return dict(path=str(s.path), total=s.total, done=s.done, skipped=s.skipped, failed=s.failed,
                failures=s.failures, seconds=s.seconds)


def _merged_summary(out: Path, parts: list[dict]) -> dict:
    with open_cache(out) as cache:
        failures = cache.failures()
    return dict(path=str(out), total=sum(p["total"] for p in parts), done=sum(p["done"] for p in parts),
                skipped=sum(p["skipped"] for p in parts), failed=len(failures), failures=failures, seconds=0.0)


__all__ = ["DEFAULT_TIMEOUT_HOURS", "Launch", "launch_from_env", "rank_device", "run_distributed_extraction",
           "shard_path"]
