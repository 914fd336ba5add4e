"""Which inputs' activations go to the trainer.

A device cannot send everything: the policy keeps every n-th input, always prefers "hard
examples" (low local confidence, as Sedna does — those are where the student needs the
teacher most), and caps samples/s and bytes/s with token buckets so a drifting camera cannot
saturate a shared uplink.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; rate 0 means unlimited."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    _tokens: float = field(init=False)
    _stamp: float = field(init=False)

    def __post_init__(self) -> None:
        self._tokens = self.burst
        self._stamp = self.clock()

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def available(self, amount: float = 1.0) -> bool:
        if self.rate <= 0:
            return True
        self._refill()
        return self._tokens >= amount

    def take(self, amount: float = 1.0) -> None:
        if self.rate > 0:
            self._refill()
            self._tokens -= amount


@dataclass(frozen=True)
class UplinkDecision:
    send: bool
    reason: str  # "every_n", "hard", "skipped", "rate_samples", "rate_bytes"


# Shared instances: decide() runs once per frame, so it allocates nothing.
_DECISIONS = {reason: UplinkDecision(reason in ("every_n", "hard"), reason)
              for reason in ("every_n", "hard", "skipped", "rate_samples", "rate_bytes")}


class UplinkPolicy:
    """Decides per input; call :meth:`charge` with the bytes actually sent.

    Thread-safe: the agent decides in its inference thread and charges in its encode thread.
    """

    def __init__(self, every_n: int = 1, max_samples_per_s: float = 0.0,
                 max_bytes_per_s: float = 0.0, hard_threshold: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if every_n < 0:
            raise ValueError("every_n must be >= 0 (0 sends only hard examples)")
        self.every_n = every_n
        self.hard_threshold = hard_threshold
        self._samples = TokenBucket(max_samples_per_s, max(1.0, max_samples_per_s), clock)
        self._bytes = TokenBucket(max_bytes_per_s, max_bytes_per_s, clock)
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def decide(self, index: int, confidence: float | None = None) -> UplinkDecision:
        with self._lock:
            return self._decide(index, confidence)

    def _decide(self, index: int, confidence: float | None) -> UplinkDecision:
        hard = (
            self.hard_threshold is not None
            and confidence is not None
            and confidence < self.hard_threshold
        )
        if hard:
            reason = "hard"
        elif self.every_n and index % self.every_n == 0:
            reason = "every_n"
        else:
            return self._count("skipped")
        if not self._samples.available():
            return self._count("rate_samples")
        if not self._bytes.available(0.0):  # in debt from earlier sends
            return self._count("rate_bytes")
        self._samples.take()
        return self._count(reason)

    def charge(self, nbytes: int) -> None:
        """Debit the bytes sent; a negative balance pauses uplink until it refills."""
        with self._lock:
            self._bytes.take(nbytes)

    def _count(self, reason: str) -> UplinkDecision:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        return _DECISIONS[reason]
