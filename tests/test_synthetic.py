"""The demo's synthetic kitchen dataset is parseable EK-100 data with decodable videos."""

from __future__ import annotations

from mambavl.data.annotations import load_annotations, load_id_list, load_tail_classes
from mambavl.data.synthetic import make_kitchen_dataset
from mambavl.extract.decode import SamplingConfig, decode_segment


def test_kitchen_dataset(tmp_path):
    ds = make_kitchen_dataset(tmp_path, n_train=12, n_val=6, n_test=3, generic_csv=True)
    train, val, test = (load_annotations(p) for p in (ds.train_csv, ds.val_csv, ds.test_csv))
    assert (len(train.segments), len(val.segments), len(test.segments)) == (12, 6, 3)
    assert not test.has_labels and train.verbs.keys == ds.verbs
    unseen = load_id_list(tmp_path / "EPIC_100_unseen_participant_ids_validation.csv")
    assert unseen and not unseen & {s.participant_id for s in train.segments}
    assert load_tail_classes(tmp_path / "EPIC_100_tail_verbs.csv")
    s = train.segments[0]
    assert s.narration == f"{s.verb} {s.noun}"
    frames, times = decode_segment(ds.videos, s, s.start_time, s.stop_time, SamplingConfig(num_frames=4, size=32),
                                   train.frame_rate(s.video_id))
    assert frames.shape == (4, 32, 32, 3) and frames.std() > 10
    generic = load_annotations(ds.generic_csv)
    assert generic.kind == "generic" and len(generic.segments) == 12
    assert len(load_annotations(ds.generic_val_csv).segments) == 6
