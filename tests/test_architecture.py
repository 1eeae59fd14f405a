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


# The libraries only video decoding and frame encoding use: training and scoring on cached features must run where
# they are not installed (a GPU machine set up for training, a cluster node with no ffmpeg).
EXTRACTION_ONLY = ("av", "ffmpeg", "imageio_ffmpeg", "open_clip", "torchcodec")


def test_training_and_evaluation_on_a_cache_need_no_decoding_library(tmp_path, run_refusing):
    """A fresh interpreter in which the decoding / encoding libraries cannot be imported (a finder refuses them and
    `importlib.util.find_spec` reports them absent) trains 1 epoch on a planted cache, evaluates the checkpoint and
    shows the --help of the commands that work on caches (train, evaluate, ablate, efficiency: each imports its
    command module); the project's decoding modules were not imported either (a `try: import av` there would
    otherwise go unseen)."""
    code = """
from pathlib import Path
from mambavl.cache.synthetic import make_planted_cache
from mambavl.evaluate import EvalConfig, evaluate
from mambavl.runtime import TrainConfig
from mambavl.train import train
work = Path(sys.argv[1])
kw = dict(frames=4, dim=16, text_dim=8, num_verbs=4, num_nouns=5, noise=1.0)
tr = make_planted_cache(work / "train.h5", n=32, seed=0, **kw)
va = make_planted_cache(work / "val.h5", n=16, seed=1, **kw)
res = train(TrainConfig(train_cache=str(tr), val_cache=str(va), out_dir=str(work / "run"), epochs=1, batch_size=16,
                        device="cpu", seed=0, min_steps=0))
metrics = evaluate(EvalConfig(checkpoint=str(res.last_checkpoint), cache=str(va), out_dir=str(work / "eval"),
                              device="cpu"))
from typer.testing import CliRunner
from mambavl.cli import app
for command in ("train", "evaluate", "ablate", "efficiency"):
    shown = CliRunner().invoke(app, [command, "--help"])
    assert shown.exit_code == 0 and "Usage" in shown.output, (command, shown.output, shown.exception)
print(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED
             or m in ("mambavl.extract.decode", "mambavl.extract.packet_plan")))
"""
    res = run_refusing(code, EXTRACTION_ONLY, str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout[-3000:]
