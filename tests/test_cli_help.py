"""Every command's --help is readable at 80 columns: lines fit, option names are whole, every option with a default
shows it — for options whose default a config dataclass owns, the dataclass's value."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import re

import pytest
import typer
from typer.testing import CliRunner

from mambavl.cli import app, command_tree, shown_default
from mambavl.train import TrainConfig


COMMANDS = list(command_tree())


def _help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


def _option_blocks(text: str) -> list[tuple[str, str]]:
    """(the names part of an option's first line, its whole entry with the lines joined) in the Options section."""
    blocks: list[tuple[str, list[str]]] = []
    for line in text.split("\nOptions:\n", 1)[1].splitlines():
        if re.match(r"^  -", line):
            names = re.split(r"\s{2,}", line.strip())[0]
            blocks.append((names, [line.strip()]))
        elif blocks and line.strip():
            blocks[-1][1].append(line.strip())
    return [(names, " ".join(lines)) for names, lines in blocks]


def _options(command) -> list:
    return [p for p in command.params if p.param_type_name == "option" and not p.hidden]


def _shows_default(option) -> bool:
    """Options whose help must show a default: every one with a default, except presence flags (off unless given)."""
    if option.default is None or option.hidden or option.name == "help":
        return False
    return not (option.is_flag and not option.secondary_opts and option.default is False)


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_is_whole_at_80_columns(path, command):
    text = _help(path)
    assert max(len(line) for line in text.splitlines()) <= 80
    blocks = _option_blocks(text)
    options = _options(command)
    assert options
    for option in options:
        names = option.opts + option.secondary_opts
        entry = next((e for n, e in blocks if all(re.search(rf"(?<![\w-]){re.escape(x)}(?![\w-])", n)
                                                 for x in names)), None)
        assert entry is not None, f"{' '.join(path)}: {'/'.join(names)} is not shown whole:\n{text}"
        if _shows_default(option):
            assert "[default: " in entry, f"{' '.join(path)} {names[0]}: no default shown in {entry!r}"


def test_train_shows_the_config_dataclass_defaults():
    """`train`'s options default to None (the dataclass owns the default): help shows the dataclass's value."""
    entries = {n.split()[0].split(",")[-1]: e for n, e in _option_blocks(_help(("train",)))}
    renamed = {"questions": "question_source"}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    shown = 0
    for option in _options(next(c for p, c in COMMANDS if p == ("train",))):
        field = fields.get(renamed.get(option.name, option.name))
        if option.default is not None or field is None or field.default in (dataclasses.MISSING, None):
            continue
        expected = shown_default(field.default, "/".join(option.opts + option.secondary_opts))
        assert f"[default: ({expected})" in entries[option.opts[0]], (option.name, entries[option.opts[0]])
        shown += 1
    assert shown >= 15 and "[default: (20)" in entries["--epochs"] and "[default: (0.001)" in entries["--lr"]


def test_root_and_train_help_do_not_import_the_stages():
    """`mambavl --help` lists the commands without importing them; `mambavl train --help` imports what its options
    need (the run configuration), not torch, the model, numba or matplotlib (measured: torch alone is 1.2–1.9 s)."""
    code = ("import sys; from mambavl.cli import main; sys.argv = ['mambavl', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = ('torch', 'numba', 'matplotlib', 'mambavl.train', 'mambavl.cli.train', 'mambavl.cli.extract')\n"
            "print('LOADED', sorted(m for m in heavy if m in sys.modules))")
    for args, allowed in (([], []), (["train"], ["mambavl.cli.train"])):
        out = subprocess.run([sys.executable, "-c", code, *args, "--help"], capture_output=True, text=True, check=True)
        assert "Usage:" in out.stdout
        assert out.stdout.rsplit("LOADED ", 1)[1].strip() == repr(allowed), out.stdout


def test_root_help_lists_every_command_with_its_line():
    """The command list that `mambavl --help` shows without importing the commands names each one, in order."""
    text = _help(())
    listed = re.findall(r"^  ([a-z-]+)  ", text.split("Commands:\n", 1)[1], flags=re.M)
    assert listed == [p[0] for p, _ in COMMANDS if len(p) == 1] + ["cache"]
    assert "Train the MambaVL fusion on a feature cache." in text


def test_the_command_line_lets_idle_openmp_threads_sleep():
    """`mambavl` sets OMP_WAIT_POLICY=PASSIVE before any command can import torch (libgomp reads it once, at load;
    spinning workers made a training epoch 5x slower on loaded cores), and an explicit setting wins."""
    code = ("import os, sys; from mambavl.cli import main; loaded = 'torch' in sys.modules\n"
            "sys.argv = ['mambavl', '--version']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('POLICY', os.environ.get('OMP_WAIT_POLICY'), 'TORCH_BEFORE', loaded)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        run_env = env if given is None else {**env, "OMP_WAIT_POLICY": given}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=run_env)
        assert out.stdout.rsplit("POLICY ", 1)[1].split() == [expected, "TORCH_BEFORE", "False"], out.stdout
