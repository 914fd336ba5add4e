"""``network.toml``: the ordered chain of nodes, the links between them, the constraints.

Nodes are listed in chain order (device first, cloud last); ``links[i]`` joins
``nodes[i]`` and ``nodes[i+1]``. Example::

    mqtt_overhead_bytes = 200        # per activation message: MQTT header, topic, envelope

    [[nodes]]
    name = "cam"
    profile = "rpi4"
    bench = "records/cam.json"       # a BenchRecord (knet-agent benchmark --out)
    [[nodes]]
    name = "cloud"
    profile = "x86-dev"
    device = "trainer-1"             # or: pick the --bench record of this device
    role = "teacher"

    [[links]]
    from = "cam"
    to = "cloud"
    bandwidth_mbps = 20
    rtt_ms = 30

    [constraints]
    min_device_blocks = 1
    accuracy_budget = 0.5
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from agent.configfile import load_model

_STRICT = ConfigDict(extra="forbid", populate_by_name=True)


class NodeSpec(BaseModel):
    model_config = _STRICT

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    profile: str = Field(description="firmware profile name or path (memory, power)")
    bench: Path | None = Field(None, description="this node's BenchRecord JSON file")
    device: str | None = Field(None, description="take the --bench record of this device")
    role: Literal["student", "teacher"] = "student"
    time_scale: float = Field(1.0, gt=0, description="multiply measured times (another "
                                                      "machine measured them)")
    memory_mb: float | None = Field(None, gt=0, description="default: the profile's")
    max_time_s: float | None = Field(None, gt=0, description="per-inference compute cap")
    overhead_s: float = Field(0.0, ge=0, description="per-input cost of the agent pipeline "
                                                     "on this node (thread hand-offs, "
                                                     "bookkeeping); calibrate with knet "
                                                     "bench chain")
    pin: list[int] = Field(default_factory=list, description="blocks that must run here")
    forbid: list[int] = Field(default_factory=list, description="blocks that must not")
    power_active_w: float | None = Field(None, ge=0, description="default: the profile's")
    power_idle_w: float | None = Field(None, ge=0, description="default: the profile's")

    @field_validator("bench")
    @classmethod
    def _rel(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        base = (info.context or {}).get("base_dir")
        return v if v is None or v.is_absolute() or base is None else Path(base) / v


class LinkSpec(BaseModel):
    model_config = _STRICT

    src: str = Field(alias="from")
    dst: str = Field(alias="to")
    bandwidth_mbps: float = Field(gt=0)
    rtt_ms: float = Field(ge=0)
    max_bytes_per_inference: int | None = Field(None, ge=1)


class Constraints(BaseModel):
    model_config = _STRICT

    min_device_blocks: int = Field(0, ge=0, description="blocks 1..k stay on the first node")
    accuracy_budget: float = Field(0.5, ge=0, description="top-1 points a codec may cost "
                                                          "at a boundary")
    codecs: list[str] | None = Field(None, description="only these codecs (default: all "
                                                       "measured)")
    allow_unmeasured_lossy: bool = Field(False, description="use lossy codecs whose loss "
                                                            "was not measured")


class NetworkConfig(BaseModel):
    model_config = _STRICT

    mqtt_overhead_bytes: int = Field(200, ge=0)
    nodes: list[NodeSpec] = Field(min_length=1, max_length=16)
    links: list[LinkSpec] = Field(default_factory=list)
    constraints: Constraints = Field(default_factory=Constraints)

    @model_validator(mode="after")
    def _chain(self) -> NetworkConfig:
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique: {names}")
        if len(self.links) != len(self.nodes) - 1:
            raise ValueError(f"{len(self.nodes)} nodes need {len(self.nodes) - 1} links "
                             f"(one between each consecutive pair), got {len(self.links)}")
        for i, link in enumerate(self.links):
            if (link.src, link.dst) != (names[i], names[i + 1]):
                raise ValueError(f"links[{i}] must join {names[i]!r} to {names[i + 1]!r} "
                                 f"(chain order), got {link.src!r} -> {link.dst!r}")
        for n in self.nodes:
            if n.bench is not None and n.device is not None:
                raise ValueError(f"node {n.name}: give bench or device, not both")
            both = set(n.pin) & set(n.forbid)
            if both:
                raise ValueError(f"node {n.name}: blocks {sorted(both)} pinned and forbidden")
        return self


def load_network(path: Path | str) -> NetworkConfig:
    """Read and validate ``network.toml``; ConfigError names the file, field and reason."""
    path = Path(path).resolve()
    return load_model(path, NetworkConfig, context={"base_dir": path.parent})
