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


def _package_sources():
    return sorted((REPO / "mambavl").rglob("*.py"))


def test_no_function_over_100_lines():
    import ast

    long = [f"{p.relative_to(REPO)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in _package_sources() for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 100]
    assert not long, "split these functions:\n" + "\n".join(long)


def test_checkpoints_are_read_in_one_place():
    """One torch.load of mambavl checkpoints (runtime/artifact.py); the other loads read other programs' files
    (encoder weights, imported features). No string-key reads of a checkpoint dict outside the artifact module."""
    import re

    loads = {str(p.relative_to(REPO)) for p in _package_sources() if "torch.load(" in p.read_text()}
    assert loads <= {"mambavl/runtime/artifact.py", "mambavl/extract/weights.py", "mambavl/cache/importer.py",
                     "mambavl/cache/dense.py"}, loads
    assert "mambavl/runtime/artifact.py" in loads
    keyed = re.compile(r"\bckpt(\[|\.get\()")
    # (fuse/scan.py's `ckpt` is the scan's own state checkpoints for the backward pass, not a model checkpoint)
    reads = [f"{p.relative_to(REPO)}:{i + 1}" for p in _package_sources() if p.name not in ("artifact.py", "scan.py")
             for i, line in enumerate(p.read_text().splitlines()) if keyed.search(line)]
    assert not reads, reads


def test_analysis_patches_nothing():
    """The audit and efficiency pass what they change (question tables, the scan implementation) instead of patching
    methods of objects or names in modules."""
    for p in (REPO / "mambavl" / "analysis").glob("*.py"):
        text = p.read_text()
        assert "object.__setattr__" not in text and "sys.modules" not in text, p.name
