"""CLI commands around a trained model: demo, ablate, efficiency, predict (registered on `mambavl.cli.app`)."""

from __future__ import annotations

from mambavl.cli import app  # noqa: F401
