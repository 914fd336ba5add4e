"""Firmware profiles: what a kind of device can run, one TOML file per kind.

The profile decides the export target (onnxruntime version → opset/IR), the execution
providers in order of preference, thread counts, and the figures the partition planner
uses (relative speed, uplink, power). A device whose onnxruntime is older than the
trainer's cannot read what the trainer's default exporter writes, so every profile must
say which onnxruntime and IR version it runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.configfile import ConfigError, load_model

CPU = "CPUExecutionProvider"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
KNOWN_PROVIDERS = (
    *GPU_PROVIDERS, CPU, "OpenVINOExecutionProvider", "CoreMLExecutionProvider",
    "ACLExecutionProvider", "XnnpackExecutionProvider",
)
# Shipped inside the package (``firmware_profiles`` sits next to ``agent`` both in the source
# tree and in site-packages), so a plain ``pip install`` finds them without any setting.
PACKAGED_PROFILES = Path(__file__).resolve().parent.parent.parent / "firmware_profiles"
# A site's own kinds and overrides of shipped ones, without touching the installed package.
SITE_PROFILES = Path("/etc/knet/profiles")
# Where a distribution package (e.g. a .deb) would put them.
SYSTEM_PROFILES = Path("/usr/share/knet/firmware_profiles")


class FirmwareProfile(BaseModel):
    """One device kind. Frozen: a loaded profile is shared by the runner and the planner."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    description: str = ""
    arch: Literal["aarch64", "armv7l", "x86_64"]
    cores: int = Field(ge=1, le=256)
    ram_mb: int = Field(ge=128)
    model_memory_mb: int = Field(ge=16, description="memory budget for block sessions")
    onnxruntime: str = Field(pattern=r"^\d+\.\d+(\.\d+)?$")
    python: str = Field("3.11", pattern=r"^3\.\d+$",
                        description="the device's Python (major.minor); device bundles "
                                    "carry wheels for it (knet bundle device)")
    max_ir_version: int = Field(ge=3, le=20)
    max_opset: int | None = Field(None, ge=7, le=40, description="highest ai.onnx opset read")
    execution_providers: tuple[str, ...] = (CPU,)
    intra_op_threads: int = Field(1, ge=1, le=256)
    inter_op_threads: int = Field(1, ge=1, le=64)
    relative_speed: float = Field(1.0, gt=0, description="block speed relative to x86-dev")
    uplink_mbps: float = Field(gt=0)
    rtt_ms: float = Field(ge=0)
    power_idle_w: float | None = Field(None, ge=0)
    power_active_w: float | None = Field(None, ge=0)

    @field_validator("execution_providers")
    @classmethod
    def _providers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one execution provider")
        unknown = [p for p in value if p not in KNOWN_PROVIDERS]
        if unknown:
            raise ValueError(f"unknown execution provider(s) {unknown}; known: {KNOWN_PROVIDERS}")
        if len(set(value)) != len(value):
            raise ValueError(f"execution provider listed twice: {list(value)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FirmwareProfile:
        if self.model_memory_mb >= self.ram_mb:
            raise ValueError(f"model_memory_mb {self.model_memory_mb} must leave room in "
                             f"ram_mb {self.ram_mb} for the OS and the agent")
        if self.intra_op_threads > self.cores:
            raise ValueError(f"intra_op_threads {self.intra_op_threads} > cores {self.cores}")
        if (self.power_idle_w is not None and self.power_active_w is not None
                and self.power_active_w < self.power_idle_w):
            raise ValueError("power_active_w is below power_idle_w")
        return self

    @property
    def ort_version(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.onnxruntime.split("."))

    @property
    def has_gpu(self) -> bool:
        """True when the profile prefers a GPU provider (the planner's cue, not a guarantee)."""
        return any(p in GPU_PROVIDERS for p in self.execution_providers)

    def supports_ir(self, ir_version: int) -> bool:
        return ir_version <= self.max_ir_version

    def supports_opset(self, opset: int) -> bool:
        return self.max_opset is None or opset <= self.max_opset


def search_path(extra: Sequence[Path | None] = ()) -> list[Path]:
    """Earlier directories shadow later ones: ``$KNET_PROFILES`` (os.pathsep-separated),
    ``extra`` (the agent config's ``model.profiles_dir``), ``/etc/knet/profiles``, the
    profiles shipped in the package, then ``/usr/share/knet/firmware_profiles``."""
    paths = [Path(p) for p in os.environ.get("KNET_PROFILES", "").split(os.pathsep) if p]
    paths.extend(Path(p) for p in extra if p is not None)
    paths.extend((SITE_PROFILES, PACKAGED_PROFILES, SYSTEM_PROFILES))
    return paths


def find_profile(name_or_path: str | Path, extra: Sequence[Path | None] = ()) -> Path:
    """A bare name is looked up on the search path; anything path-like is taken as is."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.parent != Path("."):
        if candidate.is_file():
            return candidate
        raise ConfigError(f"{candidate}: no such profile file")
    for directory in search_path(extra):
        path = directory / f"{name_or_path}.toml"
        if path.is_file():
            return path
    raise ConfigError(
        f"no firmware profile {str(name_or_path)!r} in "
        f"{', '.join(map(str, search_path(extra)))}; "
        f"known: {', '.join(list_profiles(extra)) or 'none'}"
    )


def load_profile(name_or_path: str | Path, extra: Sequence[Path | None] = ()) -> FirmwareProfile:
    """Load and validate a profile; errors name the file, the field and the reason.
    ``extra``: directories searched before the site's and the shipped ones."""
    path = find_profile(name_or_path, extra)
    profile = load_model(path, FirmwareProfile)
    if path.stem != profile.name:
        raise ConfigError(f"{path}: name: {profile.name!r} must match the file name {path.stem!r}")
    return profile


def list_profiles(extra: Sequence[Path | None] = ()) -> list[str]:
    """Every profile name on the search path (earlier directories shadow later ones)."""
    names: set[str] = set()
    for directory in search_path(extra):
        if directory.is_dir():
            names.update(p.stem for p in directory.glob("*.toml"))
    return sorted(names)
