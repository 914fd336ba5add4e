"""Recent ``stats`` of every device, for the Fleet, Device and Drift pages.

The fleet table holds what a device *is* (birth, state); this holds what it *does* over
time: a bounded ring of points per device, fed from the trainer's own connection (the same
subscription the cut adapter uses), so the console needs no broker account of its own.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import paho.mqtt.client as mqtt

from agent import safejson
from agent.wire.topics import TopicError, Topics

log = logging.getLogger(__name__)

MAX_STATS_BYTES = 64 * 1024
MAX_DEVICES = 10_000  # a flood of invented device ids cannot grow memory without bound


@dataclass(frozen=True)
class Point:
    """One stats message, reduced to what the pages plot."""

    t: float
    fps: float | None
    bytes_out_per_s: float | None
    spool_records: int | None
    accuracy: float | None
    confidence: float | None
    latency_ms_p50: float | None
    model_version: int | None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def point_from_stats(stats: dict[str, Any], now: float) -> Point:
    t = _num(stats.get("time"))
    spool = _num(stats.get("spool_records"))
    version = stats.get("model_version")
    return Point(
        t=t if t is not None and abs(t - now) < 3600 else now,  # a wild device clock
        fps=_num(stats.get("fps")), bytes_out_per_s=_num(stats.get("bytes_out_per_s")),
        spool_records=int(spool) if spool is not None else None,
        accuracy=_num(stats.get("accuracy")), confidence=_num(stats.get("confidence")),
        latency_ms_p50=_num(stats.get("latency_ms_p50")),
        model_version=version if isinstance(version, int) and not isinstance(version, bool)
        else None)


class StatsHistory:
    """Thread-safe ring of ``Point`` per device."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._points: dict[str, deque[Point]] = {}
        self.bad = 0
        self.topics: Topics | None = None

    def add(self, device: str, point: Point) -> None:
        with self._lock:
            ring = self._points.get(device)
            if ring is None:
                if len(self._points) >= MAX_DEVICES:
                    return
                ring = self._points[device] = deque(maxlen=self.size)
            ring.append(point)

    def points(self, device: str) -> list[Point]:
        with self._lock:
            return list(self._points.get(device, ()))

    def last(self, device: str) -> Point | None:
        with self._lock:
            ring = self._points.get(device)
            return ring[-1] if ring else None

    def attach(self, client: mqtt.Client, topics: Topics) -> None:
        """Subscribe on ``client`` (call again from its ``on_connect``)."""
        self.topics = topics
        client.message_callback_add(topics.all_devices("stats"), self._on_stats)
        client.subscribe(topics.all_devices("stats"), 0)

    def _on_stats(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            if self.topics is None:
                return
            device = self.topics.parse_device_topic(msg.topic)[0]
            stats = safejson.loads(msg.payload, max_bytes=MAX_STATS_BYTES,
                                   allow_constants=True)
            if not isinstance(stats, dict):
                raise ValueError("stats is not a JSON object")
            self.add(device, point_from_stats(stats, time.time()))
        except (ValueError, TypeError, UnicodeDecodeError, TopicError) as exc:
            self.bad += 1
            log.debug("console: stats on %s ignored: %s", msg.topic, str(exc)[:200])
        except Exception:  # never kill paho's thread
            self.bad += 1
            log.exception("console: stats on %s failed", msg.topic)

    def to_json(self, device: str) -> list[dict[str, Any]]:
        return [asdict(p) for p in self.points(device)]
