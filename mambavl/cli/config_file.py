"""`--config FILE`: a command's settings from a YAML or JSON file, under its explicit command-line options.

The file is a mapping of the fields of the command's config dataclass (`TrainConfig` for `train`, `ExtractConfig`
for `extract`, `EvalConfig` for `evaluate`, `AblationConfig` for `ablate`); a nested dataclass is a nested mapping
(extract's ``encoder: {kind: timm, model: ...}`` and ``sampling: {num_frames: 8}``). A run's own
`train_config.json` is a valid `--config` of `train`. Precedence: options given on the command line, then the file,
then the dataclass's defaults (the one place a default lives).

Parsing is PyYAML's `safe_load` (JSON files are read by the same parser: JSON is YAML); validation is pydantic's,
over the dataclass itself, so a value from the file is checked by the same types and the same `__post_init__` checks
as one given as an option. Errors are InputError (exit 2) naming the file and the key: an unknown key with the
nearest valid name, a value of the wrong type, a file that is not a mapping.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
import yaml
from pydantic import TypeAdapter, ValidationError

from mambavl.precision import Precision
from mambavl.errors import InputError

C = TypeVar("C")

# The `--config` option of train, extract, evaluate and ablate.
ConfigOption = Annotated[Optional[Path], typer.Option(
    "--config", help="YAML or JSON file of the command's settings (its config dataclass's fields; a run's "
                     "train_config.json works for train). Options given on the command line override it.")]


def precision_option(what: str, auto: str) -> Any:
    """The `--precision` option of train, evaluate, predict and extract (its config dataclass owns the default):
    `what` runs under autocast, `auto` says what auto picks on CUDA."""
    return Annotated[Optional[Precision], typer.Option(
        help=f"Precision of {what}: fp32, bf16, fp16 (CUDA only) or auto ({auto}; fp32 on the CPU).")]


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass in annotation `tp` (`X`, `X | None`, `Optional[X]`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def field_types(cls: type) -> dict[str, Any]:
    """{field name: resolved annotation} of dataclass `cls` (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def check_keys(data: dict[str, Any], cls: type, where: str, prefix: str = "") -> None:
    """InputError for the first key of `data` (recursively, into nested dataclasses) that is not a field of `cls`,
    naming the nearest valid key."""
    types_ = field_types(cls)
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in types_:
            near = difflib.get_close_matches(str(key), list(types_), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix + near[0]!r}?" if near else ""
            valid = ", ".join(prefix + k for k in types_)
            raise InputError(f"{where}: unknown key {name!r}{hint} (valid keys: {valid})")
        inner = _dataclass_of(types_[key])
        if inner is not None and isinstance(value, dict):
            check_keys(value, inner, where, prefix=f"{name}.")


def read_config_file(path: str | Path, cls: type) -> dict[str, Any]:
    """The mapping in YAML/JSON file `path`, its keys checked against dataclass `cls` (values are validated when
    the config is built, see `build_config`). InputError naming the file for a missing or unreadable file, a
    syntax error (with its line), a document that is not a mapping, or an unknown key."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file {p} not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"config file {p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise InputError(f"config file {p}: cannot be parsed as YAML or JSON: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"config file {p}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    check_keys(data, cls, f"config file {p}")
    return data


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data[a][b] = value for dotted key "a.b" (creating the inner mapping)."""
    *outer, last = dotted.split(".")
    for key in outer:
        data[key] = inner = dict(data.get(key) or {})
        data = inner
    data[last] = value


def _message(exc: ValidationError, path: str | Path | None, given: dict[str, Any]) -> str:
    """The first validation error as "<where>: <key>: <problem>", where is the command line when the key was given
    as an option, else the config file."""
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    from_options = path is None or any(loc == k or loc.startswith(k + ".") or k.startswith(loc + ".") for k in given)
    where = "options" if from_options else f"config file {path}"
    return f"{where}: {loc}: {msg}" if loc else f"{where}: {msg}"


def build_config(cls: type[C], path: str | Path | None, explicit: dict[str, Any],
                 unset: dict[str, Any] | None = None) -> C:
    """`cls` from the config file at `path` (None: no file) overridden by `explicit` options ({field or dotted
    "outer.field": value}; None values are options left unset and are dropped), validated by pydantic against the
    dataclass. `unset`: values of fields without a dataclass default for when neither sets them (e.g. no validation
    cache). InputError naming the file (or the command line) and the key for anything invalid."""
    data: dict[str, Any] = {**(unset or {}), **(read_config_file(path, cls) if path is not None else {})}
    given = {k: v for k, v in explicit.items() if v is not None}
    for key, value in given.items():
        _set(data, key, value)
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as exc:
        raise InputError(_message(exc, path, given)) from None
