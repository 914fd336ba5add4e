"""Exactly one scheduler among N trainer replicas: a PostgreSQL session advisory lock.

Every replica runs a ``LeaderLock``; the one whose ``pg_try_advisory_lock`` succeeds leads
(starts the APScheduler on the shared job store), the others retry every ``poll_s``. The lock
belongs to the leader's database session, so it ends with that session:

* the leader process dies (crash, SIGKILL, OOM): the kernel closes its socket, the backend
  sees EOF at once and releases the lock; a standby takes it at its next poll, so takeover
  is at most ``poll_s`` (1 s by default) plus the new scheduler's start;
* the leader's host or network vanishes (no FIN): the server's TCP keepalive ends the
  session after ``keepalive_idle_s + keepalive_interval_s * keepalive_count`` (11 s by
  default), then as above.

The leader checks its own lock session every ``poll_s``; if that session is gone it cannot
know whether another replica leads already, so it reports the loss (``on_lost``) and the
trainer exits to be restarted as a standby rather than keep scheduling.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import psycopg

from cloud_trainer.storage.fence import claim_epoch

log = logging.getLogger(__name__)

_LOCK_CLASS = 0x6B6E6574  # 'knet': the first key of the two-int advisory lock


def lock_key(fleet: str) -> tuple[int, int]:
    """One scheduler per fleet: the second key is the fleet id's CRC-32 (as int4)."""
    crc = zlib.crc32(f"scheduler:{fleet}".encode())
    return _LOCK_CLASS, crc - (1 << 32) if crc >= 1 << 31 else crc


class LeaderLock:
    """Try the lock until it is ours; then watch it. Callbacks run on this lock's thread."""

    def __init__(self, conninfo: str, fleet: str, on_elected: Callable[[], None],
                 on_lost: Callable[[str], None], poll_s: float = 1.0,
                 holder: str = "") -> None:
        self.conninfo = conninfo
        self.fleet, self.holder = fleet, holder
        self.key = lock_key(fleet)
        # The fencing epoch this replica claimed when elected (fence.py); kept after the
        # lock is lost, so that the deposed leader's writes are refused, not unfenced.
        self.epoch: int | None = None
        self.poll_s = poll_s
        self.on_elected, self.on_lost = on_elected, on_lost
        self.is_leader = False
        self.elected_at: float | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="leader-lock", daemon=True)

    def start(self) -> LeaderLock:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop trying; closing the session releases the lock if we held it."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._close()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                log.debug("closing the leader-lock session failed", exc_info=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.is_leader:
                    self._try_acquire()
                else:
                    self._check()
            except psycopg.Error as exc:
                if self.is_leader:
                    self.is_leader = False
                    self._close()
                    log.error("scheduler lock session lost: %s", exc)
                    self.on_lost(f"scheduler lock session lost: {exc}")
                    return
                log.warning("scheduler lock: cannot reach the database (%s); retrying", exc)
                self._close()
            self._stop.wait(self.poll_s)

    def _try_acquire(self) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.conninfo, autocommit=True)
        row = self._conn.execute("SELECT pg_try_advisory_lock(%s, %s)", self.key).fetchone()
        if row and row[0]:
            self.epoch = claim_epoch(self._conn, self.fleet, self.holder)
            self.is_leader, self.elected_at = True, time.time()
            log.info("this replica leads: it runs the scheduler (advisory lock %s, epoch %d)",
                     self.key, self.epoch)
            try:
                self.on_elected()
            except Exception as exc:  # leading without a scheduler would stall every job
                log.exception("starting the scheduler failed")
                self.on_lost(f"starting the scheduler failed: {exc!r}")
                self._stop.set()

    def _check(self) -> None:
        assert self._conn is not None
        row = self._conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND pid = pg_backend_pid() AND classid = %s::int8::oid AND objid = %s::int8::oid",
            (self.key[0], self.key[1] & 0xFFFFFFFF)).fetchone()
        if not row or not row[0]:
            raise psycopg.OperationalError("the advisory lock is no longer held")


def leader_pid(conninfo: str, fleet: str) -> int | None:
    """The backend pid of the session holding the fleet's scheduler lock (None: no leader)."""
    key = lock_key(fleet)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = %s::int8::oid AND objid = %s::int8::oid",
            (key[0], key[1] & 0xFFFFFFFF)).fetchone()
    return int(row[0]) if row else None
