"""Shared fixtures. Tests are offline and small: torch runs on one thread so parallel jobs do not thrash."""

from __future__ import annotations

import os
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
