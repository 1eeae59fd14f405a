"""EK-100 and generic annotation parsing, on the real EK-100 files and on broken hand-made ones."""

from __future__ import annotations

import csv

import pytest

from mambavl.data.annotations import (
    load_annotations, load_classes, load_id_list, load_tail_classes, load_video_info, parse_timestamp,
)
from mambavl.errors import InputError


@pytest.mark.parametrize("name,rows,labelled", [
    ("EPIC_100_validation.csv", 9668, True),
    ("EPIC_100_uda_source_train.csv", 16115, True),
    ("EPIC_100_test_timestamps.csv", 13092, False),
])
def test_real_files_parse_completely(ek100_dir, name, rows, labelled):
    ann = load_annotations(ek100_dir / name)
    assert len(ann.segments) == rows and ann.has_labels is labelled and ann.kind == "ek100"
    assert len(ann.verbs) == 97 and len(ann.nouns) == 300 and len(ann.video_info) == 700
    for s in ann.segments:
        assert 0 <= s.start_time <= s.stop_time and s.start_frame <= s.stop_frame
        assert s.video_id.startswith(s.participant_id + "_")
        if labelled:
            assert 0 <= s.verb_class < 97 and 0 <= s.noun_class < 300
            assert s.noun_class in s.all_noun_classes
        else:
            assert s.verb_class == -1 and s.narration == ""
    # frame numbers agree with the timestamps at the video's fps (within a frame or two of rounding)
    s = ann.segments[0]
    fps = ann.video_info[s.video_id].fps
    assert abs(s.start_frame - (s.start_time * fps + 1)) < 3


def test_real_vocab_and_subsets(ek100_dir):
    verbs = load_classes(ek100_dir / "EPIC_100_verb_classes.csv")
    assert verbs.keys[0] == "take" and "grab" in verbs.instances[0]
    assert len(load_tail_classes(ek100_dir / "EPIC_100_tail_verbs.csv")) == 86
    assert len(load_tail_classes(ek100_dir / "EPIC_100_tail_nouns.csv")) == 228
    assert load_id_list(ek100_dir / "EPIC_100_unseen_participant_ids_validation.csv") == {"P18", "P32"}
    assert len(load_id_list(ek100_dir / "EPIC_100_unseen_participant_ids_test.csv")) == 3
    info = load_video_info(ek100_dir / "EPIC_100_video_info.csv")
    assert {round(v.fps) for v in info.values()} >= {50, 60}


def test_timestamps():
    assert parse_timestamp("00:01:02.50") == pytest.approx(62.5)
    assert parse_timestamp("01:00:00.00") == 3600
    assert parse_timestamp("12.25") == 12.25
    for bad in ("aa:bb", "-3", "", "00:61:00.00"):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


HEAD = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp", "stop_timestamp",
        "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun", "noun_class", "all_nouns",
        "all_noun_classes"]
GOOD = ["P01_01_0", "P01", "P01_01", "00:00:01.00", "00:00:01.00", "00:00:02.00", "50", "100", "take cup", "take",
        "0", "cup", "1", "['cup']", "[1]"]


def _classes(tmp_path):
    _write(tmp_path / "EPIC_100_verb_classes.csv", ["id", "key", "instances", "category"],
           [["0", "take", "['take']", "retrieve"]])
    _write(tmp_path / "EPIC_100_noun_classes.csv", ["id", "key", "instances", "category"],
           [["0", "plate", "['plate']", "x"], ["1", "cup", "['cup', 'mug']", "x"]])


@pytest.mark.parametrize("column,value,message", [
    ("start_timestamp", "1:xx", r"row 2, field 'start_timestamp'"),
    ("stop_timestamp", "00:00:00.50", r"row 2, field 'stop_timestamp'.*before start"),
    ("verb_class", "7", r"row 2, field 'verb_class'"),
    ("all_noun_classes", "[1, oops", r"row 2, field 'all_noun_classes'"),
    ("start_frame", "ten", r"row 2, field 'start_frame'"),
])
def test_errors_name_file_row_field(tmp_path, column, value, message):
    _classes(tmp_path)
    bad = list(GOOD)
    bad[0] = "P01_01_1"
    bad[HEAD.index(column)] = value
    path = _write(tmp_path / "ann.csv", HEAD, [GOOD, bad])
    with pytest.raises(InputError, match=message) as err:
        load_annotations(path)
    assert "ann.csv" in str(err.value)


def test_missing_column_and_missing_classes(tmp_path):
    path = _write(tmp_path / "ann.csv", [h for h in HEAD if h != "stop_frame"], [GOOD[:7] + GOOD[8:]])
    with pytest.raises(InputError, match="missing column.*stop_frame"):
        load_annotations(path)
    path = _write(tmp_path / "ann2.csv", HEAD, [GOOD])
    with pytest.raises(InputError, match="class CSVs"):
        load_annotations(path)


def test_generic_clip_csv(tmp_path):
    path = _write(tmp_path / "clips.csv", ["video", "start", "stop", "label"],
                  [["a/x.mp4", "0", "1.5", "wave"], ["b/y.mp4", "00:00:02.00", "3", "jump"], ["x.mp4", "1", "2", "wave"]])
    ann = load_annotations(path)
    assert ann.kind == "generic" and ann.verbs.keys == ("jump", "wave") and len(ann.nouns) == 0
    assert [s.verb_class for s in ann.segments] == [1, 0, 1]
    assert ann.segments[1].start_time == 2.0 and ann.segments[0].noun_class == -1
    bad = _write(tmp_path / "bad.csv", ["video", "start", "stop", "label"], [["x.mp4", "3", "1", "wave"]])
    with pytest.raises(InputError, match="row 1, field 'stop'"):
        load_annotations(bad)


def test_generic_label_list_shared_by_splits(tmp_path):
    from mambavl.data.annotations import load_label_list

    clips = _write(tmp_path / "val.csv", ["video", "start", "stop", "label"],
                   [["a.mp4", "0", "1", "open"], ["b.mp4", "1", "2.5", "close"]])
    (tmp_path / "labels.txt").write_text("close\nopen\npour\n")
    ann = load_annotations(clips, verb_classes=tmp_path / "labels.txt")
    assert ann.verbs.keys == ("close", "open", "pour") and [s.verb_class for s in ann.segments] == [1, 0]
    assert load_annotations(clips).verbs.keys == ("close", "open")  # without a list: the file's own labels
    (tmp_path / "short.txt").write_text("open\n")
    with pytest.raises(InputError, match=r"val.csv: row 2, field 'label': 'close' is not in the label list"):
        load_annotations(clips, verb_classes=tmp_path / "short.txt")
    (tmp_path / "dup.txt").write_text("open\nclose\nopen\n")
    with pytest.raises(InputError, match=r"dup.txt: line 3: duplicate label 'open'"):
        load_label_list(tmp_path / "dup.txt")
