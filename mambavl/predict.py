"""Predict the action in a video clip with a trained checkpoint, extracting features on the fly.

The checkpoint records the attributes of the cache it was trained on (`ckpt["cache_attrs"]`): the frozen encoder
(kind, model, pretrained tag or checkpoint hash), the text tower, and — when the trainer stores them — the sampling
(mode, frames, fps, frame size) and the question length. The same encoder is rebuilt with
`mambavl.extract.encoders.build_encoder`, the clip is decoded exactly as extraction decodes a segment, and the model
sees what it saw in training:

* features: the frames of [start, stop] sampled like the training cache, encoded, sub-sampled to the checkpoint's
  `train_config["frames"]` (the evaluation sub-sampling);
* questions: the template bank's evaluation phrasing (paraphrase 0) of each kind. A checkpoint trained with
  `predicted` questions carries its first pass: the clip's top-k verb and noun candidates are appended to the head
  questions, as in training, and listed in `candidates`. A new video has no narration, so the paper's `annotation`
  protocol cannot be run; a checkpoint trained with it is asked template questions and the result says so in
  `notes`;
* answers: the class names embedded by the text tower (or read from `--cache`, which holds exactly what training
  used; a cache also supplies sampling attributes a checkpoint may lack).

Outputs: the top actions (verb, noun) ranked by p(verb)·p(noun) from the two heads (the EK-100 convention), top verbs
and nouns, and the QA head's answers to the template question kinds of the checkpoint's task (recognition: verb,
noun, scene, action, the last among the training pairs when the checkpoint carries their answer embeddings;
anticipation: next_verb, next_noun):
scores are softmax probabilities over the candidates, or per-candidate sigmoids (with the learned scene bias) for
the multi-label scene question.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from mambavl.cache import schema
from mambavl.cache.reader import open_cache
from mambavl.data.sampling import subsample
from mambavl.device import resolve_device
from mambavl.errors import InputError
from mambavl.extract.decode import DecodeError, SamplingConfig, decode_video_segment, probe_video
from mambavl.extract import weights as W
from mambavl.extract.encoders import EncoderConfig, EncoderKind, TextEncoderKind, build_encoder, file_sha256
from mambavl.extract.questions import TEMPLATES, answer_texts
from mambavl.metrics import rank_classes
from mambavl.progress import Progress, Stages
# SAMPLING_ATTRS: copied into checkpoints by training
from mambavl.runtime import QA_KINDS as TASK_QA_KINDS
from mambavl.runtime import SAMPLING_ATTRS, FirstPass, Task, load_checkpoint
from mambavl.runtime.candidates import candidate_table, head_candidate_questions


# Question kinds the QA head is asked, and which answer table each is scored against.
QA_KINDS = {"verb": "verb", "noun": "noun", "scene": "noun", "action": "action", "next_verb": "verb",
            "next_noun": "noun"}
MULTI_LABEL_KINDS = ("scene",)
STEPS = 5


@dataclass
class PredictConfig:
    """One prediction. `start` / `stop` in seconds (None: the whole video). `cache`: a cache extracted with the
    checkpoint's encoder, for its question/answer tables and sampling attributes. `encoder_weights` / `text_weights`:
    the local image / text encoder weights, when the training cache was extracted from local files that are not an
    installed ``pkg:NAME`` (their sha256 must match)."""

    video: str
    checkpoint: str
    cache: str | None = None
    start: float | None = None
    stop: float | None = None
    top: int = 5
    device: str = "auto"
    encoder_weights: str | None = None
    text_weights: str | None = None

    def __post_init__(self) -> None:
        if self.top < 1:
            raise InputError(f"predict: top={self.top} must be >= 1")
        if not Path(self.video).is_file():
            raise InputError(f"video {self.video} not found")


def sampling_from_attrs(attrs: dict, where: str):
    """The SamplingConfig extraction used, from cache attributes; InputError naming what is missing."""

    missing = [k for k in ("sampling_mode", "frame_size") if k not in attrs]
    if "decoded_frames" not in attrs and "frames_per_segment" not in attrs:
        missing.append("frames_per_segment")
    if missing:
        raise InputError(
            f"{where} does not record how its training cache sampled frames (missing {', '.join(missing)}); "
            "pass --cache with a cache extracted with the same settings"
        )
    frames = int(attrs.get("decoded_frames") or attrs["frames_per_segment"])
    fps = float(attrs.get("fps") or 0.0)
    return SamplingConfig(mode=str(attrs["sampling_mode"]), num_frames=frames, fps=fps if fps > 0 else 4.0,
                          size=int(attrs["frame_size"]))


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


def encoder_config_from_attrs(attrs: dict, device: str, question_tokens: int | None,
                              encoder_weights: str | None = None, text_weights: str | None = None):
    """The EncoderConfig that rebuilds both frozen encoders a cache was extracted with (image/video and text).

    Local weights are found from the attrs when they were a ``pkg:NAME`` installed here, else taken from
    `encoder_weights` / `text_weights`; either way their sha256 must be the recorded one."""

    kind = str(attrs.get("encoder", ""))
    if kind not in [k.value for k in EncoderKind]:
        raise InputError(
            f"the checkpoint was trained on features from encoder {kind!r} ({attrs.get('model', '?')}), which "
            "mambavl cannot run on a new video; extract a cache of the video with that extractor and use "
            "`mambavl evaluate` instead"
        )
    pretrained = str(attrs.get("pretrained", "none"))
    sha = str(attrs.get("checkpoint_sha256") or "")
    if sha:
        pretrained = _local_weights(pretrained, sha, encoder_weights, "--encoder-weights", "encoder checkpoint")
    model = str(attrs["model"])
    text_kind = str(attrs.get("text_encoder") or TextEncoderKind.CLIP.value)
    text_model, text_pretrained = str(attrs.get("text_model", "")), str(attrs.get("text_pretrained", ""))
    text_sha = str(attrs.get("text_checkpoint_sha256") or "")
    values: dict[str, Any] = dict(kind=kind, model=model, pretrained=pretrained, device=device,
                                  text_encoder=text_kind)
    if kind != EncoderKind.VIDEOMAE.value and attrs.get("tokens_per_frame_pooling") not in (None, "", "cls"):
        values["pooling"] = str(attrs["tokens_per_frame_pooling"])
    if text_kind == TextEncoderKind.HF.value:
        if text_sha and text_pretrained:  # a weights file over the folder's config
            text_pretrained = _local_weights(text_pretrained, text_sha, text_weights, "--text-weights",
                                             "text encoder weights")
        elif text_sha:  # the folder's own weights
            text_model = _local_weights(text_model, text_sha, text_weights, "--text-weights", "text encoder")
        values.update(text_model=text_model, text_pretrained=text_pretrained or None)
    else:
        shared = kind == EncoderKind.CLIP.value and text_model == model and text_pretrained == str(
            attrs.get("pretrained"))
        if shared:
            pass  # the image CLIP's own text tower (rebuilt from the same weights)
        else:
            if text_sha:
                text_pretrained = _local_weights(text_pretrained, text_sha, text_weights, "--text-weights",
                                                 "text tower checkpoint")
            values.update(text_model=text_model, text_pretrained=text_pretrained)
    if question_tokens:
        values["max_question_tokens"] = int(question_tokens)
    return EncoderConfig(**values)


def _topk(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest of probs (C,), best first; ties as the official scorers (`metrics.rank_classes`)."""
    return rank_classes(np.asarray(probs)[None], k)[0]


def top_actions(verb_p: np.ndarray, noun_p: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """(verb, noun, p(verb)·p(noun)) of the k best pairs. verb_p (V,), noun_p (Nn,) probabilities."""
    joint = verb_p[:, None] * noun_p[None, :]  # (V, Nn)
    flat = _topk(joint.reshape(-1), k)
    return [(int(i // joint.shape[1]), int(i % joint.shape[1]), float(joint.reshape(-1)[i])) for i in flat]


class _Texts:
    """Question tokens and answer embeddings: from a cache when given (what training used), else re-embedded."""

    def __init__(self, encoder, cache, verbs: list[str], nouns: list[str]):

        self.questions: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
        if cache is not None:
            bank = cache.questions()
            for kind in TEMPLATES:
                if kind in bank.templates and len(bank.templates[kind]):
                    q = int(bank.templates[kind][0])
                    self.questions[kind] = (bank.texts[q], torch.from_numpy(bank.tokens[q]),
                                            torch.from_numpy(bank.mask[q]))
            ans = cache.answers()
            self.answers = {"verb": torch.from_numpy(ans.verb), "noun": torch.from_numpy(ans.noun)}
            self.source = f"cache {cache.path}"
        else:
            texts = [TEMPLATES[kind][0] for kind in TEMPLATES]
            tok, mask, _ = encoder.encode_text(texts)  # (Q, T, Dt), (Q, T), (Q, Dt)
            for i, kind in enumerate(TEMPLATES):
                self.questions[kind] = (texts[i], tok[i], mask[i])
            vt, nt, _ = answer_texts(SimpleNamespace(keys=verbs), SimpleNamespace(keys=nouns), [])
            self.answers = {"verb": encoder.encode_text(vt)[2]}
            dim = self.answers["verb"].shape[-1]
            self.answers["noun"] = encoder.encode_text(nt)[2] if nt else torch.zeros(0, dim)
            self.source = "re-embedded by the text tower"


def predict_video(cfg: PredictConfig, progress: Progress | None = None, encoder=None) -> dict:
    """Predict the action in `cfg.video` between `cfg.start` and `cfg.stop` (see the module docstring).

    `encoder`: an already built FrozenEncoder of the checkpoint's attributes (skips rebuilding it).
    Returns dict(video, start, stop, checkpoint, task, question_source, frames {decoded, times, model},
    encoder {...}, texts_from, notes [...], actions [dict(verb, noun, verb_id, noun_id, score)],
    verbs / nouns [dict(label, id, score)], qa {kind: dict(question, target, multi_label,
    answers [dict(answer, id, score)])}). Scores are probabilities.

    Over 80 lines on purpose: one pass (checkpoint, encoder, decode, encode, predict, answer the question bank)
    that mirrors extraction and evaluation step by step, so that the two can be compared side by side.
    """

    stages = Stages(progress, STEPS)

    def tick(step: int, message: str) -> None:
        if step == STEPS:
            stages.done()
        else:
            stages.enter(message)

    dev = resolve_device(cfg.device)
    tick(0, "loading the checkpoint")
    model, ckpt = load_checkpoint(cfg.checkpoint, device=str(dev))
    model.eval()
    attrs = dict(ckpt.get("cache_attrs") or {})
    verbs = list(ckpt["vocab"]["verbs"])
    nouns = list(ckpt["vocab"]["nouns"])
    notes: list[str] = []
    cache = None
    if cfg.cache is not None:
        cache = open_cache(cfg.cache, expect=attrs, what=f"the training cache of {cfg.checkpoint}")
        if list(cache.verb_keys) != verbs or list(cache.noun_keys) != nouns:
            raise InputError(f"cache {cfg.cache} has other verb/noun classes than checkpoint {cfg.checkpoint}")
        for key in (*SAMPLING_ATTRS, "question_tokens"):
            attrs.setdefault(key, cache.attrs.get(key))
        attrs = {k: v for k, v in attrs.items() if v is not None}
    sampling = sampling_from_attrs(attrs, f"checkpoint {cfg.checkpoint}")
    q_tokens = attrs.get("question_tokens")
    if q_tokens is None and cache is not None:
        q_tokens = int(cache.questions().tokens.shape[1])
    if q_tokens is None and cache is None:
        notes.append("the checkpoint does not record the question length; questions use the encoder's default")

    # ---- the clip
    probe = probe_video(cfg.video)
    start = 0.0 if cfg.start is None else float(cfg.start)
    stop = probe.duration if cfg.stop is None else float(cfg.stop)
    if not (math.isfinite(stop) and 0 <= start < stop):
        raise InputError(f"predict: need 0 <= --start < --stop, got start {start} and stop {stop}")
    if start >= probe.duration:
        raise InputError(f"predict: --start {start} is after the end of {cfg.video} ({probe.duration:.2f} s)")
    stop = min(stop, probe.duration)
    tick(1, "building the encoder")
    if encoder is None:
        encoder = build_encoder(encoder_config_from_attrs(attrs, str(dev), q_tokens, cfg.encoder_weights,
                                                          cfg.text_weights))
    prov = encoder.provenance()
    for key in schema.COMPATIBILITY_ATTRS:
        if key in prov and key in attrs and schema.normalise_attr(prov[key]) != schema.normalise_attr(attrs[key]):
            raise InputError(f"the encoder built for prediction differs from the checkpoint's in {key!r}: "
                             f"{prov[key]!r} vs {attrs[key]!r}")
    tick(2, f"decoding {Path(cfg.video).name} [{start:.2f}, {stop:.2f}] s")
    try:
        frames, times = decode_video_segment(cfg.video, start, stop, sampling)  # (F, S, S, 3), (F,)
    except DecodeError as exc:
        raise InputError(str(exc)) from None
    tick(3, "encoding")
    feats = encoder.encode_segments(frames[None])  # (1, F', D)
    n_tok = torch.tensor([feats.shape[1]])
    train_frames = int(ckpt["train_config"].get("frames", 0))
    video, vmask = subsample(feats.float(), n_tok, train_frames, train=False)  # (1, K, D), (1, K)
    video, vmask = video.to(dev), vmask.to(dev)

    # ---- questions and heads
    task = str(ckpt.get("task", "recognition"))
    source = str(ckpt.get("question_source", "templates"))
    asked = "predicted" if source == "predicted" and ckpt.get("first_pass") else "templates"
    if source not in ("templates", "predicted"):
        notes.append(f"the checkpoint was trained with {source!r} questions, which need a narration (or a questions "
                     "file) of the segment; a new video is asked the template questions instead")
    texts = _Texts(encoder, cache, verbs, nouns)
    pairs = [tuple(p) for p in ckpt.get("vocab", {}).get("action_pairs", [])]
    if ckpt.get("action_answers") is not None and pairs and task != "anticipation":
        texts.answers["action"] = torch.as_tensor(ckpt["action_answers"]).float()  # (A, Dt), training pairs
    head_kinds = ("next_verb", "next_noun") if task == "anticipation" else ("verb", "noun")
    if task == "anticipation":
        notes.append("anticipation checkpoint: [start, stop] is the observed window; the heads predict the action "
                     "that follows it")
    tick(4, "predicting")
    q = torch.stack([texts.questions[k][1] for k in head_kinds])[None].to(dev).float()  # (1, 2, T, Dt)
    qm = torch.stack([texts.questions[k][2] for k in head_kinds])[None].to(dev).bool()  # (1, 2, T)
    candidates = None
    if asked == "predicted":
        # Self-questioning: the checkpoint's video-only first pass proposes k verbs and nouns; each head is asked
        # its template question followed by the answer embeddings of those candidates.
        first = FirstPass.from_state(ckpt["first_pass"], dev)
        probs = {k: v.cpu().numpy() for k, v in first.probs(video, vmask, q, qm).items()}
        cand = torch.as_tensor(candidate_table(first, probs, np.array([0]), 1))  # (1, 2, k)
        heads = (texts.answers["verb"], texts.answers["noun"] if nouns else texts.answers["verb"])
        q, qm = head_candidate_questions(q, qm, heads, cand)  # (1, 2, T + k, Dt), (1, 2, T + k)
        candidates = {"k": first.k, "first_pass": first.origin, "verb": [
            {"label": verbs[i], "id": int(i), "first_pass_score": float(probs["verb"][0, i])} for i in cand[0, 0]]}
        if nouns:
            candidates["noun"] = [{"label": nouns[i], "id": int(i), "first_pass_score": float(probs["noun"][0, i])}
                                  for i in cand[0, 1]]
    with torch.no_grad():
        out = model(video, vmask, q, qm)
        verb_p = out["verb"].float().softmax(-1)[0].cpu().numpy()  # (V,)
        noun_p = out["noun"].float().softmax(-1)[0].cpu().numpy() if "noun" in out else None  # (Nn,)
        qa = {}
        for kind, target in QA_KINDS.items():
            if (kind not in TASK_QA_KINDS[Task(task)] or kind not in texts.questions or target not in texts.answers
                    or (target == "noun" and not nouns)):
                continue
            text, tok, mask = texts.questions[kind]
            h = model.fuse(video, vmask, tok[None].float().to(dev), mask[None].bool().to(dev))  # (1, d)
            multi = kind in MULTI_LABEL_KINDS
            score = model.scene_logits if multi else model.qa_logits
            logits = score(model.qa_embed(h), texts.answers[target].to(dev))[0].float()  # (K,)
            p = (logits.sigmoid() if multi else logits.softmax(-1)).cpu().numpy()
            labels = {"verb": verbs, "noun": nouns,
                      "action": [f"{verbs[v]} {nouns[n]}" for v, n in pairs]}[target]
            qa[kind] = {
                "question": text,
                "target": target,
                "multi_label": multi,
                "answers": [{"answer": labels[i], "id": int(i), "score": float(p[i])} for i in _topk(p, cfg.top)],
            }

    result: dict[str, Any] = {
        "video": str(cfg.video),
        "start": start,
        "stop": stop,
        "checkpoint": str(cfg.checkpoint),
        "task": task,
        "question_source": asked,
        "candidates": candidates,
        "frames": {"decoded": int(len(frames)), "times": [float(t) for t in times], "model": int(video.shape[1])},
        "encoder": prov,
        "texts_from": texts.source,
        "notes": notes,
        "verbs": [{"label": verbs[i], "id": int(i), "score": float(verb_p[i])} for i in _topk(verb_p, cfg.top)],
        "nouns": [],
        "actions": [],
        "qa": qa,
    }
    if noun_p is not None:
        result["nouns"] = [{"label": nouns[i], "id": int(i), "score": float(noun_p[i])} for i in _topk(noun_p, cfg.top)]
        result["actions"] = [
            {"verb": verbs[v], "noun": nouns[n], "verb_id": v, "noun_id": n, "score": s}
            for v, n, s in top_actions(verb_p, noun_p, cfg.top)
        ]
    else:
        # Generic datasets have one label set (in the verb head): the action is the label.
        result["actions"] = [{"verb": r["label"], "noun": None, "verb_id": r["id"], "noun_id": None,
                              "score": r["score"]} for r in result["verbs"]]
    tick(5, "done")
    return result
