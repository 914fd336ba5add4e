"""The device package: Python 3.8 syntax and library use, the two distributions' lists in
step, optional onnx, the onnxruntime/numpy guard, guarded operator commands, the units."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import REPO, exported_digits
from conftest import tool

UNITS = [REPO / "agent" / "systemd" / "knet-agent.service",
         REPO / "deploy" / "systemd" / "knet-trainer.service",
         REPO / "deploy" / "systemd" / "knet-broker.service"]


def test_agent_needs_nothing_newer_than_python_3_8() -> None:
    done = subprocess.run([tool("vermin"), "--target=3.8-", "--violations", "--no-tips",
                           "agent", "firmware_profiles"], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    ruff = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]
    assert ruff["per-file-target-version"]["agent/**"] == "py38"


def test_device_distribution_matches_the_agent_extra() -> None:
    root = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    device = tomllib.loads((REPO / "device" / "pyproject.toml").read_text())["project"]
    extra = set(root["optional-dependencies"]["agent"])
    assert extra == set(device["dependencies"]) | set(device["optional-dependencies"]["cpu"])
    assert device["scripts"] == {"knet-agent": "agent.cli:main"}
    assert device["requires-python"] == ">=3.8"
    assert not any("torch" in r or r.startswith("onnx>") for r in extra)


def test_without_onnx_the_agent_runs_block_by_block_and_says_so_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import importlib.util

    import agent.infer.fuse
    from agent.infer.manifest import PartitionManifest
    from agent.infer.profiles import load_profile
    from agent.infer.runtime import BlockRunner

    model = exported_digits(tmp_path)
    manifest = PartitionManifest.load(model / "manifest.json")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx" else real(name, *a))
    monkeypatch.setattr(agent.infer.fuse, "_said", type(agent.infer.fuse._said)())
    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="agent.infer.fuse"):
        outs = []
        for _ in range(3):  # three runners: a swap builds a new one each time
            chain = BlockRunner(manifest, model, load_profile("x86-dev")).bound(fuse=True)
            assert chain is not None and not chain.fused
            outs.append(chain.run(x)[-1].copy())
    said = [r for r in caplog.records if "onnx package is not installed" in r.message]
    assert len(said) == 1
    assert np.allclose(outs[0], outs[2])
    want = BlockRunner(manifest, model, load_profile("x86-dev")).run(x)[-1]
    assert np.allclose(outs[0], want, atol=1e-5)


def test_old_onnxruntime_beside_numpy_2_is_refused_before_it_can_crash(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import agent.compat
    from agent.cli import main

    versions = {"onnxruntime": (1, 16, 3), "numpy": (2, 1, 0)}
    monkeypatch.setattr(agent.compat, "_release", versions.get)
    with pytest.raises(ImportError, match=r"onnxruntime 1\.16\.3 .*'numpy<2'"):
        agent.compat.check_onnxruntime_numpy()
    assert main(["--check", "--config", "/nonexistent.toml"]) == 2
    assert "numpy<2" in capsys.readouterr().err
    versions["numpy"] = (1, 24, 4)
    agent.compat.check_onnxruntime_numpy()
    versions.update(onnxruntime=(1, 20, 1), numpy=(2, 1, 0))
    agent.compat.check_onnxruntime_numpy()


def test_zip_strict_refuses_a_length_mismatch() -> None:
    from agent.compat import zip_strict

    assert list(zip_strict([1, 2], "ab")) == [(1, "a"), (2, "b")]
    with pytest.raises(ValueError, match="argument 2 is shorter"):
        list(zip_strict([1, 2], "a"))


def test_operator_commands_refuse_clearly_without_the_trainer_side(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from cloud_trainer import entry
    from knet_cli.entry import knet

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("rich", "torch") else real(name, *a))
    assert knet() == 2 and entry.knet_trainer() == 2
    err = capsys.readouterr().err
    assert "knet: this environment lacks rich" in err and "knet[trainer]" in err
    assert "knet-trainer: this environment lacks rich, torch" in err


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_units_verify_and_keep_their_security_exposure(unit: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify` (with the commands pointed at this venv's scripts, which
    it checks exist) and `security --offline`: no unit's exposure may get worse than
    recorded (the agent's went from 3.3 to 1.9 with SystemCallFilter=@system-service)."""
    analyze = tool("systemd-analyze") if shutil.which("systemd-analyze") else pytest.fail(
        "systemd-analyze is missing: apt-get install systemd")
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/knet/.venv/bin/",
                                             f"{Path(sys.executable).parent}/"))
    done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    sec = subprocess.run([analyze, "security", "--offline=yes", str(copy)],
                         capture_output=True, text=True)
    level = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", sec.stdout).group(1))
    assert level <= {"knet-agent.service": 1.9, "knet-trainer.service": 3.0,
                     "knet-broker.service": 1.7}[unit.name], sec.stdout[-400:]
