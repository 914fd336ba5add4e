"""The bounded queue between the ingestor's network thread and its writer: group commit.

``queue.Queue`` wakes a waiting consumer on every ``put``. The writer fills a batch for up
to ``batch_wait_s`` after its first message, so with ``queue.Queue`` it was woken once per
message (a futex wake, a GIL hand-over and a ``get`` each) only to wait again. Here the
producer wakes the writer when the queue turns non-empty and when a full batch is queued,
nothing in between; the writer takes the whole batch under one lock.

Group commit, bounded delay: a batch is handed out as soon as ``max_items`` are queued, or
``wait_s`` after its oldest item was queued, whichever comes first. Nothing is acknowledged
here: the writer commits a batch and only then acks it (``cloud_trainer/ingest/ingestor.py``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, TypeVar

from cloud_trainer.errors import KnetTrainerError

T = TypeVar("T")


class QueueFull(KnetTrainerError):
    """``put`` timed out: the queue stayed at its bound."""


class BatchQueue(Generic[T]):
    """A bounded FIFO whose consumer takes batches (module doc)."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._oldest_at = 0.0  # monotonic time the oldest queued item arrived
        self._wake_at = 1  # the consumer waits for this many items
        self._unfinished = 0

    def qsize(self) -> int:
        return len(self._items)

    @property
    def unfinished_tasks(self) -> int:
        """Items put and not yet marked done by the consumer (queued or being committed)."""
        return self._unfinished

    def put(self, item: T, timeout: float) -> None:
        """Append ``item``; blocks while the queue is full, ``QueueFull`` after ``timeout``."""
        with self._not_full:
            if len(self._items) >= self.maxsize and not self._not_full.wait_for(
                    lambda: len(self._items) < self.maxsize, timeout):
                raise QueueFull
            if not self._items:
                self._oldest_at = time.monotonic()
            self._items.append(item)
            self._unfinished += 1
            if len(self._items) >= self._wake_at:
                self._not_empty.notify()

    def get_batch(self, max_items: int, wait_s: float, timeout: float) -> list[T]:
        """Up to ``max_items`` items, oldest first; [] when none arrived within ``timeout``.

        Once there is an item, waits until ``max_items`` are queued or ``wait_s`` has passed
        since the oldest was queued.
        """
        with self._not_empty:
            if not self._items and not self._not_empty.wait_for(lambda: bool(self._items),
                                                                timeout):
                return []
            if len(self._items) < max_items:
                remaining = self._oldest_at + wait_s - time.monotonic()
                if remaining > 0:
                    self._wake_at = max_items
                    try:
                        self._not_empty.wait_for(lambda: len(self._items) >= max_items,
                                                 remaining)
                    finally:
                        self._wake_at = 1
            items = self._items
            # What stays keeps the older _oldest_at: handed out at the next call, never late.
            batch = [items.popleft() for _ in range(min(max_items, len(items)))]
            self._not_full.notify_all()
            return batch

    def task_done(self, n: int = 1) -> None:
        """``n`` items taken by ``get_batch`` are finished (committed and acked, or given up)."""
        with self._lock:
            self._unfinished -= n
