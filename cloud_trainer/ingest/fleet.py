"""The live fleet table: what each device announced (birth) and whether it is up (state).

Fed by the retained ``state``/``birth`` messages. The agent's session counter grows at
every start, so a message from an older session is history, not news: the classic case is
a retained Will ``offline`` of the previous run arriving after the new run's ``online`` (or
a broker delivering them in an odd order after a restart). Those are counted and ignored.
Payloads are parsed by ``agent.wire.control`` (bounded, versioned, typed); unknown extra keys
in a birth are kept in ``birth`` untouched, so an agent newer than the trainer never breaks it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.wire.control import Birth, ControlMessageError, DeviceState

log = logging.getLogger(__name__)

STATES = ("online", "stopped", "offline")
# Refusals are ControlMessageError (agent/wire/control.py: bounded, versioned, typed
# parsing) with a reason to count; the old name stays for importers.
FleetMessageError = ControlMessageError


@dataclass
class DeviceInfo:
    """What the trainer knows about one device; ``None`` until announced."""

    device: str
    state: str = "unknown"
    session: int | None = None
    state_at: float | None = None
    last_seen: float | None = None
    agent_version: str | None = None
    profile: str | None = None
    model_id: str | None = None
    model_version: int | None = None
    partition: dict[str, Any] | None = None
    block_versions: dict[str, str] = field(default_factory=dict)
    providers: list[str] = field(default_factory=list)
    birth_at: float | None = None
    birth: dict[str, Any] = field(default_factory=dict)

    @property
    def online(self) -> bool:
        return self.state == "online"


class FleetTable:
    """Thread-safe table of ``DeviceInfo`` keyed by device id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceInfo] = {}
        self.stale_ignored = 0

    def _get(self, device: str) -> DeviceInfo:
        info = self._devices.get(device)
        if info is None:
            info = self._devices[device] = DeviceInfo(device)
        return info

    def update_state(self, device: str, payload: bytes, now: float | None = None) -> bool:
        """Apply a ``state`` payload; False when it was from an older session (ignored).

        An empty payload (a retained message being cleared) forgets the state.
        Raises ControlMessageError (reason for counters) on a refused payload.
        """
        now = time.time() if now is None else now
        if not payload:
            with self._lock:
                info = self._get(device)
                info.state, info.state_at = "unknown", now
            return True
        return self.apply_state(device, DeviceState.parse(payload), now)

    def apply_state(self, device: str, msg: DeviceState, now: float | None = None) -> bool:
        """Apply a parsed ``state``; False when it was from an older session (ignored)."""
        now = time.time() if now is None else now
        with self._lock:
            info = self._get(device)
            if self._stale(info, msg.session):
                log.info("ignoring stale %s of %s: session %s < current %s",
                         msg.state, device, msg.session, info.session)
                return False
            info.state, info.state_at = msg.state, now
            if msg.session is not None:
                info.session = msg.session
            if msg.state == "online":
                info.last_seen = now
        return True

    def update_birth(self, device: str, payload: bytes, now: float | None = None) -> bool:
        """Apply a ``birth`` payload; False when empty or from an older session (ignored)."""
        if not payload:
            return False
        return self.apply_birth(device, Birth.parse(payload), now)

    def apply_birth(self, device: str, msg: Birth, now: float | None = None) -> bool:
        """Apply a parsed ``birth``; False when it was from an older session (ignored)."""
        now = time.time() if now is None else now
        with self._lock:
            info = self._get(device)
            if self._stale(info, msg.session):
                return False
            if msg.session is not None:
                info.session = msg.session
            info.birth = msg.as_dict()
            info.birth_at, info.last_seen = now, now
            info.agent_version, info.profile = msg.agent_version, msg.profile
            info.model_id, info.model_version = msg.model_id, msg.model_version
            info.partition = (msg.partition.model_dump(mode="json")
                              if msg.partition is not None else None)
            info.block_versions = dict(msg.blocks)
            info.providers = list(msg.providers)
        return True

    def _stale(self, info: DeviceInfo, session: int | None) -> bool:
        """A message of an older session than the one known (the caller holds the lock)."""
        if session is not None and info.session is not None and session < info.session:
            self.stale_ignored += 1
            return True
        return False

    def seen(self, device: str, now: float | None = None) -> None:
        """Record traffic from ``device`` (an activation) as a sign of life."""
        with self._lock:
            self._get(device).last_seen = time.time() if now is None else now

    def get(self, device: str) -> DeviceInfo | None:
        with self._lock:
            info = self._devices.get(device)
            return None if info is None else DeviceInfo(**asdict(info))

    def devices(self) -> list[DeviceInfo]:
        with self._lock:
            return [DeviceInfo(**asdict(i)) for _, i in sorted(self._devices.items())]

    def online(self) -> list[str]:
        with self._lock:
            return sorted(d for d, i in self._devices.items() if i.online)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """JSON-ready copy of the table, for an API or a status page."""
        with self._lock:
            return {d: asdict(i) for d, i in sorted(self._devices.items())}

    def __len__(self) -> int:
        with self._lock:
            return len(self._devices)

