"""The package's layers and no-cycle rule (pyproject [tool.importlinter], docs/architecture.md), checked with
import-linter so that a change which imports from a later stage, or closes a cycle, fails with a readable report."""

from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold(capsys):
    rc = lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True)
    report = capsys.readouterr().out
    assert rc == 0, "import-linter contracts broken (see docs/architecture.md):\n" + report
