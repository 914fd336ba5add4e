"""The device's own recent inputs and confidences, for an update's self-test and health watch.

The inference stage calls :meth:`CanaryRecorder.record` once per input: an append of two
references to bounded deques under a lock (no copy, no allocation beyond the tuple), so it
costs well under a microsecond. Inputs are never mutated after a source yields them, so
keeping a reference is enough.

Only inputs the running version handled sanely become canaries: its last boundary for
them is finite and within ``SANE_MAGNITUDE``. Any client allowed on the device's input
topic can send extreme but finite frames (3e38 everywhere); the running version may still
produce finite outputs near float32's limit on them, a retrained block overflows to Inf,
and a ring of those made every legitimate update fail its self-test. Such inputs are
counted in ``skipped``; the self-test filters its inputs the same way (agent/update/selftest.py).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np

CONFIDENCE_WINDOW = 1024
# The square root of float32's largest value: an activation beyond it has no headroom left
# (one product with another such value overflows). Real activations stay many orders below.
SANE_MAGNITUDE = float(np.sqrt(np.finfo(np.float32).max))


def sane(values: np.ndarray) -> bool:
    """Finite and within ``SANE_MAGNITUDE`` (per-sample masks: ``sane_rows``)."""
    return bool(sane_rows(values.reshape(1, -1))[0])


def sane_rows(batch: np.ndarray) -> np.ndarray:
    """Per row of ``batch``: every value finite and within ``SANE_MAGNITUDE``."""
    flat = np.abs(batch.reshape(len(batch), -1))
    return np.asarray((flat <= SANE_MAGNITUDE).all(axis=1))  # NaN compares False


class CanaryRecorder:
    """The last ``size`` inputs, and the last confidences tagged with the runner that made
    them (so the health watch compares the new version with the previous one)."""

    def __init__(self, size: int, confidence_window: int = CONFIDENCE_WINDOW) -> None:
        self.size = size
        self._inputs: deque[np.ndarray] = deque(maxlen=max(size, 1))
        self._conf: deque[tuple[int, float]] = deque(maxlen=confidence_window)
        self._lock = threading.Lock()
        self.skipped = 0  # inputs not kept: the running version's output was not finite

    def record(self, x: np.ndarray, runner: Any, confidence: float | None,
               output: np.ndarray | None = None) -> None:
        """Keep ``x`` as a canary if ``output`` (the running version's last boundary for
        it) is sane; the check costs about a microsecond on logits."""
        if not self.size:
            return
        if output is not None and not sane(output):
            self.skipped += 1
            return
        with self._lock:
            self._inputs.append(x)
            if confidence is not None:
                self._conf.append((id(runner), confidence))

    def inputs(self) -> list[np.ndarray]:
        with self._lock:
            return list(self._inputs)

    def confidences(self, runner: Any) -> list[float]:
        """Recent confidences of ``runner`` (it must still be referenced: ids are reused)."""
        key = id(runner)
        with self._lock:
            return [c for r, c in self._conf if r == key]
