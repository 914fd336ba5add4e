"""`knet bundle device`: a self-contained wheelhouse to install knet-agent on a fleet.

Why: fifty devices that each resolve "latest" from the internet end up with fifty stacks,
some of them broken (an old onnxruntime beside numpy 2 crashes). A bundle holds the
``knet-agent`` wheel, every dependency's wheel for the profile's platform and Python
(``pip download --platform``: aarch64 bundles are built on x86), the profile's constraints
file, the systemd unit, an example config and ``install.sh``, which installs with
``pip --no-index``. Built from a source checkout (it needs ``device/`` and ``constraints/``).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from agent.infer.profiles import load_profile
from cloud_trainer.errors import KnetTrainerError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
# manylinux tags a profile's devices accept (pip --platform takes one per tag).
GLIBC_TAGS = ("manylinux2014", "manylinux_2_17", "manylinux_2_28")
EXTRAS = "cpu,fuse"


class BundleError(KnetTrainerError, RuntimeError):
    """A bundle that cannot be built (missing sources, no wheel for the platform, ...)."""


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BundleError(f"{' '.join(cmd[2:5])} ... failed:\n{done.stderr[-3000:]}")


def _marker_requirements(source: Path, python: str, arch: str) -> list[str]:
    """The device's requirements whose markers hold on the target (``tomli`` on 3.8, ...),
    without their markers: ``pip download --python-version`` evaluates markers against the
    running interpreter, so it would leave them out of a bundle for an older Python."""
    import tomllib

    from packaging.requirements import Requirement

    env = {"python_version": python, "python_full_version": f"{python}.0",
           "platform_machine": arch, "sys_platform": "linux", "os_name": "posix",
           "platform_system": "Linux", "implementation_name": "cpython",
           "platform_python_implementation": "CPython"}
    deps = tomllib.loads((source / "device" / "pyproject.toml").read_text())["project"][
        "dependencies"]
    out = []
    for text in deps:
        req = Requirement(text)
        if req.marker is not None and req.marker.evaluate(env):
            out.append(f"{req.name}{req.specifier}")
    return out


def build_device_bundle(profile: str, out: Path, *, arch: str | None = None,
                        python: str | None = None, tarball: bool = False,
                        source: Path = REPO) -> Path:
    """Write ``out/knet-agent-<profile>-<arch>-py<python>/`` (and its ``.tar.gz`` when
    ``tarball``); returns the directory or the tarball. ``arch``/``python`` override the
    profile's (e.g. an x86 bundle of a Jetson stack for a test)."""
    prof = load_profile(profile)
    arch = arch or prof.arch
    python = python or prof.python
    constraints = source / "constraints" / f"{prof.name}.txt"
    for need in (source / "device" / "pyproject.toml", constraints,
                 source / "device" / "install.sh"):
        if not need.is_file():
            raise BundleError(f"{need}: missing; build bundles from a knet source checkout")
    root = Path(out) / f"knet-agent-{prof.name}-{arch}-py{python}"
    if root.exists():
        shutil.rmtree(root)
    wheels = root / "wheels"
    wheels.mkdir(parents=True)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
         str(source / "device"))
    for leftover in ("build", "knet_agent.egg-info"):
        shutil.rmtree(source / "device" / leftover, ignore_errors=True)
    agent_wheel = next(wheels.glob("knet_agent-*.whl"))
    platforms = [a for tag in GLIBC_TAGS for a in ("--platform", f"{tag}_{arch}")]
    _pip("download", "--only-binary=:all:", *platforms, "--python-version", python,
         "--implementation", "cp", "-d", str(wheels), "-c", str(constraints),
         f"{agent_wheel}[{EXTRAS}]", *_marker_requirements(source, python, arch))
    shutil.copy(constraints, root / "constraints.txt")
    shutil.copy(source / "agent" / "systemd" / "knet-agent.service", root)
    shutil.copy(source / "docs" / "examples" / "agent.toml", root / "agent.toml")
    shutil.copy(source / "device" / "install.sh", root / "install.sh")
    (root / "install.sh").chmod(0o755)
    (root / "bundle.env").write_text(f"PROFILE={prof.name}\nPYTHON_VERSION={python}\n"
                                     f"ARCH={arch}\nEXTRAS={EXTRAS}\n")
    log.info("bundle %s: %d wheels", root, len(list(wheels.glob("*.whl"))))
    if not tarball:
        return root
    archive = root.with_name(root.name + ".tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    return archive
