"""The README's set-up commands: the default install path (CI's) and the CPU-only one (MAMBAVL_TORCH=cpu), checked
through the scripts' dry run (the pip command lines they would run; nothing is installed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "scripts" / "constraints-dev.txt"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the set-up scripts are bash scripts")


def _dry_run(script: str, tmp_path: Path, *args: str, **env: str) -> list[str]:
    """The commands `script` would run, for a machine without the environment yet."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAMBAVL_")}
    clean.update(MAMBAVL_DRY_RUN="1", XDG_CACHE_HOME=str(tmp_path / "cache"), **env)
    done = subprocess.run(["bash", str(REPO / "scripts" / script), *args], env=clean, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "cache").exists()  # a dry run creates nothing
    return [line[2:] for line in done.stderr.splitlines() if line.startswith("+ ")]


def _venv(commands: list[str]) -> str:
    return re.fullmatch(r"\S+ -m venv (\S+)", commands[0]).group(1)


def test_default_path_is_pypis_build_pinned_by_the_constraints(tmp_path):
    commands = _dry_run("test.sh", tmp_path, "-x")
    venv = _venv(commands)
    assert re.fullmatch(r".*/mambavl/venv-[0-9a-f]{16}", venv)
    assert commands[1:] == [
        f"{venv}/bin/python -m pip install -q --upgrade pip",
        f"{venv}/bin/python -m pip install -q -c {CONSTRAINTS} torch torchvision",
        f"{venv}/bin/python -m pip install -q -c {CONSTRAINTS} -e {REPO}[dev]",
        f"touch {venv}/.mambavl-installed-dev",
        "exec python -m pytest -q -x",
    ]


def test_cpu_path_installs_torch_from_pytorchs_cpu_index_into_its_own_environment(tmp_path):
    default = _venv(_dry_run("test.sh", tmp_path))
    commands = _dry_run("test.sh", tmp_path, MAMBAVL_TORCH="cpu")
    venv = _venv(commands)
    assert venv == default + "-cpu"  # never reuses (or overwrites) an environment with the CUDA build
    assert commands[2] == (f"{venv}/bin/python -m pip install -q --index-url {CPU_INDEX} -c {CONSTRAINTS} "
                           "torch torchvision")
    assert commands[3] == f"{venv}/bin/python -m pip install -q -c {CONSTRAINTS} -e {REPO}[dev]"
    mirror = _dry_run("demo.sh", tmp_path, "--quick", MAMBAVL_TORCH="cpu", MAMBAVL_TORCH_INDEX="https://m.example/cpu")
    assert "--index-url https://m.example/cpu" in mirror[2]
    assert mirror[3].endswith(f"-e {REPO}") and mirror[-1] == "exec mambavl demo --overwrite --quick"


def test_an_unknown_torch_build_is_refused(tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAMBAVL_")}
    done = subprocess.run(["bash", str(REPO / "scripts" / "test.sh")], capture_output=True, text=True, timeout=60,
                          env={**clean, "MAMBAVL_DRY_RUN": "1", "MAMBAVL_TORCH": "cuda"})
    assert done.returncode == 2 and "MAMBAVL_TORCH=cuda: expected cpu" in done.stderr


def test_pins_live_in_the_dev_constraints_only():
    pins = {line.split("==")[0]: line.split("==")[1] for line in CONSTRAINTS.read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    assert pins == {"torch": "2.14.1", "torchvision": "0.29.1"}
    metadata = (REPO / "pyproject.toml").read_text()
    assert not re.search(r"\btorch(vision)?\s*==", metadata)


def test_conda_cpu_environment_differs_from_the_default_only_by_the_index():
    def body(name: str) -> list[str]:
        return [line for line in (REPO / name).read_text().splitlines() if line.strip() and not line.startswith("#")]

    default, cpu = body("environment.yml"), body("environment-cpu.yml")
    assert f"      - --index-url {CPU_INDEX}" in cpu
    extra = {f"      - --index-url {CPU_INDEX}", "      - --extra-index-url https://pypi.org/simple"}
    assert [line for line in cpu if line not in extra and not line.startswith("name:")] == \
        [line for line in default if not line.startswith("name:")]
