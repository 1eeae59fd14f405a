"""The identity of a cache's features: which frozen encoders made them and how the frames were sampled.

`FeatureSpec` is written into every cache's root attributes by extraction (`FeatureSpec.of_extraction`, from the
encoder's `FrozenEncoder.provenance` and the `SamplingConfig`), copied into every trained model, and turned back
into what made it: `encoder_config` rebuilds both frozen encoders, `sampling` the decoder's sampling. `mambavl
predict` asks it and never reads cache attributes itself.

Fields (cache attribute names; "" or 0 where a field does not apply):

| field | meaning |
|---|---|
| encoder, model, pretrained, checkpoint_sha256, feature_dim | image/video encoder kind, model name, weights label (tag, ``pkg:NAME``, file name or none), sha256 of a local weights file, output dim D |
| text_encoder, text_model, text_pretrained, text_checkpoint_sha256, text_dim | the text tower, likewise (dim Dt) |
| tokens_per_frame_pooling | cls / grid (spatial-token means) / tubelet-mean (VideoMAE) / imported |
| sampling_mode, decoded_frames, frames_per_segment, fps, frame_size | uniform or fps sampling, frames decoded per segment, feature tokens stored per segment, the fps of fps sampling (0 otherwise), output H = W in pixels (0 for imported features) |
| question_tokens | T, the question length of the cache's question table (0: unknown) |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from mambavl.errors import InputError
from mambavl.extract import weights as W
from mambavl.extract.sampling import SamplingConfig, SamplingMode
from mambavl.extract.encoders import EncoderConfig, EncoderKind, FrozenEncoder, TextEncoderKind, file_sha256

# The fields that say what the features *are* (a cache and a model must agree on them); the rest say how they were
# sampled, which a model can be evaluated across (e.g. a cache re-extracted with more frames).
IDENTITY_FIELDS = ("encoder", "model", "pretrained", "checkpoint_sha256", "feature_dim", "text_encoder", "text_model",
                   "text_pretrained", "text_checkpoint_sha256", "text_dim")


def _plain(value: Any) -> Any:
    """HDF5 hands back numpy scalars and bytes: plain Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    return value


@dataclass(frozen=True)
class FeatureSpec:
    """What a cache's features are and how they were sampled (see the module docstring for each field)."""

    encoder: str = ""
    model: str = ""
    pretrained: str = ""
    checkpoint_sha256: str = ""
    feature_dim: int = 0
    text_encoder: str = TextEncoderKind.CLIP.value
    text_model: str = ""
    text_pretrained: str = ""
    text_checkpoint_sha256: str = ""
    text_dim: int = 0
    tokens_per_frame_pooling: str = ""
    sampling_mode: str = ""
    decoded_frames: int = 0
    frames_per_segment: int = 0
    fps: float = 0.0
    frame_size: int = 0
    question_tokens: int = 0

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> FeatureSpec:
        """The spec recorded in cache attributes (or a trained model's copy); missing fields keep their defaults,
        which are what versions before the field existed wrote implicitly (e.g. the CLIP text tower)."""
        values = {}
        for f in dataclasses.fields(cls):
            if attrs.get(f.name) is not None:
                values[f.name] = type(f.default)(_plain(attrs[f.name]))
        return cls(**values)

    @classmethod
    def of_extraction(cls, encoder: FrozenEncoder, sampling: SamplingConfig, question_tokens: int = 0) -> FeatureSpec:
        """The spec of features extracted by `encoder` with `sampling`."""
        prov = encoder.provenance()
        return cls.from_attrs({
            **prov,
            "sampling_mode": sampling.mode.value,
            "decoded_frames": int(sampling.num_frames),
            "frames_per_segment": int(encoder.tokens_per_segment(sampling.num_frames)),
            "fps": float(sampling.fps) if sampling.mode == SamplingMode.FPS else 0.0,
            "frame_size": int(sampling.size),
            "question_tokens": int(question_tokens),
        })

    def to_attrs(self) -> dict[str, Any]:
        """Plain values by cache attribute name (what `from_attrs` reads back)."""
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that say what the features are (`IDENTITY_FIELDS`)."""
        return {k: getattr(self, k) for k in IDENTITY_FIELDS}

    def sampling(self, where: str) -> SamplingConfig:
        """The SamplingConfig extraction used; InputError naming `where` when the spec does not record it (features
        imported from another extractor, or a model from a version that did not copy the sampling)."""
        if self.sampling_mode == "imported":
            raise InputError(f"{where}: the features were imported from another extractor, so mambavl cannot sample a "
                             "new video the same way; extract a cache of the video with that extractor and use "
                             "`mambavl evaluate`")
        missing = [name for name in ("sampling_mode", "frame_size") if not getattr(self, name)]
        if not (self.decoded_frames or self.frames_per_segment):
            missing.append("frames_per_segment")
        if missing:
            raise InputError(f"{where} does not record how its training cache sampled frames (missing "
                             f"{', '.join(missing)}); pass --cache with a cache extracted with the same settings")
        return SamplingConfig(mode=self.sampling_mode, num_frames=self.decoded_frames or self.frames_per_segment,
                              fps=self.fps if self.fps > 0 else 4.0, size=self.frame_size)

    def with_defaults_from(self, other: FeatureSpec) -> FeatureSpec:
        """This spec with its unrecorded sampling fields (and question length) taken from `other` (a cache's)."""
        fill = ("sampling_mode", "decoded_frames", "frames_per_segment", "fps", "frame_size",
                "tokens_per_frame_pooling", "question_tokens")
        return dataclasses.replace(self, **{k: getattr(other, k) for k in fill if not getattr(self, k)})

    def encoder_config(self, device: str, encoder_weights: str | None = None,
                       text_weights: str | None = None) -> EncoderConfig:
        """The EncoderConfig that rebuilds both frozen encoders (image/video and text).

        Local weights are found when they were a ``pkg:NAME`` installed here, else taken from `encoder_weights` /
        `text_weights`; either way their sha256 must be the recorded one (InputError naming the option otherwise).
        InputError for an encoder mambavl cannot run (imported features)."""
        if self.encoder not in [k.value for k in EncoderKind]:
            raise InputError(f"the checkpoint was trained on features from encoder {self.encoder!r} ({self.model or '?'}"
                             "), which mambavl cannot run on a new video; extract a cache of the video with that "
                             "extractor and use `mambavl evaluate` instead")
        pretrained = self.pretrained or "none"
        if self.checkpoint_sha256:
            pretrained = _local_weights(pretrained, self.checkpoint_sha256, encoder_weights, "--encoder-weights",
                                        "encoder checkpoint")
        values: dict[str, Any] = dict(kind=self.encoder, model=self.model, pretrained=pretrained, device=device,
                                      text_encoder=self.text_encoder)
        if self.encoder != EncoderKind.VIDEOMAE.value and self.tokens_per_frame_pooling not in ("", "cls"):
            values["pooling"] = self.tokens_per_frame_pooling
        values.update(self._text_config(text_weights))
        if self.question_tokens:
            values["max_question_tokens"] = int(self.question_tokens)
        return EncoderConfig(**values)

    def _text_config(self, text_weights: str | None) -> dict[str, Any]:
        """The text-tower fields of `encoder_config`."""
        text_model, text_pretrained, sha = self.text_model, self.text_pretrained, self.text_checkpoint_sha256
        if self.text_encoder == TextEncoderKind.HF.value:
            if sha and text_pretrained:  # a weights file over the folder's config
                text_pretrained = _local_weights(text_pretrained, sha, text_weights, "--text-weights",
                                                 "text encoder weights")
            elif sha:  # the folder's own weights
                text_model = _local_weights(text_model, sha, text_weights, "--text-weights", "text encoder")
            return {"text_model": text_model, "text_pretrained": text_pretrained or None}
        shared = (self.encoder == EncoderKind.CLIP.value and text_model == self.model
                  and text_pretrained == self.pretrained)
        if shared:  # the image CLIP's own text tower (rebuilt from the same weights)
            return {}
        if sha:
            text_pretrained = _local_weights(text_pretrained, sha, text_weights, "--text-weights",
                                             "text tower checkpoint")
        return {"text_model": text_model, "text_pretrained": text_pretrained}


def _local_weights(label: str, sha: str, given: str | None, option: str, what: str) -> str:
    """The local weights file/folder to rebuild an encoder from: `given` (checked against `sha`), else the
    ``pkg:NAME`` the cache recorded (installed here, checked against `sha`); InputError naming the option."""
    if given:
        path = W.resolve_path(given)
    elif W.is_packaged(label):
        path = W.resolve_path(label)
    else:
        raise InputError(f"the training cache was extracted with the local {what} {label!r} (sha256 {sha[:12]}...); "
                         f"pass it with {option} PATH")
    if file_sha256(W.checkpoint_file(path)) != sha:
        raise InputError(f"{option} {given or label} is not the {what} the cache was extracted with "
                         f"(sha256 differs from {sha[:12]}...)")
    return str(given or label)
