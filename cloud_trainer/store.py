"""The sample store: every activation envelope the trainer accepted, kept across restarts.

``SampleStore`` is the narrow interface the ingestor and the trainer use; ``SQLiteSampleStore``
is the embedded default. A PostgreSQL or object-storage backend implements the same methods.

Why stdlib ``sqlite3`` rather than SQLAlchemy Core (which the registry uses): this is the hot
path (thousands of rows per second); ``executemany`` of ``INSERT OR IGNORE`` on the raw
driver has no per-row compilation overhead, and everything the store needs (WAL, triggers,
``BEGIN IMMEDIATE``, ``busy_timeout``) is SQLite-specific anyway, so Core's portability
would not carry over to a PostgreSQL backend: that one gets its own class behind the ABC.

Design points:

* Payloads are stored as received (the codec frame, compressed); they are decoded lazily
  by ``load_arrays`` when a trainer needs them. The frame's shape is kept in its own
  column (read from the frame header, cheap) so shape filters need no decoding.
* ``UNIQUE(device, session, seq)`` makes inserts idempotent: a redelivered QoS 1 message or
  a device's re-send after reconnect is ignored, which is what makes at-least-once
  delivery exactly-once in the store.
* Per-device totals are kept in a ``device_totals`` table inside the same transaction as
  the rows, so quotas stay exact even with two ingestor processes writing one file (WAL +
  ``busy_timeout`` + ``BEGIN IMMEDIATE``): ``add_rows`` adds one batch's new rows with one
  upsert per device (schema version 2; version 1's per-row insert trigger cost an upsert
  per sample), a trigger subtracts deleted rows. Opening a version-1 file upgrades it, and
  version-1 builds refuse it from then on: stop every older writer of a shared file first
  (one still running would insert without counting).
* "Oldest" means lowest rowid (insertion order, which is arrival order).
* SQLite integers are signed 64-bit; the envelope's ``session``/``seq`` are unsigned 64-bit,
  so they are stored in two's complement and mapped back (ordering above 2**63 is lost,
  uniqueness is not).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from agent.codec import CodecError, decode
from agent.codec.frame import peek_shape
from agent.envelope import FLAG_CONF, FLAG_INDEX, FLAG_LABEL, FLAG_PRED, BatchEnvelope, Envelope
from cloud_trainer.errors import KnetTrainerError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 1: device_totals kept by a per-row insert trigger
FILE_NAME = "samples.sqlite3"
_U63 = 1 << 63
_U64 = 1 << 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    device        TEXT    NOT NULL,
    session       INTEGER NOT NULL,
    seq           INTEGER NOT NULL,
    timestamp     REAL    NOT NULL,
    received_at   REAL    NOT NULL,
    model_id      TEXT,
    model_version INTEGER NOT NULL,
    boundary      INTEGER NOT NULL,
    label         INTEGER,
    prediction    INTEGER,
    confidence    REAL,
    shape         TEXT,
    meta          TEXT,
    size          INTEGER NOT NULL,
    payload       BLOB    NOT NULL,
    UNIQUE (device, session, seq)
);
CREATE INDEX IF NOT EXISTS samples_boundary_version_time
    ON samples (boundary, model_version, received_at);
CREATE INDEX IF NOT EXISTS samples_received ON samples (received_at);
CREATE INDEX IF NOT EXISTS samples_device ON samples (device, id);
CREATE TABLE IF NOT EXISTS device_totals (
    device TEXT PRIMARY KEY,
    count  INTEGER NOT NULL,
    bytes  INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS samples_del AFTER DELETE ON samples BEGIN
    UPDATE device_totals SET count = count - 1, bytes = bytes - OLD.size
    WHERE device = OLD.device;
END;
"""

_COLUMNS = ("id, device, session, seq, timestamp, received_at, model_id, model_version, "
            "boundary, label, prediction, confidence, shape, meta, size, payload")
_INSERT = (
    "INSERT OR IGNORE INTO samples (device, session, seq, timestamp, received_at, model_id, "
    "model_version, boundary, label, prediction, confidence, shape, meta, size, payload) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ADD_TOTALS = (
    "INSERT INTO device_totals (device, count, bytes) VALUES (?, ?, ?) "
    "ON CONFLICT (device) DO UPDATE SET count = count + excluded.count, "
    "bytes = bytes + excluded.bytes"
)
# json.dumps(meta, separators=(",", ":")) without building an encoder per call
_meta_json = json.JSONEncoder(separators=(",", ":")).encode
# One row of the samples table as ``add_rows`` takes it: the columns of ``_INSERT``.
Row = tuple[Any, ...]


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
        return self.add_rows(rows_of(envelopes, received_at, shapes))

    @abstractmethod
    def add_rows(self, rows: Sequence[Row]) -> int:
        """``add_many`` of rows already built (``rows_of``, ``batch_rows``): the ingestor
        builds a batch envelope's rows straight from its sample table."""

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


class SQLiteSampleStore(SampleStore):
    """Samples in one SQLite file (WAL): one writer at a time, readers never block it.

    Each thread gets its own connection, so a trainer thread can read while the ingestor's
    writer thread commits. Writes take ``BEGIN IMMEDIATE`` so two processes sharing the file
    queue on ``busy_timeout`` instead of failing on a lock upgrade.
    """

    def __init__(self, directory: Path, limits: StoreLimits | None = None,
                 synchronous: str = "NORMAL", busy_timeout_s: float = 30.0) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / FILE_NAME
        self.limits = limits or StoreLimits()
        self.synchronous = synchronous
        self.busy_timeout_ms = int(busy_timeout_s * 1000)
        self.evicted = 0
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self._init_schema()

    # -- connections -----------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=self.busy_timeout_ms / 1000)
        db.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
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
        if version not in (0, 1, SCHEMA_VERSION):
            raise StoreError(f"{self.path}: schema version {version}, this build reads "
                             f"{SCHEMA_VERSION}")
        with self._txn(db):
            for stmt in _split_sql(_SCHEMA):
                db.execute(stmt)
            # Version 1 kept the totals by a per-row trigger; add_rows keeps them now. A
            # version-1 build refuses the file from here on, so none re-creates it.
            db.execute("DROP TRIGGER IF EXISTS samples_ins")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

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
        """Close every thread's connection (call once no other thread uses the store)."""
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for db in conns:
            try:
                db.close()
            except sqlite3.Error:  # pragma: no cover - closing a connection of a dead thread
                log.debug("closing a store connection failed", exc_info=True)

    # -- writing ---------------------------------------------------------------------------
    def add_rows(self, rows: Sequence[Row]) -> int:
        if not rows:
            return 0
        db = self._db
        with self._write_lock, self._txn(db):
            (last_id,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM samples").fetchone()
            inserted = int(db.executemany(_INSERT, rows).rowcount)
            if inserted:
                db.executemany(_ADD_TOTALS, _new_totals(db, rows, inserted, last_id))
                self.evicted += self._enforce_sizes(db, {r[0] for r in rows})
        return inserted

    def expire(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        db = self._db
        with self._write_lock, self._txn(db):
            n = 0
            if self.limits.max_age_s is not None:
                n += db.execute("DELETE FROM samples WHERE received_at < ?",
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
    @staticmethod
    def _where(boundary: int | None, model_version: int | None, since: float | None,
               device: str | None) -> tuple[str, tuple[Any, ...]]:
        clauses, args = [], []
        for col, op, val in (("boundary", "=", boundary), ("model_version", "=", model_version),
                             ("received_at", ">=", since), ("device", "=", device)):
            if val is not None:
                clauses.append(f"{col} {op} ?")
                args.append(val)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", tuple(args)

    def query(self, boundary: int | None = None, model_version: int | None = None,
              since: float | None = None, device: str | None = None,
              limit: int | None = None) -> list[Sample]:
        return list(self.iter_query(boundary, model_version, since, device, limit))

    def iter_query(self, boundary: int | None = None, model_version: int | None = None,
                   since: float | None = None, device: str | None = None,
                   limit: int | None = None) -> Iterator[Sample]:
        """Like ``query`` but streams rows (a long read sees one consistent WAL snapshot)."""
        where, args = self._where(boundary, model_version, since, device)
        sql = f"SELECT {_COLUMNS} FROM samples{where} ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args = (*args, int(limit))
        for row in self._db.execute(sql, args):
            yield _sample(row)

    def count(self, boundary: int | None = None, model_version: int | None = None,
              since: float | None = None, device: str | None = None) -> int:
        if boundary is model_version is since is None:
            sql, args = "SELECT COALESCE(SUM(count), 0) FROM device_totals", ()
            if device is not None:
                sql, args = sql + " WHERE device = ?", (device,)
            return int(self._db.execute(sql, args).fetchone()[0])
        where, args = self._where(boundary, model_version, since, device)
        return int(self._db.execute(f"SELECT COUNT(*) FROM samples{where}", args).fetchone()[0])

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
            "SELECT MIN(received_at), MAX(received_at) FROM samples").fetchone()
        by_boundary = {f"{b}/v{v}": n for b, v, n in db.execute(
            "SELECT boundary, model_version, COUNT(*) FROM samples "
            "GROUP BY boundary, model_version")}
        file_bytes = sum(p.stat().st_size for p in self.directory.glob(FILE_NAME + "*"))
        return {
            "path": str(self.path),
            "samples": sum(d["count"] for d in devices.values()),
            "bytes": sum(d["bytes"] for d in devices.values()),
            "file_bytes": file_bytes,
            "oldest_received_at": oldest,
            "newest_received_at": newest,
            "devices": devices,
            "boundaries": by_boundary,
            "evicted": self.evicted,
        }


def _new_totals(db: sqlite3.Connection, rows: Sequence[Row], inserted: int,
                last_id: int) -> list[tuple[str, int, int]]:
    """(device, count, bytes) of the rows this transaction inserted: summed from ``rows``
    when every one was new, else read back (ids above ``last_id``, AUTOINCREMENT: only
    this transaction's rows; the payload's overflow pages are not read)."""
    if inserted == len(rows):
        totals: dict[str, list[int]] = {}
        for r in rows:
            t = totals.get(r[0])
            if t is None:
                totals[r[0]] = [1, r[13]]
            else:
                t[0] += 1
                t[1] += r[13]
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


def rows_of(envelopes: Iterable[Envelope], received_at: float | None,
            shapes: Sequence[tuple[int, ...] | None] | None) -> list[Row]:
    """Table rows of a batch; each shape read from its frame unless the caller gave them."""
    now = time.time() if received_at is None else received_at
    if shapes is None:
        return [_row(e, now) for e in envelopes]
    return [_row(e, now, shape) for e, shape in zip(envelopes, shapes, strict=True)]


def batch_rows(env: BatchEnvelope, frames: Sequence[bytes], shape: tuple[int, ...] | None,
               received_at: float, keep: Sequence[bool] | None = None) -> list[Row]:
    """The rows ``rows_of(env.envelopes(frames), received_at, [shape] * n)`` gives, the same
    values, without a per-sample ``Envelope``: the shared fields, the shape column and the
    batch's meta JSON are made once, a sample's ``index`` spliced into it. ``keep[i]``
    False: sample i is left out (it failed a per-sample check)."""
    if len(frames) != len(env.samples):
        raise ValueError(f"{len(frames)} frames for {len(env.samples)} samples")
    base = env.meta
    device, session = env.device, _to_i64(env.session)
    model, version, boundary = _model_id(base), env.model_version, env.boundary
    shape_col = None if shape is None else ",".join(map(str, shape))
    base_json = _meta_json(base) if base else None
    # {**base, "index": i} as json.dumps writes it: base's text with the key appended
    # (where base has its own "index" the key keeps its place: dumped per sample).
    head = (base_json[:-1] + ',"index":') if base_json else '{"index":'
    splice = "index" not in base
    records = env.samples.tolist()
    pairs: Iterable[tuple[Any, bytes]] = zip(records, frames, strict=True)
    if keep is not None:
        pairs = (p for p, ok in zip(pairs, keep, strict=True) if ok)
    rows: list[Row] = []
    append = rows.append
    for (seq, ts, index, label, pred, conf, flags), frame in pairs:
        meta: str | None = base_json
        if flags & FLAG_INDEX:
            meta = (f"{head}{index}}}" if splice else
                    _meta_json({**base, "index": index}))
        append((device, session, seq - _U64 if seq >= _U63 else seq, ts, received_at, model,
                version, boundary, label if flags & FLAG_LABEL else None,
                pred if flags & FLAG_PRED else None,
                conf if flags & FLAG_CONF and conf == conf else None, shape_col, meta,
                len(frame), frame))
    return rows


_UNREAD: Any = object()


def _row(e: Envelope, received_at: float, shape: tuple[int, ...] | None = _UNREAD) -> Row:
    if shape is _UNREAD:
        shape = frame_shape(e.payload)
    return (
        e.device, _to_i64(e.session), _to_i64(e.seq), e.timestamp, received_at,
        _model_id(e.meta), e.model_version, e.boundary, e.label, e.prediction,
        None if e.confidence is None or e.confidence != e.confidence else e.confidence,
        None if shape is None else ",".join(map(str, shape)),
        _meta_json(e.meta) if e.meta else None,
        len(e.payload), e.payload,
    )


def _sample(row: Sequence[Any]) -> Sample:
    (rid, device, session, seq, ts, received_at, model_id, model_version, boundary, label,
     prediction, confidence, shape, meta, size, payload) = row
    return Sample(
        id=rid, device=device, session=_from_i64(session), seq=_from_i64(seq), timestamp=ts,
        received_at=received_at, model_id=model_id, model_version=model_version,
        boundary=boundary, label=label, prediction=prediction, confidence=confidence,
        shape=tuple(int(x) for x in shape.split(",") if x) if shape is not None else None,
        size=size, payload=bytes(payload), meta=json.loads(meta) if meta else {},
    )
