"""The sample store: every activation envelope the trainer accepted, kept across restarts.

``SampleStore`` is the narrow interface the ingestor and the trainer use; ``SQLiteSampleStore``
is the embedded default. A PostgreSQL or object-storage backend implements the same methods.

Why stdlib ``sqlite3`` rather than SQLAlchemy Core (which the registry uses): this is the hot
path (thousands of rows per second); ``executemany`` of ``INSERT OR IGNORE`` on the raw
driver has no per-row compilation overhead, and everything the store needs (WAL, triggers,
``BEGIN IMMEDIATE``, ``busy_timeout``) is SQLite-specific anyway, so Core's portability
would not carry over to a PostgreSQL backend: that one gets its own class behind the ABC.

Design points:

* Two tables (schema version 3): ``frames`` keeps each accepted message's codec frame once,
  as received (compressed), with what its samples share (arrival time, model, boundary,
  shape, meta); ``samples`` keeps one small key row per sample pointing at its frame
  (``part``: its position in a batch frame, NULL for a version-1 envelope's whole frame).
  A batch of N samples is one frame row and N key rows, not N copies of a cut frame:
  the per-sample work at ingest (cutting and checksumming N frames, writing each) was most
  of what ingest cost (docs/benchmarks.md). Readers still see one ``Sample`` per sample
  with its own frame: a batch frame is cut once when its samples are read (``_Reader``).
* ``UNIQUE(device, session, seq)`` on the key rows makes inserts idempotent per sample: a
  redelivered QoS 1 message, a device's re-send after reconnect or a replayed batch
  overlapping stored samples adds no key twice, which is what makes at-least-once delivery
  exactly-once in the store. A frame none of whose samples were new is deleted in the same
  transaction; a frame whose last sample is evicted goes with it (delete trigger).
* A sample's ``size`` is its share of its frame's bytes (the frame's length over its
  samples): the byte totals and limits count what is on disk.
* Per-device totals are kept in a ``device_totals`` table inside the same transaction as
  the rows, so quotas stay exact even with two ingestor processes writing one file (WAL +
  ``busy_timeout`` + ``BEGIN IMMEDIATE``): ``add_frames`` adds one batch's new rows with one
  upsert per device (schema version 2; version 1's per-row insert trigger cost an upsert
  per sample), a trigger subtracts deleted rows. Opening a version-1 or 2 file upgrades it
  (every old row becomes a frame of its own and its key row, ids kept), and older builds
  refuse it from then on: stop every older writer of a shared file first.
* "Oldest" means lowest rowid (insertion order, which is arrival order).
* SQLite integers are signed 64-bit; the envelope's ``session``/``seq`` are unsigned 64-bit,
  so they are stored in two's complement and mapped back (ordering above 2**63 is lost,
  uniqueness is not).
"""

from __future__ import annotations

import json
import logging
import operator
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from agent.wire.codec import CodecError, decode, split_batch
from agent.wire.codec.frame import peek_shape
from agent.wire.envelope import (
    FLAG_CONF,
    FLAG_INDEX,
    FLAG_LABEL,
    FLAG_PRED,
    BatchEnvelope,
    Envelope,
)
from cloud_trainer.errors import KnetTrainerError

log = logging.getLogger(__name__)

# 1: device_totals kept by a per-row insert trigger; 2: one row per sample, its own frame
SCHEMA_VERSION = 3
FILE_NAME = "samples.sqlite3"
_U63 = 1 << 63
_U64 = 1 << 64
# A stored frame passed ingest's size checks; cutting it on read needs no second bound.
_STORED_MAX_BYTES = 1 << 40
# A new file's page size. A batch frame is ~100-200 kB: in 4 KiB pages SQLite writes it as a
# chain of ~45 overflow pages into the WAL and copies each again at the checkpoint; in
# 64 KiB pages, 3 (docs/benchmarks.md, issue 16). A file keeps the page size it was made with.
PAGE_SIZE = 1 << 16
_PAGE_SIZES = frozenset(1 << k for k in range(9, 17))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at   REAL    NOT NULL,
    model_id      TEXT,
    model_version INTEGER NOT NULL,
    boundary      INTEGER NOT NULL,
    shape         TEXT,
    meta          TEXT,
    payload       BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS frames_boundary_version_time
    ON frames (boundary, model_version, received_at);
CREATE INDEX IF NOT EXISTS frames_received ON frames (received_at);
CREATE TABLE IF NOT EXISTS samples (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    device     TEXT    NOT NULL,
    session    INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    timestamp  REAL    NOT NULL,
    label      INTEGER,
    prediction INTEGER,
    confidence REAL,
    meta_index INTEGER,
    frame      INTEGER NOT NULL,
    part       INTEGER,
    size       INTEGER NOT NULL,
    UNIQUE (device, session, seq)
);
CREATE INDEX IF NOT EXISTS samples_device ON samples (device, id);
CREATE INDEX IF NOT EXISTS samples_frame ON samples (frame);
CREATE TABLE IF NOT EXISTS device_totals (
    device TEXT PRIMARY KEY,
    count  INTEGER NOT NULL,
    bytes  INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS samples_del AFTER DELETE ON samples BEGIN
    UPDATE device_totals SET count = count - 1, bytes = bytes - OLD.size
    WHERE device = OLD.device;
    DELETE FROM frames WHERE id = OLD.frame
        AND NOT EXISTS (SELECT 1 FROM samples WHERE frame = OLD.frame);
END;
"""

# Schema 1 or 2 (one row per sample, its frame in it) into 3: every old row becomes a frame
# of its own (id kept) and its key row (id kept, so "oldest" keeps its order).
_UPGRADE_FROM_2 = """
ALTER TABLE samples RENAME TO samples_v2;
DROP TRIGGER IF EXISTS samples_ins;
DROP TRIGGER IF EXISTS samples_del;
DROP INDEX IF EXISTS samples_boundary_version_time;
DROP INDEX IF EXISTS samples_received;
DROP INDEX IF EXISTS samples_device;
"""
_COPY_FROM_2 = (
    "INSERT INTO frames (id, received_at, model_id, model_version, boundary, shape, meta, "
    "payload) SELECT id, received_at, model_id, model_version, boundary, shape, meta, payload "
    "FROM samples_v2",
    "INSERT INTO samples (id, device, session, seq, timestamp, label, prediction, confidence, "
    "meta_index, frame, part, size) SELECT id, device, session, seq, timestamp, label, "
    "prediction, confidence, NULL, id, NULL, size FROM samples_v2",
    "DROP TABLE samples_v2",
)

# What readers select: a sample's key row, its frame's shared columns, and the frame's
# payload only for a whole frame (a batch frame is fetched once for its samples: _Reader).
SELECT_SAMPLES = (
    "SELECT s.id, s.device, s.session, s.seq, s.timestamp, f.received_at, f.model_id, "
    "f.model_version, f.boundary, s.label, s.prediction, s.confidence, f.shape, f.meta, "
    "s.meta_index, s.size, s.frame, s.part, CASE WHEN s.part IS NULL THEN f.payload END "
    "FROM samples s JOIN frames f ON f.id = s.frame"
)
COUNT_SAMPLES = "SELECT COUNT(*) FROM samples s JOIN frames f ON f.id = s.frame"
_INSERT_FRAME = (
    "INSERT INTO frames (received_at, model_id, model_version, boundary, shape, meta, payload) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_SAMPLE = (
    "INSERT OR IGNORE INTO samples (frame, device, session, seq, timestamp, label, prediction, "
    "confidence, meta_index, part, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ADD_TOTALS = (
    "INSERT INTO device_totals (device, count, bytes) VALUES (?, ?, ?) "
    "ON CONFLICT (device) DO UPDATE SET count = count + excluded.count, "
    "bytes = bytes + excluded.bytes"
)
# json.dumps(meta, separators=(",", ":")) without building an encoder per call
_meta_json = json.JSONEncoder(separators=(",", ":")).encode
_SIZE = operator.itemgetter(9)  # a key row's size (FrameRows.samples)


@dataclass(frozen=True)
class FrameRows:
    """What one accepted message stores: its codec frame once and a key row per sample,
    every one of the same device.

    ``frame``: the ``frames`` columns (received_at, model_id, model_version, boundary,
    shape, meta, payload). ``samples``: per sample, the ``samples`` columns after ``frame``
    (device, session, seq, timestamp, label, prediction, confidence, meta_index, part,
    size), session and seq already in two's complement."""

    frame: tuple[Any, ...]
    samples: list[tuple[Any, ...]]


class StoreError(KnetTrainerError, RuntimeError):
    """The store cannot be opened or written (schema from a newer build, disk trouble)."""


@dataclass(frozen=True)
class StoreLimits:
    """Retention limits; ``None`` means unlimited.

    Byte limits count payload bytes (the codec frames), not SQLite's page overhead.
    """

    max_age_s: float | None = None
    max_bytes: int | None = None
    device_max_bytes: int | None = None
    device_max_count: int | None = None


@dataclass(frozen=True)
class Sample:
    """One stored sample; ``payload`` is the codec frame exactly as the device sent it."""

    id: int
    device: str
    session: int
    seq: int
    timestamp: float
    received_at: float
    model_id: str | None
    model_version: int
    boundary: int
    label: int | None
    prediction: int | None
    confidence: float | None
    shape: tuple[int, ...] | None
    size: int
    payload: bytes
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.device, self.session, self.seq)

    def array(self, max_bytes: int = 64 << 20) -> np.ndarray:
        """Decode the payload (float32, the frame's shape)."""
        return decode(self.payload, max_bytes=max_bytes)


class SampleStore(ABC):
    """What the ingestor and the trainer need from a sample store, and nothing more."""

    def add_many(self, envelopes: Iterable[Envelope], received_at: float | None = None,
                 shapes: Sequence[tuple[int, ...] | None] | None = None) -> int:
        """Insert in one transaction; duplicates of (device, session, seq) are ignored.

        Returns how many were new. When it returns, the rows are committed (durable against
        a process crash), which is what lets the ingestor acknowledge them to the broker.
        ``shapes``: each payload's frame shape when the caller already parsed the frames
        (the ingestor does, to validate them), so that the store does not parse them again.
        """
        now = time.time() if received_at is None else received_at
        envs = list(envelopes)
        if shapes is None:
            return self.add_frames([envelope_rows(e, now) for e in envs])
        return self.add_frames([envelope_rows(e, now, shape)
                                for e, shape in zip(envs, shapes, strict=True)])

    @abstractmethod
    def add_frames(self, frames: Sequence[FrameRows]) -> int:
        """``add_many`` of frames already made (``envelope_rows``, ``batch_rows``): one
        transaction; returns how many samples were new."""

    def add(self, envelope: Envelope, received_at: float | None = None) -> bool:
        """Insert one envelope; True when it was new."""
        return self.add_many([envelope], received_at) == 1

    @abstractmethod
    def query(self, boundary: int | None = None, model_version: int | None = None,
              since: float | None = None, device: str | None = None,
              limit: int | None = None) -> list[Sample]:
        """Samples matching every given filter, oldest first; ``since`` is a received_at."""

    @abstractmethod
    def count(self, boundary: int | None = None, model_version: int | None = None,
              since: float | None = None, device: str | None = None) -> int: ...

    @abstractmethod
    def sample_keys(self) -> set[tuple[str, int, int]]:
        """Every stored (device, session, seq): for audits and tests."""

    @abstractmethod
    def expire(self, now: float | None = None) -> int:
        """Apply every retention limit now; returns how many samples were evicted."""

    @abstractmethod
    def stats(self) -> dict[str, Any]: ...

    def totals(self) -> tuple[int, int]:
        """(samples, payload bytes), cheap: from the per-device totals, for metrics."""
        st = self.stats()
        return int(st["samples"]), int(st["bytes"])

    @abstractmethod
    def close(self) -> None: ...

    def load_arrays(self, boundary: int, model_version: int | None = None,
                    since: float | None = None, device: str | None = None,
                    limit: int | None = None, max_bytes: int = 64 << 20) -> np.ndarray:
        """Decoded activations of ``boundary`` stacked on axis 0 (batch-1 frames concatenate).

        A sample that no longer decodes (it was validated at ingest, so this means a codec
        change or disk corruption) is skipped with a warning rather than failing a training
        run. Raises ValueError when the samples disagree on shape.
        """
        arrays: list[np.ndarray] = []
        for s in self.query(boundary, model_version, since, device, limit):
            try:
                a = s.array(max_bytes)
            except CodecError as exc:
                log.warning("sample %s no longer decodes: %s", s.key, exc)
                continue
            arrays.append(a if a.ndim else a[None])
        if not arrays:
            return np.empty((0,), dtype=np.float32)
        shapes = {a.shape[1:] for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"boundary {boundary} samples disagree on shape: {sorted(shapes)}")
        return np.concatenate(arrays, axis=0)

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _to_i64(v: int) -> int:
    return v - _U64 if v >= _U63 else v


def _from_i64(v: int) -> int:
    return v + _U64 if v < 0 else v


def frame_shape(payload: bytes) -> tuple[int, ...] | None:
    """The shape a codec frame's header declares; None if it is not one. Only the header:
    ingest checked the frame (CRC included) before it reached the store, and a second CRC
    pass per row cost more than the row's insert with batch envelopes."""
    return peek_shape(payload)


def _model_id(meta: dict[str, Any]) -> str | None:
    value = meta.get("model_id", meta.get("model"))
    return value if isinstance(value, str) else None


class _Checkpointer:
    """Copies the WAL into the database file on its own thread and connection.

    SQLite's auto-checkpoint runs inside the COMMIT that crosses its threshold, so the
    ingest writer waited for the copy and two fsyncs: at batch ingest rates most of its
    wall time (docs/benchmarks.md, issue 16). Here the store's connections never
    checkpoint; this thread runs a PASSIVE checkpoint (which never waits on the writer)
    each time ``wal_bytes`` more were committed. A WAL is rewound only by a transaction
    that starts once everything was copied, which a writer appending meanwhile rarely
    allows: so after ``max_wal_bytes`` the writer waits (``settle``, before its next
    transaction) for one checkpoint that began after its last commit, and when that one
    copied everything its next transaction rewinds the WAL: bounded, one checkpoint's wait
    per ``max_wal_bytes``. A reader on an older snapshot keeps a checkpoint from copying
    everything; the writer then goes on after that one checkpoint, and the WAL grows until
    the reader is done, as it would with SQLite's own checkpoints. (A RESTART checkpoint
    would wait for that reader, and its busy handler sleeps in steps of up to 100 ms while
    the writer is locked out.)"""

    def __init__(self, connect: Callable[[], sqlite3.Connection], wal_bytes: int,
                 max_wal_bytes: int, timeout_s: float) -> None:
        self._connect = connect
        self._wal_bytes = wal_bytes
        self._max_wal_bytes = max_wal_bytes
        self._timeout_s = timeout_s
        self._written = 0  # since the last nudge
        self._unsettled = 0  # bytes committed since the writer last settled
        self._commits = 0
        self._checked_upto = -1  # the commit count the last checkpoint began after
        self._cond = threading.Condition()
        self._pending = False  # a checkpoint is asked for
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="knet-store-checkpoint",
                                        daemon=True)
        self._thread.start()

    def wrote(self, n_bytes: int) -> None:
        """The writer committed about ``n_bytes`` more."""
        with self._cond:
            self._commits += 1
            self._written += n_bytes
            self._unsettled += n_bytes
            if self._written >= self._wal_bytes:
                self._written = 0
                self._pending = True
                self._cond.notify_all()

    def settle(self) -> None:
        """Before a write transaction: past ``max_wal_bytes``, wait for one checkpoint of
        everything committed so far, so that the transaction rewinds the WAL if it was
        copied whole (the writer thread, under its lock)."""
        with self._cond:
            if self._unsettled < self._max_wal_bytes:
                return
            target = self._commits
            self._pending = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._checked_upto >= target or self._stop,
                                self._timeout_s)
            self._unsettled = 0

    def _run(self) -> None:
        db = self._connect()
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._pending or self._stop, 1.0)
                    if self._stop:
                        return
                    self._pending = False
                    commits = self._commits
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # retried at the next wake; SQLite's data is safe
                    log.warning("sample store checkpoint failed: %s", exc)
                with self._cond:
                    self._checked_upto = max(self._checked_upto, commits)
                    self._cond.notify_all()
        finally:
            db.close()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=60)


class SQLiteSampleStore(SampleStore):
    """Samples in one SQLite file (WAL): one writer at a time, readers never block it.

    Each thread gets its own connection, so a trainer thread can read while the ingestor's
    writer thread commits. Writes take ``BEGIN IMMEDIATE`` so two processes sharing the file
    queue on ``busy_timeout`` instead of failing on a lock upgrade. Checkpoints run on a
    thread of their own (``_Checkpointer``), not inside the writer's COMMIT.
    """

    WAL_CHECKPOINT_BYTES = 4 << 20  # SQLite's own default threshold: 1,000 pages of 4 KiB
    MAX_WAL_BYTES = 32 << 20  # the WAL is rewound after about this much (_Checkpointer)

    def __init__(self, directory: Path, limits: StoreLimits | None = None,
                 synchronous: str = "NORMAL", busy_timeout_s: float = 30.0,
                 page_size: int = PAGE_SIZE) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        if page_size not in _PAGE_SIZES:
            raise ValueError(f"page_size must be a power of two from 512 to 65536, "
                             f"got {page_size}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / FILE_NAME
        self.limits = limits or StoreLimits()
        self.synchronous = synchronous
        self.page_size = page_size
        self.busy_timeout_ms = int(busy_timeout_s * 1000)
        self.evicted = 0
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self._checkpointer: _Checkpointer | None = None
        self._init_schema()

    # -- connections -----------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=self.busy_timeout_ms / 1000)
        db.execute(f"PRAGMA page_size={self.page_size}")  # a new file's only
        db.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute("PRAGMA wal_autocheckpoint=0")  # _Checkpointer's thread does it
        db.execute(f"PRAGMA journal_size_limit={self.MAX_WAL_BYTES}")
        return db

    @property
    def _db(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"sample store {self.path} is closed")
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._connect()
            self._local.db = db
            with self._conns_lock:
                self._conns.append(db)
        return db

    def _init_schema(self) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 1, 2, SCHEMA_VERSION):
            raise StoreError(f"{self.path}: schema version {version}, this build reads "
                             f"{SCHEMA_VERSION}")
        with self._txn(db):
            old = version in (1, 2) and db.execute(
                "SELECT 1 FROM pragma_table_info('samples') WHERE name = 'payload'").fetchone()
            if old:
                for stmt in _UPGRADE_FROM_2.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
            for stmt in _split_sql(_SCHEMA):
                db.execute(stmt)
            if old:
                for stmt in _COPY_FROM_2:
                    db.execute(stmt)
                log.info("sample store %s upgraded from schema %d to %d", self.path, version,
                         SCHEMA_VERSION)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        actual = int(db.execute("PRAGMA page_size").fetchone()[0])
        if actual != self.page_size:  # made by an older build, or with another page size
            log.info("sample store %s keeps its page size of %d bytes (asked: %d)", self.path,
                     actual, self.page_size)
            self.page_size = actual

    class _Txn:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _txn(self, db: sqlite3.Connection) -> SQLiteSampleStore._Txn:
        return SQLiteSampleStore._Txn(db)

    def close(self) -> None:
        """Close every thread's connection (call once no other thread uses the store); the
        last connection to close checkpoints what is left."""
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for db in conns:
            try:
                db.close()
            except sqlite3.Error:  # pragma: no cover - closing a connection of a dead thread
                log.debug("closing a store connection failed", exc_info=True)

    # -- writing ---------------------------------------------------------------------------
    def add_frames(self, frames: Sequence[FrameRows]) -> int:
        frames = [f for f in frames if f.samples]
        if not frames:
            return 0
        db = self._db
        with self._write_lock:
            if self._checkpointer is None:
                self._checkpointer = _Checkpointer(
                    self._connect, self.WAL_CHECKPOINT_BYTES, self.MAX_WAL_BYTES,
                    self.busy_timeout_ms / 1000)
            self._checkpointer.settle()
            inserted = self._add_frames(db, frames)
            self._checkpointer.wrote(sum(len(f.frame[-1]) for f in frames))
        return inserted

    def _add_frames(self, db: sqlite3.Connection, frames: list[FrameRows]) -> int:
        with self._txn(db):
            (last_id,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM samples").fetchone()
            # The frames' ids, for their key rows: AUTOINCREMENT under this transaction's
            # write lock gives one executemany consecutive ids after sqlite_sequence's.
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'frames'").fetchone()
            first_frame = (row[0] if row else 0) + 1
            db.executemany(_INSERT_FRAME, [f.frame for f in frames])
            (last_frame,) = db.execute("SELECT last_insert_rowid()").fetchone()
            if last_frame != first_frame + len(frames) - 1:  # pragma: no cover - SQLite's
                raise StoreError(f"frame ids {first_frame}.. not consecutive: {last_frame}")
            rows: list[tuple[Any, ...]] = []
            for frame_id, f in enumerate(frames, first_frame):
                rows += [(frame_id, *r) for r in f.samples]
            inserted = int(db.executemany(_INSERT_SAMPLE, rows).rowcount)
            if inserted < len(rows):  # frames none of whose samples were new go
                db.execute("DELETE FROM frames WHERE id >= ? AND NOT EXISTS "
                           "(SELECT 1 FROM samples WHERE frame = frames.id)", (first_frame,))
            if inserted:
                db.executemany(_ADD_TOTALS, _new_totals(db, frames, inserted, len(rows),
                                                        last_id))
                self.evicted += self._enforce_sizes(db, {f.samples[0][0] for f in frames})
        return inserted

    def expire(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        db = self._db
        with self._write_lock, self._txn(db):
            n = 0
            if self.limits.max_age_s is not None:
                n += db.execute("DELETE FROM samples WHERE frame IN "
                                "(SELECT id FROM frames WHERE received_at < ?)",
                                (now - self.limits.max_age_s,)).rowcount
            devices = {r[0] for r in db.execute("SELECT device FROM device_totals")}
            n += self._enforce_sizes(db, devices)
            db.execute("DELETE FROM device_totals WHERE count <= 0")
        self.evicted += n
        return n

    def _enforce_sizes(self, db: sqlite3.Connection, devices: Iterable[str]) -> int:
        """Evict the oldest samples of each over-quota device, then the oldest overall."""
        lim = self.limits
        n = 0
        if lim.device_max_bytes is not None or lim.device_max_count is not None:
            for device in devices:
                row = db.execute("SELECT count, bytes FROM device_totals WHERE device = ?",
                                 (device,)).fetchone()
                if row is None:
                    continue
                n += self._evict_oldest(db, row[0], row[1], lim.device_max_count,
                                        lim.device_max_bytes, device)
        if lim.max_bytes is not None:
            count, total = db.execute(
                "SELECT COALESCE(SUM(count), 0), COALESCE(SUM(bytes), 0) FROM device_totals"
            ).fetchone()
            n += self._evict_oldest(db, count, total, None, lim.max_bytes, None)
        return n

    @staticmethod
    def _evict_oldest(db: sqlite3.Connection, count: int, total: int, max_count: int | None,
                      max_bytes: int | None, device: str | None) -> int:
        excess_n = max(0, count - max_count) if max_count is not None else 0
        excess_b = max(0, total - max_bytes) if max_bytes is not None else 0
        if not excess_n and not excess_b:
            return 0
        where, args = ("WHERE device = ?", (device,)) if device is not None else ("", ())
        cur = db.execute(f"SELECT id, size FROM samples {where} ORDER BY id", args)
        last_id, freed, taken = None, 0, 0
        for row_id, size in cur:
            if taken >= excess_n and freed >= excess_b:
                break
            last_id, freed, taken = row_id, freed + size, taken + 1
        cur.close()
        if last_id is None:
            return 0
        return int(db.execute(f"DELETE FROM samples {where}{' AND' if where else 'WHERE'} "
                              "id <= ?", (*args, last_id)).rowcount)

    # -- reading ---------------------------------------------------------------------------
    def query(self, boundary: int | None = None, model_version: int | None = None,
              since: float | None = None, device: str | None = None,
              limit: int | None = None) -> list[Sample]:
        return list(self.iter_query(boundary, model_version, since, device, limit))

    def iter_query(self, boundary: int | None = None, model_version: int | None = None,
                   since: float | None = None, device: str | None = None,
                   limit: int | None = None) -> Iterator[Sample]:
        """Like ``query`` but streams rows (a long read sees one consistent WAL snapshot)."""
        where, args = where_clause(boundary, model_version, since, device, "?")
        sql = f"{SELECT_SAMPLES}{where} ORDER BY s.id"
        if limit is not None:
            sql += " LIMIT ?"
            args = (*args, int(limit))
        db = self._db
        reader = _Reader(lambda frame_id: db.execute(
            "SELECT payload FROM frames WHERE id = ?", (frame_id,)).fetchone()[0])
        for row in db.execute(sql, args):
            yield reader.sample(row)

    def count(self, boundary: int | None = None, model_version: int | None = None,
              since: float | None = None, device: str | None = None) -> int:
        if boundary is model_version is since is None:
            sql, args = "SELECT COALESCE(SUM(count), 0) FROM device_totals", ()
            if device is not None:
                sql, args = sql + " WHERE device = ?", (device,)
            return int(self._db.execute(sql, args).fetchone()[0])
        where, args = where_clause(boundary, model_version, since, device, "?")
        return int(self._db.execute(f"{COUNT_SAMPLES}{where}", args).fetchone()[0])

    def sample_keys(self) -> set[tuple[str, int, int]]:
        return {(d, _from_i64(s), _from_i64(q))
                for d, s, q in self._db.execute("SELECT device, session, seq FROM samples")}

    def totals(self) -> tuple[int, int]:
        n, b = self._db.execute("SELECT COALESCE(SUM(count), 0), COALESCE(SUM(bytes), 0) "
                                "FROM device_totals").fetchone()
        return int(n), int(b)

    def stats(self) -> dict[str, Any]:
        db = self._db
        devices = {d: {"count": c, "bytes": b} for d, c, b in
                   db.execute("SELECT device, count, bytes FROM device_totals WHERE count > 0 "
                              "ORDER BY device")}
        oldest, newest = db.execute(
            "SELECT MIN(received_at), MAX(received_at) FROM frames").fetchone()
        by_boundary = {f"{b}/v{v}": n for b, v, n in db.execute(BY_BOUNDARY)}
        file_bytes = sum(p.stat().st_size for p in self.directory.glob(FILE_NAME + "*"))
        return {
            "path": str(self.path),
            "samples": sum(d["count"] for d in devices.values()),
            "bytes": sum(d["bytes"] for d in devices.values()),
            "file_bytes": file_bytes,
            "page_size": self.page_size,
            "oldest_received_at": oldest,
            "newest_received_at": newest,
            "devices": devices,
            "boundaries": by_boundary,
            "evicted": self.evicted,
        }


def _new_totals(db: sqlite3.Connection, frames: Sequence[FrameRows], inserted: int,
                rows: int, last_id: int) -> list[tuple[str, int, int]]:
    """(device, count, bytes) of the samples this transaction inserted: summed per frame
    (one device's) when every one was new, else read back (ids above ``last_id``,
    AUTOINCREMENT: only this transaction's rows)."""
    if inserted == rows:
        totals: dict[str, list[int]] = {}
        for f in frames:
            n, b = len(f.samples), sum(map(_SIZE, f.samples))
            t = totals.setdefault(f.samples[0][0], [0, 0])
            t[0] += n
            t[1] += b
        return [(d, n, b) for d, (n, b) in totals.items()]
    return [(d, int(n), int(b)) for d, n, b in db.execute(
        "SELECT device, COUNT(*), SUM(size) FROM samples WHERE id > ? GROUP BY device",
        (last_id,))]


def _split_sql(script: str) -> list[str]:
    """Statements of ``_SCHEMA``; trigger bodies contain ';' so split on 'END;' first."""
    out: list[str] = []
    for chunk in script.split("END;"):
        if "CREATE TRIGGER" in chunk:
            head, trig = chunk.split("CREATE TRIGGER", 1)
            out += [s for s in head.split(";") if s.strip()]
            out.append("CREATE TRIGGER" + trig + "END;")
        else:
            out += [s for s in chunk.split(";") if s.strip()]
    return out


BY_BOUNDARY = ("SELECT f.boundary, f.model_version, COUNT(*) FROM samples s "
               "JOIN frames f ON f.id = s.frame GROUP BY f.boundary, f.model_version")


def where_clause(boundary: int | None, model_version: int | None, since: float | None,
                 device: str | None, mark: str) -> tuple[str, tuple[Any, ...]]:
    """The WHERE of ``SELECT_SAMPLES``/``COUNT_SAMPLES`` for the given filters; ``mark``:
    the driver's parameter marker."""
    clauses, args = [], []
    for col, op, val in (("f.boundary", "=", boundary), ("f.model_version", "=", model_version),
                         ("f.received_at", ">=", since), ("s.device", "=", device)):
        if val is not None:
            clauses.append(f"{col} {op} {mark}")
            args.append(val)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", tuple(args)


def envelope_rows(e: Envelope, received_at: float,
                  shape: tuple[int, ...] | None = None) -> FrameRows:
    """A version-1 envelope's frame and key row (its whole frame: ``part`` NULL); the shape
    is read from the frame header unless the caller gave it."""
    if shape is None:
        shape = frame_shape(e.payload)
    return FrameRows(
        (received_at, _model_id(e.meta), e.model_version, e.boundary,
         None if shape is None else ",".join(map(str, shape)),
         _meta_json(e.meta) if e.meta else None, e.payload),
        [(e.device, _to_i64(e.session), _to_i64(e.seq), e.timestamp, e.label, e.prediction,
          None if e.confidence is None or e.confidence != e.confidence else e.confidence,
          None, None, len(e.payload))])


def batch_rows(env: BatchEnvelope, shape: tuple[int, ...], received_at: float,
               keep: Sequence[bool] | None = None) -> FrameRows:
    """A version-2 envelope's frame (stored once, as received) and the key rows of its
    samples (``part``: the sample's position in the frame; ``meta_index``: its index, which
    readers put into the batch's meta). ``shape``: one sample's, ``(1, ...)``. ``keep[i]``
    False: sample i is left out (it failed a per-sample check)."""
    n = len(env.samples)
    payload = env.payload
    device, session = env.device, _to_i64(env.session)
    share, extra = divmod(len(payload), n)  # a sample's share of the frame's bytes
    records = env.samples.tolist()
    samples = [(device, session, _to_i64(seq), ts,
                label if flags & FLAG_LABEL else None, pred if flags & FLAG_PRED else None,
                conf if flags & FLAG_CONF and conf == conf else None,
                index if flags & FLAG_INDEX else None, i, share + (i < extra))
               for i, (seq, ts, index, label, pred, conf, flags) in enumerate(records)
               if keep is None or keep[i]]
    return FrameRows(
        (received_at, _model_id(env.meta), env.model_version, env.boundary,
         ",".join(map(str, shape)), _meta_json(env.meta) if env.meta else None, payload),
        samples)


class _Reader:
    """Rows of ``SELECT_SAMPLES`` into ``Sample``s, each with its own frame: a batch frame
    is fetched (``fetch(frame_id)``) and cut once for its samples, which are read together
    (consecutive ids). A frame that no longer cuts (disk corruption) is handed on whole,
    so that decoding the sample fails as a damaged version-1 frame does."""

    def __init__(self, fetch: Callable[[int], bytes]) -> None:
        self._fetch = fetch
        self._frame_id: int | None = None
        self._parts: list[bytes] | bytes = b""

    def sample(self, row: Sequence[Any]) -> Sample:
        (rid, device, session, seq, ts, received_at, model_id, model_version, boundary, label,
         prediction, confidence, shape, meta, meta_index, size, frame_id, part, payload) = row
        if part is not None:
            if frame_id != self._frame_id:
                stored = bytes(self._fetch(frame_id))
                try:
                    self._parts = split_batch(stored, max_bytes=_STORED_MAX_BYTES,
                                              values=False).frames
                except CodecError as exc:
                    log.warning("stored frame %d does not cut into samples: %s", frame_id, exc)
                    self._parts = stored
                self._frame_id = frame_id
            payload = self._parts if isinstance(self._parts, bytes) else self._parts[part]
        fields: dict[str, Any] = json.loads(meta) if meta else {}
        if meta_index is not None:
            fields["index"] = meta_index
        return Sample(
            id=rid, device=device, session=_from_i64(session), seq=_from_i64(seq),
            timestamp=ts, received_at=received_at, model_id=model_id,
            model_version=model_version, boundary=boundary, label=label,
            prediction=prediction, confidence=confidence,
            shape=tuple(int(x) for x in shape.split(",") if x) if shape is not None else None,
            size=size, payload=bytes(payload), meta=fields)
