"""The `mambavl` command line: thin typer commands that build a config and call a library function.

Each stage registers its commands from its own module (``extract``, ``train``, ``evaluate``); this module only
owns the application objects and the mapping of errors to exit codes:

* 0 — done; 2 — bad input (``InputError``: the message names the file/row/field);
* 3 — finished, with recorded failures (extraction);
* 4 — training stopped (``TrainingStopped``: a non-finite loss or weights, a checkpoint that could not be written;
  the last good checkpoint is kept).

The one deliberate exception to imports at the top of modules lives in this layer: each command imports the library
stage it runs inside its body (e.g. ``from mambavl.evaluate import evaluate``), so that ``mambavl --help`` and a
command's ``--help`` do not import every stage (fusion kernels, evaluation plots) that other commands need.
Progress bars are drawn by `mambavl.cli.progress`, the only renderer of the library's `mambavl.progress.Progress`
reports.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
import typing
from enum import Enum

import typer
from typer.core import TyperGroup
from typer.models import OptionInfo

from mambavl import __version__
from mambavl.errors import InputError, TrainingStopped, os_error_message

class LazyGroup(TyperGroup):
    """A command group whose commands are imported when first asked for (run, or their own --help), so that
    ``mambavl --help`` imports no stage and ``mambavl train --help`` only what `train`'s options need.

    `lazy` maps a command name to (the module that registers it on `source`, the line that the group's own --help
    shows for it, so that listing the commands imports none of them)."""

    lazy: typing.ClassVar[dict[str, tuple[str, str]]] = {}
    source: typing.ClassVar[typer.Typer]

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(dict.fromkeys([*self.lazy, *self.commands]))

    def get_command(self, ctx: typer.Context, cmd_name: str) -> typing.Any:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            importlib.import_module(self.lazy[cmd_name][0])
            info = next(i for i in self.source.registered_commands if i.name == cmd_name)
            self.commands[cmd_name] = typer.main.get_command_from_info(
                info,
                pretty_exceptions_short=self.source.pretty_exceptions_short,
                rich_markup_mode=self.source.rich_markup_mode,
            )
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: typer.Context, formatter: typing.Any) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names), default=0)
        rows = []
        for name in names:
            if name in self.lazy:
                rows.append((name, _shortened(self.lazy[name][1], limit)))
            elif not self.commands[name].hidden:
                rows.append((name, self.commands[name].get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _shortened(text: str, limit: int) -> str:
    """`text` cut at a word boundary to at most `limit` characters, with "..." where cut (as click shortens help)."""
    if len(text) <= limit:
        return text
    return text[: max(limit - 3, 0)].rsplit(" ", 1)[0].rstrip(" ,;:") + "..."


class _Commands(LazyGroup):
    lazy = {
        "extract": ("mambavl.cli.extract",
                    "Decode segments, run the frozen encoder, write (or resume) a feature cache."),
        "train": ("mambavl.cli.train", "Train the MambaVL fusion on a feature cache."),
        "evaluate": ("mambavl.cli.evaluate",
                     "EK-100 metrics, per-class accuracy, plots and a submission for a checkpoint on a cache."),
        "audit-questions": ("mambavl.cli.evaluate", "Measure how much accuracy comes from the question text."),
        "efficiency": ("mambavl.cli.tools", "Parameters, FLOPs, latency and peak memory of the fusion."),
        "ablate": ("mambavl.cli.tools", "Train the ablation variants and linear probes; a table with mean ± sd."),
        "predict": ("mambavl.cli.video", "Top actions and the answers to the question bank for one clip."),
        "demo": ("mambavl.cli.video", "The whole pipeline on generated kitchen clips, no downloads."),
        "export": ("mambavl.cli.share", "Write a checkpoint as a Hugging Face model folder with its model card."),
        "push": ("mambavl.cli.share", "Upload a model folder to the Hugging Face Hub."),
    }


class _CacheCommands(LazyGroup):
    lazy = {
        "inspect": ("mambavl.cli.cache",
                    "Show a cache's attributes, counts per window, failures and question tables."),
        "merge": ("mambavl.cli.cache", "Join shard caches into one, in annotation row order."),
        "import": ("mambavl.cli.extract",
                   "Turn features from another extractor (AVION, EgoVLP, TIM, ...) into a cache."),
    }


app = typer.Typer(
    name="mambavl",
    help="MambaVL: extract frozen features once, train the fusion on the cache, evaluate EK-100 style.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
    cls=_Commands,
)
cache_app = typer.Typer(
    help="Inspect, merge and import feature caches.", no_args_is_help=True, rich_markup_mode=None, cls=_CacheCommands
)
app.add_typer(cache_app, name="cache")
_Commands.source = app
_CacheCommands.source = cache_app

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_FAILURES = 3
EXIT_TRAINING_STOPPED = 4


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mambavl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """MambaVL command line."""


def command_tree(
    group: typing.Any = None, path: tuple[str, ...] = ()
) -> typing.Iterator[tuple[tuple[str, ...], typing.Any]]:
    """Every command of the command line (or of `group`) as (its path, e.g. ("cache", "import"), the click command),
    in help order, each imported; groups are walked, not yielded."""
    group = typer.main.get_command(app) if group is None else group
    ctx = typer.Context(group, info_name=path[-1] if path else "mambavl")
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if hasattr(command, "list_commands"):  # a group
            yield from command_tree(command, path + (name,))
        elif command is not None:
            yield path + (name,), command


def fail(message: str, code: int = EXIT_BAD_INPUT) -> "typer.Exit":
    """Print an error to stderr and return the Exit to raise (exit code 2 = bad input)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def positive(value: float | None) -> float | None:
    """Option callback for numbers that must be > 0 (a rate, a duration, a learning rate); None = not given.
    Anything else (0, negative, nan) stops with exit 2 naming the option and its range."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"{value} is not in the range x>0 (a positive number)")
    return value


def shown_default(value: typing.Any, flag: str = "") -> str:
    """How help shows a default value: an Enum by its value, a float compactly (0.001, 20), a bool as the flag's own
    spelling when `flag` is a "--on/--off" pair (else on/off), anything else as str."""
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        on, _, off = flag.partition("/")
        return (on if value else off).strip().lstrip("-") if off else ("on" if value else "off")
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(shown_default(v) for v in value)
    return str(value)


def config_default(config: type, dotted: str) -> typing.Any:
    """The default of field `dotted` of dataclass `config` ("epochs", or "sampling.num_frames" through a nested
    dataclass field's default instance); `dataclasses.MISSING` when there is no such field or it has no default."""
    head, _, rest = dotted.partition(".")
    field = {f.name: f for f in dataclasses.fields(config)}.get(head)
    if field is None:
        return dataclasses.MISSING
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return dataclasses.MISSING
    for part in rest.split(".") if rest else ():
        value = getattr(value, part, dataclasses.MISSING)
    return value


def defaults_from(config: type, **renamed: str) -> typing.Callable:
    """Decorator of a command whose options default to None so that the config dataclass `config` owns the default
    (an option given overrides it, one left out keeps the dataclass's): help shows the dataclass's default for each
    such option, read from the dataclass, never restated. `renamed`: option parameter -> field name where they
    differ (e.g. ``questions="question_source"``, or a nested field ``frames="sampling.num_frames"``). Goes below
    ``@app.command``."""

    def apply(command: typing.Callable) -> typing.Callable:
        hints = typing.get_type_hints(command, include_extras=True)
        for name, parameter in inspect.signature(command).parameters.items():
            value = config_default(config, renamed.get(name, name))
            if parameter.default is not None or value is dataclasses.MISSING:
                continue
            info = next((m for m in getattr(hints[name], "__metadata__", ()) if isinstance(m, OptionInfo)), None)
            if info is None or value is None or value == {}:
                continue
            # in Annotated[..., typer.Option("--amp/--no-amp")] the declaration arrives as the default
            decls = [d for d in (info.default, *(info.param_decls or ())) if isinstance(d, str)]
            info.show_default = shown_default(value, next((d for d in decls if "/" in d), ""))
            command.__annotations__[name] = hints[name]  # the evaluated hint, carrying show_default, for typer
        return command

    return apply


def optional_path(path: os.PathLike | None) -> str | None:
    """A path option as the str the config dataclasses take; None stays None (option not given)."""
    return None if path is None else str(path)


def question_sources(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated list option ("templates,annotation") as a tuple; None stays None (option not given)."""
    return None if text is None else tuple(q.strip() for q in text.split(",") if q.strip())


# OpenMP's default wait policy lets an idle worker thread spin after every parallel region. Where the cores are also
# busy with other work (a shared machine, or torch's and numba's thread pools next to each other) the spinning thread
# holds the core that the thread it waits for needs, and each of the many small parallel regions of a training step
# then costs a scheduler time slice: a `mambavl train` epoch on 360 clips (tiny CLIP, 2x2 grid features, 2 torch
# threads, 2 loaded cores) took 32 s under the default policy and 6.5 s with PASSIVE, with the same numbers.
# libgomp reads the variable once, when torch (or numba) loads it, hence here, before any command imports torch.
OPENMP_WAIT_POLICY = "PASSIVE"


def passive_openmp(environ: typing.MutableMapping[str, str] = os.environ) -> str:
    """Set OMP_WAIT_POLICY to PASSIVE unless the environment already sets it (``OMP_WAIT_POLICY=ACTIVE mambavl ...``
    keeps the runtime's spinning); returns the policy in force. Takes effect only for an OpenMP runtime not yet
    loaded, i.e. when called before torch is imported."""
    return environ.setdefault("OMP_WAIT_POLICY", OPENMP_WAIT_POLICY)


def main() -> None:
    """Console-script entry point: InputError anywhere below a command becomes exit code 2, TrainingStopped 4; an
    OSError about the place a file lives (read-only file system, permissions, full disk, open-files limit) 2.
    OpenMP worker threads sleep when idle instead of spinning (`passive_openmp`) unless OMP_WAIT_POLICY is set."""
    passive_openmp()
    try:
        app()
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except TrainingStopped as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_TRAINING_STOPPED)
    except OSError as exc:  # a read-only file system, permissions, a full disk, the open-files limit: exit 2
        message = os_error_message(exc, exc.filename or "(unnamed)")
        if message is None:
            raise
        typer.echo(f"error: {message}", err=True)
        sys.exit(EXIT_BAD_INPUT)
