"""Keep one device's message from ending the trainer's network threads, and end the process
when a thread dies anyway.

paho runs every ``on_message`` callback on its network thread and re-raises what a callback
raises, which ends that thread: the connection then times out, the broker publishes the
trainer's Will (``offline``) and the process lives on as a zombie that looks healthy to
systemd. Two layers:

* ``guard_callback`` wraps a message callback so that *any* exception is counted, logged at
  most once per interval per (callback, topic device) and the message dropped;
* ``ThreadDeathWatch`` installs a ``threading.excepthook`` that records the first thread to
  die of an uncaught exception and calls ``on_death`` (the service stops and the daemon
  exits non-zero, so systemd restarts it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class RateLimitedLog:
    """At most one line per key per interval, with a count of what was suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[Any, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: Any, msg: str, *args: Any, exc_info: bool = False) -> bool:
        """Log unless ``key`` logged within the interval; True when a line was written."""
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last.get(key, (-1e18, 0))
            if now - last < self.interval:
                self._last[key] = (last, suppressed + 1)
                return False
            self._last[key] = (now, 0)
        extra = f" ({suppressed} similar suppressed)" if suppressed else ""
        self.logger.log(level, msg + extra, *args, exc_info=exc_info)
        return True


MessageCallback = Callable[[Any, Any, Any], None]


def guard_callback(name: str, callback: MessageCallback, errors: Counter[str],
                   limiter: RateLimitedLog) -> MessageCallback:
    """``callback`` that never raises: a failure counts ``errors[name]`` and drops the message."""

    def guarded(client: Any, userdata: Any, msg: Any) -> None:
        try:
            callback(client, userdata, msg)
        except Exception as exc:  # the guard's purpose: one message never ends paho's thread
            errors[name] += 1
            topic = getattr(msg, "topic", "?")
            limiter.log(logging.ERROR, (name, type(exc).__name__),
                        "%s: message on %r dropped: %s: %s", name, topic,
                        type(exc).__name__, str(exc)[:200], exc_info=True)

    guarded.__name__ = getattr(callback, "__name__", name)
    return guarded


class ThreadDeathWatch:
    """A ``threading.excepthook`` that turns a dead thread into a stop of the process."""

    def __init__(self, on_death: Callable[[str, BaseException | None], None]) -> None:
        self.on_death = on_death
        self.dead: list[str] = []
        self._previous: Callable[[threading.ExceptHookArgs], Any] | None = None

    def install(self) -> ThreadDeathWatch:
        self._previous = threading.excepthook
        threading.excepthook = self._hook
        return self

    def uninstall(self) -> None:
        if self._previous is not None and threading.excepthook == self._hook:
            threading.excepthook = self._previous
        self._previous = None

    def _hook(self, args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else "?"
        if args.exc_type is SystemExit:
            return
        self.dead.append(name)
        log.critical("thread %s died of %s: %s; stopping the process so that its supervisor "
                     "restarts it", name, getattr(args.exc_type, "__name__", args.exc_type),
                     args.exc_value, exc_info=(args.exc_type, args.exc_value,  # type: ignore[arg-type]
                                               args.exc_traceback))
        self.on_death(name, args.exc_value)


__all__ = ["RateLimitedLog", "ThreadDeathWatch", "guard_callback"]
