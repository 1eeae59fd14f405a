"""Shared fixtures. Tests are offline and small: torch runs on one thread so parallel jobs do not thrash."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ek100_dir() -> Path:
    """The real EK-100 annotation CSVs shipped in tests/data/ek100 (CC BY-NC 4.0, see its README), or
    $MAMBAVL_EK100_DIR."""
    env = os.environ.get("MAMBAVL_EK100_DIR")
    path = Path(env) if env else REPO / "tests" / "data" / "ek100"
    if not (path / "EPIC_100_validation.csv").is_file():
        pytest.fail(f"EK-100 annotation CSVs not found at {path} (tests/data/ek100, or set MAMBAVL_EK100_DIR)")
    return path


@pytest.fixture
def run_refusing():
    """Factory: run(code, blocked, *args, timeout=600) runs the Python `code` in a fresh interpreter, with this
    checkout first on the path, where the top-level packages in `blocked` cannot be imported: a meta-path finder
    refuses them and `importlib.util.find_spec` reports them absent, so an optional `try: import x` goes unseen no
    more than a hard import. `code` sees the tuple as BLOCKED. Returns the CompletedProcess (text, output captured)."""

    def run(code: str, blocked, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        prelude = f"""import importlib.abc, importlib.util, sys
BLOCKED = {tuple(blocked)!r}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (refused by the test)")
sys.meta_path.insert(0, Refuse())
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] in BLOCKED else _find(name, package)
"""
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True, text=True, env=env,
                              timeout=timeout)

    return run


@pytest.fixture(scope="session")
def tiny_encoder():
    """The tiny random-init CLIP (`mambavl-tiny-clip`, pretrained none) on the CPU, built once per session."""
    from mambavl.extract.encoders import EncoderConfig, build_encoder

    return build_encoder(EncoderConfig(model="mambavl-tiny-clip", pretrained="none", device="cpu"))


@pytest.fixture(scope="session")
def tiny_extract_config():
    """Factory: an ExtractConfig of a synthetic kitchen dataset's training CSV with the tiny encoder, 4 frames of
    64x64 and the anticipation window (tau_a 0.5 s, tau_o 1 s); keyword arguments override fields."""
    from mambavl.extract.decode import SamplingConfig
    from mambavl.extract.encoders import EncoderConfig
    from mambavl.cache.build import ExtractConfig

    def make(kitchen, out, **overrides):
        base = dict(annotations=str(kitchen.train_csv), videos=str(kitchen.videos), out=str(out),
                    encoder=EncoderConfig(model="mambavl-tiny-clip", pretrained="none", device="cpu"),
                    sampling=SamplingConfig(num_frames=4, size=64), anticipation=True, tau_a=0.5, tau_o=1.0)
        base.update(overrides)
        return ExtractConfig(**base)

    return make


# Every video decoder, for tests that must hold for each (`mambavl extract --decoder`); the CUDA one is GPU-marked.
DECODERS = [
    pytest.param("ffmpeg", id="ffmpeg"),
    pytest.param("torchcodec", id="torchcodec"),
    pytest.param("torchcodec-cuda", id="torchcodec-cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=DECODERS)
def decoder(request):
    """Each decoder in turn (a test using it runs once per decoder); skipped with the reason where one is unusable."""
    from mambavl.extract.backends import build_decoder, torchcodec_problem

    name = request.param
    if name != "ffmpeg":
        problem = torchcodec_problem("cuda" if name.endswith("cuda") else "cpu")
        if problem:
            pytest.skip(f"decoder {name}: {problem}")
    return build_decoder(name)
