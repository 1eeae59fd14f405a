"""A trained model as a folder in the Hugging Face model layout, and `hf://ORG/NAME[@REV]` references to one.

The folder holds the checkpoint's own description, split by kind of value, and nothing that needs unpickling:

| file | what |
|---|---|
| config.json | `TrainedModel.to_state()`, every tensor replaced by ``{"$tensor": NAME}``; ``"export"``: layout, |
| | byte count and sha256 of every data file |
| model.safetensors | every tensor of that state under its NAME: the weights (``weights/<key>``), the first-pass fold |
| | models (``first_pass/states/<i>/<key>``), ``action_answers``, ``train_candidates`` |
| README.md | the model card (`mambavl.runtime.export`; informational, not read back) |

NAME is the path of the value inside the state, joined by "/" (list items by their index), so the two files
together are exactly `to_state()`'s dict and `TrainedModel.from_state` rebuilds the run: there is one description
of the artifact, in `mambavl.runtime.artifact`. Reading checks the sizes and sha256 config.json records before any
tensor is read, so a truncated or changed file is refused (InputError naming it) instead of loading other weights.

`resolve_checkpoint` turns what a user passes as ``--checkpoint`` (a file, such a folder, or ``hf://ORG/NAME`` with
an optional ``@REVISION``) into a local path: hub references are fetched with `huggingface_hub.snapshot_download`
into the usual Hugging Face cache (``HF_HUB_CACHE``), and read from that cache alone when ``HF_HUB_OFFLINE`` is set.
`push_folder` uploads a folder with `huggingface_hub.HfApi` (the token from ``HF_TOKEN`` or ``hf auth login``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from mambavl.errors import InputError
from mambavl.files import atomic_write, atomic_write_text

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CARD = "README.md"
LAYOUT = 1  # version of this folder layout (the artifact's own format is the state's "format")
TENSOR = "$tensor"
HUB_PREFIX = "hf://"
# typer/pathlib collapse "hf://org/name" to "hf:/org/name" when an option is a Path: both spellings are accepted
_HUB = re.compile(r"^hf:/{1,2}(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?/?$")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# state <-> (json, tensors)


def split_tensors(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` with every tensor moved into `tensors` under its path NAME and replaced by {"$tensor": NAME}."""
    if isinstance(value, torch.Tensor):
        # a copy of its own: safetensors refuses tensors that share storage (tied weights, views of one buffer)
        tensors[name] = value.detach().to("cpu").contiguous().clone()
        return {TENSOR: name}
    if isinstance(value, dict):
        return {str(k): split_tensors(v, f"{name}/{k}" if name else str(k), tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [split_tensors(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"{name}: {type(value).__name__} has no place in config.json or model.safetensors")


def join_tensors(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """The inverse of `split_tensors`: {"$tensor": NAME} -> tensors[NAME] (InputError naming `where` if absent)."""
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            if value[TENSOR] not in tensors:
                raise InputError(f"{where}: config.json names tensor {value[TENSOR]!r}, which {WEIGHTS} lacks")
            return tensors[value[TENSOR]]
        return {k: join_tensors(v, tensors, where) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, tensors, where) for v in value]
    return value


def write_folder(state: dict[str, Any], out: Path, card: str | None = None) -> dict[str, Any]:
    """Write `state` (a `TrainedModel.to_state()` dict) into the folder `out` (created; files replaced atomically,
    model.safetensors before the config.json that vouches for it). Returns config.json's content."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    config = split_tensors(state, "", tensors)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}), fsync=True)
    weights = out / WEIGHTS
    config["export"] = {"layout": LAYOUT, "files": {WEIGHTS: {"bytes": weights.stat().st_size,
                                                              "sha256": sha256_of(weights)}}}
    atomic_write_text(out / CONFIG, json.dumps(config, indent=1) + "\n")
    if card is not None:
        atomic_write_text(out / CARD, card)
    return config


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a model folder; InputError naming the file when it is missing or not JSON (truncated)."""
    path = folder / CONFIG
    if not path.is_file():
        raise InputError(f"{folder}: no {CONFIG}, so not a mambavl model folder (`mambavl export` writes one)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON, truncated or damaged ({exc})") from None
    if not isinstance(config, dict) or "export" not in config or "kind" not in config:
        raise InputError(f"{path}: not a mambavl model config (no 'kind' and 'export' entries)")
    return config


def verify_files(folder: Path, config: dict[str, Any]) -> None:
    """InputError naming the first data file that is missing or whose size / sha256 is not the one config.json
    records (a truncated download, a changed file)."""
    files = config["export"].get("files") or {}
    if WEIGHTS not in files:
        raise InputError(f"{folder / CONFIG}: records no {WEIGHTS}")
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise InputError(f"{path}: missing (config.json records it)")
        size = path.stat().st_size
        if size != int(expected["bytes"]):
            raise InputError(f"{path}: {size} bytes, but config.json records {expected['bytes']} (truncated or "
                             "replaced); download or export the model again")
        if sha256_of(path) != expected["sha256"]:
            raise InputError(f"{path}: sha256 differs from the one config.json records (the file was changed or "
                             "damaged); download or export the model again")


def read_folder(folder: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The state dict a model folder holds (tensors on `device`), after checking its files (`verify_files`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_config(folder)
    verify_files(folder, config)
    try:
        tensors = load_file(str(folder / WEIGHTS), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{folder / WEIGHTS}: not a readable safetensors file ({exc})") from None
    layout = config.pop("export")
    if not isinstance(layout.get("layout"), int) or layout["layout"] > LAYOUT:
        raise InputError(f"{folder / CONFIG}: folder layout {layout.get('layout')!r} is newer than this mambavl "
                         f"reads ({LAYOUT}): upgrade mambavl")
    return join_tensors(config, tensors, str(folder))


# ----------------------------------------------------------------------------------------------------------------
# references: file, folder, hf://ORG/NAME[@REV]


def parse_hub(ref: str) -> tuple[str, str | None] | None:
    """(repo_id, revision or None) of an ``hf://ORG/NAME[@REV]`` reference; None for anything else."""
    text = str(ref)
    if not text.startswith("hf:/"):
        return None
    m = _HUB.match(text)
    if m is None:
        raise InputError(f"{text}: not a hub reference; write hf://ORG/NAME or hf://ORG/NAME@REVISION")
    return m["repo"], m["rev"]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(ref: str | os.PathLike) -> Path:
    """The local path of a checkpoint reference: a file or folder as given; ``hf://ORG/NAME[@REV]`` downloaded (or
    found, offline) in the Hugging Face cache. Read at call time: ``HF_HUB_CACHE`` (the cache folder) and
    ``HF_HUB_OFFLINE`` (cache only). InputError naming the reference when it cannot be had."""
    hub = parse_hub(str(ref))
    if hub is None:
        return Path(ref)
    repo, rev = hub
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id=repo, revision=rev, repo_type="model",
                                 cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=offline())
    except Exception as exc:  # noqa: BLE001 - any hub failure (network, auth, missing repo/revision/cache) is bad input
        how = " (HF_HUB_OFFLINE is set: only the local Hugging Face cache was searched)" if offline() else ""
        raise InputError(f"{HUB_PREFIX}{repo}{'@' + rev if rev else ''}: cannot get it from the Hugging Face Hub"
                         f"{how}: {type(exc).__name__}: {str(exc)[:300]}") from None
    return Path(path)


def fingerprint(ref: str | os.PathLike) -> dict[str, str]:
    """metrics.json's identity of a checkpoint reference: {"path", "sha256"}. A folder's sha256 is its
    config.json's (which records the sha256 of the weights); a hub reference keeps its hf:// text as the path and
    names the local snapshot."""
    hub = parse_hub(str(ref))
    local = resolve_checkpoint(ref)
    target = local / CONFIG if local.is_dir() else local
    out = {"path": str(local.resolve()), "sha256": sha256_of(target)}
    if hub is not None:
        out.update(path=f"{HUB_PREFIX}{hub[0]}{'@' + hub[1] if hub[1] else ''}", snapshot=str(local))
    return out


# ----------------------------------------------------------------------------------------------------------------
# upload


def push_folder(folder: str | os.PathLike, repo: str, private: bool = False, revision: str | None = None,
                message: str | None = None) -> dict[str, str]:
    """Upload a model folder to the Hub repository `repo` ("ORG/NAME"; created when missing) after checking its
    files. The token comes from where huggingface_hub looks (HF_TOKEN, `hf auth login`). Returns {"repo", "url",
    "commit"}; InputError for a bad folder or repository id."""
    folder = Path(folder)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo):
        raise InputError(f"--repo {repo!r}: write ORG/NAME (a Hugging Face model repository id)")
    verify_files(folder, read_config(folder))
    if not (folder / CARD).is_file():
        raise InputError(f"{folder}: no {CARD} (the model card); export the model with `mambavl export`")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model", revision=revision,
                                 commit_message=message or f"Upload mambavl model ({folder.name})")
    except Exception as exc:  # noqa: BLE001 - no token, no rights, no network: say which, exit 2
        raise InputError(f"could not upload {folder} to {repo} ({type(exc).__name__}: {str(exc)[:300]}); log in "
                         "with `hf auth login` or set HF_TOKEN to a token with write access") from None
    return {"repo": repo, "url": str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo}"),
            "commit": str(getattr(info, "oid", "") or "")}
