"""Property tests (hypothesis): the annotation parser and the frame number <-> time conversions, on inputs no one
wrote by hand. Parsing either returns exactly what was written or raises InputError naming the row and field."""

from __future__ import annotations

import csv
import math

import pytest
from fault_inputs import HEADER, hms, write_classes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mambavl.data.annotations import (
    FRAME_TOLERANCE, TIMESTAMP_RESOLUTION, Segment, check_frame_times, frame_at, frame_start, frame_window,
    infer_frame_rates, load_annotations, load_segments, parse_timestamp,
)
from mambavl.errors import InputError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
rates = st.floats(min_value=1.0, max_value=240.0, allow_nan=False)
times = st.floats(min_value=0.0, max_value=36_000.0, allow_nan=False)


@FAST
@given(centis=st.integers(min_value=0, max_value=100 * 3600 * 30))
def test_timestamp_round_trip(centis):
    assert parse_timestamp(hms(centis / 100)) == pytest.approx(centis / 100, abs=1e-6)


@FAST
@given(text=st.text(max_size=16))
def test_timestamp_parser_raises_only_value_error(text):
    try:
        value = parse_timestamp(text)
    except ValueError:
        return
    assert math.isfinite(value) and value >= 0


@FAST
@given(t=times, rate=rates)
def test_frame_at_is_the_frame_displayed_at_t(t, rate):
    n = frame_at(t, rate)
    assert n >= 1
    assert frame_start(n, rate) <= t + 1e-6 and t < frame_start(n + 1, rate) + 1e-6
    assert frame_at(frame_start(n, rate), rate) == n  # a frame's own start time maps back to it


@FAST
@given(start=times, length=st.floats(min_value=0.0, max_value=600.0), rate=rates)
def test_frame_window_covers_the_window(start, length, rate):
    first, last = frame_window(start, start + length, rate)
    assert 1 <= first <= last
    assert frame_start(first, rate) <= start + 1e-6  # the first frame is showing at `start`
    assert frame_start(last + 1, rate) >= start + length - 1e-6  # the last one is still showing just before stop
    assert last - first <= length * rate + 1


@FAST
@given(rate=st.sampled_from([25.0, 30.0, 50.0, 59.94, 60.0, 90.0]), jitter=st.lists(st.integers(-1, 1), min_size=8,
       max_size=8), starts=st.lists(st.integers(0, 3600 * 100), min_size=4, max_size=4, unique=True))
def test_numbering_rate_is_recovered_and_rows_pass_the_check(rate, jitter, starts):
    """Rows written the way EK-100's are (frames from one clock, 10 ms timestamps, +-1 frame apart) give back the
    rate within a fraction of a frame over the video, and every such row passes the consistency check."""
    segs = []
    for i, c in enumerate(sorted(starts)):
        t0, t1 = c / 100, c / 100 + 1.5
        f0 = max(1, round(t0 * rate) + 1 + jitter[2 * i])
        f1 = max(f0, round(t1 * rate) + jitter[2 * i + 1])
        segs.append(Segment(f"v_{i}", "P01", "P01_01", round(t0, 2), round(t1, 2), f0, f1, "", "", "", -1, -1, (),
                            i + 1))
    est = infer_frame_rates(segs)["P01_01"]
    horizon = max(s.stop_time for s in segs)
    assert abs(est - rate) * horizon <= FRAME_TOLERANCE + TIMESTAMP_RESOLUTION * rate
    check_frame_times("ann.csv", segs, {"P01_01": est})


row_values = st.fixed_dictionaries({
    "start": st.integers(0, 360_000), "length": st.integers(0, 6_000), "verb": st.integers(0, 2),
    "noun": st.integers(0, 2), "nouns": st.lists(st.integers(0, 2), min_size=1, max_size=3),
    "narration": st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=20),
})


@FAST
@given(rows=st.lists(row_values, min_size=1, max_size=6))
def test_parser_returns_what_was_written(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("ann") / "ann.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for i, r in enumerate(rows):
            t0, t1 = r["start"] / 100, (r["start"] + r["length"]) / 100
            w.writerow([f"P01_01_{i}", "P01", "P01_01", hms(t0), hms(t0), hms(t1), round(t0 * 60) + 1,
                        max(round(t0 * 60) + 1, round(t1 * 60)), r["narration"], "v", r["verb"], "n", r["noun"],
                        str(["n"] * len(r["nouns"])), str(r["nouns"])])
    segments, kind = load_segments(path)
    assert kind == "ek100" and len(segments) == len(rows)
    for s, r in zip(segments, rows):
        assert s.start_time == pytest.approx(r["start"] / 100, abs=1e-6)
        assert s.stop_time == pytest.approx((r["start"] + r["length"]) / 100, abs=1e-6)
        assert (s.verb_class, s.noun_class, s.all_noun_classes) == (r["verb"], r["noun"], tuple(r["nouns"]))
        assert s.narration == r["narration"].strip()


@FAST
@given(column=st.sampled_from(["start_timestamp", "stop_timestamp", "start_frame", "stop_frame", "verb_class",
                               "noun_class", "all_noun_classes"]),
       junk=st.sampled_from(["", "abc", "1:2:3:4", "-5", "nan", "[1, 'x']", "__import__('os')", "12:75:00.00",
                             "1e999", "[[1]]"]))
def test_parser_names_row_and_field_of_a_bad_cell(tmp_path_factory, column, junk):
    path = tmp_path_factory.mktemp("bad") / "ann.csv"
    good = ["P01_01_0", "P01", "P01_01", "00:00:01.00", "00:00:01.00", "00:00:02.00", "61", "120", "take plate",
            "take", "0", "plate", "0", "['plate']", "[0]"]
    bad = list(good)
    bad[HEADER.index(column)] = junk
    bad[0] = "P01_01_1"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([HEADER, good, bad])
    write_classes(path.parent)
    with pytest.raises(InputError) as err:
        load_annotations(path)
    assert "ann.csv: row 2, field" in str(err.value) and repr(column) in str(err.value)
