"""When the real-footage test runs, skips or fails: it needs OpenCV's sample clips, fetched with apt-get from
Debian. A machine without apt-get or network skips it with a one-line reason; under CI (CI=true) it stays required."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def rf():
    spec = importlib.util.spec_from_file_location("real_footage_gate", REPO / "scripts" / "real_footage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clips_already_fetched_run_without_apt(rf, tmp_path, monkeypatch):
    for name in rf.CLIPS:
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.setattr(rf.shutil, "which", lambda tool: None)
    assert rf.clips_unavailable(tmp_path) is None
    assert rf.unavailable_action(None, {"CI": "true"}) == rf.unavailable_action(None, {}) == "run"


def test_no_apt_gives_a_one_line_reason(rf, tmp_path, monkeypatch):
    monkeypatch.setattr(rf.shutil, "which", lambda tool: None)
    monkeypatch.setattr(rf, "fetch_clips", lambda media: pytest.fail("must not try to fetch without apt-get"))
    reason = rf.clips_unavailable(tmp_path / "media")
    assert "apt-get" in reason and "\n" not in reason


def test_failed_fetch_gives_a_one_line_reason(rf, tmp_path, monkeypatch):
    def offline(media):
        raise subprocess.CalledProcessError(100, ["apt-get", "update", "-qq"])

    monkeypatch.setattr(rf.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(rf, "fetch_clips", offline)
    reason = rf.clips_unavailable(tmp_path / "media")
    assert reason.startswith("could not fetch") and "CalledProcessError" in reason and "\n" not in reason


@pytest.mark.parametrize("env, action", [({}, "skip"), ({"CI": "false"}, "skip"), ({"CI": ""}, "skip"),
                                         ({"CI": "true"}, "fail"), ({"CI": "1"}, "fail"), ({"CI": "TRUE"}, "fail")])
def test_missing_clips_skip_outside_ci_and_fail_in_ci(rf, env, action):
    assert rf.unavailable_action("no apt-get on this machine", env) == action
