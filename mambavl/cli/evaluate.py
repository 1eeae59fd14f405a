"""CLI commands of the evaluate stage (registered on `mambavl.cli.app`)."""

from __future__ import annotations

from mambavl.cli import app, cache_app  # noqa: F401
