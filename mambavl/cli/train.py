"""CLI commands of the train stage (registered on `mambavl.cli.app`)."""

from __future__ import annotations

from mambavl.cli import app, cache_app  # noqa: F401
