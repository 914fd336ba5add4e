"""Every MQTT topic knet uses, in one place.

Layout: ``{prefix}/v1/{fleet}/{device}/{leaf}``. The prefix is configurable, the version
segment is fixed so a v2 wire format can share a broker with v1 devices. The device id is
also the MQTT username, so the ACL pattern ``{prefix}/v1/+/%u/#`` confines each device to its
own subtree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from agent.errors import KnetAgentError

WIRE_VERSION = "v1"
DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# Names under a fleet that are not devices: a device with such an id would collide.
RESERVED_IDS = frozenset({"model", "trainer", "plan", "chain"})


_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK_RE = re.compile(r"[0-9]{1,9}")  # not str.isdigit(): "²" passes it and fails int()


class TopicError(KnetAgentError, ValueError):
    """A device, fleet or topic name that knet cannot use."""


class TopicKind(str, Enum):
    """What a topic carries: messages are routed on this, never on the topic's spelling."""

    # {fleet}/{device}/{leaf}: the value is the leaf
    STATE = "state"
    BIRTH = "birth"
    ACT = "act"
    STATS = "stats"
    UPDATE = "update"
    INFER = "infer"
    REPLY = "reply"
    RESULT = "result"
    INPUT = "input"
    BENCH = "bench"
    CHAIN = "chain"
    BLOB_REQUEST = "blobreq"
    # {fleet}/model/...
    MANIFEST = "manifest"
    BLOB = "blob"
    # trainer/{id}/state
    TRAINER_STATE = "trainer_state"


DEVICE_LEAVES = {k.value: k for k in TopicKind
                 if k not in (TopicKind.MANIFEST, TopicKind.BLOB, TopicKind.TRAINER_STATE)}


@dataclass(frozen=True)
class ParsedTopic:
    """A topic of this fleet, taken apart; only the fields of its kind are set."""

    kind: TopicKind
    device: str | None = None
    trainer: str | None = None
    sha256: str | None = None
    chunk: int | None = None


def validate_id(value: str, what: str = "device id") -> str:
    if not DEVICE_ID_RE.fullmatch(value):
        raise TopicError(
            f"{what} {value!r} must be 1-63 characters of lowercase a-z, 0-9 and '-', "
            "starting with a letter or digit"
        )
    if value in RESERVED_IDS:
        raise TopicError(f"{what} {value!r} is reserved ({', '.join(sorted(RESERVED_IDS))})")
    return value


def connection_username(account: str, connection: str | None = None) -> str:
    """The broker username of one of ``account``'s connections.

    The broker binds each session to its username (``use_username_as_clientid``), so an
    account with several simultaneous connections (a trainer's main, ingest and split
    connections) logs each in as ``<account>.<connection>``. ``.`` is never part of an id,
    so no device or trainer id can collide with such a name.
    """
    if not connection:
        return account
    return f"{account}.{validate_id(connection, 'connection name')}"


@dataclass(frozen=True)
class Topics:
    """Topic names for one fleet."""

    fleet: str
    prefix: str = "knet"

    def __post_init__(self) -> None:
        validate_id(self.fleet, "fleet id")
        if not self.prefix or any(c in self.prefix for c in "+#") or self.prefix.endswith("/"):
            raise TopicError(f"topic prefix {self.prefix!r} must be non-empty, no wildcards")

    @property
    def root(self) -> str:
        return f"{self.prefix}/{WIRE_VERSION}"

    @property
    def fleet_root(self) -> str:
        return f"{self.root}/{self.fleet}"

    def device(self, device: str, leaf: str) -> str:
        return f"{self.fleet_root}/{validate_id(device)}/{leaf}"

    def state(self, device: str) -> str:
        return self.device(device, "state")

    def birth(self, device: str) -> str:
        return self.device(device, "birth")

    def act(self, device: str) -> str:
        return self.device(device, "act")

    def stats(self, device: str) -> str:
        return self.device(device, "stats")

    def update(self, device: str) -> str:
        return self.device(device, "update")

    def infer(self, device: str) -> str:
        return self.device(device, "infer")

    def reply(self, device: str) -> str:
        """Where the device asks for split-inference replies (its MQTT v5 ResponseTopic)."""
        return self.device(device, "reply")

    def result(self, device: str) -> str:
        return self.device(device, "result")

    def input(self, device: str) -> str:
        """Frames from sensors/cameras for this device."""
        return self.device(device, "input")

    def bench(self, device: str) -> str:
        return self.device(device, "bench")

    def chain(self, device: str) -> str:
        """A chain stage's boundary activations for the next stage (``agent/infer/chain.py``)."""
        return self.device(device, "chain")

    @property
    def manifest(self) -> str:
        return f"{self.fleet_root}/model/manifest"

    def blob(self, sha256: str, chunk: int) -> str:
        return f"{self.fleet_root}/model/blob/{sha256}/{chunk}"

    def blob_request(self, device: str) -> str:
        """A device asks for missing chunks here; the trainer serves them on blob topics."""
        return self.device(device, "blobreq")

    def trainer_state(self, trainer_id: str) -> str:
        return f"{self.root}/trainer/{validate_id(trainer_id, 'trainer id')}/state"

    # Subscription filters for the cloud side.
    def all_devices(self, leaf: str) -> str:
        return f"{self.fleet_root}/+/{leaf}"

    def shared(self, group: str, topic_filter: str) -> str:
        """An MQTT v5 shared subscription: replicas in ``group`` split the messages."""
        return f"$share/{validate_id(group, 'share group')}/{topic_filter}"

    def parse(self, topic: str) -> ParsedTopic:
        """The kind and the ids of one of this fleet's topics (or a trainer's state topic);
        TopicError for anything else, an unknown device leaf included."""
        parts = topic.split("/")
        root = self.root.split("/")
        if parts[: len(root)] != root:
            raise TopicError(f"{topic!r} is not under {self.root!r}")
        rest = parts[len(root):]
        if len(rest) == 3 and rest[0] == "trainer" and rest[2] == "state":
            return ParsedTopic(TopicKind.TRAINER_STATE,
                               trainer=validate_id(rest[1], "trainer id"))
        if len(rest) < 3 or rest[0] != self.fleet:
            raise TopicError(f"{topic!r} is not a topic of fleet {self.fleet!r}")
        if rest[1] == "model":
            return self._parse_model(topic, rest[2:])
        if len(rest) != 3 or rest[2] not in DEVICE_LEAVES:
            raise TopicError(f"{topic!r} is not a device topic knet uses")
        return ParsedTopic(DEVICE_LEAVES[rest[2]], device=validate_id(rest[1]))

    @staticmethod
    def _parse_model(topic: str, rest: list[str]) -> ParsedTopic:
        if rest == ["manifest"]:
            return ParsedTopic(TopicKind.MANIFEST)
        if (len(rest) == 3 and rest[0] == "blob" and _SHA256_RE.fullmatch(rest[1])
                and _CHUNK_RE.fullmatch(rest[2])):
            return ParsedTopic(TopicKind.BLOB, sha256=rest[1], chunk=int(rest[2]))
        raise TopicError(f"{topic!r} is not a model topic knet uses")

    def parse_device_topic(self, topic: str) -> tuple[str, str]:
        """``(device, leaf)`` of a device topic of this fleet; TopicError otherwise."""
        parts = topic.split("/")
        base = self.fleet_root.split("/")
        if len(parts) != len(base) + 2 or parts[: len(base)] != base:
            raise TopicError(f"{topic!r} is not a device topic of fleet {self.fleet!r}")
        return validate_id(parts[-2]), parts[-1]
