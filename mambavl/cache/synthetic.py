"""Synthetic caches with planted class structure, written through the real writer.

For tests and benchmarks of stage 2 (training, evaluation, loaders) that must not depend on video decoding or a
real encoder: each segment's frame tokens are verb prototype + noun prototype + a verb-specific temporal drift +
noise, so a fusion model can learn the classes in seconds; the verb needs the frame order (the drift's sign) to be
told apart from its mirror class. Two caches made with the same `structure_seed` (and different `seed`) share the
class structure and the text space: a train/val pair.

The question table holds template questions (random fixed embeddings) and, unless disabled, per-segment
"annotation" questions built the way the paper's protocol builds them: each row's verb question embeds its own
verb answer (and the noun question its noun). That is a deliberate leak, for the leak-audit tests.

`make_order_cache` writes a cache whose verbs are decided by the order of the frames alone (three reversed-time
pairs of motions; optionally every clip next to its time-reversed copy), for tests and studies of whether the order
of frames reaches the heads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mambavl.cache import schema
from mambavl.cache.writer import CacheWriter, RowMeta

TEMPLATE_PARAPHRASES = 3
QUESTION_TOKENS = 6


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


def _question_table(template_tokens, sources, verbs, nouns, verb_keys, noun_keys, verb_text, noun_text, srng):
    """The planted question table: every template kind's paraphrases, and with the annotation source one question
    per head and row whose tokens carry the answer's text embedding (the protocol's leak). Returns (texts, tokens,
    templates, per_segment, label_keyed)."""
    n, num_nouns, text_dim = len(verbs), len(noun_keys), verb_text.shape[1]
    texts, tokens = [], []
    templates = {}
    for k, kind in enumerate(schema.TEMPLATE_KINDS):
        idx = []
        for p in range(TEMPLATE_PARAPHRASES):
            idx.append(len(texts))
            texts.append(f"template {kind} question {p}")
            tokens.append(template_tokens[k * TEMPLATE_PARAPHRASES + p])
        templates[kind] = idx
    per_segment, label_keyed = {}, {}
    if "annotation" in sources:
        table = np.full((n, 2), -1, dtype=np.int32)
        seen: dict[str, int] = {}
        for i in range(n):
            vq = f"What is the person doing in '{verb_keys[verbs[i]]} [MASK]'?"
            nq = f"Which object is used in '[MASK] {noun_keys[nouns[i]]}'?" if num_nouns else None
            for j, (q, emb) in enumerate(((vq, verb_text[verbs[i]]), (nq, noun_text[nouns[i]] if nq else None))):
                if q is None:
                    continue
                if q not in seen:
                    seen[q] = len(texts)
                    texts.append(q)
                    # the question's tokens carry its own answer's text embedding: the protocol's leak
                    tok = 0.3 * srng.normal(size=(QUESTION_TOKENS, text_dim)) + 3.0 * emb[None]
                    tokens.append(tok)
                table[i, j] = seen[q]
        per_segment["annotation"] = table
        label_keyed["annotation"] = table[:, 0] >= 0  # made from each row's own narration
    return texts, tokens, templates, per_segment, label_keyed


def _attrs(num_nouns, structure_seed, seed, n, dim, text_dim, frames, labelled, anticipation, sources) -> dict:
    """The planted cache's root attributes (a "planted" encoder of the given dims)."""
    return dict(
        dataset_kind="ek100" if num_nouns else "generic",
        annotation_file="planted.csv",
        annotation_sha256=f"planted-{structure_seed}-{seed}-{n}",
        encoder="planted",
        model=f"planted-{structure_seed}",
        pretrained="none",
        feature_dim=dim,
        text_model=f"planted-text-{structure_seed}",
        text_pretrained="none",
        text_dim=text_dim,
        frames_per_segment=frames,
        frame_size=0,
        has_labels=labelled,
        anticipation=anticipation,
        question_sources=sources,
        source="mambavl.cache.synthetic.make_planted_cache",
    )


def make_planted_cache(
    path: str | os.PathLike,
    n: int = 200,
    num_verbs: int = 6,
    num_nouns: int = 5,
    frames: int = 8,
    dim: int = 32,
    text_dim: int = 24,
    seed: int = 0,
    structure_seed: int = 1234,
    noise: float = 0.5,
    anticipation: bool = False,
    annotation_questions: bool = True,
    labelled: bool = True,
    participants: tuple[str, ...] = ("P01", "P02", "P03", "P04"),
    invalid_rows: int = 0,
    verb_appearance: float = 1.0,
) -> Path:
    """Write a planted-structure cache at `path` and return the path.

    n rows; features (n, frames, dim); text embeddings of width text_dim. `labelled=False` writes a test-split-like
    cache (labels -1, no annotation questions). The last `invalid_rows` rows are left invalid with a recorded
    failure, as an extraction that lost a few videos would. `verb_appearance` scales the verb's prototype: at 0 the
    verb shows only in the temporal drift, which averages to zero over the frames, so the mean of a segment's frame
    tokens says nothing about its verb (an order-only verb, like a motion).
    Over 80 lines on purpose: one readable recipe of a complete cache, every table in the writer's order.
    """
    path = Path(path)
    srng = np.random.default_rng(structure_seed)  # shared class structure and text space
    rng = np.random.default_rng(seed)  # this cache's samples

    verb_proto = srng.normal(size=(num_verbs, dim))
    noun_proto = srng.normal(size=(max(num_nouns, 1), dim))
    drift = srng.normal(size=(num_verbs, dim))
    text = _planted_text(srng, structure_seed, num_verbs, num_nouns, text_dim)

    # skewed class frequencies, as in EK-100 (a few head classes, a tail)
    pv, pn = 1.0 / np.arange(1, num_verbs + 1), 1.0 / np.arange(1, max(num_nouns, 1) + 1)
    verbs = rng.choice(num_verbs, size=n, p=pv / pv.sum())
    nouns = rng.choice(max(num_nouns, 1), size=n, p=pn / pn.sum()) if num_nouns else np.full(n, -1)

    t = np.linspace(-1.0, 1.0, frames)[None, :, None]  # (1, F, 1)
    base = verb_appearance * verb_proto[verbs][:, None] + (noun_proto[nouns][:, None] if num_nouns else 0.0)  # (n, 1, D)
    feats = base + t * drift[verbs][:, None] + noise * rng.normal(size=(n, frames, dim))  # (n, F, D)
    ant = None
    if anticipation:
        # the observed window shows the action's objects before it starts: the noun, weaker verb, more noise
        ant = 0.6 * base + 0.3 * t * drift[verbs][:, None] + 1.5 * noise * rng.normal(size=(n, frames, dim))

    attrs = (num_nouns, structure_seed, seed, n, dim, text_dim, frames, labelled, anticipation)
    _write_planted(path, feats, ant, verbs, nouns, rng, text, attrs, labelled, annotation_questions, participants,
                   invalid_rows)
    return path


@dataclass
class _PlantedText:
    """The text side of a planted cache, drawn from the structure stream: answer embeddings and template tokens."""

    verb_text: np.ndarray  # (V, Dt)
    noun_text: np.ndarray  # (Nn, Dt)
    template_tokens: np.ndarray  # (kinds * paraphrases, T, Dt)
    srng: np.random.Generator  # the structure stream, for the annotation questions' tokens


def _planted_text(srng: np.random.Generator, structure_seed: int, num_verbs: int, num_nouns: int,
                  text_dim: int) -> _PlantedText:
    verb_text = _unit(srng.normal(size=(num_verbs, text_dim)))
    noun_text = _unit(srng.normal(size=(max(num_nouns, 1), text_dim)))[:num_nouns]
    # "action" (the last kind) came later: its tokens come from their own stream, so every other draw is unchanged
    template_tokens = np.concatenate([
        srng.normal(size=((len(schema.TEMPLATE_KINDS) - 1) * TEMPLATE_PARAPHRASES, QUESTION_TOKENS, text_dim)),
        np.random.default_rng([structure_seed, 1]).normal(size=(TEMPLATE_PARAPHRASES, QUESTION_TOKENS, text_dim)),
    ])
    return _PlantedText(verb_text, noun_text, template_tokens, srng)


def _write_planted(path: Path, feats: np.ndarray, ant: np.ndarray | None, verbs: np.ndarray, nouns: np.ndarray,
                   rng: np.random.Generator, text: _PlantedText, attr_args: tuple, labelled: bool,
                   annotation_questions: bool, participants: tuple[str, ...], invalid_rows: int = 0,
                   keys: tuple[list[str], list[str]] | None = None, source: str | None = None) -> None:
    """Write planted features (n, F, D) (and the anticipation window's, or None) with their labels, scene nouns
    drawn from `rng`, the question table and the answer tables through the real writer. `attr_args` are `_attrs`'s
    arguments before `sources`; `keys` the verb and noun class names (default verb0.., noun0..)."""
    n, frames = feats.shape[:2]
    num_verbs, num_nouns, text_dim = len(text.verb_text), len(text.noun_text), text.verb_text.shape[1]
    verb_text, noun_text, template_tokens, srng = text.verb_text, text.noun_text, text.template_tokens, text.srng
    parts = [participants[i % len(participants)] for i in range(n)]

    all_nouns = []
    for i in range(n):
        extra = rng.choice(max(num_nouns, 1), size=rng.integers(0, 3)) if num_nouns else []
        all_nouns.append(tuple(sorted({int(nouns[i]), *map(int, extra)})) if num_nouns else ())

    verb_keys, noun_keys = keys or ([f"verb{v}" for v in range(num_verbs)], [f"noun{k}" for k in range(num_nouns)])
    rows = RowMeta(
        narration_id=[f"{parts[i]}_01_{i}" for i in range(n)],
        video_id=[f"{parts[i]}_01" for i in range(n)],
        participant_id=parts,
        narration=[f"{verb_keys[verbs[i]]} {noun_keys[nouns[i]] if num_nouns else ''}".strip() if labelled else ""
                   for i in range(n)],
        verb_class=np.where(labelled, verbs, -1).astype(np.int32),
        noun_class=np.where(labelled, nouns, -1).astype(np.int32),
        all_noun_classes=all_nouns if labelled else [() for _ in range(n)],
        start_time=np.arange(n, dtype=np.float64) * 4.0 + 2.0,
        stop_time=np.arange(n, dtype=np.float64) * 4.0 + 4.5,
    )
    sources = ["templates"] + (["annotation"] if annotation_questions and labelled else [])
    attrs = _attrs(*attr_args, sources)
    if source:
        attrs["source"] = source
    path.unlink(missing_ok=True)
    with CacheWriter(path, attrs, rows, verb_keys, noun_keys) as w:
        times = rows.start_time[:, None] + np.linspace(0, 2.5, frames)[None]  # (n, F)
        for i in range(n - invalid_rows):
            w.write_row(i, feats[i], times[i])
            if ant is not None:
                w.write_row(i, ant[i], times[i] - 2.0, window=schema.ANTICIPATION)
        for i in range(n - invalid_rows, n):
            w.record_failure(i, schema.RECOGNITION, "planted failure: video missing")

        texts, tokens, templates, per_segment, label_keyed = _question_table(
            template_tokens, sources, verbs, nouns, verb_keys, noun_keys, verb_text, noun_text, srng)
        tokens_arr = np.stack(tokens).astype(np.float32)  # (Q, T, Dt)
        mask = np.ones(tokens_arr.shape[:2], dtype=bool)
        mask[:, -1] = False  # one padded token per question, so masking is exercised
        w.write_questions(texts, tokens_arr, mask, tokens_arr[:, :-1].mean(1), templates, per_segment, label_keyed)

        pairs = sorted({(int(v), int(k)) for v, k in zip(verbs, nouns)}) if num_nouns else []
        action = np.asarray([_unit(verb_text[v] + noun_text[k]) for v, k in pairs]).reshape(-1, text_dim)
        w.write_answers(verb_text, noun_text.reshape(-1, text_dim), np.asarray(pairs).reshape(-1, 2), action,
                        verb_keys, noun_keys, [f"{verb_keys[v]} {noun_keys[k]}" for v, k in pairs])
        w.finalize()


# Order-defined verbs: three reversed-time pairs. key, axis of the motion (0: x, 1: y, 2: size), direction.
ORDER_VERBS = (("move-left", 0, -1), ("move-right", 0, 1), ("lift", 1, -1), ("lower", 1, 1), ("shrink", 2, -1),
               ("grow", 2, 1))
ORDER_NOUNS = ("tomato", "lettuce", "plate", "sponge", "pan")
ORDER_PIXELS = 12  # side of the rendered frame


def reversed_verb(verb: int) -> int:
    """The verb of the same clip played backwards (`ORDER_VERBS` lists each pair side by side: 0<->1, 2<->3, ...)."""
    return verb ^ 1


def _order_frames(rng: np.random.Generator, verbs: np.ndarray, nouns: np.ndarray, colours: np.ndarray,
                  frames: int) -> np.ndarray:
    """Render each clip's object and a still distractor as soft blobs on a (P, P, C) grid -> (n, F, P*P*C).

    The path is drawn first as an unordered interval [lo, hi] on the verb's axis (random start and length, i.e.
    random position and speed); the verb only says in which direction it is run. A clip and its mirror verb therefore
    have the same distribution of frame *sets*: only the order of the frames tells them apart."""
    n, p = len(verbs), ORDER_PIXELS
    yy, xx = np.mgrid[0:p, 0:p].astype(np.float32) / (p - 1)  # (P, P) in [0, 1]
    lo = rng.uniform(0.15, 0.5, size=n)
    hi = lo + rng.uniform(0.2, 0.45, size=n)  # the length of the path: the speed
    s = np.linspace(0.0, 1.0, frames)[None, :]  # (1, F)
    axis, direction = np.array([ORDER_VERBS[v][1] for v in verbs]), np.array([ORDER_VERBS[v][2] for v in verbs])
    run = np.where(direction[:, None] > 0, lo[:, None] + (hi - lo)[:, None] * s, hi[:, None] - (hi - lo)[:, None] * s)
    cx, cy = rng.uniform(0.3, 0.7, size=(2, n))  # the position on the axes the verb does not move along
    x = np.where(axis[:, None] == 0, run, cx[:, None])  # (n, F)
    y = np.where(axis[:, None] == 1, run, cy[:, None])
    r = np.where(axis[:, None] == 2, 0.05 + 0.25 * run, 0.12)
    blob = np.exp(-((xx - x[..., None, None]) ** 2 + (yy - y[..., None, None]) ** 2) / (2 * r[..., None, None] ** 2))
    img = blob[..., None] * colours[nouns][:, None, None, None]  # (n, F, P, P, C)
    # the distractor: another object, small and still, in a random corner
    other = (nouns + rng.integers(1, len(colours), size=n)) % len(colours)
    dx, dy = rng.choice([0.1, 0.9], size=(2, n))
    still = np.exp(-((xx - dx[:, None, None]) ** 2 + (yy - dy[:, None, None]) ** 2) / (2 * 0.07**2))  # (n, P, P)
    img = img + 0.5 * still[:, None, ..., None] * colours[other][:, None, None, None]
    return img.reshape(n, frames, -1)


def make_order_cache(
    path: str | os.PathLike,
    n: int = 240,
    frames: int = 8,
    dim: int = 64,
    text_dim: int = 24,
    seed: int = 0,
    structure_seed: int = 4321,
    noise: float = 0.3,
    reversed_pairs: bool = False,
    participants: tuple[str, ...] = ("P01", "P02", "P03", "P04"),
) -> Path:
    """A cache whose verbs are defined only by the direction and order of motion, written at `path`.

    Each clip shows one object (the noun: its colour) moving along one axis (x, y or size) in one direction, from a
    random start over a random distance, beside a small still distractor object. The six verbs are three
    reversed-time pairs (`ORDER_VERBS`, `reversed_verb`): the set of frames of a clip is as likely under its verb as
    under the mirror verb, so the mean frame feature cannot tell a pair apart and the verb is decided by the order
    of the frames only. Frames are rendered as (P, P, C) blob images (a luminance channel and one colour channel
    per noun) and mapped to `dim` features by a fixed random
    projection and a tanh (a stand-in for a frozen random encoder; the structure seed fixes colours, projection and
    text space, so caches with one structure seed and different seeds are a train/val pair), plus Gaussian feature
    noise of scale `noise`. `reversed_pairs=True` writes rows in pairs: row 2i+1 is row 2i played backwards with
    the mirror verb (the same rendered frames in the opposite order; the feature noise is drawn per row, so with
    `noise=0` the pair's features are exactly reversed) — a model that does not read the order gives both clips of
    a pair (nearly) the same scores, so it gets both right (almost) never and scores about 50 % verb top-1 at best.
    Features only, no decoding or encoding: 240 clips take well under a second.
    """
    path = Path(path)
    srng = np.random.default_rng([structure_seed, 7])
    rng = np.random.default_rng(seed)
    # a luminance channel every object shares (where it is) and one colour channel per object (what it is)
    colours = np.concatenate([np.ones((len(ORDER_NOUNS), 1)), 0.5 * np.eye(len(ORDER_NOUNS))], axis=1)  # (Nn, C)
    proj = srng.normal(size=(ORDER_PIXELS * ORDER_PIXELS * colours.shape[1], dim)) / ORDER_PIXELS  # (P*P*C, D)
    bias = srng.normal(scale=0.5, size=dim)
    text = _planted_text(srng, structure_seed, len(ORDER_VERBS), len(ORDER_NOUNS), text_dim)
    base = (n + 1) // 2 if reversed_pairs else n
    verbs = rng.integers(len(ORDER_VERBS), size=base)
    nouns = rng.integers(len(ORDER_NOUNS), size=base)
    pixels = _order_frames(rng, verbs, nouns, colours, frames)  # (base, F, P*P*C)
    if reversed_pairs:
        pixels = np.stack([pixels, pixels[:, ::-1]], axis=1).reshape(-1, *pixels.shape[1:])[:n]
        verbs = np.stack([verbs, reversed_verb(verbs)], axis=1).reshape(-1)[:n]
        nouns = np.repeat(nouns, 2)[:n]
    feats = np.tanh(pixels @ proj + bias)
    feats = feats + noise * rng.normal(size=feats.shape)  # (n, F, D)
    attrs = (len(ORDER_NOUNS), structure_seed, seed, n, dim, text_dim, frames, True, False)
    keys = ([v[0] for v in ORDER_VERBS], list(ORDER_NOUNS))
    _write_planted(path, feats, None, verbs, nouns, rng, text, attrs, True, False, participants, keys=keys,
                   source="mambavl.cache.synthetic.make_order_cache")
    return path


def make_planted_views(source: str | os.PathLike, path: str | os.PathLike, temporal: int = 2, spatial: int = 3,
                       signal_views: tuple[int, ...] = (2,), noise: float = 0.5, seed: int = 0) -> Path:
    """A multi-view copy (T x S views, `mambavl.extract.views`) of the planted cache `source` at `path`: the views in
    `signal_views` hold `source`'s features plus fresh noise of scale `noise`, every other view noise only, as if
    the action were visible in those crops / clips alone. Rows, labels, questions and answers are `source`'s."""
    path, rng = Path(path), np.random.default_rng(seed)
    with schema.open_h5(source, "r") as src:
        attrs = schema.read_attrs(src.attrs)
        feats = src["features"][()].astype(np.float32)  # (n, F, D)
        times, valid = src["frame_times"][()], src["valid"][()]
        text = lambda name: [s.decode() if isinstance(s, bytes) else str(s) for s in src[name][()]]  # noqa: E731
        rows = RowMeta(narration_id=text("narration_id"), video_id=text("video_id"),
                       participant_id=text("participant_id"), narration=text("narration"),
                       verb_class=src["verb_class"][()], noun_class=src["noun_class"][()],
                       all_noun_classes=[tuple(a) for a in src[schema.ALL_NOUNS][()]],
                       start_time=src["start_time"][()], stop_time=src["stop_time"][()])
        verb_keys, noun_keys = text("classes/verb"), text("classes/noun")

        def tables(w: CacheWriter) -> None:
            for group in (schema.QUESTIONS, schema.ANSWERS):
                src.copy(src[group], w.f, name=group)

        views = temporal * spatial
        attrs.update(temporal_views=temporal, spatial_crops=spatial, anticipation=False,
                     view_definition=f"planted: views {list(signal_views)} carry the signal, the others noise only",
                     source="mambavl.cache.synthetic.make_planted_views")
        for key in ("schema_version", "package_version", "created", "complete"):
            attrs.pop(key, None)
        path.unlink(missing_ok=True)
        with CacheWriter(path, attrs, rows, verb_keys, noun_keys, on_create=tables) as w:
            for i in np.flatnonzero(valid):
                x = noise * rng.normal(size=(views, *feats.shape[1:]))  # (V, F, D)
                x[list(signal_views)] += feats[i]
                w.write_row(int(i), x, np.broadcast_to(times[i], (views, times.shape[1])))
            w.finalize()
    return path
