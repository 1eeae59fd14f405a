"""The QA objective: targets from the annotations, a scene loss that the negatives do not swamp, QA metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mambavl import metrics as M
from mambavl.cache.reader import open_cache
from mambavl.cache.synthetic import make_planted_cache
from mambavl.fuse import qa
from mambavl.fuse.model import create_model


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return open_cache(make_planted_cache(tmp_path_factory.mktemp("qa") / "c.h5", n=40, seed=0))


def test_answer_targets_are_the_segment_labels(planted):
    lab = planted.labels()
    verb = torch.as_tensor(np.asarray(lab["verb_class"], np.int64))
    noun = torch.as_tensor(np.asarray(lab["noun_class"], np.int64))
    for kind in ("verb", "next_verb"):
        assert torch.equal(qa.answer_targets(kind, verb, noun), verb)
    for kind in ("noun", "next_noun"):
        assert torch.equal(qa.answer_targets(kind, verb, noun), noun)
    with pytest.raises(ValueError, match="scene"):
        qa.answer_targets("scene", verb, noun)
    with pytest.raises(ValueError, match="action"):
        qa.answer_targets("action", verb, noun)
    # The answer table row of a target is that class's text: verb i answers with the i-th verb answer.
    answers = planted.answers()
    assert answers.verb.shape[0] == len(planted.verb_keys) and answers.noun.shape[0] == len(planted.noun_keys)


def test_action_targets_and_answers_follow_the_action_vocabulary(planted):
    """The action question is answered by the segment's (verb, noun) pair: its index in the run's action vocabulary,
    whose answer embeddings are the cache's action answers of those pairs, in that order."""
    from mambavl.runtime import action_answers, action_vocab, load_labels

    rows = np.arange(planted.n)
    pairs = action_vocab(planted, rows)
    labels = load_labels(planted, {p: i for i, p in enumerate(pairs)})
    target = qa.answer_targets("action", labels.verb, labels.noun, labels.action)
    for r in (0, 7, 19):
        assert pairs[int(target[r])] == (int(labels.verb[r]), int(labels.noun[r]))
    emb = action_answers(planted, pairs)  # (A, Dt)
    answers = planted.answers()
    cache_row = {tuple(p): i for i, p in enumerate(answers.action_pairs.tolist())}
    for i in (0, len(pairs) - 1):
        assert np.array_equal(emb[i].numpy(), answers.action[cache_row[pairs[i]]])
    # a vocabulary pair the cache has no answer for: the action question cannot be asked
    assert action_answers(planted, [*pairs, (99, 99)]) is None


def test_scene_targets_are_all_noun_classes(planted):
    lab = planted.labels()
    multi = qa.scene_targets(lab["all_noun_classes"], len(planted.noun_keys)).numpy()
    assert multi.shape == (planted.n, len(planted.noun_keys))
    for row, ids in zip(multi, lab["all_noun_classes"]):
        assert set(np.flatnonzero(row)) == {int(i) for i in ids}
    # the segment's own noun is always among them (EK-100: all_noun_classes includes noun_class)
    assert multi[np.arange(planted.n), np.asarray(lab["noun_class"])].all()
    # ids outside the vocabulary (-1, too large) are ignored
    assert qa.scene_targets([[0, -1, 7]], 3).tolist() == [[1.0, 0.0, 0.0]]


def test_scene_loss_is_not_swamped_by_negatives():
    torch.manual_seed(0)
    # CLIP's text width: random answers are near-orthogonal, as real answer embeddings are to an untrained query
    model, _ = create_model("small", video_dim=8, text_dim=512, num_verbs=4, num_nouns=300, d_model=16, n_layers=1)
    target = torch.zeros(32, 300)
    target[torch.arange(32), torch.randint(300, (32,))] = 1.0
    with torch.no_grad():
        emb = model.qa_embed(torch.randn(32, 16))  # (B, Dt)
        answers = torch.randn(300, 512)
        p = model.scene_logits(emb, answers).sigmoid()
        # The bias starts at the prior: an average negative is near 1/300, not at 0.5 as with plain scaled cosine.
        assert float(p.mean()) < 0.02 and float(model.qa_logits(emb, answers).sigmoid().mean()) > 0.3
    assert float(model.scene_bias.detach()) == pytest.approx(math.log((1 / 300) / (1 - 1 / 300)))
    # Normalised by positives: the positives' gradient is a sizeable share of the whole (a plain mean BCE over all
    # 300 classes gives the 32 positives about 1/300 of the weight each entry has at init).
    logits = torch.zeros(32, 300, requires_grad=True)
    qa.multilabel_loss(logits + model.scene_bias.detach(), target).backward()
    g = logits.grad.abs()
    share = float(g[target > 0].sum() / g.sum())
    assert share > 0.3
    logits.grad = None
    torch.nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
    g = logits.grad.abs()
    assert float(g[target > 0].sum() / g.sum()) < 0.01  # what the old loss did
    assert qa.qa_loss("scene", torch.zeros(2, 3), torch.tensor([[1.0, 0, 0], [0, 0, 1]])) == pytest.approx(
        3 * math.log(2.0))
    assert float(qa.qa_loss("verb", torch.zeros(2, 4), torch.tensor([-1, -1]))) == 0.0


def test_mean_average_precision_hand_made():
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.4], [0.1, 0.2, 0.3]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    # class 0 ranks rows 0 (hit), 1, 2 (hit): AP = (1/1 + 2/3) / 2; class 1: row 1 first: AP = 1; class 2 has no
    # positive and is left out.
    res = M.mean_average_precision(scores, targets)
    assert res["classes"] == 2 and res["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert math.isnan(M.mean_average_precision(scores, np.zeros_like(targets))["mAP"])
    with pytest.raises(ValueError):
        M.mean_average_precision(scores, targets[:, :2])


def test_recall_at_k_matches_topk_accuracy():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 9))
    labels = rng.integers(0, 9, 50)
    cand = M.rank_classes(scores, 3)
    assert M.recall_at_k(cand, labels) == pytest.approx(M.topk_accuracy(scores, labels, (3,))[3])
    labels[:10] = -1  # unlabelled rows are left out
    assert M.recall_at_k(cand, labels) == pytest.approx(M.topk_accuracy(scores[10:], labels[10:], (3,))[3])
    assert math.isnan(M.recall_at_k(cand[:0], labels[:0]))


def test_qa_loss_falls_and_answers_far_above_chance(tmp_path):
    """On a planted cache the QA head learns to answer: its loss falls over training and, on held-out segments,
    verb / noun / action answer top-1 is far above chance (1/6, 1/5, 1/A) and scene mAP far above an untrained
    model's."""
    from mambavl.evaluate import qa_metrics
    from mambavl.cache.dataset import SegmentDataset
    from mambavl.runtime import Asker, TrainedModel, clip_batches, qa_logits, task_spec
    from mambavl.train import TrainConfig, train

    def qa_scores(model, cache, action_answers=None):  # every valid recognition row, batches of 64, 4 frames
        rows = np.asarray(cache.valid_indices("recognition"), dtype=np.int64)
        clips = clip_batches(SegmentDataset(cache, window="recognition", indices=rows), 64, 4, torch.device("cpu"))
        return qa_logits(model, clips, Asker.of_cache(cache, task_spec("recognition"), action_answers=action_answers))

    train_cache = make_planted_cache(tmp_path / "train.h5", n=96, seed=0)
    val = open_cache(make_planted_cache(tmp_path / "val.h5", n=48, seed=1))
    cfg = TrainConfig(train_cache=str(train_cache), val_cache=None, out_dir=str(tmp_path / "run"),
                      model_overrides={"d_model": 16, "n_layers": 1, "scan_impl": "chunked"}, epochs=6,
                      batch_size=16, lr=1e-2, warmup_epochs=0, frames=4, qa_every=1, device="cpu", min_steps=0)
    untrained, _ = create_model("small", video_dim=32, text_dim=24, num_verbs=6, num_nouns=5, num_actions=0,
                                **cfg.model_overrides)
    before = qa_metrics(qa_scores(untrained, val), val.labels(), (1, 5))
    result = train(cfg)
    losses = [row["train_loss_qa"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0]
    run = TrainedModel.load(result.last_checkpoint)
    pairs = run.vocab.action_pairs
    assert run.action_answers.shape == (len(pairs), 24)
    after = qa_metrics(qa_scores(result.model, val, run.action_answers),
                       val.labels(), (1, 5), pairs)
    assert after["verb"]["top1"] > 45 and after["noun"]["top1"] > 45  # chance: 16.7 and 20
    assert after["action"]["top1"] > 3 * 100 / len(pairs)  # chance: 1 / A
    assert after["action"]["n"] + after["action"]["unseen_pairs"] == 48
    assert after["scene"]["mAP"] > before["scene"]["mAP"] + 15
    assert after["verb"]["n"] == after["scene"]["n"] == 48
