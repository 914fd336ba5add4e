"""The agent's configuration (``agent.toml``), validated before anything starts.

Unknown keys are rejected at every level and every error names the file, the field and the
reason. Relative paths are resolved against the config file's directory, so a deployment
directory can be moved as a whole. Secrets may come from a file or from systemd's
``LoadCredential`` (``$CREDENTIALS_DIRECTORY``), so they never sit in the config itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.compat import Annotated
from agent.configfile import ConfigError, load_model, resolve_path
from agent.mqtt.endpoint import LinkSettings, TlsSettings
from agent.wire.topics import Topics, validate_id

if TYPE_CHECKING:
    from agent.infer.manifest import PartitionManifest
    from agent.infer.profiles import FirmwareProfile

log = logging.getLogger(__name__)

_STRICT = ConfigDict(extra="forbid")




def _resolve_list(value: list[Path], info: ValidationInfo) -> list[Path]:
    return [p for p in (resolve_path(v, info) for v in value) if p is not None]


class DeviceSection(BaseModel):
    model_config = _STRICT

    id: str
    fleet: str = "default"
    topic_prefix: str = "knet"
    state_dir: Path = Path("/var/lib/knet")
    cache_dir: Path = Path("/var/cache/knet")

    @field_validator("id", "fleet")
    @classmethod
    def _ids(cls, v: str, info: ValidationInfo) -> str:
        return validate_id(v, "fleet id" if info.field_name == "fleet" else "device id")

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        Topics("default", v)  # raises TopicError (a ValueError) with the reason
        return v

    _paths = field_validator("state_dir", "cache_dir")(resolve_path)


class ModelSection(BaseModel):
    model_config = _STRICT

    manifest: Path
    profile: str = Field("x86-dev", description="a profile name, or a path to a profile TOML")
    profiles_dir: Path | None = Field(
        None, description="searched for the profile before /etc/knet/profiles and the "
                          "profiles shipped with knet (agent/infer/profiles.py)")
    fuse: bool = Field(True, description="run the partition as one onnxruntime session "
                       "(agent/infer/fuse.py); false = one run per block, with per-block latency "
                       "histograms")

    _paths = field_validator("manifest", "profiles_dir")(resolve_path)


# The [mqtt] table is the device link's endpoint (agent/mqtt/endpoint.py): the same model,
# defaults and validation as every other knet connection. The names stay for importers.
TlsSection = TlsSettings
MqttSection = LinkSettings


class NpzSource(BaseModel):
    model_config = _STRICT

    kind: Literal["npz"]
    path: Path
    x_key: str = "x"
    y_key: str | None = "y"
    rate_hz: float = Field(0.0, ge=0, description="0 = as fast as possible")
    loop: bool = False
    max_frames: int | None = Field(None, ge=1, description="stop after this many inputs "
                                   "(with loop = true, replay wraps around until then)")

    _paths = field_validator("path")(resolve_path)


class ImagesSource(BaseModel):
    model_config = _STRICT

    kind: Literal["images"]
    directory: Path
    glob: str = "*.png"
    rate_hz: float = Field(0.0, ge=0, description="0 = as fast as possible")
    loop: bool = False
    max_frames: int | None = Field(None, ge=1, description="stop after this many inputs "
                                   "(with loop = true, replay wraps around until then)")
    resize: bool = Field(True, description="resize to the input HxW; false = skip other sizes")

    _paths = field_validator("directory")(resolve_path)


class MqttSource(BaseModel):
    model_config = _STRICT

    kind: Literal["mqtt"]
    topic: str | None = Field(None, description="default: {prefix}/v1/{fleet}/{device}/input")
    qos: int = Field(1, ge=0, le=1)
    queue_size: int = Field(64, ge=1, le=100_000, description="frames waiting for inference")


class UpstreamSource(BaseModel):
    """A later stage of a chain: envelopes from the previous stage (``agent/infer/chain.py``)."""

    model_config = _STRICT

    kind: Literal["upstream"]
    device: str = Field(description="the previous stage's device id")
    topic: str | None = Field(None, description="default: {prefix}/v1/{fleet}/{device}/chain")
    queue_size: int = Field(256, ge=1, le=100_000,
                            description="decoded inputs waiting; keep >= the broker's "
                                        "max_inflight_messages")
    max_payload_bytes: int = Field(16 * 2**20, ge=1024)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return validate_id(v, "source.device")


Source = Annotated[Union[NpzSource, ImagesSource, MqttSource, UpstreamSource],
                   Field(discriminator="kind")]



def codec_spec(v: str) -> str:
    """A field validator: a codec spec the registry accepts, in its canonical form."""
    from agent.wire.codec import CodecError, parse_spec

    try:
        return str(parse_spec(v))
    except CodecError as exc:
        raise ValueError(str(exc)) from None

class ChainSection(BaseModel):
    """This agent is a stage of a chain: relay its last boundary, or publish results."""

    model_config = _STRICT

    enabled: bool = False
    codec: str = Field("uint8+lz4", description="codec of the boundary sent to the next stage")
    topic: str | None = Field(None, description="default: {prefix}/v1/{fleet}/{device}/chain")

    _codec = field_validator("codec")(codec_spec)


class UplinkSection(BaseModel):
    model_config = _STRICT

    enabled: bool = True
    every_n: int = Field(1, ge=0, description="send every n-th input; 0 = hard examples only")
    max_samples_per_s: float = Field(0.0, ge=0, description="0 = unlimited")
    max_bytes_per_s: float = Field(0.0, ge=0, description="0 = unlimited")
    hard_threshold: float | None = Field(None, gt=0, le=1)
    boundaries: list[int] = Field(default_factory=lambda: [1],
                                  description="0 = the raw input, i = output of block i")
    allow_raw_upload: bool = False
    codec: str = "uint8+lz4"
    batch_size: int = Field(1, ge=1, le=4096, description=(
        "samples per message (a batch also closes at 2 MiB of float32); > 1 sends "
        "version-2 batch envelopes, which trainers older than batching refuse (upgrade "
        "the trainers first)"))
    batch_wait_s: float = Field(0.05, ge=0, le=10, description=(
        "a batch is sent this long after its first sample even if not full"))

    @model_validator(mode="after")
    def _batchable_codec(self) -> UplinkSection:
        from agent.wire.codec import batchable

        if self.batch_size > 1 and not batchable(self.codec):
            raise ValueError(f"batch_size > 1 needs a codec whose frames split per sample "
                             f"(raw, fp16, uint8, int8), not {self.codec!r}")
        return self

    @model_validator(mode="after")
    def _raw_needs_consent(self) -> UplinkSection:
        if 0 in self.boundaries and not self.allow_raw_upload:
            raise ValueError("boundary 0 is the raw input: it leaves the device only with "
                             "allow_raw_upload = true")
        if any(b < 0 for b in self.boundaries):
            raise ValueError("boundaries are >= 0")
        if len(set(self.boundaries)) != len(self.boundaries):
            raise ValueError(f"boundary listed twice: {self.boundaries}")
        return self

    _codec = field_validator("codec")(codec_spec)


class SpoolSection(BaseModel):
    model_config = _STRICT

    max_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    policy: Literal["drop_oldest", "drop_newest"] = "drop_oldest"


class PipelineSection(BaseModel):
    model_config = _STRICT

    queue_size: int = Field(32, ge=1, le=100_000)
    exit_when_done: bool = Field(False, description="exit once a finite source is sent")


class MetricsSection(BaseModel):
    model_config = _STRICT

    prometheus_port: int | None = Field(None, ge=0, le=65535)
    prometheus_bind: str = "127.0.0.1"
    stats_interval_s: float = Field(5.0, gt=0)
    publish_results: bool = False


class WatchdogSection(BaseModel):
    model_config = _STRICT

    enabled: bool = Field(True, description="ping systemd when $WATCHDOG_USEC is set")
    max_stall_s: float = Field(30.0, gt=0, description="a stage silent this long is unhealthy")


class SplitSection(BaseModel):
    model_config = _STRICT

    enabled: bool = False
    timeout_s: float = Field(5.0, gt=0)


class UpdateHealthSection(BaseModel):
    """When a freshly swapped version counts as unhealthy and is rolled back."""

    model_config = _STRICT

    watch_s: float = Field(30.0, ge=0, description="watch window after a swap; 0 = no watch")
    min_inputs: int = Field(20, ge=1, description="inputs the new version must see first")
    max_error_rate: float = Field(0.05, ge=0, le=1, description="failed inferences / inputs")
    confidence_drop: float = Field(
        0.5, ge=0, le=1,
        description="roll back when the mean confidence falls below this fraction of the "
                    "previous version's (0 = never)")


class UpdateSection(BaseModel):
    """Over-the-air block updates (``agent.update.updater``); off unless enabled."""

    model_config = _STRICT

    enabled: bool = False
    public_keys: list[Path] = Field(
        default_factory=list, description="operator Ed25519 public keys (PEM); several "
                                          "during a key rotation")
    allow_unsigned: bool = Field(False, description="development only; refused with a key")
    canary_inputs: int = Field(32, ge=0, le=1024, description="recent inputs kept for "
                                                               "the self-test")
    min_canary_inputs: int = Field(8, ge=1, description="fewer: the agreement check is "
                                                        "skipped (shapes/finite still run)")
    agreement_threshold: float = Field(
        0.5, ge=0, le=1,
        description="top-1 agreement (or cosine similarity) with the running version on "
                    "the canary inputs; it catches broken blocks, the trainer's gate judges "
                    "accuracy: lower it when an update is meant to change many predictions")
    max_manifest_bytes: int = Field(2 * 1024 * 1024, ge=1024, le=2 * 1024 * 1024)
    max_block_bytes: int = Field(64 * 1024 * 1024, ge=1, le=64 * 1024 * 1024)
    max_update_bytes: int = Field(256 * 1024 * 1024, ge=1,
                                  description="block bytes one update may download")
    cache_max_bytes: int | None = Field(None, ge=1, description="block cache budget")
    download_timeout_s: float = Field(300.0, gt=0)
    request_interval_s: float = Field(2.0, gt=0, description="re-request a chunk after")
    first_request_after_s: float = Field(2.0, ge=0, description="wait for a push first")
    retry_after_s: float = Field(60.0, gt=0, description="try a timed-out download again "
                                                         "(from the chunks held) after")
    health: UpdateHealthSection = Field(default_factory=UpdateHealthSection)

    _paths = field_validator("public_keys")(_resolve_list)

    def load_keys(self) -> dict[str, Any]:
        """``{key_id: Ed25519PublicKey}``; ConfigError naming the field if a key is bad."""
        from agent.update.signing import SigningError, load_public_keys

        try:
            return load_public_keys(self.public_keys)
        except SigningError as exc:
            raise ConfigError(f"update.public_keys: {exc}") from None

    @model_validator(mode="after")
    def _trust(self) -> UpdateSection:
        if self.public_keys and self.allow_unsigned:
            raise ValueError("allow_unsigned is refused while public_keys are configured")
        if self.enabled and not self.public_keys and not self.allow_unsigned:
            raise ValueError("enabled updates need public_keys (or allow_unsigned = true on "
                             "a development fleet)")
        return self


class AgentConfig(BaseModel):
    model_config = _STRICT

    device: DeviceSection
    model: ModelSection
    mqtt: MqttSection = Field(default_factory=MqttSection)
    source: Source
    uplink: UplinkSection = Field(default_factory=UplinkSection)
    spool: SpoolSection = Field(default_factory=SpoolSection)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    watchdog: WatchdogSection = Field(default_factory=WatchdogSection)
    split: SplitSection = Field(default_factory=SplitSection)
    chain: ChainSection = Field(default_factory=ChainSection)
    update: UpdateSection = Field(default_factory=UpdateSection)

    _path: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _defaults_from_device(self) -> AgentConfig:
        """Fill the defaults that depend on the device id (copies: sections may be shared)."""
        if self.mqtt.username is None:
            self.mqtt = self.mqtt.model_copy(update={"username": self.device.id})
        if isinstance(self.source, UpstreamSource) and not self.chain.enabled:
            raise ValueError("source.kind = upstream makes this a chain stage: set "
                             "[chain] enabled = true")
        if isinstance(self.source, MqttSource) and self.source.topic is None:
            self.source = self.source.model_copy(
                update={"topic": self.topics.input(self.device.id)})
        return self

    @property
    def topics(self) -> Topics:
        return Topics(self.device.fleet, self.device.topic_prefix)

    @property
    def path(self) -> Path | None:
        """The file this config was loaded from (None when built in code)."""
        return self._path

    @property
    def model_dir(self) -> Path:
        """Block files are named relative to the manifest's directory."""
        return self.model.manifest.parent


def load_config(path: Path | str) -> AgentConfig:
    """Read and validate ``agent.toml``; ConfigError names the file, the field and why."""
    path = Path(path).resolve()
    config = load_model(path, AgentConfig, context={"base_dir": path.parent})
    config._path = path
    return config


def check_partition(config: AgentConfig, manifest: PartitionManifest,
                    profile: FirmwareProfile) -> list[str]:
    """Refuse a deployment that cannot run; return warnings for what merely degrades it.

    Refused (ConfigError naming the field): a block file missing or not matching its
    sha256, IR newer than the profile's onnxruntime reads, blocks that do not fit the
    profile's memory budget, an image source for a non-image input. Warned: GPU providers
    this onnxruntime build lacks (CPU takes over), uplink boundaries this partition neither
    receives nor produces, split inference on a node that holds the whole model.
    """
    from agent.infer.manifest import ManifestError
    from agent.infer.runtime import PartitionError, check_fit

    where = str(config.path or "agent config")
    try:
        manifest.verify_files(config.model_dir)
    except ManifestError as exc:
        raise ConfigError(f"{where}: model.manifest: {exc}") from None
    try:
        warnings = check_fit(manifest, profile)
    except PartitionError as exc:
        raise ConfigError(f"{where}: model.profile: {exc}") from None
    shape = manifest.blocks[0].input_shape
    if isinstance(config.source, ImagesSource) and (len(shape) != 3 or shape[0] not in (1, 3)):
        raise ConfigError(f"{where}: source.kind: an image source needs a (1|3, H, W) input, "
                          f"this partition takes {shape}")
    outside = [b for b in config.uplink.boundaries
               if not manifest.first - 1 <= b <= manifest.last]
    if outside:
        warnings.append(f"uplink.boundaries {outside} are outside this partition "
                        f"({manifest.first - 1}..{manifest.last}); they are not sent")
    if config.update.enabled:
        try:
            config.update.load_keys()
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if config.split.enabled and manifest.is_complete:
        warnings.append("split.enabled: this node holds the whole model; nothing to split")
    for w in warnings:
        log.warning("%s: %s", where, w)
    return warnings
