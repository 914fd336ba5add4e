"""Which trainer replica stores which device's activations: a stable hash of the device id.

Why not the broker's shared subscription: Mosquitto (2.0.11, measured in
tests/test_fleet_faults.py and docs/deploy.md) does not restore an offline client's *shared*
subscription from persistence after a restart, so activations published meanwhile were
acknowledged to devices and dropped (579 of 900). A *plain* persistent subscription is
restored and queued. So each replica keeps its own plain persistent session on every
device's ``act`` topic, stores the devices whose ``sha256(device) % replicas == replica`` and
acknowledges the others unstored (their owner's session holds them too).

What that guarantees, and costs:

* nothing is lost across a broker restart or a replica's crash or restart: each replica's
  share is queued in its own session (``session_expiry``, 24 h by default) until it returns;
* a dead replica's share waits for it (it is not taken over); restart it, or stop every
  replica and change ``replicas``: replicas that disagree on ``replicas`` could each
  believe a device is another's and acknowledge it unstored;
* the broker sends every activation to every replica (N times the fan-out; each copy not
  ours costs a topic parse and a hash, no decode and no database write).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class DevicePartition:
    """Replica ``index`` of ``count`` owns the devices whose id hashes to it."""

    count: int = 1
    index: int = 0

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"replica {self.index} of {self.count}: need 0 <= replica < "
                             "replicas")

    def owner(self, device: str) -> int:
        return _owner(device, self.count)

    def owns(self, device: str) -> bool:
        return self.count == 1 or self.owner(device) == self.index


@lru_cache(maxsize=1 << 16)  # every message asks; a fleet has far fewer devices than that
def _owner(device: str, count: int) -> int:
    # SHA-256, not CRC-32: CRC is linear, so ids that differ only in a counter
    # ("cam-000", "cam-002", ...) can share their low bits and all land on one replica.
    digest = hashlib.sha256(device.encode()).digest()
    return int.from_bytes(digest[:8], "big") % count
