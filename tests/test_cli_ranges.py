"""Every numeric option of every command has a stated range, and a value outside it stops the command with exit 2
naming the option and the range before anything is written; sizes that depend on the data (--candidate-folds
against the training rows) are checked as soon as the data is open, before the first training."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mambavl.cache.synthetic import make_planted_cache
from mambavl.cli import app, command_tree


def _numeric_options():
    for prefix, cmd in command_tree():
        for param in cmd.params:
            name = param.bare_type() if callable(getattr(param, "bare_type", None)) else None  # "int", "float"
            kind = {"int": int, "float": float}.get(str(name))
            if param.param_type_name == "option" and kind is not None and not param.is_flag:
                yield prefix, cmd, param, kind


def test_every_numeric_option_has_a_range():
    found = list(_numeric_options())
    assert len(found) > 40  # extract, train, evaluate, audit, efficiency, ablate, predict, demo, cache import
    unbounded = [f"{' '.join(prefix)} {param.opts[0]}" for prefix, _, param, _ in found
                 if param.min is None and param.max is None and param.callback is None]
    assert not unbounded, f"numeric options without a range: {unbounded}"


def _bad_values(param, kind):
    if param.min is None and param.max is None:  # checked by the `positive` callback: x > 0
        return ["0", "-1", "nan"]
    out = []
    if param.min is not None:
        out.append(str(param.min - 1) if kind is int else str(param.min - 0.5))
    if param.max is not None:
        out.append(str(param.max + 1))
    return out


@pytest.mark.parametrize("case", [pytest.param((p, o.opts[0], v), id=f"{' '.join(p)} {o.opts[0]}={v}")
                                  for p, c, o, k in _numeric_options() for v in _bad_values(o, k)])
def test_out_of_range_value_exits_2_naming_the_option_before_any_output(tmp_path, case):
    prefix, option, value = case
    cmd = dict(command_tree())[prefix]
    args = [*prefix, f"{option}={value}"]
    for param in cmd.params:  # every other required parameter gets a placeholder (never reached)
        if param.required:
            args += [str(tmp_path / "x")] if param.param_type_name == "argument" else [param.opts[0], "x"]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = CliRunner().invoke(app, args)
    finally:
        os.chdir(cwd)
    assert res.exit_code == 2, (args, res.output)
    assert option in res.output and ("range" in res.output or "greater than" in res.output
                                     or "less than" in res.output), res.output
    assert list(tmp_path.iterdir()) == [], f"{args} wrote {list(tmp_path.iterdir())}"


def test_fps_zero_is_refused_not_uniform(tmp_path):
    res = CliRunner().invoke(app, ["extract", "a.csv", "--videos", str(tmp_path), "--out", str(tmp_path / "x.h5"),
                                   "--fps", "0"])
    assert res.exit_code == 2 and "--fps" in res.output and "x>0" in res.output, res.output
    assert not (tmp_path / "x.h5").exists()


def test_candidate_folds_beyond_the_training_rows(tmp_path):
    train = make_planted_cache(tmp_path / "train.h5", n=24, seed=0)
    val = make_planted_cache(tmp_path / "val.h5", n=12, seed=1)
    res = CliRunner().invoke(app, ["train", "--train-cache", str(train), "--val-cache", str(val), "--out",
                                   str(tmp_path / "r"), "--questions", "predicted", "--candidates-k", "2",
                                   "--candidate-folds", "100", "--epochs", "1", "--device", "cpu", "--quiet"])
    assert res.exit_code == 2, res.output
    assert "--candidate-folds 100" in res.output and "choose 2 to 24" in res.output
    assert not Path(tmp_path / "r" / "last.pt").exists()
