"""Bounded on-disk store-and-forward for messages that must reach the broker.

Why SQLite rather than a hand-written segment log: a committed transaction is atomic and
survives SIGKILL at any instant (no half-written record, no torn length prefix to recover
from), FIFO order comes free from an AUTOINCREMENT key, and the file format is inspectable
with the ``sqlite3`` shell on a device.

Durability: WAL with ``synchronous=NORMAL`` (the default here). A commit is in the WAL, in
the OS page cache, when ``append`` returns, so a process crash (SIGKILL, OOM kill, segfault)
loses nothing; only a power cut can lose the last few commits, and it never corrupts the
file. ``synchronous=FULL`` fsyncs every commit, which on an SD card costs one flash write
per message (tens to hundreds per second instead of thousands); pass ``synchronous="FULL"``
where losing the last second of activations on power loss matters more than throughput.

``AUTOINCREMENT`` matters: without it SQLite may hand out a deleted row's id again once the
table is empty, and a reader that drains "everything after id N" would skip new records.

The byte bound counts topic + payload bytes (the logical size); the file on disk is larger
by SQLite's page overhead plus the WAL (checkpointed at about 4 MiB).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, NamedTuple

from agent.errors import KnetAgentError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FILE_NAME = "spool.sqlite3"
Policy = Literal["drop_oldest", "drop_newest"]
Synchronous = Literal["NORMAL", "FULL"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT    NOT NULL,
    qos     INTEGER NOT NULL,
    size    INTEGER NOT NULL,
    payload BLOB    NOT NULL
)
"""


class Record(NamedTuple):
    """One spooled message; ``id`` grows strictly with append order."""

    id: int
    topic: str
    payload: bytes
    qos: int


class SpoolError(KnetAgentError, RuntimeError):
    """The spool could not be opened even after moving a damaged file aside."""


class Spool:
    """A FIFO of (topic, payload, qos) bounded by ``max_bytes``, safe across process kills.

    Thread-safe: one connection guarded by a lock, since the service appends from worker
    threads while the MQTT link acknowledges from its own thread.
    """

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        policy: Policy = "drop_oldest",
        synchronous: Synchronous = "NORMAL",
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if policy not in ("drop_oldest", "drop_newest"):
            raise ValueError(f"policy must be 'drop_oldest' or 'drop_newest', got {policy!r}")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / FILE_NAME
        self.max_bytes = max_bytes
        self.policy: Policy = policy
        self.synchronous: Synchronous = synchronous
        self.dropped_oldest = 0
        self.dropped_newest = 0
        self._lock = threading.Lock()
        self._db = self._open_or_reset()
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records").fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])
        if self._count:
            log.info("spool %s holds %d records (%d bytes) from a previous run",
                     self.path, self._count, self._bytes)

    # -- opening -------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            result = db.execute("PRAGMA quick_check").fetchone()
            if result is None or result[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {result[0] if result else 'no result'}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(
                    f"schema version {version}, this build reads {SCHEMA_VERSION}")
            db.execute(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("SELECT id, topic, qos, size, payload FROM records LIMIT 1").fetchall()
        except BaseException:  # closed on any failure, then re-raised
            db.close()
            raise
        return db

    def _open_or_reset(self) -> sqlite3.Connection:
        """Open the spool; a damaged file is moved aside once, never crash-looped on."""
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    src.replace(Path(str(aside) + suffix))
            log.error(
                "spool file %s is unreadable (%s): moved it to %s and started an empty spool. "
                "The messages in it were not sent; inspect it with `sqlite3 %s .recover` if "
                "they matter, otherwise delete it to free the space.",
                self.path, exc, aside, aside,
            )
        try:
            return self._connect()
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot create a spool at {self.path}: {exc}") from exc

    # -- writing -------------------------------------------------------------------------
    def append(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        """Store a message durably; False when the bound made us drop this one."""
        return self.append_many([(topic, payload, qos)])[0]

    def append_many(self, messages: Sequence[tuple[str, bytes, int]],
                    ids: list[int] | None = None) -> list[bool]:
        """Store several messages in one transaction: one commit instead of one each, and
        every kept message is committed (durable) when this returns. One flag per message:
        False where the bound made us drop it. ``ids``: receives the record id of each kept
        message, in order."""
        if not messages:
            return []
        with self._lock:
            kept: list[bool] = []
            count, nbytes = self._count, self._bytes
            dropped_newest = evicted_total = 0
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for topic, payload, qos in messages:
                    size = len(topic.encode()) + len(payload)
                    if size > self.max_bytes:
                        dropped_newest += 1
                        kept.append(False)
                        log.warning("a %d-byte message exceeds the whole spool (%d bytes): "
                                    "dropped", size, self.max_bytes)
                        continue
                    overflow = nbytes + size - self.max_bytes
                    if overflow > 0 and self.policy == "drop_newest":
                        dropped_newest += 1
                        kept.append(False)
                        continue
                    if overflow > 0:
                        evicted, evicted_bytes = self._evict_oldest(db, overflow)
                        count -= evicted
                        nbytes -= evicted_bytes
                        evicted_total += evicted
                    cur = db.execute(
                        "INSERT INTO records (topic, qos, size, payload) VALUES (?, ?, ?, ?)",
                        (topic, qos, size, payload),
                    )
                    if ids is not None:
                        ids.append(int(cur.lastrowid or 0))
                    count += 1
                    nbytes += size
                    kept.append(True)
                db.execute("COMMIT")
            except BaseException:  # no half transaction, whatever stopped it; re-raised
                db.execute("ROLLBACK")
                raise
            self._count, self._bytes = count, nbytes
            self.dropped_newest += dropped_newest
            self.dropped_oldest += evicted_total
            return kept

    @staticmethod
    def _evict_oldest(db: sqlite3.Connection, overflow: int) -> tuple[int, int]:
        """Delete the oldest records until ``overflow`` bytes are free (inside a transaction)."""
        evicted = evicted_bytes = last_id = 0
        cur = db.execute("SELECT id, size FROM records ORDER BY id")
        while evicted_bytes < overflow and (rows := cur.fetchmany(64)):
            for rid, rsize in rows:
                evicted += 1
                evicted_bytes += rsize
                last_id = rid
                if evicted_bytes >= overflow:
                    break
        cur.close()
        db.execute("DELETE FROM records WHERE id <= ?", (last_id,))
        return evicted, evicted_bytes

    def ack(self, record_id: int) -> bool:
        """Remove a record the broker acknowledged; False when it was already gone."""
        return self.ack_many((record_id,)) == 1

    def ack_many(self, record_ids: Iterable[int]) -> int:
        """Remove several records in one transaction (one commit instead of one each)."""
        ids = list(record_ids)
        if not ids:
            return 0
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                removed = removed_bytes = 0
                # Chunks of 500: old SQLite builds allow 999 host parameters per statement.
                for start in range(0, len(ids), 500):
                    chunk = ids[start:start + 500]
                    marks = ",".join("?" * len(chunk))
                    n, nbytes = db.execute(
                        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records"
                        f" WHERE id IN ({marks})",
                        chunk,
                    ).fetchone()
                    db.execute(f"DELETE FROM records WHERE id IN ({marks})", chunk)
                    removed += n
                    removed_bytes += nbytes
                db.execute("COMMIT")
            except BaseException:  # no half transaction, whatever stopped it; re-raised
                db.execute("ROLLBACK")
                raise
            self._count -= removed
            self._bytes -= removed_bytes
            return removed

    # -- reading -------------------------------------------------------------------------
    def peek(self, limit: int = 100, after: int = 0) -> list[Record]:
        """Up to ``limit`` records with id > ``after``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos FROM records WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [Record(rid, topic, bytes(payload), qos) for rid, topic, payload, qos in rows]

    def __iter__(self) -> Iterator[Record]:
        """Every record in FIFO order, read in batches (the lock is not held between them)."""
        after = 0
        while batch := self.peek(500, after):
            yield from batch
            after = batch[-1].id

    def __len__(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        """Logical size: topic + payload bytes of the records held."""
        return self._bytes

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
