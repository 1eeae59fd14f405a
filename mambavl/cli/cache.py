"""`mambavl cache inspect | merge`: commands that read and write caches through h5py.

They import neither torch nor a decoder or encoder library (`mambavl.cache.reader`, `mambavl.cache.merge`), so they
start in about half a second and run where those are not installed. `cache import`, which embeds texts, lives with
`extract` in `mambavl.cli.extract`.

Exit codes: 0 done; 2 bad input (the message names the file and what is wrong with it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mambavl.cli import cache_app, fail
from mambavl.errors import InputError


def describe_cache(path: Path) -> dict:
    """What `cache inspect` shows: attrs, counts per window, failures, question/answer table sizes."""
    from mambavl.cache import schema
    from mambavl.cache.reader import open_cache

    with open_cache(path) as cache:
        f = cache.h5()
        windows = {}
        for window in schema.WINDOWS:
            p = schema.window_prefix(window)
            if p + "valid" in f:
                valid = f[p + "valid"][()]
                windows[window] = {"rows": int(len(valid)), "valid": int(valid.sum()),
                                   "tokens_shape": list(f[p + "features"].shape)}
                if window == schema.RECOGNITION and schema.VIEW_FEATURES in f:
                    windows[window]["views"] = 1 + int(f[schema.VIEW_FEATURES].shape[1])
        failures = cache.failures()
        q = f.get(schema.QUESTIONS)
        a = f.get(schema.ANSWERS)
        info = {
            "path": str(path),
            "attrs": {k: v for k, v in sorted(cache.attrs.items())},
            "complete": bool(f.attrs.get("complete", False)),
            "segments": cache.n,
            "windows": windows,
            "failed": len(failures),
            "failures": failures,
            "classes": {"verb": len(cache.verb_keys), "noun": len(cache.noun_keys)},
            "questions": {
                "texts": int(q["texts"].shape[0]) if q is not None else 0,
                "tokens_shape": list(q["tokens"].shape) if q is not None else [],
                "templates": {k: int(v.shape[0]) for k, v in q["templates"].items()} if q is not None else {},
                "per_segment": sorted(q["per_segment"].keys()) if q is not None and "per_segment" in q else [],
            },
            "answers": {k: int(a[k].shape[0]) for k in ("verb", "noun", "action")} if a is not None else {},
        }
    return info


@cache_app.command("inspect")
def cache_inspect(
    cache: Annotated[Path, typer.Argument(help="Cache file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show a cache's attributes, counts per window, failures and question/answer tables."""
    try:
        info = describe_cache(cache)
    except InputError as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return

    console = Console()
    t = Table(title=f"{cache}", show_header=True)
    t.add_column("attribute")
    t.add_column("value")
    for k, v in info["attrs"].items():
        t.add_row(k, str(v))
    console.print(t)
    for window, w in info["windows"].items():
        views = f", {w['views']} views" if w.get("views") else ""
        console.print(f"{window}: {w['valid']}/{w['rows']} valid, tokens {w['tokens_shape']}{views}")
    console.print(f"complete: {info['complete']}  classes: {info['classes']}  questions: {info['questions']}  "
                  f"answers: {info['answers']}")
    console.print(f"failures: {info['failed']}")
    for f in info["failures"][:20]:
        console.print(f"  row {f['index']} {f['narration_id']} [{f['window']}]: {f['reason']}")


@cache_app.command("merge")
def cache_merge(
    out: Annotated[Path, typer.Argument(help="Merged cache to write.")],
    shards: Annotated[list[Path], typer.Argument(help="Shard caches written with --shard i/N.")],
    remove_shards: Annotated[bool, typer.Option(
        "--remove-shards", help="Delete the shard files after a successful merge.")] = False,
) -> None:
    """Join shard caches into one, in annotation row order.

    Refused (exit 2, naming the shard) unless every shard is complete, their attributes agree, each i of --shard i/N
    is there once, no row or narration_id is in two shards and the rows add up to the annotation file's.
    """
    from mambavl.cache.merge import merge_caches

    try:
        path = merge_caches([str(s) for s in shards], str(out))
    except InputError as exc:
        raise fail(str(exc)) from None
    if remove_shards:
        for s in shards:
            s.unlink()
    typer.echo(f"merged {len(shards)} shards into {path}" + (" (shards removed)" if remove_shards else ""))
