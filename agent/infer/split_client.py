"""Split inference from the device's side: the trainer runs blocks k+1..N on the partition's
last boundary (MQTT v5 request/response) and replies with the prediction.

Each request waits in a pending map until its reply, a refusal, a failed send or its
timeout. Four threads change that map: the encode stage adds requests, paho's network thread
resolves replies, the publish stage drops the requests it could not send and the supervisor
expires late ones. One lock guards the map and the counters, so every request ends in
exactly one counter (``requests == replies + errors + offline + timeouts + pending``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import safejson
from agent.wire.topics import Topics

log = logging.getLogger(__name__)

MAX_REPLY_BYTES = 64 * 1024  # a reply is a prediction, not a tensor


@dataclass(frozen=True)
class SplitCounts:
    """What became of the requests so far (the ``split`` section of the stats message)."""

    requests: int = 0
    replies: int = 0
    errors: int = 0
    timeouts: int = 0
    offline: int = 0
    pending: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class _Pending:
    label: int | None
    sent_at: float  # time.monotonic()


class SplitClient:
    """The pending split requests of one device and what became of each."""

    def __init__(self, topics: Topics, device: str, timeout_s: float,
                 on_result: Callable[[bool], None]) -> None:
        """``on_result(correct)`` is called for each reply to an input with a label."""
        self.reply_topic = topics.reply(device)
        self.request_topic = topics.infer(device)
        self.timeout_s = timeout_s
        self._on_result = on_result
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._counts = {"requests": 0, "replies": 0, "errors": 0, "timeouts": 0,
                        "offline": 0}

    def request(self, seq: int, envelope: bytes, label: int | None
                ) -> tuple[str, bytes, Properties]:
        """Register request ``seq`` (an envelope of the last boundary); returns the message
        to publish: topic, payload and the v5 properties that route the reply back."""
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = seq.to_bytes(8, "big")
        props.MessageExpiryInterval = max(1, int(self.timeout_s))
        with self._lock:
            self._pending[seq] = _Pending(label, time.monotonic())
            self._counts["requests"] += 1
        return self.request_topic, envelope, props

    def unsent(self, props: Properties) -> None:
        """The request carrying ``props`` could not be published (offline): it is over."""
        seq = int.from_bytes(getattr(props, "CorrelationData", b""), "big")
        with self._lock:
            if self._pending.pop(seq, None) is not None:
                self._counts["offline"] += 1

    def on_reply(self, msg: mqtt.MQTTMessage) -> None:
        """A message on the reply topic (paho's thread): resolve the request it answers."""
        corr = getattr(msg.properties, "CorrelationData", None)
        seq = int.from_bytes(corr, "big") if corr else -1
        with self._lock:
            pending = self._pending.pop(seq, None)
        if pending is None:
            return  # late or unknown: it already timed out
        error, prediction = parse_reply(bytes(msg.payload))  # paho's bytes: not a copy
        with self._lock:
            self._counts["errors" if error is not None else "replies"] += 1
        if error is not None:
            log.warning("split inference refused: %s", error)
        elif pending.label is not None:
            self._on_result(prediction == pending.label)

    def expire(self, now: float) -> int:
        """Drop the requests older than the timeout (``now``: time.monotonic()); how many."""
        with self._lock:
            late = [seq for seq, p in self._pending.items() if now - p.sent_at > self.timeout_s]
            for seq in late:
                del self._pending[seq]
            self._counts["timeouts"] += len(late)
        return len(late)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def counts(self) -> SplitCounts:
        """A consistent snapshot of the counters."""
        with self._lock:
            return SplitCounts(pending=len(self._pending), **self._counts)


def parse_reply(payload: bytes) -> tuple[object | None, object]:
    """``(error, None)`` for a refusal or an unreadable reply, ``(None, prediction)`` for an
    answer (the prediction as the trainer sent it; None when it sent none)."""
    try:
        reply = safejson.loads(payload, max_bytes=MAX_REPLY_BYTES)
    except safejson.UnsafeJSONError:
        return "undecodable reply", None
    if not isinstance(reply, dict):
        return "the reply is not a JSON object", None
    if "error" in reply:
        return reply["error"], None
    return None, reply.get("prediction")
