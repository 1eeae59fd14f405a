"""The fusion models compute what they computed before the layer was rewritten into fewer, larger kernels.

`tests/data/fusion_reference/reference.pt` holds, per model variant (joint / parallel layout, shared / disjoint A,
video-only, bidirectional), the weights of a tiny model, inputs with padded clips and questions, and the outputs and
parameter gradients that the code before the rewrite computed (`make_reference.py` there). Today's model, given the
same weights (same parameter names and shapes: checkpoints need no migration), must reproduce them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent / "data" / "fusion_reference"


def _maker():
    spec = importlib.util.spec_from_file_location("make_reference", HERE / "make_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MAKER = _maker()
REFERENCE = torch.load(HERE / "reference.pt", weights_only=True)


@pytest.mark.parametrize("name", list(MAKER.CASES))
def test_outputs_and_gradients_match_the_recorded_ones(name):
    case = REFERENCE["cases"][name]
    model = MAKER.build(name, case["state_dict"])  # strict load: same names and shapes
    # The sequential reference scan (the definition; the recording used the numba scan, equal to it in float64 to
    # ~1e-12): this test is about the arithmetic around the scan, and needs no kernel compiled.
    model.use_scan("reference")
    got = MAKER.run(model, REFERENCE["inputs"])
    want = case["values"]
    assert sorted(got) == sorted(want)
    for key, ref in want.items():
        torch.testing.assert_close(got[key].float(), ref, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
