"""Predict the action in a video clip with a trained checkpoint, extracting features on the fly.

A trained run records the feature spec of the cache it was trained on (`TrainedModel.features`, a
`mambavl.extract.spec.FeatureSpec`): the frozen encoder (kind, model, pretrained tag or checkpoint hash), the text
tower, the sampling (mode, frames, fps, frame size) and the question length. The spec rebuilds the same encoders
(`FeatureSpec.encoder_config`), the clip is decoded exactly as extraction decodes a segment, and the clip then takes
the path every cache row takes (`mambavl.runtime.present`, an `Asker`, `head_logits`, `qa_logits`):

* features: the frames of [start, stop] sampled like the training cache, encoded, sub-sampled to the checkpoint's
  `train_config.frames` (the evaluation sub-sampling);
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
the multi-label scene question. The result says which part of the model each output comes from (`sources`): the
recognition heads and the QA head are separate outputs, so the top action and a QA answer may disagree. `dataset`
names the heads as the training data does ("label" for a generic clip CSV).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mambavl.cache import schema
from mambavl.cache.reader import QuestionBank, open_cache, releases_caches
from mambavl.device import Precision, as_precision, autocast, resolve_device, resolve_precision
from mambavl.errors import InputError
from mambavl.extract.decode import DecodeError, decode_video_segment, probe_video
from mambavl.extract.encoders import FrozenEncoder, build_encoder
from mambavl.extract.questions import TEMPLATES, QuestionSource, answer_texts
from mambavl.extract.spec import FeatureSpec
from mambavl.fuse.qa import QA_TARGET
from mambavl.metrics import rank_classes
from mambavl.progress import Progress, Stages
from mambavl.runtime import (
    AnswerTables,
    Asker,
    ClipBatch,
    TrainedModel,
    candidate_questions,
    head_logits,
    present,
    qa_logits,
)
from mambavl.runtime.candidates import candidate_table

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
    # autocast of the encoders and the fusion model; auto = fp16 encoders on CUDA (as extraction), fp32 fusion
    precision: Precision = Precision.AUTO

    def __post_init__(self) -> None:
        self.precision = as_precision(self.precision, "predict: precision")
        if self.top < 1:
            raise InputError(f"predict: top={self.top} must be >= 1")
        if not Path(self.video).is_file():
            raise InputError(f"video {self.video} not found")


def _topk(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest of probs (C,), best first; ties as `metrics.rank_classes`."""
    return rank_classes(np.asarray(probs)[None], k)[0]


def top_actions(verb_p: np.ndarray, noun_p: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """(verb, noun, p(verb)·p(noun)) of the k best pairs. verb_p (V,), noun_p (Nn,) probabilities."""
    joint = verb_p[:, None] * noun_p[None, :]  # (V, Nn)
    flat = _topk(joint.reshape(-1), k)
    return [(int(i // joint.shape[1]), int(i % joint.shape[1]), float(joint.reshape(-1)[i])) for i in flat]


def embedded_texts(encoder: FrozenEncoder, verbs: list[str], nouns: list[str]) -> tuple[QuestionBank, AnswerTables]:
    """The evaluation phrasing of every template kind and the class names' answer texts, embedded by the text tower
    (what the cache holds, for a prediction without one): a one-paraphrase question table and the answer tables."""
    texts = [TEMPLATES[kind][0] for kind in TEMPLATES]
    tok, mask, pooled = encoder.encode_text(texts)  # (Q, T, Dt), (Q, T), (Q, Dt)
    bank = QuestionBank(texts=texts, tokens=tok.numpy(), mask=mask.numpy(), pooled=pooled.numpy(),
                        templates={kind: np.array([i]) for i, kind in enumerate(TEMPLATES)})
    vt, nt, _ = answer_texts(_Keys(verbs), _Keys(nouns), [])
    verb = encoder.encode_text(vt)[2]
    return bank, AnswerTables(verb, encoder.encode_text(nt)[2] if nt else None)


@dataclass
class _Keys:
    """The class keys `answer_texts` reads from an annotation's class table."""

    keys: list[str]


@dataclass
class Clip:
    """A decoded and encoded clip: features (1, F', D), the decoded frames' count and times (s)."""

    features: torch.Tensor
    decoded: int
    times: list[float]
    start: float
    stop: float


def _window(cfg: PredictConfig) -> tuple[float, float]:
    """[start, stop] of the clip in seconds, clamped to the video; InputError for an empty or outside window."""
    probe = probe_video(cfg.video)
    start = 0.0 if cfg.start is None else float(cfg.start)
    stop = probe.duration if cfg.stop is None else float(cfg.stop)
    if not (math.isfinite(stop) and 0 <= start < stop):
        raise InputError(f"predict: need 0 <= --start < --stop, got start {start} and stop {stop}")
    if start >= probe.duration:
        raise InputError(f"predict: --start {start} is after the end of {cfg.video} ({probe.duration:.2f} s)")
    return start, min(stop, probe.duration)


def encode_clip(cfg: PredictConfig, spec: FeatureSpec, encoder: FrozenEncoder, where: str) -> Clip:
    """Decode [start, stop] of the video sampled as the training cache was, and encode it."""
    start, stop = _window(cfg)
    try:
        frames, times = decode_video_segment(cfg.video, start, stop, spec.sampling(where))  # (F, S, S, 3), (F,)
    except DecodeError as exc:
        raise InputError(str(exc)) from None
    feats = encoder.encode_segments(frames[None])  # (1, F', D)
    return Clip(feats, int(len(frames)), [float(t) for t in times], start, stop)


def _asker(run: TrainedModel, encoder: FrozenEncoder, cache: Any) -> tuple[Asker, str]:
    """Template questions and answer tables for the clip: from `cache` when given (what training used), else embedded
    by the text tower; the run's own action answers either way."""
    if cache is not None:
        asker = Asker.of_cache(cache, run.spec, action_answers=run.action_answers)
        return asker, f"cache {cache.path}"
    bank, answers = embedded_texts(encoder, run.vocab.verbs, run.vocab.nouns)
    if run.action_answers is not None and run.vocab.action_pairs:
        answers.action = torch.as_tensor(run.action_answers).float()  # (A, Dt), training pairs
    return Asker(run.spec, bank, answers), "re-embedded by the text tower"


def _self_questioning(run: TrainedModel, clip: ClipBatch, asker: Asker) -> tuple[Asker, dict | None]:
    """Under `predicted` questions, the run's video-only first pass proposes k verbs and nouns; each head is then asked
    its template question followed by their answer embeddings. Returns the asker and the candidates' report."""
    first = run.first_pass_models(clip.video.device)
    if run.question_source != QuestionSource.PREDICTED or first is None:
        return asker, None
    qt, qm, _ = asker.head_tokens(clip.rows, train=False, generator=None, device=clip.video.device)
    probs = {k: v.cpu().numpy() for k, v in first.probs(clip.video, clip.mask, qt, qm).items()}
    cand = candidate_table(first, probs, np.array([0]), 1)  # (1, 2, k)
    verbs, nouns = run.vocab.verbs, run.vocab.nouns
    report: dict[str, Any] = {"k": first.k, "first_pass": first.origin, "verb": [
        {"label": verbs[i], "id": int(i), "first_pass_score": float(probs["verb"][0, i])} for i in cand[0, 0]]}
    if nouns:
        report["noun"] = [{"label": nouns[i], "id": int(i), "first_pass_score": float(probs["noun"][0, i])}
                          for i in cand[0, 1]]
    return asker.with_candidates(cand), report


def _ranked(probs: np.ndarray, labels: list[str], k: int) -> list[dict]:
    return [{"label": labels[i], "id": int(i), "score": float(probs[i])} for i in _topk(probs, k)]


def _answers(qa: dict[str, np.ndarray], asker: Asker, run: TrainedModel, top: int) -> dict[str, dict]:
    """The QA head's answers per kind: the question, its answer table and the top answers (softmax probabilities, or
    per-candidate sigmoids for a multi-label kind)."""
    verbs, nouns = run.vocab.verbs, run.vocab.nouns
    names = {"verb": verbs, "noun": nouns, "scene": nouns,
             "action": [f"{verbs[v]} {nouns[n]}" for v, n in run.vocab.action_pairs]}
    out = {}
    for kind, logits in qa.items():
        if kind == "indices":
            continue
        multi = asker.spec.is_multi_label(kind)
        t = torch.as_tensor(logits[0])
        p = (t.sigmoid() if multi else t.softmax(-1)).numpy()
        target = "noun" if QA_TARGET[kind] == "scene" else QA_TARGET[kind]
        out[kind] = {"question": asker.question_text(kind), "target": target, "multi_label": multi,
                     "answers": [{"answer": names[QA_TARGET[kind]][i], "id": int(i), "score": float(p[i])}
                                 for i in _topk(p, top)]}
    return out


def _notes(run: TrainedModel, asked: str) -> list[str]:
    notes = []
    if run.question_source.value != asked and run.question_source != QuestionSource.PREDICTED:
        notes.append(f"the checkpoint was trained with {run.question_source.value!r} questions, which need a narration "
                     "(or a questions file) of the segment; a new video is asked the template questions instead")
    if run.spec.window == schema.ANTICIPATION:
        notes.append("anticipation checkpoint: [start, stop] is the observed window; the heads predict the action "
                     "that follows it")
    return notes


def _feature_spec(run: TrainedModel, cfg: PredictConfig) -> tuple[FeatureSpec, Any]:
    """The run's feature spec, completed from `cfg.cache` (checked to be a cache of the run's encoders and classes)
    where the run did not record a sampling field; and the opened cache (None without one)."""
    if cfg.cache is None:
        return run.features, None
    cache = open_cache(cfg.cache, expect=run.cache_attrs(), what=f"the training cache of {cfg.checkpoint}")
    run.check_cache(cache, f"checkpoint {cfg.checkpoint}")
    return run.features.with_defaults_from(FeatureSpec.from_attrs(cache.attrs)), cache


@releases_caches
def predict_video(cfg: PredictConfig, progress: Progress | None = None, encoder: FrozenEncoder | None = None) -> dict:
    """Predict the action in `cfg.video` between `cfg.start` and `cfg.stop` (see the module docstring).

    `encoder`: an already built FrozenEncoder of the checkpoint's feature spec (skips rebuilding it).
    Returns dict(video, start, stop, checkpoint, task, question_source, frames {decoded, times, model},
    encoder {...}, texts_from, notes [...], actions [dict(verb, noun, verb_id, noun_id, score)],
    verbs / nouns [dict(label, id, score)], qa {kind: dict(question, target, multi_label,
    answers [dict(answer, id, score)])}). Scores are probabilities.
    """
    stages = Stages(progress, STEPS)
    dev = resolve_device(cfg.device)
    fusion_precision = resolve_precision(cfg.precision, dev)  # auto: fp32
    stages.enter("loading the checkpoint")
    run = TrainedModel.load(cfg.checkpoint, dev)
    model = run.model(dev)
    spec, cache = _feature_spec(run, cfg)
    spec.sampling(f"checkpoint {cfg.checkpoint}")  # refused before any decoding when the sampling is unknown
    stages.enter("building the encoder")
    if encoder is None:
        encoder = build_encoder(dataclasses.replace(spec.encoder_config(str(dev), cfg.encoder_weights,
                                                                        cfg.text_weights), precision=cfg.precision))
    built = FeatureSpec.from_attrs(encoder.provenance())
    for key, value in built.identity().items():
        if value != getattr(spec, key):
            raise InputError(f"the encoder built for prediction differs from the checkpoint's in {key!r}: "
                             f"{value!r} vs {getattr(spec, key)!r}")
    stages.enter(f"decoding {Path(cfg.video).name}")
    clip = encode_clip(cfg, spec, encoder, f"checkpoint {cfg.checkpoint}")
    stages.enter("predicting")
    batch = present(clip.features, torch.tensor([clip.features.shape[1]]), run.train_config.frames, dev)
    asker, texts_from = _asker(run, encoder, cache)
    with autocast(fusion_precision, dev):
        asker, candidates = _self_questioning(run, batch, asker)
        heads, _ = head_logits(model, [batch], asker)
        qa = qa_logits(model, [batch], asker)
    stages.done()
    return _result(cfg, run, clip, batch, heads, _answers(qa, asker, run, cfg.top), candidates, asker,
                   encoder.provenance(), texts_from)


# Which part of the model each output comes from: the recognition heads and the QA head are trained on different
# objectives and read different questions, so the top action and a QA answer may disagree.
SOURCES = {
    "actions": "recognition heads (verb and noun classifiers; actions ranked by p(verb)·p(noun))",
    "verbs": "recognition head (verb classifier)",
    "nouns": "recognition head (noun classifier)",
    "qa": "QA head (the fused clip+question vector scored against the answer texts; trained by the QA objective, "
          "separately from the recognition heads)",
}


def _dataset_kind(run: TrainedModel) -> str:
    """"ek100" or "generic" (checkpoints written before it was recorded: generic when they have no nouns)."""
    return run.annotation.get("kind") or ("ek100" if run.has_nouns else "generic")


def _result(cfg: PredictConfig, run: TrainedModel, clip: Clip, batch: ClipBatch, heads: dict, qa: dict,
            candidates: dict | None, asker: Asker, encoder: dict, texts_from: str) -> dict[str, Any]:
    """predict_video's result (see its docstring) from the heads' logits and the QA answers."""
    verbs, nouns = run.vocab.verbs, run.vocab.nouns
    verb_p = heads["verb"].softmax(-1)[0].numpy()  # (V,)
    result: dict[str, Any] = {
        "video": str(cfg.video), "start": clip.start, "stop": clip.stop, "checkpoint": str(cfg.checkpoint),
        "task": run.task.value, "question_source": asker.source.value, "candidates": candidates,
        "frames": {"decoded": clip.decoded, "times": clip.times, "model": int(batch.video.shape[1])},
        "encoder": encoder, "texts_from": texts_from, "notes": _notes(run, asker.source.value),
        "verbs": _ranked(verb_p, verbs, cfg.top), "nouns": [], "actions": [], "qa": qa,
        "dataset": {"kind": _dataset_kind(run), "heads": schema.head_names(_dataset_kind(run))},
        "sources": dict(SOURCES),
    }
    if "noun" in heads:
        noun_p = heads["noun"].softmax(-1)[0].numpy()  # (Nn,)
        result["nouns"] = _ranked(noun_p, nouns, cfg.top)
        result["actions"] = [{"verb": verbs[v], "noun": nouns[n], "verb_id": v, "noun_id": n, "score": s}
                             for v, n, s in top_actions(verb_p, noun_p, cfg.top)]
    else:
        # Generic datasets have one label set (in the verb head): the action is the label.
        result["actions"] = [{"verb": r["label"], "noun": None, "verb_id": r["id"], "noun_id": None,
                              "score": r["score"]} for r in result["verbs"]]
    return result
