"""One start/stop interface for the trainer daemon's parts (ingest, split server, cut
adapter, console, metrics endpoint, leader lock, job scheduler): ``TrainerService`` starts
each once and stops what it started in reverse order, whatever each does inside."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)


@runtime_checkable
class Subsystem(Protocol):
    """A part with its own threads or connections. ``stop`` must cope with a part that is
    already stopped or whose ``start`` failed halfway, and return within its own bounded
    timeout."""

    def start(self) -> object: ...

    def stop(self) -> None: ...


class Managed:
    """A part whose own verbs differ (e.g. the ingestor's start without waiting for its
    SUBACK), under the one interface."""

    def __init__(self, start: Callable[[], object], stop: Callable[[], None]) -> None:
        self._start, self._stop = start, stop

    def start(self) -> Managed:
        self._start()
        return self

    def stop(self) -> None:
        self._stop()


class Subsystems:
    """The started parts, in start order; safe to add to from another thread (the leader
    lock starts the scheduler on its own thread when elected)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: list[tuple[str, Subsystem]] = []

    def start(self, name: str, part: Subsystem) -> None:
        """Start ``part``; ``stop_all`` stops it, also when its start raised halfway (so
        the threads it had started by then end with the daemon)."""
        with self._lock:
            self._started.append((name, part))
        part.start()
        log.debug("%s started", name)

    def stop_all(self) -> None:
        """Stop every started part, the last started first; one failing to stop is logged
        and the others still stop (the daemon is going down either way)."""
        while True:
            with self._lock:
                if not self._started:
                    return
                name, part = self._started.pop()
            try:
                part.stop()
            except Exception:  # shutting down: the other parts and the lock must still go
                log.exception("stopping %s failed", name)

    def names(self) -> list[str]:
        with self._lock:
            return [name for name, _ in self._started]
