"""Stage 1 end to end: extraction equals the encoder on the same frames, resume, failures, shards, CLI, import."""

from __future__ import annotations

import csv
import json
import pickle
import shutil

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mambavl.cache.build import ExtractConfig, run_extraction
from mambavl.cache.reader import open_cache
from mambavl.cli import app
from mambavl.data.annotations import load_annotations
from mambavl.data.synthetic import make_kitchen_dataset
from mambavl.extract.decode import SamplingConfig, anticipation_window, decode_segment
from mambavl.extract.encoders import EncoderConfig, build_encoder
from mambavl.progress import Recorder

TINY = EncoderConfig(model="mambavl-tiny-clip", pretrained="none", device="cpu")
TINY_ARGS = ["--model", "mambavl-tiny-clip", "--pretrained", "none", "--frames", "4", "--size", "64", "--quiet"]


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory):
    return make_kitchen_dataset(tmp_path_factory.mktemp("kitchen"), n_train=8, n_val=4, n_test=3,
                                segments_per_video=4, generic_csv=True)


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(TINY)


def _cfg(kitchen, out, **kw):
    base = dict(annotations=str(kitchen.train_csv), videos=str(kitchen.videos), out=str(out), encoder=TINY,
                sampling=SamplingConfig(num_frames=4, size=64), anticipation=True, tau_a=0.5, tau_o=1.0)
    base.update(kw)
    return ExtractConfig(**base)


def test_features_equal_encoder_on_same_frames(tmp_path, kitchen, encoder):
    summary = run_extraction(_cfg(kitchen, tmp_path / "c.h5"), encoder=encoder)
    assert (summary.total, summary.done, summary.failed) == (8, 8, 0)
    cache = open_cache(tmp_path / "c.h5")
    ann = load_annotations(kitchen.train_csv)
    f = cache.h5()
    for row in (0, 5):
        seg = ann.segments[row]
        frames, times = decode_segment(kitchen.videos, seg, seg.start_time, seg.stop_time,
                                       SamplingConfig(num_frames=4, size=64), ann.frame_rate(seg.video_id))
        expect = encoder.encode_segments(frames[None])[0].numpy().astype(np.float16)
        assert np.array_equal(f["features"][row], expect)
        assert np.allclose(f["frame_times"][row], times, atol=1e-4)
        a0, a1 = anticipation_window(seg.start_time, 0.5, 1.0)
        ant = f["anticipation/frame_times"][row]
        assert a0 <= ant.min() and ant.max() <= a1
    assert cache.attrs["question_sources"] == ["templates", "annotation"]
    assert cache.questions().per_segment["annotation"].shape == (8, 2)
    assert cache.questions().label_keyed["annotation"].all()  # made from each segment's own narration
    assert cache.answers().verb.shape == (6, encoder.text_dim)
    assert f.attrs["complete"]


def test_resumed_run_equals_uninterrupted(tmp_path, kitchen, encoder):
    run_extraction(_cfg(kitchen, tmp_path / "full.h5"), encoder=encoder)

    class Crash(Exception):
        pass

    class CrashAfterThree(Recorder):
        def advance(self, n=1, **fields):
            super().advance(n, **fields)
            if self.done >= 3:
                raise Crash

    with pytest.raises(Crash):
        run_extraction(_cfg(kitchen, tmp_path / "part.h5"), progress=CrashAfterThree(), encoder=encoder)
    with h5py.File(tmp_path / "part.h5") as f:
        assert 0 < f["valid"][()].sum() < 8
    summary = run_extraction(_cfg(kitchen, tmp_path / "part.h5"), encoder=encoder)
    assert summary.skipped >= 3 and summary.done == 8
    with h5py.File(tmp_path / "full.h5") as a, h5py.File(tmp_path / "part.h5") as b:
        for name in ("features", "frame_times", "valid", "anticipation/features", "questions/tokens",
                     "answers/action"):
            assert np.array_equal(a[name][()], b[name][()], equal_nan=True), name


def test_broken_videos_land_in_failures(tmp_path, kitchen):
    videos = tmp_path / "videos"
    shutil.copytree(kitchen.videos, videos)
    ann = load_annotations(kitchen.train_csv)
    vids = sorted({s.video_id for s in ann.segments})
    assert len(vids) == 2
    (videos / "P01" / "videos" / f"{vids[0]}.MP4").write_bytes(b"")  # zero bytes
    second = next(videos.glob(f"*/videos/{vids[1]}.MP4"))
    second.write_bytes(second.read_bytes()[:2000])  # truncated
    result = CliRunner().invoke(app, ["extract", str(kitchen.train_csv), "--videos", str(videos), "--out",
                                      str(tmp_path / "c.h5"), *TINY_ARGS])
    assert result.exit_code == 3, result.output
    info = json.loads(CliRunner().invoke(app, ["cache", "inspect", str(tmp_path / "c.h5"), "--json"]).output)
    reasons = " ".join(f["reason"] for f in info["failures"])
    assert info["failed"] == 8 and "0 bytes" in reasons and vids[1] in reasons
    assert info["windows"]["recognition"]["valid"] == 0


def test_cli_extract_inspect_shards_merge(tmp_path, kitchen):
    runner = CliRunner()
    out = tmp_path / "val.h5"
    r = runner.invoke(app, ["extract", str(kitchen.val_csv), "--videos", str(kitchen.videos), "--out", str(out),
                            *TINY_ARGS])
    assert r.exit_code == 0, r.output
    assert "4/4 segments done" in r.output
    r = runner.invoke(app, ["cache", "inspect", str(out)])
    assert r.exit_code == 0 and "recognition: 4/4 valid" in r.output
    for i in range(2):
        r = runner.invoke(app, ["extract", str(kitchen.val_csv), "--videos", str(kitchen.videos), "--out",
                                str(tmp_path / f"s{i}.h5"), "--shard", f"{i}/2", *TINY_ARGS])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["cache", "merge", str(tmp_path / "m.h5"), str(tmp_path / "s1.h5"),
                            str(tmp_path / "s0.h5")])
    assert r.exit_code == 0, r.output
    with h5py.File(out) as a, h5py.File(tmp_path / "m.h5") as b:
        assert np.array_equal(a["features"][()], b["features"][()])
        assert list(a["narration_id"][()]) == list(b["narration_id"][()])
    merged, whole = open_cache(tmp_path / "m.h5").questions(), open_cache(out).questions()
    qm, qw = merged.per_segment["annotation"], whole.per_segment["annotation"]
    assert [merged.texts[i] for i in qm.ravel()] == [whole.texts[i] for i in qw.ravel()]
    assert np.array_equal(merged.label_keyed["annotation"], whole.label_keyed["annotation"])


def test_cli_bad_input_exit_2(tmp_path, kitchen):
    bad = tmp_path / "bad.csv"
    rows = list(csv.reader(open(kitchen.train_csv)))
    rows[2][5] = "00:00:00.00"  # stop before start
    with open(bad, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    shutil.copy(kitchen.root / "EPIC_100_verb_classes.csv", tmp_path)
    shutil.copy(kitchen.root / "EPIC_100_noun_classes.csv", tmp_path)
    r = CliRunner().invoke(app, ["extract", str(bad), "--videos", str(kitchen.videos), "--out",
                                 str(tmp_path / "x.h5"), *TINY_ARGS])
    assert r.exit_code == 2 and "row 2" in r.output and "stop_timestamp" in r.output
    assert not (tmp_path / "x.h5").exists()
    r = CliRunner().invoke(app, ["extract", str(kitchen.test_csv), "--videos", str(kitchen.videos), "--out",
                                 str(tmp_path / "t.h5"), "--questions", "templates,annotation,file", *TINY_ARGS])
    assert r.exit_code == 2


def test_test_split_gets_templates_only(tmp_path, kitchen, encoder):
    run_extraction(_cfg(kitchen, tmp_path / "t.h5", annotations=str(kitchen.test_csv), anticipation=False),
                   encoder=encoder)
    cache = open_cache(tmp_path / "t.h5")
    assert cache.attrs["question_sources"] == ["templates"] and not cache.attrs["has_labels"]
    assert (cache.labels()["verb_class"] == -1).all()


@pytest.mark.parametrize("fmt", ["npy", "pt", "pkl", "lmdb"])
def test_import_features(tmp_path, kitchen, fmt):
    ann = load_annotations(kitchen.val_csv)
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 10)).astype(np.float32) for _ in ann.segments]
    src = tmp_path / "feats"
    src.mkdir()
    if fmt == "lmdb":
        import lmdb

        env = lmdb.open(str(src), map_size=1 << 26)
        with env.begin(write=True) as txn:
            for s in ann.segments:
                for k in range(s.start_frame, s.stop_frame + 1):
                    txn.put(f"{s.video_id}_frame_{k:010d}.jpg".encode(),
                            np.full(10, k, np.float32).tobytes())
        env.close()
    for s, a in zip(ann.segments, arrays):
        if fmt == "npy":
            np.save(src / f"{s.narration_id}.npy", a)
        elif fmt == "pt":
            torch.save(torch.from_numpy(a), src / f"{s.narration_id}.pt")
        elif fmt == "pkl":
            with open(src / f"{s.narration_id}.pkl", "wb") as f:
                pickle.dump(a, f)
    out = tmp_path / "imp.h5"
    r = CliRunner().invoke(app, ["cache", "import", "--features", str(src), "--annotations", str(kitchen.val_csv),
                                 "--out", str(out), "--name", "avion-test", "--frames", "3", "--source-fps", "12",
                                 "--text-model", "mambavl-tiny-clip", "--text-pretrained", "none"])
    assert r.exit_code == 0, r.output
    cache = open_cache(out)
    assert cache.attrs["encoder"] == "imported" and cache.attrs["model"] == "avion-test"
    feats = cache.h5()["features"][()]
    if fmt == "lmdb":
        s = ann.segments[0]
        assert feats.shape == (4, 3, 10) and s.start_frame <= feats[0, 0, 0] <= feats[0, 2, 0] <= s.stop_frame
    else:
        assert np.allclose(feats, np.stack(arrays), atol=1e-2)


def test_import_refuses_mismatch_and_writes_nothing(tmp_path, kitchen):
    ann = load_annotations(kitchen.val_csv)
    src = tmp_path / "feats"
    src.mkdir()
    for i, s in enumerate(ann.segments):
        np.save(src / f"{s.narration_id}.npy", np.zeros((2, 8 if i else 9), np.float32))
    out = tmp_path / "imp.h5"
    args = ["cache", "import", "--features", str(src), "--annotations", str(kitchen.val_csv), "--out", str(out),
            "--name", "x", "--text-model", "mambavl-tiny-clip", "--text-pretrained", "none"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "dimensions disagree" in r.output
    (src / f"{ann.segments[0].narration_id}.npy").unlink()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and ann.segments[0].narration_id in r.output
    assert not out.exists() and not (tmp_path / "imp.h5.partial").exists()


def test_class_keyed_question_file_is_flagged_at_extraction_and_refused_at_evaluation(tmp_path, kitchen, encoder):
    """A questions file that finds some segments by narration_id and the rest by their own action class: extraction
    records which rows were found by class, evaluation-time question batching refuses them (naming the file), and
    training-time batching accepts them."""
    from mambavl.errors import InputError
    from mambavl.extract.questions import QuestionSource
    from mambavl.runtime import Asker, task_spec

    ann = load_annotations(kitchen.val_csv)
    segs = ann.segments
    qfile = tmp_path / "llm_questions.csv"
    qfile.write_text("narration_id,verb_class,noun_class,verb_question,noun_question\n"
                     f"{segs[0].narration_id},,,own v?,own n?\n"
                     + "".join(f",{s.verb_class},{s.noun_class},class v?,class n?\n" for s in segs[1:]))
    run_extraction(_cfg(kitchen, tmp_path / "q.h5", annotations=str(kitchen.val_csv),
                        questions=("templates", "file"), questions_file=str(qfile), anticipation=False),
                   encoder=encoder)
    cache = open_cache(tmp_path / "q.h5")
    assert cache.questions().label_keyed["file"].tolist() == [False] + [True] * (len(segs) - 1)
    spec = task_spec("recognition")  # the heads ask verb and noun questions
    Asker.of_cache(cache, spec, QuestionSource.FILE)  # training rows: allowed
    with pytest.raises(InputError, match=r"llm_questions\.csv.*training rows only"):
        Asker.of_cache(cache, spec, QuestionSource.FILE, evaluation=True)


def test_cli_extract_config_file_under_options(tmp_path, kitchen):
    """`extract --config`: nested encoder/sampling settings from YAML; an option given overrides the file; the
    rest keeps ExtractConfig's defaults; an unknown key is exit 2 naming it and the nearest valid key."""
    cfg = tmp_path / "extract.yaml"
    cfg.write_text("encoder: {model: mambavl-tiny-clip, pretrained: none}\nsampling: {num_frames: 3, size: 64}\n"
                   "questions: [templates]\n")
    out = tmp_path / "c.h5"
    r = CliRunner().invoke(app, ["extract", str(kitchen.val_csv), "--videos", str(kitchen.videos), "--out", str(out),
                                 "--config", str(cfg), "--frames", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    cache = open_cache(out)
    assert (cache.attrs["frames_per_segment"], cache.attrs["frame_size"]) == (2, 64)  # option over file
    assert cache.attrs["model"] == "mambavl-tiny-clip" and list(cache.questions().per_segment) == []
    cache.close()
    cfg.write_text("encoder: {model: mambavl-tiny-clip, pretrainde: none}\n")
    r = CliRunner().invoke(app, ["extract", str(kitchen.val_csv), "--videos", str(kitchen.videos), "--out",
                                 str(tmp_path / "d.h5"), "--config", str(cfg), "--quiet"])
    assert r.exit_code == 2 and "'encoder.pretrainde'" in r.output and "'encoder.pretrained'" in r.output
    assert not (tmp_path / "d.h5").exists()
