"""Start-up of the command line: how long the light commands take from the shell, against the bare h5py read a user
would otherwise type to look at a cache.

    python benchmarks/cli_startup.py --workdir /tmp/mambavl-bench            # 9 interleaved runs of each command
    python benchmarks/cli_startup.py --workdir /tmp/x --against /path/to/other/checkout   # before / after a change
    python benchmarks/cli_startup.py --smoke --workdir /tmp/x                # one run each, seconds

Each command runs as its own `python -m mambavl ...` process (what a user's shell does, imports included), round-robin
with the others, in --workdir, where a small cache is written first (`mambavl.cache.synthetic.make_planted_cache`):

  --version, --help, train --help   what a newcomer types first
  cache inspect C, cache inspect --json C
  bare h5py                         `python -c "import h5py; ..."` printing the cache's attributes and row count
  import torch                      `python -c "import torch"`: what any command that needs torch pays at least

With --against DIR the mambavl commands also run from the checkout DIR (PYTHONPATH=DIR), interleaved with this one.

Headline: `cache inspect` / bare h5py, target <= 3x (inspect needs typer, rich and the cache reader on top of h5py,
and neither torch nor a decoder).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO,
    base_parser,
    fmt_s,
    headline,
    interleaved,
    machine_line,
    median,
    print_table,
    spread,
    write_json,
)
from mambavl.cache.synthetic import make_planted_cache  # noqa: E402

TARGET = 3.0


def commands(cache: Path) -> dict[str, list[str]]:
    """Name -> argv after `python` for the mambavl commands (each run from a checkout); the baselines are
    `BASELINES`."""
    return {
        "mambavl --version": ["-m", "mambavl", "--version"],
        "mambavl --help": ["-m", "mambavl", "--help"],
        "mambavl train --help": ["-m", "mambavl", "train", "--help"],
        "mambavl cache inspect": ["-m", "mambavl", "cache", "inspect", str(cache)],
        "mambavl cache inspect --json": ["-m", "mambavl", "cache", "inspect", "--json", str(cache)],
    }


BASELINES = {
    "bare h5py": ["-c", "import sys, h5py\nwith h5py.File(sys.argv[1], 'r') as f:\n"
                        "    print(dict(f.attrs), f['valid'].shape[0])"],
    "import torch": ["-c", "import torch"],
}


def runner(argv: list[str], cwd: Path, checkout: Path | None):
    """A callable that runs `python argv` in `cwd` (with PYTHONPATH=checkout when given) and checks its exit code."""
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout) + os.pathsep + env.get("PYTHONPATH", "")

    def run() -> None:
        res = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"`python {' '.join(argv)}` failed ({res.returncode}):\n{res.stderr[-2000:]}")

    return run


def main() -> None:
    p = base_parser(__doc__.split("\n\n", 1)[0])
    p.add_argument("--workdir", required=True, help="folder for the small cache the commands read")
    p.add_argument("--against", default=None, help="another checkout of mambavl whose commands run interleaved")
    args = p.parse_args()
    repeats = args.repeats or (1 if args.smoke else 9)
    checkouts = {"": REPO}
    if args.against:
        other = Path(args.against).resolve()
        if not (other / "mambavl" / "__init__.py").is_file():
            raise SystemExit(f"--against {other}: not a mambavl checkout (no mambavl/__init__.py)")
        checkouts = {" (this checkout)": REPO, " (--against)": other}
    work = Path(args.workdir).resolve()  # the commands run inside it: a relative path would not resolve there
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "startup.h5"
    if not cache.exists():
        make_planted_cache(cache, n=64, seed=0, frames=4, dim=16, text_dim=8, num_verbs=4, num_nouns=5, noise=1.0)
    print(machine_line())

    fns = {}
    for name, argv in commands(cache).items():
        for suffix, checkout in checkouts.items():
            fns[name + suffix] = runner(argv, work, checkout)
    for name, argv in BASELINES.items():
        fns[name] = runner([*argv, str(cache)] if name == "bare h5py" else argv, work, None)
    times = interleaved(fns, repeats, warmup=0 if args.smoke else 1)

    base = median(times["bare h5py"])
    rows = [[name, fmt_s(median(t)), f"{spread(t):.0%}", f"{median(t) / base:.2f}x"] for name, t in times.items()]
    print_table(["command", "wall", "spread", "vs bare h5py"], rows,
                title=f"start-up, one process per run, median of {repeats} (interleaved)")
    inspect = median(times["mambavl cache inspect" + next(iter(checkouts))])
    ratio = inspect / base
    write_json(args.json, {"repeats": repeats, "times_s": times, "against": args.against,
                           "inspect_vs_bare_h5py": ratio})
    print(headline("cache_inspect_vs_bare_h5py", ratio, "x", f"<= {TARGET:g}x", ratio <= TARGET,
                   f"(inspect {fmt_s(inspect)}, bare h5py {fmt_s(base)})"))


if __name__ == "__main__":
    main()
