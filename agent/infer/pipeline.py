"""Threaded stages joined by bounded queues.

Source, inference, encoding and publishing each run in their own thread so communication
overlaps computation (the offloading pipeline of the Duan thesis); onnxruntime, lz4 and zfp
release the GIL for their heavy work. A full queue blocks the stage before it, so a slow
uplink slows the source instead of growing memory.

The queues are :class:`Channel`, not ``queue.Queue``: a ``Queue`` wakes a blocked producer on
every ``get``, so a source that is ahead of inference costs one thread switch (and a GIL
hand-over) per frame; a ``Channel`` lets it sleep until the queue is half empty and then
refill it in one burst. A stage with ``batch > 1`` receives lists of what is waiting (up to
``batch`` items), e.g. to commit many messages to the spool in one transaction.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_END = object()  # flows down the pipeline once the source is exhausted


class Channel:
    """A bounded FIFO between two threads whose blocked producer is woken only once the
    consumer has drained it to half (see the module docstring); ``queue.Queue``'s
    ``put``/``get``/``qsize`` semantics otherwise (``queue.Full``/``queue.Empty``)."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._low = maxsize // 2  # a waiting producer is woken at or below this depth
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._getters = self._putters = 0

    def put(self, item: Any, timeout: float) -> None:
        with self._lock:
            if len(self._items) >= self.maxsize:
                self._putters += 1
                try:
                    self._not_full.wait_for(lambda: len(self._items) <= self._low, timeout)
                finally:
                    self._putters -= 1
                if len(self._items) >= self.maxsize:
                    raise queue.Full
            self._items.append(item)
            if self._getters:
                self._not_empty.notify()

    def get_many(self, limit: int, timeout: float) -> list[Any]:
        """Up to ``limit`` items, oldest first, waiting up to ``timeout`` for the first."""
        with self._lock:
            if not self._items:
                self._getters += 1
                try:
                    self._not_empty.wait_for(lambda: self._items, timeout)
                finally:
                    self._getters -= 1
                if not self._items:
                    raise queue.Empty
            items = self._items
            out = [items.popleft() for _ in range(min(limit, len(items)))]
            if self._putters and len(items) <= self._low:
                self._not_full.notify_all()
            return out

    def get(self, timeout: float) -> Any:
        return self.get_many(1, timeout)[0]

    def qsize(self) -> int:
        return len(self._items)


@dataclass
class Stage:
    """One thread: takes items from ``inbox``, hands what ``fn`` returns to the next stage.

    ``fn`` may return None to drop an item (it was counted by the stage itself). With
    ``batch > 1``, ``fn`` takes a list of up to ``batch`` waiting items instead of one item
    and returns a list (or None) for the whole batch; when it raises, the batch is retried
    item by item and the lists that come back are joined.

    ``flush`` (optional) holds work back across calls, e.g. samples filling a batch:
    ``due_in()`` says in how many seconds it wants ``flush(False)`` called even if no
    item arrives (None: nothing waiting), and ``flush(True)`` at the end of the stream
    hands on whatever is left. What ``flush`` returns goes to the next stage like ``fn``'s.
    """

    name: str
    fn: Callable[[Any], Any]
    queue_size: int = 16
    batch: int = 1
    flush: Callable[[bool], Any] | None = None
    due_in: Callable[[], float | None] | None = None
    inbox: Channel = field(init=False)
    processed: int = 0
    errors: int = 0
    beat: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.inbox = Channel(self.queue_size)


class RunnerSlot:
    """Holds the active inference object; a swap takes effect between two inputs.

    The inference stage reads ``current`` once per input, so an input is processed wholly
    by the old or wholly by the new chain, never by a mix.
    """

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self._lock = threading.Lock()

    @property
    def current(self) -> Any:
        return self._runner

    def swap(self, runner: Any) -> Any:
        with self._lock:
            old, self._runner = self._runner, runner
        return old


class Pipeline:
    """``source`` feeds ``stages`` in order: :meth:`start`, then :meth:`join` or :meth:`stop`."""

    def __init__(self, source: Iterable[Any], stages: list[Stage], *,
                 inline_source: bool = False) -> None:
        """``inline_source``: the first stage's thread pulls from ``source`` itself. For a
        local replay that never blocks on the network this saves a thread hand-off (and a
        GIL round trip) per input; a source that waits on others (MQTT) keeps its thread."""
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.source = source
        self.stages = stages
        self.inline_source = inline_source
        self.source_items = 0
        self.source_done = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.source_beat = time.monotonic()

    def start(self) -> Pipeline:
        feed = self._feed_inline if self.inline_source else self._feed
        self._threads = [threading.Thread(target=feed, name="knet-source", daemon=True)]
        for i, stage in enumerate(self.stages):
            if i == 0 and self.inline_source:
                continue  # the source thread runs the first stage
            nxt = self.stages[i + 1] if i + 1 < len(self.stages) else None
            self._threads.append(threading.Thread(
                target=self._work, args=(stage, nxt), name=f"knet-{stage.name}", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def _put(self, q: Channel, item: Any) -> bool:
        """Blocking put that still notices a stop request: back-pressure, not a hang."""
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _feed(self) -> None:
        first = self.stages[0].inbox
        try:
            for item in self.source:
                self.source_beat = time.monotonic()
                if self._stop.is_set() or not self._put(first, item):
                    return
                self.source_items += 1
        except Exception:  # any source (user-configured) may fail: end the stream, not hang it
            log.exception("input source failed; no more input will be read")
        finally:
            self.source_done.set()
            self._put(first, _END)

    def _feed_inline(self) -> None:
        first = self.stages[0]
        nxt = self.stages[1] if len(self.stages) > 1 else None
        try:
            for item in self.source:
                now = time.monotonic()
                self.source_beat = first.beat = now
                if self._stop.is_set():
                    return
                self.source_items += 1
                out = self._call(first, [item] if first.batch > 1 else item)
                if out is not None and nxt is not None and not self._put(nxt.inbox, out):
                    return
        except Exception:  # any source (user-configured) may fail: end the stream, not hang it
            log.exception("input source failed; no more input will be read")
        finally:
            self.source_done.set()
            if nxt is not None:
                self._put(nxt.inbox, _END)

    def _work(self, stage: Stage, nxt: Stage | None) -> None:
        while True:
            stage.beat = time.monotonic()
            try:
                items = stage.inbox.get_many(stage.batch, timeout=self._wait(stage))
            except queue.Empty:
                if self._stop.is_set():
                    return
                if not self._flush(stage, nxt, False):
                    return
                continue
            end = items[-1] is _END  # nothing follows the end marker
            if end:
                items.pop()
            work = [items] if stage.batch > 1 and items else items
            for item in work:
                out = self._call(stage, item)
                if out is not None and nxt is not None and not self._put(nxt.inbox, out):
                    return
            if end:
                if not self._flush(stage, nxt, True):
                    return
                if nxt is not None:
                    self._put(nxt.inbox, _END)
                return

    @staticmethod
    def _wait(stage: Stage) -> float:
        """How long the stage may block on its inbox: 0.5 s, or until its flush is due."""
        due = stage.due_in() if stage.due_in is not None else None
        return 0.5 if due is None else min(0.5, due)

    def _flush(self, stage: Stage, nxt: Stage | None, force: bool) -> bool:
        """Run the stage's ``flush`` when one is due (always with ``force``); False once a
        stop request interrupted the hand-off."""
        if stage.flush is None or (not force and stage.due_in is not None
                                   and stage.due_in() != 0.0):
            return True
        try:
            out = stage.flush(force)
        except Exception:  # like fn: the stage thread must go on
            stage.errors += 1
            log.exception("stage %s failed to flush; what it held was dropped", stage.name)
            return True
        return out is None or nxt is None or self._put(nxt.inbox, out)

    @staticmethod
    def _call(stage: Stage, item: Any) -> Any:
        """``stage.fn`` on one item, or on a batch; a failing batch is retried item by item
        (as one-item lists), so one bad item costs only itself."""
        try:
            out = stage.fn(item)
        except Exception:  # one bad item costs only itself: the stage thread must go on
            if stage.batch > 1 and len(item) > 1:
                outs = [Pipeline._call(stage, [one]) for one in item]
                merged = [x for o in outs if o is not None for x in o]
                return merged or None
            stage.errors += 1
            log.exception("stage %s failed on one item; it was dropped", stage.name)
            return None
        stage.processed += len(item) if stage.batch > 1 else 1
        return out

    def depths(self) -> dict[str, int]:
        return {s.name: s.inbox.qsize() for s in self.stages}

    def healthy(self, max_beat_age: float = 30.0) -> bool:
        """Every stage thread alive and looping (an idle stage still beats on its timeout)."""
        now = time.monotonic()
        workers = self._threads[1:]
        if not workers:
            return False
        alive = all(t.is_alive() for t in workers) or self.finished()
        return alive and all(now - s.beat < max_beat_age for s in self.stages)

    def finished(self) -> bool:
        """The source is exhausted and every stage has passed the end marker on."""
        return self.source_done.is_set() and not any(t.is_alive() for t in self._threads)

    def join(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(remaining)
        return not any(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.join(timeout)
