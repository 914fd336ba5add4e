"""The device's own recent inputs and confidences, for an update's self-test and health watch.

The inference stage calls :meth:`CanaryRecorder.record` once per input: an append of two
references to bounded deques under a lock (no copy, no allocation beyond the tuple), so it
costs well under a microsecond. Inputs are never mutated after a source yields them, so
keeping a reference is enough.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np

CONFIDENCE_WINDOW = 1024


class CanaryRecorder:
    """The last ``size`` inputs, and the last confidences tagged with the runner that made
    them (so the health watch compares the new version with the previous one)."""

    def __init__(self, size: int, confidence_window: int = CONFIDENCE_WINDOW) -> None:
        self.size = size
        self._inputs: deque[np.ndarray] = deque(maxlen=max(size, 1))
        self._conf: deque[tuple[int, float]] = deque(maxlen=confidence_window)
        self._lock = threading.Lock()

    def record(self, x: np.ndarray, runner: Any, confidence: float | None) -> None:
        if not self.size:
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
