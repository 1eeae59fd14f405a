"""Markdown tables of the reports (efficiency.md, ablation.md, audit.md, the model card, the demo's README).

A leaf module: each report decides its columns and cell formats; this writes them as GitHub-flavoured markdown.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def markdown_row(cells: Iterable[Any]) -> str:
    """One table line, "| a | b |"; cells as str, a "|" inside a cell escaped so it cannot split the row."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a markdown table: `header`, the separator, one line per row of `rows`."""
    return [markdown_row(header), "|" + "---|" * len(header), *(markdown_row(r) for r in rows)]
