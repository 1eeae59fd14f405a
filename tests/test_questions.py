"""Question protocols on the real EK-100 vocabulary: templates carry no label, annotation questions leak."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mambavl.data.annotations import Segment, load_annotations
from mambavl.errors import InputError
from mambavl.extract.questions import (
    TEMPLATES, annotation_questions, answer_texts, build_question_table, contains_answer, leak_rate,
    load_question_file, mask_words, phrase, question_file_lookup, refuse_label_keyed,
)


@pytest.fixture(scope="module")
def val(ek100_dir):
    return load_annotations(ek100_dir / "EPIC_100_validation.csv")


def _forms(vocab, c, written):
    return [vocab.keys[c], *vocab.instances[c], written]


def test_templates_carry_no_label_word(val):
    for phrases in TEMPLATES.values():
        for text in phrases:
            for vocab in (val.verbs, val.nouns):
                for key, inst in zip(vocab.keys, vocab.instances):
                    assert not contains_answer(text, [key, *inst]), (text, key)


def test_annotation_protocol_masks_the_other_label_and_leaks_its_own(val):
    segs = val.segments
    vqs, nqs = zip(*(annotation_questions(s, val.verbs, val.nouns) for s in segs))
    verb_forms = [_forms(val.verbs, s.verb_class, s.verb) for s in segs]
    noun_forms = [_forms(val.nouns, s.noun_class, s.noun) for s in segs]
    # masking: the verb question never names the noun, the noun question never names the verb
    assert leak_rate(vqs, noun_forms) <= 0.01 and leak_rate(nqs, verb_forms) <= 0.01
    # ... and each still carries its own answer: the protocol's leak
    assert leak_rate(vqs, verb_forms) > 0.8 and leak_rate(nqs, noun_forms) > 0.9
    assert leak_rate([TEMPLATES["verb"][0]] * len(segs), verb_forms) == 0.0


def test_mask_inflections():
    assert mask_words("opening the fridge", ["open"]) == "[MASK] the fridge"
    assert mask_words("put down plate", ["put-down", "put"]) == "[MASK] down plate"
    assert mask_words("take sea salt", ["salt:sea"]) == "take [MASK]"
    assert phrase("tap:water") == "water tap" and phrase("put-down") == "put down"


def test_no_narration_is_refused(val):
    seg = Segment("x_1", "P01", "P01_01", 0, 1, 1, 2, "", "", "", -1, -1, (), 7)
    with pytest.raises(InputError, match="row 7.*no narration"):
        annotation_questions(seg, val.verbs, val.nouns)
    with pytest.raises(InputError, match="no narrations|none"):
        build_question_table([seg], val.verbs, val.nouns, ["templates", "annotation"])


def test_question_table_indices(val):
    segs = val.segments[:50]
    texts, templates, per_segment, keyed = build_question_table(segs, val.verbs, val.nouns,
                                                                ["templates", "annotation"])
    assert keyed["annotation"].all()  # every annotation question is made from the segment's own narration
    assert len(texts) == len(set(texts))
    assert texts[templates["verb"][0]] == TEMPLATES["verb"][0]
    table = per_segment["annotation"]
    assert table.shape == (50, 2)
    for s, (a, b) in zip(segs, table):
        assert (texts[a], texts[b]) == annotation_questions(s, val.verbs, val.nouns)


def test_question_files(tmp_path, val):
    segs = val.segments[:3]
    csv_path = tmp_path / "q.csv"
    csv_path.write_text("narration_id,verb_question,noun_question\n" +
                        "".join(f"{s.narration_id},what v {i}?,what n {i}?\n" for i, s in enumerate(segs)))
    assert load_question_file(csv_path, segs)[2] == ("what v 2?", "what n 2?")
    js = tmp_path / "q.json"
    js.write_text(json.dumps({f"{s.verb_class},{s.noun_class}": {"verb": "v?", "noun": "n?"} for s in segs}))
    assert load_question_file(js, segs) == [("v?", "n?")] * 3
    texts, _, per_segment, keyed = build_question_table(segs, val.verbs, val.nouns, ["templates", "file"], str(js))
    assert texts[per_segment["file"][0, 0]] == "v?"
    assert keyed["file"].all()  # found by each segment's own action class
    bad = tmp_path / "bad.csv"
    bad.write_text("narration_id,verb_question,noun_question\nnope,a?,b?\n")
    with pytest.raises(InputError, match="no questions for segment"):
        load_question_file(bad, segs)
    worse = tmp_path / "worse.csv"
    worse.write_text("narration_id,verb_question\nx,a?\n")
    with pytest.raises(InputError, match="noun_question"):
        load_question_file(worse, segs)


def test_answer_texts(val):
    v, n, a = answer_texts(val.verbs, val.nouns, [(0, 0), (1, 2)])
    assert v[0] == "take" and len(n) == 300 and a == [f"{v[0]} {n[0]}", f"{v[1]} {n[2]}"]
    assert np.isnan(leak_rate([], []))


def test_class_keyed_questions_are_flagged_and_refused_at_evaluation(tmp_path, val):
    segs = val.segments[:4]
    path = tmp_path / "mixed.csv"
    # row 0 by narration_id, rows 1-3 by their action class; the global entry then takes over for all but row 0
    path.write_text("narration_id,verb_class,noun_class,verb_question,noun_question\n"
                    f"{segs[0].narration_id},,,own v?,own n?\n"
                    + "".join(f",{s.verb_class},{s.noun_class},class v?,class n?\n" for s in segs[1:]))
    questions, keyed = question_file_lookup(path, segs)
    assert questions[0] == ("own v?", "own n?") and questions[1] == ("class v?", "class n?")
    assert keyed.tolist() == [False, True, True, True]
    refuse_label_keyed("file", keyed, np.array([0]), str(path))  # narration_id-keyed rows may be evaluated
    with pytest.raises(InputError, match=r"mixed\.csv.*3 evaluated segment.*training rows only") as err:
        refuse_label_keyed("file", keyed, np.arange(4), str(path), [s.narration_id for s in segs])
    assert segs[1].narration_id in str(err.value)

    glob = tmp_path / "global.json"
    glob.write_text(json.dumps({"*": {"verb": "g v?", "noun": "g n?"},
                                f"{segs[1].verb_class},{segs[1].noun_class}": {"verb": "c v?", "noun": "c n?"},
                                segs[2].narration_id: {"verb": "o v?", "noun": "o n?"}}))
    questions, keyed = question_file_lookup(glob, segs)
    # a global entry is label-free and wins over the class key; a row's own narration_id wins over both
    assert [q[0] for q in questions] == ["g v?", "g v?", "o v?", "g v?"] and not keyed.any()


def _good(segs) -> dict:
    return {s.narration_id: {"verb": f"What happens in {s.narration_id}?", "noun": "Which object?"} for s in segs}


def test_question_files_in_other_encodings_and_shapes_are_refused_naming_file_entry_and_problem(tmp_path, val):
    segs = val.segments[:3]
    first = segs[0].narration_id
    good = _good(segs)
    csv_text = "narration_id,verb_question,noun_question\n" + "".join(
        f"{s.narration_id},What is happening?,Which object?\n" for s in segs)
    surrogate = json.dumps({**good, first: {"verb": "What is happening X here?", "noun": "n?"}}).replace("X", "\\ud83d")
    cases = {
        "deep.json": ("[" * 100000 + "]" * 100000, "nested too deeply"),
        "deep_objects.json": ('{"a":' * 50000 + "1" + "}" * 50000, "nested too deeply"),
        "utf16.json": (json.dumps(good).encode("utf-16"), "not UTF-8 \\(looks UTF-16 LE"),
        "utf16be.json": (b"\xfe\xff" + json.dumps(good).encode("utf-16-be"), "not UTF-8 \\(looks UTF-16 BE"),
        "utf16_nobom.json": (json.dumps(good).encode("utf-16-le"), "not UTF-8 \\(looks UTF-16 or UTF-32"),
        "utf32.json": (json.dumps(good).encode("utf-32"), "not UTF-8 \\(looks UTF-32 LE"),
        "utf16.csv": (csv_text.encode("utf-16"), "not UTF-8 \\(looks UTF-16 LE"),
        "latin1.csv": (csv_text.replace("Which", "Qu\u00e9").encode("latin-1"),
                       r"byte 0xe9 at offset \d+ \(line 2, column \d+\)"),
        "surrogate.json": (surrogate, f"entry '{first}', field verb: invalid character U\\+D83D at position 19"),
        "nul.json": (json.dumps({**good, first: {"verb": "v?", "noun": "Which\u0000 object?"}}),
                     f"entry '{first}', field noun: NUL character"),
        "nul.csv": (csv_text.replace("Which object", "Which\u0000object", 1), "row 1, field noun: NUL character"),
        "records.json": (json.dumps([{"narration_id": first, "verb_question": "a\u0000", "noun_question": "b"}]),
                         "record 1, field verb: NUL"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        with pytest.raises(InputError, match=message) as info:
            load_question_file(path, segs)
        assert str(path) in str(info.value), name


def test_question_files_that_work_keep_working(tmp_path, val):
    segs = val.segments[:3]
    good = _good(segs)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode())
    assert load_question_file(bom, segs)[0] == ("What happens in %s?" % segs[0].narration_id, "Which object?")
    uni = tmp_path / "unicode.json"
    uni.write_text(json.dumps({s.narration_id: {"verb": "这个人在做什么？ 🍳 ما الذي", "noun": "Welches? 🥄"}
                               for s in segs}, ensure_ascii=False), encoding="utf-8")
    assert load_question_file(uni, segs)[1] == ("这个人在做什么？ 🍳 ما الذي", "Welches? 🥄")
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({**good, segs[0].narration_id: {"verb": "very " * 40000 + "?", "noun": "n?"}}))
    assert len(load_question_file(huge, segs)[0][0]) == 200001
    pair = tmp_path / "pair.json"  # an escaped surrogate pair is one emoji, not a lone surrogate
    pair.write_text(json.dumps({"*": {"verb": "What is cooked \U0001F373?", "noun": "n?"}}))
    assert load_question_file(pair, segs)[0][0] == "What is cooked \U0001F373?"


def test_bad_question_file_refused_before_any_cache_file(tmp_path, ek100_dir):
    from typer.testing import CliRunner

    from mambavl.cli import app

    bad = tmp_path / "q.json"
    bad.write_text("[" * 100000 + "]" * 100000)
    videos = tmp_path / "videos"
    videos.mkdir()
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["extract", str(ek100_dir / "EPIC_100_validation.csv"), "--videos", str(videos),
                                   "--out", str(out / "c.h5"), "--model", "mambavl-tiny-clip", "--pretrained",
                                   "none", "--device", "cpu", "--limit", "3", "--questions", "templates,file",
                                   "--questions-file", str(bad), "--quiet"])
    assert res.exit_code == 2 and "nested too deeply" in res.output and "q.json" in res.output, res.output
    assert not out.exists()
