"""What the uplink achieves, measured from the device's own traffic (no probe messages).

The link feeds every PUBACKed reliable message: its delay from the moment it was handed to
paho to its PUBACK (an MQTT-level round trip, including any wait in the in-flight window
under load) and its size. ``snapshot()`` gives the median delay over the last messages and
the bytes acknowledged per second over a sliding window, for ``stats`` (the planner's
network figures, from live measurements instead of a file). ``delivered`` takes the delay
of each uplinked sample from its inference to the PUBACK of the message that carried it
(batching, spool and network together): ``delivery_ms_p50``/``_p99`` over the last samples.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Iterable

DELIVERY_SAMPLES = 8192


class NetMeter:
    def __init__(self, window_s: float = 10.0, samples: int = 128) -> None:
        self.window_s = window_s
        self._rtts: deque[float] = deque(maxlen=samples)
        self._acked: deque[tuple[float, int]] = deque()
        self._delivery: deque[float] = deque(maxlen=DELIVERY_SAMPLES)
        self._lock = threading.Lock()

    def acked(self, delay_s: float, nbytes: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._rtts.append(max(0.0, delay_s))
            self._acked.append((now, nbytes))
            self._trim(now)

    def delivered(self, delays_s: Iterable[float]) -> None:
        """Inference-to-PUBACK delays of the samples one acknowledged message carried."""
        with self._lock:
            self._delivery.extend(delays_s)

    def _trim(self, now: float) -> None:
        while self._acked and now - self._acked[0][0] > self.window_s:
            self._acked.popleft()

    def snapshot(self, now: float | None = None) -> dict[str, float | int | None]:
        """``rtt_ms`` (median PUBACK delay, None before the first ack), ``uplink_bytes_per_s``
        (acked bytes over the window: a lower bound of capacity when the device is idle),
        ``acked_in_window``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            rtt = statistics.median(self._rtts) * 1e3 if self._rtts else None
            nbytes = sum(n for _t, n in self._acked)
            count = len(self._acked)
            span = min(self.window_s, now - self._acked[0][0]) if self._acked else 0.0
            delivery = sorted(self._delivery)
        return {"rtt_ms": rtt, "uplink_bytes_per_s": nbytes / span if span > 0 else 0.0,
                "acked_in_window": count, "delivery_ms_p50": _quantile(delivery, 0.5),
                "delivery_ms_p99": _quantile(delivery, 0.99)}


def _quantile(ordered: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of sorted seconds, in ms; None when empty."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3
