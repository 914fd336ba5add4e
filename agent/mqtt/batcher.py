"""Collect uplinked samples into batches: one message per N samples, or per time bound.

A batch holds samples of one boundary, model and model version (what one version-2
envelope carries: ``agent.wire.envelope.BatchEnvelope``). It is ready when it holds ``size``
samples, when its float32 bytes reach ``max_bytes`` (the agent uses 2 MiB, so the encoded
message stays under the trainer's default ``max_payload`` even with the raw codec), or
``wait_s`` after its first sample arrived,
whichever comes first: at high rates the per-message costs are paid once per ``size``
samples, at low rates a sample waits at most ``wait_s`` (plus the encode stage's own
latency) before it is encoded and spooled.

Single-threaded by design: only the agent's encode stage adds and takes (the pipeline calls
``take_due`` when the stage's inbox stays empty, see ``agent.infer.pipeline.Stage.flush``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Batch:
    """Samples waiting for one message: ``arrays[i]`` (batch 1 each) and ``items[i]``."""

    key: Hashable
    started: float
    arrays: list[np.ndarray] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)
    nbytes: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def stacked(self) -> np.ndarray:
        """The samples as one (N, ...) array: the single copy a batch costs."""
        return np.concatenate(self.arrays, axis=0)


class Batcher:
    """Batches by key; ``add`` returns the batches it completed, ``take_due`` the timed-out
    ones (all of them with ``force``, e.g. at the end of the stream)."""

    def __init__(self, size: int, wait_s: float, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self.size = size
        self.wait_s = wait_s
        self.max_bytes = max_bytes
        self.clock = clock
        self._open: dict[Hashable, Batch] = {}
        self._next_due = float("inf")  # the oldest open batch's deadline: add() checks one float

    def add(self, key: Hashable, array: np.ndarray, item: Any) -> list[Batch]:
        """Add one sample (``array`` with its batch dimension of 1); completed batches."""
        now = self.clock()
        out = self.take_due(now=now) if now >= self._next_due else []
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = Batch(key, now)
            self._next_due = min(self._next_due, now + self.wait_s)
        batch.arrays.append(array)
        batch.items.append(item)
        batch.nbytes += array.nbytes
        if len(batch) >= self.size or batch.nbytes >= self.max_bytes:
            out.append(self._open.pop(key))
            self._next_due = min((b.started + self.wait_s for b in self._open.values()),
                                 default=float("inf"))
        return out

    def take_due(self, force: bool = False, now: float | None = None) -> list[Batch]:
        """The batches whose time bound has passed (every open batch with ``force``), in
        the order they were started."""
        if not self._open:
            return []
        now = self.clock() if now is None else now
        due = [k for k, b in self._open.items() if force or b.started + self.wait_s <= now]
        out = [self._open.pop(k) for k in due]
        self._next_due = min((b.started + self.wait_s for b in self._open.values()),
                             default=float("inf"))
        return out

    def due_in(self) -> float | None:
        """Seconds until the oldest open batch is due (0 when overdue); None when empty."""
        if not self._open:
            return None
        return max(0.0, self._next_due - self.clock())

    def __len__(self) -> int:
        """Samples waiting."""
        return sum(len(b) for b in self._open.values())
