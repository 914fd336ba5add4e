"""``mypy --strict`` on ``agent/``, the device side (pyproject.toml's ``[tool.mypy]``), on
every ``make test`` (so in CI) as in ``make lint``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, tool

pytestmark = pytest.mark.slow  # a cold mypy run takes ~15 s on 2 cores


def mypy(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([tool("mypy"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_agent_is_clean_under_mypy_strict() -> None:
    done = mypy(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found" in done.stdout


def test_the_configuration_is_strict_and_covers_agent(tmp_path: Path) -> None:
    """The same ``[tool.mypy]`` on a throwaway ``agent`` package with an unannotated
    function and an implicit Any return: both are reported, so strict mode is on."""
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "__init__.py").write_text("")
    (tmp_path / "agent" / "loose.py").write_text(
        "import json\n\n\ndef f(x):\n    return x\n\n\n"
        "def g(s: str) -> int:\n    return json.loads(s)\n")
    text = (REPO / "pyproject.toml").read_text()
    start = text.index("[tool.mypy]")
    end = text.index("\n# Package contracts")
    (tmp_path / "pyproject.toml").write_text(text[start:end])
    done = mypy(tmp_path, "--cache-dir", str(tmp_path / "cache"))
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "agent/loose.py:4: error: Function is missing a type annotation" in out
    assert "agent/loose.py:9: error: Returning Any from function declared to return" in out
