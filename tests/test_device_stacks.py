"""Device stacks from the bundles alone: each profile's constraints file, installed by the
bundle's install.sh with no index reachable, runs an exported partition end to end.

Stacks: jetson-nano on Python 3.8 (onnxruntime 1.16.3, the agent's floor and the oldest a
profile runs; numpy 1), jetson-orin-nano on 3.10, rpi4/rpi5 on 3.11. They are built for
x86-64 here (the same pins, ``--arch x86_64``); the aarch64 download is checked on rpi4.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from agent_helpers import REPO, agent_config, exported_digits, write_inputs
from mqtt_helpers import Collector

from agent.wire.topics import Topics
from broker.launcher import Mosquitto
from cloud_trainer.release.bundle import build_device_bundle

pytestmark = [pytest.mark.slow, pytest.mark.mqtt]
STACKS = {"jetson-nano": "3.8", "jetson-orin-nano": "3.10", "rpi4": "3.11"}


def interpreter(version: str) -> str:
    """python<version> from PATH or pyenv; the test fails, with how to get it, otherwise."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [str(c / "bin" / "python") for c in sorted(root.glob(f"{version}.*"),
                                                           reverse=True)]
    candidates.append(shutil.which(f"python{version}") or "")
    for cand in filter(None, candidates):  # a pyenv shim on PATH may not run: try each
        probe = subprocess.run([cand, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == str(
                tuple(map(int, version.split(".")))):
            return cand
    pytest.fail(f"no Python {version} interpreter (python{version} on PATH or pyenv "
                f"versions {version}.x): the device stack for it cannot be tested")


def offline_env() -> dict[str, str]:
    """No pip configuration, no index, no find-links: only the bundle's wheels."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported_digits(tmp_path_factory.mktemp("model"))  # IR 8 / opset 17: every stack


@pytest.mark.parametrize("profile", sorted(STACKS))
def test_bundle_installs_offline_and_runs_a_partition(profile: str, tmp_path: Path,
                                                      mosquitto: Mosquitto,
                                                      model_dir: Path) -> None:
    python = interpreter(STACKS[profile])
    bundle = build_device_bundle(profile, tmp_path / "dist", arch="x86_64",
                                 python=STACKS[profile])
    prefix = tmp_path / "opt-knet"
    done = subprocess.run(
        ["sh", str(bundle / "install.sh")], capture_output=True, text=True, timeout=300,
        env={**offline_env(), "PYTHON": python, "KNET_PREFIX": str(prefix),
             "KNET_ETC": str(tmp_path / "etc"), "KNET_SYSTEMD_DIR": str(tmp_path / "units")})
    assert done.returncode == 0, done.stdout + done.stderr
    unit = (tmp_path / "units" / "knet-agent.service").read_text()
    assert f"ExecStart={prefix}/.venv/bin/knet-agent" in unit
    bin_dir = prefix / ".venv" / "bin"
    assert not (bin_dir / "knet").exists() and not (bin_dir / "knet-trainer").exists()
    pins = {line.split("==")[0]: line.split("==")[1] for line in
            (bundle / "constraints.txt").read_text().splitlines() if "==" in line}
    frozen = subprocess.run([str(bin_dir / "python"), "-m", "pip", "freeze"],
                            capture_output=True, text=True, env=offline_env()).stdout
    for name, version in pins.items():
        assert f"{name}=={version}" in frozen, f"{name} {version} not installed:\n{frozen}"

    write_inputs(tmp_path / "inputs.npz", 40)
    cfg = agent_config(tmp_path, mosquitto.port, model_dir / "manifest.json",
                       model={"profile": profile})
    topic = Topics("lab").act("dev-1")
    with Collector(mosquitto.host, mosquitto.port, topic) as sub:
        run = subprocess.run([str(bin_dir / "knet-agent"), "--config", str(cfg),
                              "--exit-when-done"], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path, env=offline_env())
        assert run.returncode == 0, run.stdout + run.stderr
        assert sub.wait_for(lambda m: len(m) >= 80, 10)
    assert len(sub.payloads()) == 80  # 40 inputs x boundaries 1 and 2
    assert "block by block" not in run.stderr  # onnx is there: the partition ran fused


def test_aarch64_bundle_holds_only_aarch64_or_pure_wheels(tmp_path: Path) -> None:
    archive = build_device_bundle("rpi4", tmp_path, tarball=True)
    wheels = sorted(p.name for p in (tmp_path / "knet-agent-rpi4-aarch64-py3.11" /
                                     "wheels").glob("*.whl"))
    assert any(w.startswith("onnxruntime-1.20.1-cp311") and "aarch64" in w for w in wheels)
    binary = [w for w in wheels if not w.endswith("-none-any.whl")]
    assert binary and all("aarch64" in w for w in binary), binary
    assert archive.stat().st_size > 10 * 2**20
    print(f"rpi4 aarch64 bundle: {len(wheels)} wheels, {archive.stat().st_size / 2**20:.0f} MB",
          file=sys.stderr)


def test_constraints_cover_every_profile_and_pin_the_agents_floor() -> None:
    import tomllib

    from agent.infer.profiles import list_profiles, load_profile

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["agent"]
    floor = next(r.split(">=")[1] for r in extra if r.startswith("onnxruntime>="))
    versions = []
    for name in list_profiles():
        text = (REPO / "constraints" / f"{name}.txt").read_text()
        assert f"onnxruntime=={load_profile(name).onnxruntime}" in text, name
        versions.append(tuple(map(int, load_profile(name).onnxruntime.split("."))))
        if versions[-1] < (1, 19):
            assert "numpy==1." in text or "numpy>=1.24,<2" in text, name
    assert min(versions) == tuple(map(int, floor.split("."))), "the floor is a tested stack"
