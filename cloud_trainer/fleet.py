"""The live fleet table: what each device announced (birth) and whether it is up (state).

Fed by the retained ``state``/``birth`` messages. The agent's session counter grows at
every start, so a message from an older session is history, not news: the classic case is
a retained Will ``offline`` of the previous run arriving after the new run's ``online`` (or
a broker delivering them in an odd order after a restart). Those are counted and ignored.
Unknown extra keys in a birth are kept in ``birth`` untouched, so an agent newer than the
trainer never breaks it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from agent import safejson
from cloud_trainer.errors import KnetTrainerError

log = logging.getLogger(__name__)

STATES = ("online", "stopped", "offline")
# A birth lists blocks, providers and a partition: a few KB. Bounded before parsing, with
# the nesting depth, because a retained state/birth is re-delivered after every restart.
MAX_FLEET_MESSAGE_BYTES = 256 * 1024


class FleetMessageError(KnetTrainerError, ValueError):
    """A state or birth payload that is not the JSON object knet agents send."""


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


def _json_object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        body = safejson.loads(payload, max_bytes=MAX_FLEET_MESSAGE_BYTES)
    except safejson.UnsafeJSONError as exc:
        raise FleetMessageError(f"{what} refused: {exc}") from None
    if not isinstance(body, dict):
        raise FleetMessageError(f"{what} must be a JSON object")
    return body


def _session(body: dict[str, Any], what: str) -> int | None:
    session = body.get("session")
    if session is None:
        return None
    if isinstance(session, bool) or not isinstance(session, int) or session < 0:
        raise FleetMessageError(f"{what} session must be a non-negative integer")
    return session


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
        """Apply a ``state`` message; False when it was from an older session (ignored).

        An empty payload (a retained message being cleared) forgets the state.
        Raises FleetMessageError on a malformed payload.
        """
        now = time.time() if now is None else now
        if not payload:
            with self._lock:
                info = self._get(device)
                info.state, info.state_at = "unknown", now
            return True
        body = _json_object(payload, "state")
        state = body.get("state")
        if state not in STATES:
            raise FleetMessageError(f"state must be one of {STATES}, got {state!r}")
        session = _session(body, "state")
        with self._lock:
            info = self._get(device)
            if session is not None and info.session is not None and session < info.session:
                self.stale_ignored += 1
                log.info("ignoring stale %s of %s: session %d < current %d",
                         state, device, session, info.session)
                return False
            info.state, info.state_at = state, now
            if session is not None:
                info.session = session
            if state == "online":
                info.last_seen = now
        return True

    def update_birth(self, device: str, payload: bytes, now: float | None = None) -> bool:
        """Apply a ``birth`` message; False when it was from an older session (ignored)."""
        now = time.time() if now is None else now
        if not payload:
            return False
        body = _json_object(payload, "birth")
        session = _session(body, "birth")
        with self._lock:
            info = self._get(device)
            if session is not None and info.session is not None and session < info.session:
                self.stale_ignored += 1
                return False
            if session is not None:
                info.session = session
            info.birth, info.birth_at, info.last_seen = body, now, now
            info.agent_version = _str(body.get("agent_version"))
            info.profile = _str(body.get("profile"))
            info.model_id = _str(body.get("model_id"))
            mv = body.get("model_version")
            info.model_version = mv if isinstance(mv, int) and not isinstance(mv, bool) else None
            part = body.get("partition")
            info.partition = part if isinstance(part, dict) else None
            blocks = body.get("blocks", body.get("block_versions"))
            info.block_versions = (
                {str(k): str(v) for k, v in blocks.items()} if isinstance(blocks, dict) else {})
            eps = body.get("providers", body.get("eps"))
            info.providers = [str(p) for p in eps] if isinstance(eps, list) else []
        return True

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


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
