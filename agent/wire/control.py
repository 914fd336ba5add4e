"""Control-plane messages: a device's ``state``, ``birth`` and ``stats``, the trainer's state.

Each is a pydantic model (like ``UpdateReport`` and ``BenchRecord``), built by its sender and
parsed by every receiver through :func:`parse_control`, the one place where a payload from
another party becomes an object:

1. the size is bounded, then the nesting depth, before the JSON parser runs
   (``agent.safejson``: a retained hostile document is re-delivered after every restart);
2. ``format_version`` is read first: a version this code does not know is refused as
   ``version``, never half-understood (a message without one predates versioning: 1);
3. the body is validated strictly (no ``"3"`` for 3, no ``true`` for 1).

Every refusal is a ``ControlMessageError`` whose ``reason`` is one of
:data:`REJECT_REASONS`, for the receiver to count. Unknown keys are kept (``extra="allow"``):
a newer sender may add fields within a version; a change that old receivers would misread
bumps ``format_version``.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from agent import safejson
from agent.errors import KnetAgentError
from agent.wire.topics import TopicKind

FORMAT_VERSION = 1
REJECT_REASONS = ("oversized", "malformed", "version", "invalid")
DEVICE_STATES = ("online", "stopped", "offline")

M = TypeVar("M", bound="ControlMessage")


class ControlMessageError(KnetAgentError, ValueError):
    """A control message refused; ``reason`` (one of ``REJECT_REASONS``) is for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


class ControlMessage(BaseModel):
    """Common to every control message: the version, bounded parsing, compact JSON."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    KIND: ClassVar[TopicKind]
    MAX_BYTES: ClassVar[int] = 256 * 1024  # a few kB in practice; far bigger is hostile
    ALLOW_NAN: ClassVar[bool] = False  # NaN/Infinity literals (not JSON, but Python emits them)

    format_version: int = FORMAT_VERSION

    def as_dict(self) -> dict[str, Any]:
        """The fields the sender set (and the version), JSON-ready: what ``payload`` holds."""
        body = self.model_dump(mode="json", exclude_unset=True, exclude={"format_version"})
        return {"format_version": self.format_version, **body}

    def payload(self) -> bytes:
        return json.dumps(self.as_dict(), separators=(",", ":")).encode()

    @classmethod
    def parse(cls: type[M], payload: bytes | str) -> M:
        """Untrusted bytes to a message; ``ControlMessageError`` on anything refused."""
        if len(payload) > cls.MAX_BYTES:
            raise ControlMessageError("oversized", f"{cls.KIND.value} of {len(payload)} bytes "
                                                   f"exceeds {cls.MAX_BYTES}")
        try:
            body = safejson.loads(payload, max_bytes=cls.MAX_BYTES,
                                  allow_constants=cls.ALLOW_NAN)
        except safejson.UnsafeJSONError as exc:
            raise ControlMessageError("malformed", f"{cls.KIND.value}: {exc}") from None
        if not isinstance(body, dict):
            raise ControlMessageError("malformed", f"{cls.KIND.value} is not a JSON object")
        version = body.get("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or \
                not 1 <= version <= FORMAT_VERSION:
            raise ControlMessageError("version", f"{cls.KIND.value} format_version "
                                                 f"{str(version)[:20]!r} is not one this "
                                                 f"receiver reads (1..{FORMAT_VERSION})")
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "<root>"
            raise ControlMessageError("invalid", f"{cls.KIND.value}.{where}: {first['msg']} "
                                                 f"({exc.error_count()} error(s))") from None


class DeviceState(ControlMessage):
    """``{fleet}/{device}/state``, retained; the Will says ``offline`` (composed once, so
    without ``ts``). ``session`` orders a device's runs: an older one is history."""

    KIND: ClassVar[TopicKind] = TopicKind.STATE

    state: Literal["online", "stopped", "offline"]
    session: int | None = Field(None, ge=0)
    device: str | None = None
    ts: float | None = None


class Partition(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    first: int = Field(ge=0)
    last: int = Field(ge=0)
    num_blocks: int = Field(ge=1)


class Birth(ControlMessage):
    """``{fleet}/{device}/birth``, retained, published before ``online``: what runs there."""

    KIND: ClassVar[TopicKind] = TopicKind.BIRTH

    device: str | None = None
    session: int | None = Field(None, ge=0)
    ts: float | None = None
    agent_version: str | None = None
    hostname: str | None = None
    profile: str | None = None
    onnxruntime: str | None = None
    model_id: str | None = None
    model_version: int | None = Field(None, ge=0)
    partition: Partition | None = None
    # block index -> sha256 of the block file running there ("block_versions": older agents)
    blocks: dict[str, str] = Field(default_factory=dict,
                                   validation_alias=AliasChoices("blocks", "block_versions"))
    providers: list[str] = Field(default_factory=list,
                                 validation_alias=AliasChoices("providers", "eps"))
    uplink: dict[str, Any] | None = None


class NetworkFigures(BaseModel):
    """The link's measured figures (``agent.mqtt.netmeter``), what the cut adapter plans with."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    rtt_ms: float | None = None
    uplink_bytes_per_s: float | None = None
    acked_in_window: int | None = Field(None, ge=0)
    # inference -> PUBACK of the uplinked samples (batching, spool and network together)
    delivery_ms_p50: float | None = None
    delivery_ms_p99: float | None = None


class Stats(ControlMessage):
    """``{fleet}/{device}/stats``, QoS 0: telemetry every ``stats_interval_s``."""

    KIND: ClassVar[TopicKind] = TopicKind.STATS
    ALLOW_NAN: ClassVar[bool] = True  # a rate over an empty window may be NaN

    model_version: int | None = None
    session: int | None = Field(None, ge=0)
    time: float | None = None
    fps: float | None = None
    frames: int | None = None
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    accuracy: float | None = None
    accuracy_total: float | None = None
    bytes_out: int | None = None
    bytes_out_per_s: float | None = None
    queue_depth: dict[str, int] = Field(default_factory=dict)
    spool_bytes: int | None = None
    spool_records: int | None = None
    spool_dropped: int | None = None
    link: dict[str, int] = Field(default_factory=dict)
    bad_inputs: dict[str, int] = Field(default_factory=dict)
    uplink: dict[str, Any] = Field(default_factory=dict)
    split: dict[str, int] = Field(default_factory=dict)
    chain: dict[str, Any] | None = None
    network: NetworkFigures | None = None


class RunSummary(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    run_id: str
    status: str
    version: int | None = None
    reason: str = ""
    started_at: str
    finished_at: str | None = None


class TrainerState(ControlMessage):
    """``trainer/{id}/state``, retained; the Will says ``offline``. ``online`` carries a
    summary for dashboards: runs per job, ingest counters, dropped device messages."""

    KIND: ClassVar[TopicKind] = TopicKind.TRAINER_STATE
    MAX_BYTES: ClassVar[int] = 1 << 20

    state: Literal["online", "offline"]
    trainer: str
    fleet: str
    pid: int = Field(ge=0)
    started_at: float
    time: float
    leader: bool = True  # runs the scheduler (replicas on PostgreSQL: one of them)
    rounds: int | None = Field(None, ge=0)
    runs: dict[str, RunSummary] | None = None
    devices_online: int | None = Field(None, ge=0)
    dropped: dict[str, Any] | None = None
    ingest: dict[str, Any] | None = None
    models: dict[str, dict[str, Any]] | None = None


MESSAGE_TYPES: dict[TopicKind, type[ControlMessage]] = {
    m.KIND: m for m in (DeviceState, Birth, Stats, TrainerState)}


def parse_control(kind: TopicKind, payload: bytes | str) -> ControlMessage:
    """The message on a topic of ``kind``; ``ControlMessageError`` when refused, ValueError
    when ``kind`` carries no control message."""
    cls = MESSAGE_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"{kind.value} topics carry no control message")
    return cls.parse(payload)


__all__ = ["FORMAT_VERSION", "MESSAGE_TYPES", "REJECT_REASONS", "Birth", "ControlMessage",
           "ControlMessageError", "DeviceState", "NetworkFigures", "Partition", "RunSummary",
           "Stats", "TrainerState", "parse_control"]
