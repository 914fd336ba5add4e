"""Every MQTT topic knet uses, in one place.

Layout: ``{prefix}/v1/{fleet}/{device}/{leaf}``. The prefix is configurable, the version
segment is fixed so a v2 wire format can share a broker with v1 devices. The device id is
also the MQTT username, so the ACL pattern ``{prefix}/v1/+/%u/#`` confines each device to its
own subtree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.errors import KnetAgentError

WIRE_VERSION = "v1"
DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# Names under a fleet that are not devices: a device with such an id would collide.
RESERVED_IDS = frozenset({"model", "trainer", "plan", "chain"})


class TopicError(KnetAgentError, ValueError):
    """A device, fleet or topic name that knet cannot use."""


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
        """A chain stage's boundary activations for the next stage (``agent/chain.py``)."""
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

    def parse_device_topic(self, topic: str) -> tuple[str, str]:
        """``(device, leaf)`` of a device topic of this fleet; TopicError otherwise."""
        parts = topic.split("/")
        base = self.fleet_root.split("/")
        if len(parts) != len(base) + 2 or parts[: len(base)] != base:
            raise TopicError(f"{topic!r} is not a device topic of fleet {self.fleet!r}")
        return validate_id(parts[-2]), parts[-1]
