"""Frozen encoders. Image/video, three families: the open_clip image tower (per-frame features), any timm image
model (per-frame features), VideoMAE via transformers (clip-level tokens). Text, for questions and answers, two:
the open_clip text tower, or a Hugging Face encoder (BERT / MiniLM / RoBERTa ...: per-token hidden states and their
masked mean). Image and text encoders are independent and both are recorded in the cache attributes.

Everything runs under `torch.inference_mode()`, in batches, on the best device (CUDA when present; the image/video
tower under fp16 autocast there by default, `EncoderConfig.precision`). Weights: a hub tag for online users
(open_clip ``openai``, ``laion2b_s34b_b79k``; timm ``in1k``, ...), a local file or folder in any of the formats
`mambavl.extract.weights` reads, a packaged ``pkg:NAME``, or ``none`` for seeded random initialisation — what the
tests and the offline demo use, with the tiny configs shipped in ``mambavl/extract/model_configs``
(``mambavl-tiny-clip``; ``videomae-tiny``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mambavl.data.annotations import file_sha256  # noqa: F401  (re-exported: mambavl.predict uses it)
from mambavl.device import Precision, as_precision, autocast, resolve_device, resolve_precision
from mambavl.errors import InputError
from mambavl.extract import hub
from mambavl.extract import weights as W

CONFIG_DIR = Path(__file__).with_name("model_configs")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_VIDEOMAE = "videomae-tiny"
VIDEOMAE_OFFLINE = ("Offline choices: --model FOLDER (a VideoMAE folder with config.json; its weights, or --pretrained "
                    "PATH or none), or --model videomae-tiny --pretrained none (the test config).")


class EncoderKind(str, Enum):
    CLIP = "clip"
    TIMM = "timm"
    VIDEOMAE = "videomae"


class TextEncoderKind(str, Enum):
    CLIP = "clip"  # the open_clip text tower
    HF = "hf"  # a Hugging Face encoder (AutoModel + AutoTokenizer)


# Per-frame feature of an image tower. "cls": CLIP's image embedding (the class token, projected), or a timm
# model's pooled pre-logits feature. "grid": the spatial tokens / feature map (CLIP: every patch token through
# ln_post and the projection; timm: the final feature map, or the patch tokens of a ViT) averaged over the 2x2
# quadrants of the image and concatenated (4 x dim per frame): keeps where things are, which a pooled vector of a
# random or weak encoder mostly loses (motion direction, spatial layout).
POOLINGS = ("cls", "grid")
GRID = 2


@dataclass
class EncoderConfig:
    """Which frozen encoders to run.

    Image/video (`kind`, `model`, `pretrained`): clip — open_clip model name, pretrained tag / local weights / none;
    timm — timm model name, local weights / ``pkg:NAME`` / a timm pretrained tag (hub, online) / none; videomae — a
    transformers name or local folder (or "videomae-tiny" with pretrained none or a local weights file).
    Text (`text_encoder`, `text_model`, `text_pretrained`): clip — open_clip model and weights, by default the
    image CLIP itself (else ViT-B-32/openai); hf — a Hugging Face name or local folder (or ``pkg:all-minilm-l6-v2``)
    in `text_model`, with `text_pretrained` unset (the folder's weights), a weights file, or none (random init)."""

    kind: EncoderKind = EncoderKind.CLIP
    model: str = "ViT-B-32"
    pretrained: str = "openai"
    text_model: str | None = None
    text_pretrained: str | None = None
    device: str = "auto"
    batch_size: int = 64
    max_question_tokens: int = 16
    pooling: str = "cls"  # "cls" (pooled image feature) or "grid" (2x2 grid of spatial-token means)
    text_encoder: TextEncoderKind = TextEncoderKind.CLIP
    # autocast of the image/video tower (`mambavl.device.Precision`); auto = fp16 on CUDA, fp32 on the CPU. The text
    # tower (questions and answers, embedded once) runs in fp32. Features are stored as the cache stores them.
    precision: Precision = Precision.AUTO

    def __post_init__(self) -> None:
        self.precision = as_precision(self.precision, "encoder precision")
        self.kind = EncoderKind(self.kind)
        self.text_encoder = TextEncoderKind(self.text_encoder)
        if self.pooling not in POOLINGS:
            raise InputError(f"encoder pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.pooling != "cls" and self.kind == EncoderKind.VIDEOMAE:
            raise InputError(f"encoder pooling {self.pooling!r} applies to image towers (clip, timm) only")
        if self.text_encoder == TextEncoderKind.HF and not self.text_model:
            raise InputError("--text-encoder hf needs --text-model (a Hugging Face name or local folder, e.g. "
                             "pkg:all-minilm-l6-v2)")


def _register_configs() -> None:
    import open_clip

    if "mambavl-tiny-clip" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def _is_none(tag: str | None) -> bool:
    return tag is None or str(tag).lower() in ("", "none", "random")


def _quiet_seeded(build):
    """build() with torch's RNG seeded (random init must mean the same weights on every run: resume, predict,
    shards) and library warnings about missing pretrained weights silenced (here it is what was asked for)."""
    root, level = logging.getLogger(), logging.getLogger().level
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        root.setLevel(max(level, logging.ERROR))
        try:
            return build()
        finally:
            root.setLevel(level)


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    return model.eval().requires_grad_(False)


def _clip_state(clip, state: dict) -> dict:
    """open_clip's own adaptations of third-party / older CLIP state dicts (as open_clip.load_checkpoint does)."""
    from open_clip import factory

    state = {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    state = factory.convert_state_dict(clip, state)
    if "positional_embedding" in state and not hasattr(clip, "positional_embedding"):
        state = factory.convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        if key in state and getattr(clip, key, None) is not None and state[key].ndim != getattr(clip, key).ndim:
            state[key] = state[key].reshape(getattr(clip, key).shape)
    if "logit_bias" not in state and getattr(clip, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    for resize in (factory.resize_pos_embed, factory.resize_text_pos_embed):
        try:  # interpolates position embeddings of another grid / context length
            resize(state, clip)
        except (AssertionError, RuntimeError, KeyError):
            pass  # the width differs too: another architecture, which load_into reports by its first key
    return state


def load_clip(model: str, pretrained: str | None, device: torch.device, option: str = "--pretrained"):
    """An open_clip model in eval mode with frozen parameters. `pretrained`: an open_clip tag (downloaded from the
    hub once, see `mambavl.extract.hub`), local weights (any format of `mambavl.extract.weights`), or none (seeded
    random init). `option` names the command-line option of `pretrained` in messages."""
    import open_clip

    _register_configs()
    if model not in open_clip.list_models():
        raise InputError(f"unknown open_clip model {model!r} (see open_clip.list_models())")
    local = not _is_none(pretrained) and W.looks_like_path(pretrained)
    if local:
        state, source = W.read_state_dict(str(pretrained))
    tag = None if _is_none(pretrained) or local else str(pretrained)
    if tag is not None and not open_clip.get_pretrained_cfg(model, tag):
        known = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none for this model"
        raise InputError(f"{option} {tag!r}: not an open_clip tag of {model} (known: {known}), nor a local file "
                         "(not found); or use pkg:NAME or none")

    def build():
        return _quiet_seeded(lambda: open_clip.create_model(model, pretrained=tag, device="cpu"))

    try:
        clip = build() if tag is None else hub.load_from_hub(build, f"open_clip {model} weights {tag!r}",
                                                                hub.offline_choices(option))
    except RuntimeError as exc:
        raise InputError(f"could not load open_clip {model} with pretrained={pretrained!r}: {exc}") from exc
    if local:
        W.load_into(clip, _clip_state(clip, state), source, f"open_clip {model}")
    return _freeze(clip.to(device))


def load_timm(model: str, pretrained: str | None, device: torch.device):
    """A timm image model in eval mode with frozen parameters. `pretrained`: local weights (any format of
    `mambavl.extract.weights`, and the `efficientnet_pytorch` layout renamed to timm's), ``pkg:NAME``, a timm
    pretrained tag (``default`` or e.g. ``in1k``: downloaded from the hub, for online users), or none."""
    import timm

    if not timm.is_model(model.split(".")[0]):
        raise InputError(f"unknown timm model {model!r} (see timm.list_models())")
    local = not _is_none(pretrained) and W.looks_like_path(pretrained)
    if _is_none(pretrained) or local:
        net = _quiet_seeded(lambda: timm.create_model(model, pretrained=False))
        if local:
            state, source = W.read_state_dict(str(pretrained))
            W.load_into(net, W.convert_layout(state, net), source, f"timm {model}")
    else:
        name = model if pretrained == "default" else f"{model.split('.')[0]}.{pretrained}"
        try:
            net = hub.load_from_hub(lambda: timm.create_model(name, pretrained=True),
                                    f"timm {model} weights {pretrained!r}", hub.offline_choices("--pretrained"))
        except InputError:
            raise
        except Exception as exc:  # hub errors come in many types (OSError, HTTP errors, RuntimeError)
            raise InputError(f"could not load timm {name} from the hub ({type(exc).__name__}: {exc}); offline, pass a "
                             "local weights file with --pretrained PATH") from None
    return _freeze(net.to(device))


def _from_hub_or_folder(cls, name: str, choices: str):
    """`cls.from_pretrained(name)` (a transformers config or model): a local folder as it is, a hub name through
    `hub.load_from_hub` (one message naming the offline choices when the hub is not usable)."""
    if Path(name).exists():
        return cls.from_pretrained(name)
    return hub.load_from_hub(lambda: cls.from_pretrained(name), f"{cls.__name__} {name!r}", choices)


class TextTower:
    """Token-level and pooled text embeddings from an open_clip text transformer.

    tokens: the transformer's per-token outputs after ln_final, mapped by the text projection into the same space as
    the pooled embedding, truncated to `max_tokens`; mask marks real tokens (start, words, end)."""

    def __init__(self, model: str, pretrained: str | None, device: torch.device, max_tokens: int, clip=None):
        import open_clip

        self.clip = clip if clip is not None else load_clip(model, pretrained, device, option="--text-pretrained")
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = device
        self.max_tokens = max_tokens
        host = getattr(self.clip, "text", self.clip)  # CustomTextCLIP keeps the tower in .text
        self.ln_final = getattr(host, "ln_final", None)
        self.projection = getattr(host, "text_projection", None)
        with torch.inference_mode():
            self.dim = int(self.clip.encode_text(self.tokenizer(["a"]).to(device)).shape[-1])

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if self.projection is None:
            return x
        if isinstance(self.projection, torch.nn.Linear):
            return self.projection(x)
        return x @ self.projection

    def _short_context(self) -> bool:
        """True for open_clip's standard CLIP text tower (causal mask, end-of-text pooling), which gives the same
        outputs on a prefix of the context as on the whole padded context."""
        import open_clip

        c = self.clip
        return (type(c) is open_clip.model.CLIP and getattr(c, "attn_mask", None) is not None
                and getattr(c, "text_pool_type", "argmax") == "argmax")

    def _encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """CLIP's encode_text, run on the shortest prefix of the context that holds every real token of the batch
        and the `max_tokens` outputs we keep (questions are ~20 of 77 tokens: about 4x less work). Causal attention
        makes the outputs at those positions identical to a full-context run (tested)."""
        if not self._short_context():
            return self.clip.encode_text(ids)
        from open_clip.transformer import text_global_pool

        c = self.clip
        real = (ids != 0).any(0).nonzero()
        n = max(self.max_tokens, int(real.max()) + 1 if len(real) else 1)
        n = min(n, ids.shape[1])
        ids = ids[:, :n]
        cast = c.transformer.get_cast_dtype()
        x = c.token_embedding(ids).to(cast) + c.positional_embedding[:n].to(cast)
        x = c.ln_final(c.transformer(x, attn_mask=c.attn_mask[:n, :n]))  # (b, n, W); the token hook sees this
        x = text_global_pool(x, ids, c.text_pool_type, eos_token_id=getattr(c, "text_eos_id", None))
        return self._project(x)

    def encode(self, texts: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (Q, T, Dt) float32, mask (Q, T) bool, pooled (Q, Dt) float32 — all on the CPU."""
        toks, masks, pools = [], [], []
        captured: list[torch.Tensor] = []
        hook = None
        if self.ln_final is not None:
            hook = self.ln_final.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            with torch.inference_mode():
                for k in range(0, len(texts), batch_size):
                    ids = self.tokenizer(list(texts[k:k + batch_size])).to(self.device)  # (b, ctx)
                    captured.clear()
                    pooled = self._encode_text(ids).float()  # (b, Dt)
                    t = self.max_tokens
                    if captured:
                        per_token = self._project(captured[-1][:, :t]).float()  # (b, T, Dt)
                        mask = ids[:, :t] != 0
                    else:  # towers without a token-level output: the pooled vector is the only token
                        per_token, mask = pooled[:, None], torch.ones(len(ids), 1, dtype=torch.bool)
                    toks.append(per_token.cpu())
                    masks.append(mask.cpu())
                    pools.append(pooled.cpu())
        finally:
            if hook is not None:
                hook.remove()
        if not texts:
            return torch.zeros(0, self.max_tokens, self.dim), torch.zeros(0, self.max_tokens, dtype=torch.bool), \
                torch.zeros(0, self.dim)
        return torch.cat(toks), torch.cat(masks), torch.cat(pools)


class HFTextTower:
    """Token-level and pooled text embeddings from a Hugging Face encoder (BERT, MiniLM, RoBERTa ...).

    tokens: the last hidden states of the first `max_tokens` positions (start token, word pieces, end token),
    zero-padded; mask marks real tokens; pooled: the mean of the last hidden states over every real token of the
    whole text (the sentence-transformers convention for all-MiniLM-L6-v2 and kin), not normalised.

    `model`: a hub name (online), a local folder with config + tokenizer + weights, or ``pkg:NAME``. `pretrained`:
    None / "" for the folder's own weights, "none" for seeded random init of its config, or a weights file (any
    format of `mambavl.extract.weights`) loaded over its config."""

    def __init__(self, model: str, pretrained: str | None, device: torch.device, max_tokens: int):
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load bar of weight names; progress is the CLI's business
        self.path = W.resolve_path(model) if W.looks_like_path(model, hub_names=True) else None
        where = str(self.path) if self.path is not None else model
        own_weights = pretrained is None or str(pretrained) == ""

        def load():  # (tokenizer, the model with its own weights | its config)
            tokenizer = AutoTokenizer.from_pretrained(where)
            return tokenizer, AutoModel.from_pretrained(where) if own_weights else AutoConfig.from_pretrained(where)

        try:
            if self.path is None:  # a hub name: downloaded once, or offline one message (mambavl.extract.hub)
                self.tokenizer, net = hub.load_from_hub(
                    load, f"the Hugging Face text encoder {model!r} (tokenizer, config"
                          + (", weights)" if own_weights else ")"), hub.offline_text_choices())
            else:
                self.tokenizer, net = load()
            self.weights_file = W.checkpoint_file(self.path) if self.path is not None and own_weights else None
            if not own_weights:  # the config: random init, or a weights file over it
                config = net
                net = _quiet_seeded(lambda: AutoModel.from_config(config))
                if not _is_none(pretrained):
                    state, self.weights_file = W.read_state_dict(str(pretrained))
                    W.load_into(net, state, self.weights_file, f"Hugging Face {config.model_type} encoder {model}")
        except (OSError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"could not load the Hugging Face text encoder {model!r}: "
                             f"{str(exc).splitlines()[0]}") from None
        self.model = _freeze(net.to(device))
        self.device = device
        self.max_tokens = max_tokens
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (Q, T, Dt) float32, mask (Q, T) bool, pooled (Q, Dt) float32 — all on the CPU."""
        t = self.max_tokens
        toks = torch.zeros(len(texts), t, self.dim)
        masks = torch.zeros(len(texts), t, dtype=torch.bool)
        pools = torch.zeros(len(texts), self.dim)
        with torch.inference_mode():
            for k in range(0, len(texts), batch_size):
                batch = self.tokenizer(list(texts[k:k + batch_size]), padding=True, truncation=True,
                                       return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()  # (b, L, Dt)
                m = batch["attention_mask"].bool()  # (b, L)
                w = m.unsqueeze(-1).float()
                pools[k:k + len(hidden)] = ((hidden * w).sum(1) / w.sum(1).clamp_min(1.0)).cpu()
                n = min(t, hidden.shape[1])
                toks[k:k + len(hidden), :n] = (hidden[:, :n] * w[:, :n]).cpu()
                masks[k:k + len(hidden), :n] = m[:, :n].cpu()
        return toks, masks, pools


def text_tower_spec(cfg: EncoderConfig, image: bool = True) -> tuple[str, str]:
    """(model, pretrained) of the open_clip text tower: `text_model` when given, else the image CLIP's model (when
    `image` and the image encoder is a CLIP), else ViT-B-32; with `text_pretrained` when given, else the image CLIP's
    weights (same model) or openai. `image`: False for a text tower without an image encoder (`cache import`)."""
    own_clip = image and cfg.kind == EncoderKind.CLIP
    if cfg.text_model:
        return cfg.text_model, str(cfg.text_pretrained or "openai")
    if own_clip:
        return cfg.model, str(cfg.pretrained if cfg.text_pretrained is None else cfg.text_pretrained)
    return "ViT-B-32", str(cfg.text_pretrained or "openai")


class FrozenEncoder:
    """A frozen video encoder plus its text tower. See `build_encoder`."""

    feature_dim: int
    text_dim: int

    def __init__(self, cfg: EncoderConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        # InputError before any weights load when the device cannot run the precision (fp16 on the CPU)
        self.precision = resolve_precision(cfg.precision, self.device, on_cuda=Precision.FP16)
        self.kind = cfg.kind
        self.crop_pct: float | None = None  # timm's eval crop: resize to size / crop_pct, then centre-crop
        self.interpolation = "bicubic"
        self.weights_file: Path | None = None
        if not _is_none(cfg.pretrained) and W.looks_like_path(cfg.pretrained) and not (
                cfg.kind == EncoderKind.VIDEOMAE and cfg.model != TINY_VIDEOMAE):
            self.weights_file = W.checkpoint_file(W.resolve_path(str(cfg.pretrained)))
        if cfg.kind == EncoderKind.CLIP:
            self.clip = load_clip(cfg.model, cfg.pretrained, self.device)
            size = self.clip.visual.image_size
            self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
            self.mean = torch.tensor(OPENAI_MEAN, device=self.device).view(1, 3, 1, 1)
            self.std = torch.tensor(OPENAI_STD, device=self.device).view(1, 3, 1, 1)
            if cfg.pooling == "grid":
                visual = self.clip.visual
                if getattr(visual, "proj", None) is None or not hasattr(visual, "output_tokens") or getattr(
                        visual, "attn_pool", None) is not None:
                    raise InputError(f"--pooling grid needs a ViT image tower with a projection; {cfg.model} has "
                                     "none (use --pooling cls)")
        elif cfg.kind == EncoderKind.TIMM:
            self._build_timm()
        else:
            self._build_videomae()
        if cfg.kind != EncoderKind.VIDEOMAE:
            with torch.inference_mode():
                probe = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
                self.feature_dim = int(self._image_features(probe).shape[-1])
        text_model, text_pretrained = text_tower_spec(cfg)
        # one model for both towers when they are the same CLIP, as it was trained
        share = (cfg.kind == EncoderKind.CLIP and cfg.text_encoder == TextEncoderKind.CLIP
                 and text_model == cfg.model and text_pretrained == str(cfg.pretrained))
        self.text_encoder = TextEncoder(cfg, self.device, clip=self.clip if share else None, image=True)
        self.text = self.text_encoder.text
        self.text_model, self.text_pretrained = self.text_encoder.text_model, self.text_encoder.text_pretrained
        self.text_dim = self.text_encoder.text_dim

    # ------------------------------------------------------------------ timm
    def _build_timm(self) -> None:
        import timm

        self.net = load_timm(self.cfg.model, self.cfg.pretrained, self.device)
        # the model's own eval preprocessing (size, mean/std, interpolation, centre crop), as timm resolves it
        data = timm.data.resolve_data_config({}, model=self.net)
        _, h, w = data["input_size"]
        if h != w:
            raise InputError(f"timm {self.cfg.model}: non-square input size {h}x{w} is not supported")
        self.image_size = int(h)
        self.crop_pct = float(data.get("crop_pct") or 1.0)
        self.interpolation = "bilinear" if data.get("interpolation") == "bilinear" else "bicubic"
        self.mean = torch.tensor(data["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(data["std"], device=self.device).view(1, 3, 1, 1)
        if self.cfg.pooling == "grid":
            with torch.inference_mode():
                probe = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
                out = self.net.forward_features(probe)
            if out.ndim == 3 and math.isqrt(out.shape[1] - getattr(self.net, "num_prefix_tokens", 0)) ** 2 != (
                    out.shape[1] - getattr(self.net, "num_prefix_tokens", 0)):
                raise InputError(f"--pooling grid: timm {self.cfg.model}'s tokens do not form a square grid "
                                 "(use --pooling cls)")
            if out.ndim not in (3, 4):
                raise InputError(f"--pooling grid: timm {self.cfg.model} has no spatial features (use --pooling cls)")

    def _timm_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, 3, S, S) -> per-frame features (N, D): the pooled pre-logits feature, or the 2x2
        grid of the final feature map (CNN: NCHW; NHWC for some models) / patch tokens (ViT)."""
        feats = self.net.forward_features(x)
        if self.cfg.pooling == "cls":
            return self.net.forward_head(feats, pre_logits=True).flatten(1)  # (N, D)
        if feats.ndim == 3:  # (N, prefix + P, D): drop class/register tokens, lay patches on their grid
            tokens = feats[:, getattr(self.net, "num_prefix_tokens", 0):]
            side = math.isqrt(tokens.shape[1])
            grid = tokens.transpose(1, 2).reshape(len(x), -1, side, side)  # (N, D, side, side)
        else:
            nhwc = getattr(self.net, "output_fmt", "NCHW") == "NHWC" or str(
                getattr(self.net, "output_fmt", "")).endswith("NHWC")
            grid = feats.permute(0, 3, 1, 2) if nhwc else feats  # (N, D, h, w)
        return F.adaptive_avg_pool2d(grid.float(), GRID).flatten(2).transpose(1, 2).flatten(1)  # (N, GRID*GRID*D)

    # ------------------------------------------------------------------ VideoMAE
    def _build_videomae(self) -> None:
        from transformers import VideoMAEConfig, VideoMAEModel

        pretrained = self.cfg.pretrained
        if self.cfg.model == TINY_VIDEOMAE:
            config = VideoMAEConfig(image_size=64, patch_size=16, num_channels=3, num_frames=16, tubelet_size=2,
                                    hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, use_mean_pooling=True)
            model = _quiet_seeded(lambda: VideoMAEModel(config))
            if not _is_none(pretrained):
                if not W.looks_like_path(pretrained):
                    raise InputError("videomae-tiny is a test config: use --pretrained none or a local weights file")
                state, source = W.read_state_dict(str(pretrained))
                W.load_into(model, state, source, "VideoMAE videomae-tiny")
        elif _is_none(pretrained):
            model = VideoMAEModel(_from_hub_or_folder(VideoMAEConfig, self.cfg.model, VIDEOMAE_OFFLINE))
        elif W.looks_like_path(pretrained, hub_names=True) and W.resolve_path(str(pretrained)).is_file():
            # a weights file over the architecture of --model (a hub name or a folder with config.json)
            config = _from_hub_or_folder(VideoMAEConfig, self.cfg.model, VIDEOMAE_OFFLINE)
            model = _quiet_seeded(lambda: VideoMAEModel(config))
            state, source = W.read_state_dict(str(pretrained))
            W.load_into(model, state, source, f"VideoMAE {self.cfg.model}")
            self.weights_file = source
        else:
            where = pretrained if Path(pretrained).exists() else self.cfg.model
            model = _from_hub_or_folder(VideoMAEModel, where, VIDEOMAE_OFFLINE)
        self.videomae = model.to(self.device).eval().requires_grad_(False)
        c = self.videomae.config
        self.image_size, self.tubelet, self.mae_frames = int(c.image_size), int(c.tubelet_size), int(c.num_frames)
        self.feature_dim = int(c.hidden_size)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    # ------------------------------------------------------------------ shared
    def tokens_per_segment(self, num_frames: int) -> int:
        """F' stored per segment for F decoded frames (image towers: F; VideoMAE: its frames / tubelet size)."""
        return num_frames if self.kind != EncoderKind.VIDEOMAE else self.mae_frames // self.tubelet

    def _prepare(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised float (N, 3, S, S) at the model's input size.

        CLIP / VideoMAE: resized to S x S. timm: timm's eval transform on tensors — the shorter side resized to
        floor(S / crop_pct), then the centre S x S crop (frames arrive centre-cropped to a square by ffmpeg)."""
        x = frames.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, H, W)
        s = self.image_size
        if self.crop_pct is not None:
            h, w = x.shape[-2:]
            scale = math.floor(s / self.crop_pct)
            size = (scale, max(scale, round(w * scale / h))) if h <= w else (max(scale, round(h * scale / w)), scale)
            if size != (h, w):
                x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False,
                                  antialias=True).clamp_(0, 1)
            top, left = (x.shape[-2] - s) // 2, (x.shape[-1] - s) // 2
            x = x[..., top:top + s, left:left + s]
        elif x.shape[-1] != s or x.shape[-2] != s:
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
        return (x - self.mean) / self.std

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, 3, S, S) -> per-frame features (N, D) of the image tower."""
        return self._clip_frames(x) if self.kind == EncoderKind.CLIP else self._timm_frames(x)

    def _clip_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, 3, S, S) -> per-frame features (N, D) of the configured pooling."""
        if self.cfg.pooling == "cls":
            return self.clip.encode_image(x)
        visual = self.clip.visual
        visual.output_tokens = True
        try:
            _, tokens = visual(x)  # (N, P, W): patch tokens after ln_post, before the projection
        finally:
            visual.output_tokens = False
        tokens = tokens @ visual.proj  # (N, P, E)
        side = math.isqrt(tokens.shape[1])
        grid = tokens.transpose(1, 2).reshape(len(x), -1, side, side)  # (N, E, side, side)
        return F.adaptive_avg_pool2d(grid, GRID).flatten(2).transpose(1, 2).flatten(1)  # (N, GRID*GRID*E)


    def encode_segments(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames (S, F, H, W, 3) -> tokens (S, F', D) float32 on the CPU. Frames may be a numpy array or a
        tensor already on the device (a GPU decoder's); host frames go to a CUDA device through pinned memory."""
        if isinstance(frames, torch.Tensor):
            frames_t = frames
        else:
            frames_t = torch.from_numpy(np.ascontiguousarray(frames))
            if self.device.type == "cuda":
                frames_t = frames_t.pin_memory().to(self.device, non_blocking=True)
        s, f = frames_t.shape[:2]
        with torch.inference_mode(), autocast(self.precision, self.device):
            if self.kind != EncoderKind.VIDEOMAE:
                flat = frames_t.reshape(s * f, *frames_t.shape[2:])
                outs = [self._image_features(self._prepare(flat[k:k + self.cfg.batch_size])).float().cpu()
                        for k in range(0, len(flat), self.cfg.batch_size)]
                return torch.cat(outs).reshape(s, f, -1)  # (S, F, D)
            if f != self.mae_frames:  # VideoMAE has a fixed clip length: resample uniformly in time
                pick = np.floor((np.arange(self.mae_frames) + 0.5) * f / self.mae_frames).astype(int)
                frames_t = frames_t[:, pick]
            outs = []
            per_batch = max(1, self.cfg.batch_size // self.mae_frames)
            for k in range(0, s, per_batch):
                clip = frames_t[k:k + per_batch]
                b = clip.shape[0]
                x = self._prepare(clip.reshape(-1, *clip.shape[2:]))  # (b*T, 3, S, S)
                x = x.reshape(b, self.mae_frames, *x.shape[1:])  # (b, T, 3, S, S)
                hidden = self.videomae(pixel_values=x).last_hidden_state  # (b, T/t * P, D)
                t = self.mae_frames // self.tubelet
                outs.append(hidden.reshape(b, t, -1, hidden.shape[-1]).mean(2).float().cpu())  # (b, T/t, D)
            return torch.cat(outs)

    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (Q, T, Dt), mask (Q, T) bool, pooled (Q, Dt), float32 on the CPU."""
        return self.text.encode(list(texts))

    def provenance(self) -> dict:
        """Root attributes of a cache written with this encoder: the image/video encoder and the text encoder, each
        with its name, weights (tag, file name, ``pkg:NAME`` or none; never a machine path), the sha256 of a
        local weights file ("" for hub tags and random init) and its output dim."""
        cfg = self.cfg
        preprocess = {"size": int(self.image_size), "mean": [round(float(v), 6) for v in self.mean.flatten()],
                      "std": [round(float(v), 6) for v in self.std.flatten()], "interpolation": self.interpolation,
                      "crop_pct": self.crop_pct if self.crop_pct is not None else 1.0}
        return {
            "encoder": cfg.kind.value,
            "model": cfg.model,
            "pretrained": _weights_label(cfg.pretrained),
            "checkpoint_sha256": file_sha256(self.weights_file) if self.weights_file else "",
            "feature_dim": int(self.feature_dim),
            "image_preprocess": json.dumps(preprocess),
            **self.text_encoder.provenance(),
            "tokens_per_frame_pooling": cfg.pooling if self.kind != EncoderKind.VIDEOMAE else "tubelet-mean",
        }


class TextEncoder:
    """The text tower of an `EncoderConfig` (`text_encoder`, `text_model`, `text_pretrained`), alone: what
    questions and answers of imported features need, and the text half of a `FrozenEncoder`.

    The open_clip text tower is the one `text_tower_spec` names (`image`: whether an image encoder comes with it, as
    in a FrozenEncoder; `clip`: that image CLIP, already loaded, when the text tower is the same model)."""

    def __init__(self, cfg: EncoderConfig, device: torch.device | None = None, clip=None, image: bool = False):
        self.cfg = cfg
        self.device = device if device is not None else resolve_device(cfg.device)
        if cfg.text_encoder == TextEncoderKind.HF:
            self.text_model, self.text_pretrained = str(cfg.text_model), str(cfg.text_pretrained or "")
            self.text = HFTextTower(self.text_model, cfg.text_pretrained, self.device, cfg.max_question_tokens)
        else:
            self.text_model, self.text_pretrained = text_tower_spec(cfg, image)
            self.text = TextTower(self.text_model, self.text_pretrained, self.device, cfg.max_question_tokens,
                                  clip=clip)
        self.text_dim = int(self.text.dim)

    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (Q, T, Dt), mask (Q, T) bool, pooled (Q, Dt), float32 on the CPU."""
        return self.text.encode(list(texts))

    def provenance(self) -> dict:
        """The text encoder's cache attributes (see `FrozenEncoder.provenance`)."""
        cfg = self.cfg
        text_file = getattr(self.text, "weights_file", None)
        if cfg.text_encoder == TextEncoderKind.CLIP and self.text_pretrained and not _is_none(
                self.text_pretrained) and W.looks_like_path(self.text_pretrained):
            text_file = W.checkpoint_file(W.resolve_path(self.text_pretrained))
        hf = cfg.text_encoder == TextEncoderKind.HF
        return {
            "text_encoder": cfg.text_encoder.value,
            "text_model": _weights_label(self.text_model) if hf else self.text_model,
            "text_pretrained": _weights_label(self.text_pretrained) if self.text_pretrained else "",
            "text_checkpoint_sha256": file_sha256(text_file) if text_file else "",
            "text_dim": int(self.text_dim),
        }


def _weights_label(spec: str | None) -> str:
    """How a weights spec is recorded: "none", a tag or ``pkg:NAME`` as given, a local file/folder by its name."""
    if _is_none(spec):
        return "none"
    s = str(spec)
    if W.is_packaged(s) or not W.looks_like_path(s, hub_names=True):
        return s
    return Path(s).name


def build_encoder(cfg: EncoderConfig) -> FrozenEncoder:
    """The frozen encoder described by `cfg` (weights loaded, eval mode, no gradients)."""
    return FrozenEncoder(cfg)
