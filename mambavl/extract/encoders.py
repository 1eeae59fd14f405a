"""Frozen encoders: the open_clip image tower (per-frame tokens), VideoMAE via transformers (clip-level tokens),
and a text tower for questions and answers.

Everything runs under `torch.inference_mode()`, in batches, on the best device (CUDA when present, fp16 autocast
there). Weights: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...), a local checkpoint path, or
``none`` for random initialisation — what the tests and the offline demo use, with the tiny configs shipped in
``mambavl/extract/model_configs`` (``mambavl-tiny-clip``; ``videomae-tiny``).
"""

from __future__ import annotations

import hashlib
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
from mambavl.device import resolve_device
from mambavl.errors import InputError

CONFIG_DIR = Path(__file__).with_name("model_configs")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_VIDEOMAE = "videomae-tiny"


class EncoderKind(str, Enum):
    CLIP = "clip"
    VIDEOMAE = "videomae"


# Per-frame feature of a CLIP image tower. "cls": CLIP's image embedding (the class token, projected).
# "grid": every patch token through ln_post and the projection, averaged over the 2x2 quadrants of the image and
# concatenated (4 x embed_dim per frame): keeps where things are, which a class token of a random or weak
# encoder mostly loses (motion direction, spatial layout).
POOLINGS = ("cls", "grid")
GRID = 2


@dataclass
class EncoderConfig:
    """Which frozen encoder to run. `pretrained`: open_clip tag, local checkpoint path, or "none" (random init).
    For VideoMAE, `model` is a transformers name/local folder (or "videomae-tiny" with pretrained "none") and the
    text tower is `text_model`/`text_pretrained` (default ViT-B-32/openai)."""

    kind: EncoderKind = EncoderKind.CLIP
    model: str = "ViT-B-32"
    pretrained: str = "openai"
    text_model: str | None = None
    text_pretrained: str | None = None
    device: str = "auto"
    batch_size: int = 64
    max_question_tokens: int = 16
    pooling: str = "cls"  # CLIP: "cls" (the image embedding) or "grid" (2x2 grid of projected patch-token means)

    def __post_init__(self) -> None:
        self.kind = EncoderKind(self.kind)
        if self.pooling not in POOLINGS:
            raise InputError(f"encoder pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.pooling != "cls" and self.kind != EncoderKind.CLIP:
            raise InputError(f"encoder pooling {self.pooling!r} applies to CLIP image towers only")


def _register_configs() -> None:
    import open_clip

    if "mambavl-tiny-clip" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def _is_none(tag: str | None) -> bool:
    return tag is None or str(tag).lower() in ("", "none", "random")


def load_clip(model: str, pretrained: str | None, device: torch.device):
    """An open_clip model in eval mode with frozen parameters. `pretrained` is a tag, a file path or none."""
    import open_clip

    _register_configs()
    if model not in open_clip.list_models():
        raise InputError(f"unknown open_clip model {model!r} (see open_clip.list_models())")
    weights = None if _is_none(pretrained) else pretrained
    if weights and (os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        if not Path(weights).is_file():
            raise InputError(f"checkpoint {weights} not found")
    try:
        # random init is seeded: "none" must mean the same weights on every run (resume, predict, shards)
        root, level = logging.getLogger(), logging.getLogger().level
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if weights is None:  # open_clip warns at every random init; here it is what was asked for
                root.setLevel(max(level, logging.ERROR))
            try:
                clip = open_clip.create_model(model, pretrained=weights, device=device)
            finally:
                root.setLevel(level)
    except RuntimeError as exc:
        raise InputError(f"could not load open_clip {model} with pretrained={pretrained!r}: {exc}") from exc
    clip.eval().requires_grad_(False)
    return clip


class TextTower:
    """Token-level and pooled text embeddings from an open_clip text transformer.

    tokens: the transformer's per-token outputs after ln_final, mapped by the text projection into the same space as
    the pooled embedding, truncated to `max_tokens`; mask marks real tokens (start, words, end)."""

    def __init__(self, model: str, pretrained: str | None, device: torch.device, max_tokens: int, clip=None):
        import open_clip

        self.clip = clip if clip is not None else load_clip(model, pretrained, device)
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


class FrozenEncoder:
    """A frozen video encoder plus its text tower. See `build_encoder`."""

    feature_dim: int
    text_dim: int

    def __init__(self, cfg: EncoderConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.kind = cfg.kind
        text_model = cfg.text_model or (cfg.model if cfg.kind == EncoderKind.CLIP else "ViT-B-32")
        text_pretrained = cfg.text_pretrained if cfg.text_model else (
            cfg.pretrained if cfg.kind == EncoderKind.CLIP else (cfg.text_pretrained or "openai"))
        self.text_model, self.text_pretrained = text_model, str(text_pretrained)
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
            with torch.inference_mode():
                probe = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
                self.feature_dim = int(self._clip_frames(probe).shape[-1])
            share = text_model == cfg.model and self.text_pretrained == str(cfg.pretrained)
        else:
            self._build_videomae()
            share = False
        # one model for both towers when they are the same CLIP, as it was trained
        self.text = TextTower(text_model, text_pretrained, self.device, cfg.max_question_tokens,
                              clip=self.clip if share else None)
        self.text_dim = self.text.dim

    # ------------------------------------------------------------------ VideoMAE
    def _build_videomae(self) -> None:
        from transformers import VideoMAEConfig, VideoMAEModel

        if self.cfg.model == TINY_VIDEOMAE:
            if not _is_none(self.cfg.pretrained):
                raise InputError("videomae-tiny is a random-init test config: use --pretrained none")
            config = VideoMAEConfig(image_size=64, patch_size=16, num_channels=3, num_frames=16, tubelet_size=2,
                                    hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, use_mean_pooling=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = VideoMAEModel(config)
        elif _is_none(self.cfg.pretrained):
            model = VideoMAEModel(VideoMAEConfig.from_pretrained(self.cfg.model))
        else:
            model = VideoMAEModel.from_pretrained(self.cfg.pretrained if Path(self.cfg.pretrained).exists()
                                                  else self.cfg.model)
        self.videomae = model.to(self.device).eval().requires_grad_(False)
        c = self.videomae.config
        self.image_size, self.tubelet, self.mae_frames = int(c.image_size), int(c.tubelet_size), int(c.num_frames)
        self.feature_dim = int(c.hidden_size)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    # ------------------------------------------------------------------ shared
    def tokens_per_segment(self, num_frames: int) -> int:
        """F' stored per segment for F decoded frames (CLIP: F; VideoMAE: its frames / tubelet size)."""
        return num_frames if self.kind == EncoderKind.CLIP else self.mae_frames // self.tubelet

    def _prepare(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised float (N, 3, S, S) at the model's input size."""
        x = frames.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, H, W)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True).clamp_(0, 1)
        return (x - self.mean) / self.std

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

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else torch.autocast(
            "cpu", enabled=False)

    def encode_segments(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames (S, F, H, W, 3) -> tokens (S, F', D) float32 on the CPU."""
        frames_t = torch.from_numpy(np.ascontiguousarray(frames))
        s, f = frames_t.shape[:2]
        with torch.inference_mode(), self._autocast():
            if self.kind == EncoderKind.CLIP:
                flat = frames_t.reshape(s * f, *frames_t.shape[2:])
                outs = [self._clip_frames(self._prepare(flat[k:k + self.cfg.batch_size])).float().cpu()
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
        """Root attributes of a cache written with this encoder."""
        cfg = self.cfg
        ckpt = cfg.pretrained if (not _is_none(cfg.pretrained) and Path(cfg.pretrained).is_file()) else None
        return {
            "encoder": cfg.kind.value,
            "model": cfg.model,
            "pretrained": "none" if _is_none(cfg.pretrained) else (Path(cfg.pretrained).name if ckpt else
                                                                   cfg.pretrained),
            "checkpoint_sha256": file_sha256(ckpt) if ckpt else "",
            "feature_dim": int(self.feature_dim),
            "text_model": self.text_model,
            "text_pretrained": "none" if _is_none(self.text_pretrained) else self.text_pretrained,
            "text_dim": int(self.text_dim),
            "tokens_per_frame_pooling": cfg.pooling if self.kind == EncoderKind.CLIP else "tubelet-mean",
        }


def build_encoder(cfg: EncoderConfig) -> FrozenEncoder:
    """The frozen encoder described by `cfg` (weights loaded, eval mode, no gradients)."""
    return FrozenEncoder(cfg)
