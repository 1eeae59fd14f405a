"""Metrics on hand-made cases with known answers, and on the real EK-100 validation labels and subset files."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from mambavl import metrics as M

# ----------------------------------------------------------------------------------------------------------------
# top-k accuracy


def test_topk_accuracy_official_cases():
    # The cases of the official tests/test_metrics.py, written as scores (the rank lists become descending scores).
    # Official (1-based): ranks [[1,2,3],[2,3,1],[3,1,2],[1,2,3]], labels [1,3,2,1]; here 0-based.
    ranks = np.array([[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]])
    scores = np.zeros((4, 3))
    for i, row in enumerate(ranks):
        scores[i, row] = [3.0, 2.0, 1.0]
    labels = np.array([0, 2, 1, 0])
    acc = M.topk_accuracy(scores, labels, ks=(1, 2, 3, 5))
    assert acc == {1: 0.5, 2: 0.75, 3: 1.0, 5: 1.0}


def test_topk_ties_rank_higher_class_first():
    # the project's tie rule: among equal scores the higher class index first (a stable sort, reversed)
    assert M.topk_accuracy(np.array([[1.0, 1.0, 0.0]]), np.array([1]), ks=(1,)) == {1: 1.0}
    scores = np.array([[0.3, 0.3, 0.3, 0.1], [0.0, 0.5, 0.5, 0.5]])
    assert M.rank_classes(scores).tolist() == [[2, 1, 0, 3], [3, 2, 1, 0]]
    assert M.rank_classes(scores).tolist() == np.argsort(scores, kind="stable")[:, ::-1].tolist()
    assert M.topk_accuracy(scores, np.array([0, 1]), ks=(1,)) == {1: 0.0}
    assert M.topk_accuracy(scores, np.array([1, 3]), ks=(1, 2, 3)) == {1: 0.5, 2: 1.0, 3: 1.0}


def test_action_ties_follow_the_official_order():
    # three logit levels per task: many exactly tied verb and noun scores. The levels' differences differ between
    # verbs and nouns, so equal pair scores come only from those ties (not from rounding of equal sums).
    rng = np.random.default_rng(3)
    verb = np.array([0.0, 1.3, 2.9])[rng.integers(0, 3, size=(200, 12))]
    noun = np.array([0.0, 0.4, 5.1])[rng.integers(0, 3, size=(200, 150))]
    pairs, _ = M.action_scores_from_verb_noun(verb, noun)
    official = _official_action_pairs(verb, noun, kind="stable")
    np.testing.assert_array_equal(pairs, official)
    vl, nl = rng.integers(0, 12, 200), rng.integers(0, 150, 200)
    assert M.action_topk_accuracy(pairs, vl, nl) == M.action_topk_accuracy(official, vl, nl)


def test_topk_k_larger_than_classes_and_bad_labels():
    scores = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert M.topk_accuracy(scores, np.array([0, 1]), ks=(1, 5)) == {1: 0.0, 5: 1.0}
    # A label outside the class range is never a hit.
    assert M.topk_accuracy(scores, np.array([0, 7]), ks=(5,)) == {5: 0.5}


def test_topk_nan_scores_never_rank_first():
    scores = np.array([[np.nan, 0.1, 0.2]])
    assert M.rank_classes(scores).tolist() == [[2, 1, 0]]


def test_empty_inputs_give_nan():
    acc = M.topk_accuracy(np.zeros((0, 3)), np.zeros(0, int), ks=(1, 5))
    assert math.isnan(acc[1]) and math.isnan(acc[5])
    assert math.isnan(M.class_mean_topk_recall(np.zeros((0, 3)), np.zeros(0, int)))
    pairs, sc = M.action_scores_from_verb_noun(np.zeros((0, 3)), np.zeros((0, 4)))
    assert pairs.shape == (0, 12, 2) and sc.shape == (0, 12)
    assert math.isnan(M.action_topk_accuracy(pairs, [], [], ks=(1,))[1])


def test_shape_errors():
    with pytest.raises(ValueError, match="rows"):
        M.topk_accuracy(np.zeros((3, 2)), np.zeros(2, int))
    with pytest.raises(ValueError, match="2-d"):
        M.topk_accuracy(np.zeros(3), np.zeros(3, int))


# ----------------------------------------------------------------------------------------------------------------
# action scores


def _official_action_pairs(verb, noun, top_n=100, kind="quicksort"):
    """Transliteration of C1 utils/scoring.py:compute_action_scores (batch-wide softmax, reversed argsort); kind
    "stable" makes numpy's tie order (class order, reversed) deterministic."""

    def top_scores(s):
        idx = np.argsort(s, kind=kind)[:, ::-1][:, :top_n]
        return idx, s[np.arange(len(s))[:, None], idx]

    def softmax_all(x):  # scipy.special.softmax(x) with axis=None normalises over the whole array
        e = np.exp(x - x.max())
        return e / e.sum()

    tv, tvs = top_scores(verb)
    tn, tns = top_scores(noun)
    mat = softmax_all(tvs)[:, :, None] * softmax_all(tns)[:, None, :]
    n = len(mat)
    ranks = mat.reshape(n, -1).argsort(axis=-1, kind=kind)[:, ::-1]
    vi, ni = np.unravel_index(ranks[:, :top_n], mat.shape[1:])
    seg = np.arange(n)[:, None]
    return np.stack([tv[seg, vi], tn[seg, ni]], axis=-1)


def test_action_scores_hand_case():
    # p(verb) = softmax([log 3, log 1]) = [.75, .25]; p(noun) = [.5, .3, .2] -> products ranked by hand.
    verb = np.log(np.array([[3.0, 1.0]]))
    noun = np.log(np.array([[5.0, 3.0, 2.0]]))
    pairs, scores = M.action_scores_from_verb_noun(verb, noun, top=4)
    assert pairs[0].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0]]
    np.testing.assert_allclose(scores[0], [0.375, 0.225, 0.15, 0.125])
    # top larger than V * Nn keeps every pair.
    pairs, scores = M.action_scores_from_verb_noun(verb, noun, top=100)
    assert pairs.shape == (1, 6, 2)
    np.testing.assert_allclose(scores.sum(), 1.0)


def test_action_scores_ties_break_on_class_ids():
    verb = np.zeros((1, 2))
    noun = np.zeros((1, 2))
    pairs, scores = M.action_scores_from_verb_noun(verb, noun, top=4)
    assert pairs[0].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    np.testing.assert_allclose(scores[0], 0.25)


def test_action_scores_match_official_ranking_at_ek100_sizes():
    rng = np.random.default_rng(0)
    verb = rng.normal(size=(64, 97)) * 3
    noun = rng.normal(size=(64, 300)) * 3
    pairs, scores = M.action_scores_from_verb_noun(verb, noun)
    assert pairs.shape == (64, 100, 2)
    np.testing.assert_array_equal(pairs, _official_action_pairs(verb, noun))
    assert (np.diff(scores, axis=1) <= 0).all()
    # Brute force over all 97 x 300 pairs with full softmaxes ranks the same top 100.
    pv = np.exp(verb - verb.max(1, keepdims=True))
    pv /= pv.sum(1, keepdims=True)
    pn = np.exp(noun - noun.max(1, keepdims=True))
    pn /= pn.sum(1, keepdims=True)
    full = (pv[:, :, None] * pn[:, None, :]).reshape(64, -1)
    best = np.argsort(-full, axis=1)[:, :100]
    np.testing.assert_array_equal(pairs[..., 0], best // 300)
    np.testing.assert_array_equal(pairs[..., 1], best % 300)


def test_action_accuracy_outside_top_pairs_is_a_miss():
    verb = np.array([[5.0, 0.0, -5.0]])
    noun = np.array([[5.0, 0.0, -5.0]])
    pairs, _ = M.action_scores_from_verb_noun(verb, noun, top=3)  # (0,0), then (0,1)/(1,0)
    assert M.action_topk_accuracy(pairs, [0], [0], ks=(1,)) == {1: 1.0}
    assert M.action_topk_accuracy(pairs, [2], [2], ks=(1, 5, 100)) == {1: 0.0, 5: 0.0, 100: 0.0}
    assert M.action_ids(np.array([0, 1, 96]), np.array([0, 1, 299])).tolist() == [0, 1001, 96299]


# ----------------------------------------------------------------------------------------------------------------
# class-mean recall, per-class accuracy, frequency buckets


def test_class_mean_recall_hand_case():
    # Class 0: 3 segments, 1 hit (recall 1/3); class 1: 1 segment, hit (recall 1). Mean = 2/3, accuracy = 1/2.
    scores = np.array([[0.9, 0.1], [0.1, 0.9], [0.2, 0.8], [0.1, 0.9]])
    labels = np.array([0, 0, 0, 1])
    assert M.class_mean_topk_recall(scores, labels, k=1) == pytest.approx(2 / 3)
    assert M.topk_accuracy(scores, labels, ks=(1,))[1] == pytest.approx(0.5)
    # classes= restricts to the listed classes that are present (RULSTM many-shot handling); absent ones ignored.
    assert M.class_mean_topk_recall(scores, labels, k=1, classes=[1, 5]) == pytest.approx(1.0)
    assert math.isnan(M.class_mean_topk_recall(scores, labels, k=1, classes=[5]))
    assert M.class_mean_topk_recall(scores, labels, k=5) == 1.0


def test_per_class_accuracy():
    scores = np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.2, 0.8, 0.0], [0.1, 0.9, 0.0]])
    labels = np.array([0, 0, 0, 1])
    pc = M.per_class_accuracy(scores, labels, ks=(1, 2))
    assert pc["support"].tolist() == [3, 1, 0]
    np.testing.assert_allclose(pc["top1"][:2], [1 / 3, 1.0])
    np.testing.assert_allclose(pc["top2"][:2], [1.0, 1.0])
    assert math.isnan(pc["top1"][2])


def test_confusion_matrix():
    cm = M.confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 0, 1, 5]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]


def test_frequency_buckets_and_bucket_accuracy():
    counts = np.array([5, 50, 30, 10, 5, 0])
    b = M.frequency_buckets(counts)
    # Order by count: 1 (share before 0) head, 2 (0.5) mid, 3 (0.8) tail, 0 and 4 tail, 5 unseen -> tail.
    assert b.tolist() == ["tail", "head", "mid", "tail", "tail", "tail"]
    scores = np.eye(6)[[1, 1, 2, 3, 0]]
    labels = np.array([1, 0, 2, 3, 4])
    out = M.bucket_accuracy(scores, labels, b, ks=(1,))
    assert out["head"] == {"classes": 1, "n": 1, "top1": 1.0}
    assert out["mid"] == {"classes": 1, "n": 1, "top1": 1.0}
    assert out["tail"]["n"] == 3 and out["tail"]["top1"] == pytest.approx(1 / 3)
    assert M.frequency_buckets(np.zeros(3)).tolist() == ["tail"] * 3


# ----------------------------------------------------------------------------------------------------------------
# the EK-100 recognition metric dict on a hand-made split


def test_recognition_subsets_hand_case():
    verb_labels = np.array([0, 1, 2, 2])
    noun_labels = np.array([0, 1, 0, 2])
    participants = ["P01", "P02", "P02", "P03"]
    # Right verb everywhere; right noun on rows 0 and 2.
    verb = np.eye(3)[verb_labels] * 10
    noun = np.eye(3)[[0, 2, 0, 0]] * 10
    m = M.ek100_recognition_metrics(verb, noun, verb_labels, noun_labels, participants, {"P02"}, {2}, {1})
    assert m["all"]["verb"] == {"n": 4, "top1": 1.0, "top5": 1.0}
    assert m["all"]["noun"]["top1"] == 0.5
    assert m["all"]["action"]["top1"] == 0.5
    assert m["unseen"]["noun"] == {"n": 2, "top1": 0.5, "top5": 1.0}
    # tail verb rows: verb 2 -> rows 2, 3; tail noun rows: noun 1 -> row 1; tail action = union -> rows 1, 2, 3.
    assert m["tail"]["verb"]["n"] == 2
    assert m["tail"]["noun"] == {"n": 1, "top1": 0.0, "top5": 1.0}
    assert m["tail"]["action"]["n"] == 3 and m["tail"]["action"]["top1"] == pytest.approx(1 / 3)
    flat = M.official_recognition_keys(m)
    assert flat["all_action_accuracy_at_1"] == 50.0
    assert set(flat) == {
        "all_verb_accuracy_at_1", "all_verb_accuracy_at_5", "all_noun_accuracy_at_1", "all_noun_accuracy_at_5",
        "all_action_accuracy_at_1", "all_action_accuracy_at_5", "unseen_verb_accuracy_at_1",
        "unseen_noun_accuracy_at_1", "unseen_action_accuracy_at_1", "tail_verb_accuracy_at_1",
        "tail_noun_accuracy_at_1", "tail_action_accuracy_at_1",
    }  # fmt: skip


def test_no_unseen_segment_omits_subset_with_warning_and_no_nouns():
    verb = np.eye(2) * 3
    with pytest.warns(UserWarning, match="no unseen"):
        m = M.ek100_recognition_metrics(verb, None, np.array([0, 1]), None, ["P01", "P01"], {"P99"})
    assert set(m) == {"all"} and set(m["all"]) == {"verb"}


def test_anticipation_metrics_hand_case():
    verb_labels = np.array([0, 0, 0, 1])
    noun_labels = np.array([0, 0, 0, 0])
    verb = np.array([[9.0, 0.0], [0.0, 9.0], [0.0, 9.0], [0.0, 9.0]])
    noun = np.tile([9.0, 0.0], (4, 1))
    m = M.ek100_anticipation_metrics(verb, noun, verb_labels, noun_labels, k=1)
    assert m["all"]["verb"] == {"n": 4, "classes": 2, "recall@1": pytest.approx(2 / 3)}
    assert m["all"]["noun"]["recall@1"] == 1.0
    # Actions (0,0) recall 1/3 and (1,0) recall 1.
    assert m["all"]["action"] == {"n": 4, "classes": 2, "recall@1": pytest.approx(2 / 3)}


# ----------------------------------------------------------------------------------------------------------------
# real EK-100 validation labels and subset files (counted independently with the csv module)


def _read_ek100(ek100_dir: Path):
    with open(ek100_dir / "EPIC_100_validation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    verb = np.array([int(r["verb_class"]) for r in rows])
    noun = np.array([int(r["noun_class"]) for r in rows])
    part = [r["participant_id"] for r in rows]

    def column(name, key, cast):
        with open(ek100_dir / name, newline="") as f:
            return {cast(r[key]) for r in csv.DictReader(f)}

    unseen = column("EPIC_100_unseen_participant_ids_validation.csv", "participant_id", str)
    tail_v = column("EPIC_100_tail_verbs.csv", "verb", int)
    tail_n = column("EPIC_100_tail_nouns.csv", "noun", int)
    return verb, noun, part, unseen, tail_v, tail_n


@pytest.fixture(scope="module")
def ek100_val(ek100_dir):
    return _read_ek100(ek100_dir)


def test_real_subset_sizes(ek100_val):
    verb, noun, part, unseen, tail_v, tail_n = ek100_val
    assert unseen == {"P18", "P32"}
    n_unseen = sum(p in ("P18", "P32") for p in part)
    n_tail_v = sum(int(v) in tail_v for v in verb)
    n_tail_n = sum(int(n) in tail_n for n in noun)
    n_tail_a = sum(int(v) in tail_v or int(n) in tail_n for v, n in zip(verb, noun))
    # Constant scores: cheap, and every subset's size is still reported.
    m = M.ek100_recognition_metrics(np.zeros((len(verb), 97)), np.zeros((len(verb), 300)), verb, noun, part,
                                    unseen, tail_v, tail_n)
    assert m["all"]["verb"]["n"] == len(verb) == 9668
    assert m["unseen"]["verb"]["n"] == m["unseen"]["action"]["n"] == n_unseen == 1065
    assert m["tail"]["verb"]["n"] == n_tail_v
    assert m["tail"]["noun"]["n"] == n_tail_n
    assert m["tail"]["action"]["n"] == n_tail_a
    assert n_tail_v + n_tail_n > n_tail_a > max(n_tail_v, n_tail_n)  # a union, not either alone


def test_real_perfect_scores_give_one_everywhere(ek100_val):
    verb, noun, part, unseen, tail_v, tail_n = ek100_val
    vs = np.eye(97, dtype=np.float32)[verb] * 20
    ns = np.eye(300, dtype=np.float32)[noun] * 20
    m = M.ek100_recognition_metrics(vs, ns, verb, noun, part, unseen, tail_v, tail_n)
    assert set(m) == {"all", "unseen", "tail"}
    for subset in m.values():
        for task in subset.values():
            assert task["top1"] == 1.0 and task["top5"] == 1.0
    a = M.ek100_anticipation_metrics(vs, ns, verb, noun, part, unseen, tail_v, tail_n)
    assert all(t["recall@5"] == 1.0 for s in a.values() for t in s.values())


def test_real_constant_scores_predict_the_last_class(ek100_val):
    verb, noun, part, unseen, tail_v, tail_n = ek100_val
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no spurious warnings on the real split
        m = M.ek100_recognition_metrics(np.ones((len(verb), 97)), np.ones((len(verb), 300)), verb, noun, part,
                                        unseen, tail_v, tail_n)
    # Ties rank the highest class first (official): top-1 = frequency of class 96; top-5 = of classes 92..96.
    assert m["all"]["verb"]["top1"] == pytest.approx(np.mean(verb == 96))
    assert m["all"]["verb"]["top5"] == pytest.approx(np.mean(verb >= 92))
    assert m["all"]["noun"]["top1"] == pytest.approx(np.mean(noun == 299))
    # actions: the official top lists keep verbs 96..0 and nouns 299..200; all products tie, and the reversed
    # argsort of the flattened matrix puts the last positions first: verb 0 with noun 200
    assert m["all"]["action"]["top1"] == pytest.approx(np.mean((verb == 0) & (noun == 200)))
    un = np.isin(part, ["P18", "P32"])
    assert m["unseen"]["verb"]["top1"] == pytest.approx(np.mean(verb[un] == 96))
    tv = np.isin(verb, list(tail_v))
    assert m["tail"]["verb"]["top1"] == pytest.approx(np.mean(verb[tv] == 96))


def test_tie_rule_is_stated_as_the_projects_without_claiming_the_official_order():
    doc = M.__doc__
    assert "keeps equal scores in class order" not in doc and "keeps equal scores" not in M.rank_classes.__doc__
    assert "Ties (this project's rule)" in doc and "higher class index ranks first" in doc
    assert "numpy version" in doc  # why the official script has no defined tie order


def test_rulstm_frame_offset_is_documented_with_its_size():
    from pathlib import Path

    from mambavl.cache import importer
    from mambavl.data.annotations import frame_window

    # the window's first key is the frame displayed at the start time: one key after floor(start * 30)
    assert frame_window(1.02, 2.0, 30.0)[0] == int(1.02 * 30) + 1
    text = (Path(__file__).resolve().parents[1] / "docs" / "extract.md").read_text()
    assert "one frame (33 ms) later" in text and "9,639 of the 9,668" in text
    assert "33 ms" in importer.__doc__


def _pairs_bruteforce(verb, noun, vocab, k):
    """Independent reference: p(verb) * p(noun) for each vocabulary pair, best first (ties: later entry first)."""
    pv = np.exp(verb - verb.max(1, keepdims=True))
    pv /= pv.sum(1, keepdims=True)
    pn = np.exp(noun - noun.max(1, keepdims=True))
    pn /= pn.sum(1, keepdims=True)
    out = []
    for r in range(len(verb)):
        s = [(pv[r, v] * pn[r, n], i) for i, (v, n) in enumerate(vocab)]
        out.append([vocab[i] for _, i in sorted(s, reverse=True)[:k]])
    return np.asarray(out)


def test_anticipation_action_recall_over_training_actions_and_all_pairs():
    # planted: 5 verbs x 5 nouns; training saw only 5 pairs. Every segment's labelled pair is a training action that
    # is built from its row's second-worst verb and noun: weak among all 25 pairs, yet one of the 5 training actions.
    rng = np.random.default_rng(0)
    vocab = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]
    n = 40
    verb = rng.normal(size=(n, 5))
    noun = rng.normal(size=(n, 5))
    vl = rng.integers(0, 5, n)
    nl = vl.copy()
    for r in range(n):  # make the labelled pair weak: the second-worst verb and noun of the row
        verb[r, vl[r]] = np.sort(verb[r])[1] - 1e-3
        noun[r, nl[r]] = np.sort(noun[r])[1] - 1e-3
    ranked = M.action_pairs_in_vocabulary(verb, noun, np.asarray(vocab), k=5)
    np.testing.assert_array_equal(ranked, _pairs_bruteforce(verb, noun, vocab, 5))
    m = M.ek100_anticipation_metrics(verb, noun, vl, nl, training_actions=vocab)["all"]
    assert m["action"]["vocabulary"] == "training actions" and m["action"]["vocabulary_size"] == 5
    assert m["action_all_pairs"]["vocabulary"] == "all pairs" and m["action_all_pairs"]["vocabulary_size"] == 25
    assert m["action"]["recall@5"] == 1.0  # 5 training actions: a labelled one is always in the top 5 ...
    assert m["action_all_pairs"]["recall@5"] < 0.5  # ... but rarely among the top 5 of 25 pairs
    # without a vocabulary the headline is the all-pairs number, as before
    plain = M.ek100_anticipation_metrics(verb, noun, vl, nl)["all"]
    assert plain["action"]["recall@5"] == m["action_all_pairs"]["recall@5"] and "action_all_pairs" not in plain
    assert "vocabulary" not in plain["action"]
    # a labelled action never seen in training is a miss among the training actions, and its class counts
    vl2, nl2 = vl.copy(), nl.copy()
    vl2[0], nl2[0] = 4, 0
    m2 = M.ek100_anticipation_metrics(verb, noun, vl2, nl2, training_actions=vocab)["all"]["action"]
    assert m2["classes"] == len(np.unique(vl2 * 6 + nl2)) and m2["recall@5"] < 1.0


def test_chance_levels_are_k_over_classes():
    levels = M.chance_levels({"verb": 6, "noun": 300, "action": 6 * 300, "tiny": 3, "none": 0}, ks=(1, 5))
    assert levels["verb"] == {"classes": 6, "top1": 16.6667, "top5": 83.3333}
    assert levels["noun"]["top5"] == pytest.approx(500 / 300, abs=1e-4)
    assert levels["tiny"]["top5"] == 100.0  # k >= C: every class is in the top k
    assert "none" not in levels
