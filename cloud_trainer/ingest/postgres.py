"""The sample store on PostgreSQL: one store for every trainer replica.

Same contract as ``SQLiteSampleStore`` (``cloud_trainer/ingest/store.py``), built for N writers:

* **Dedup across replicas** is the unique key ``(device, session, seq)`` and
  ``INSERT ... ON CONFLICT DO NOTHING``, never a check-then-insert: two replicas handed the
  same envelope (a re-delivery after a reconnect) both commit, and one row exists.
* **A batch envelope's frame once.** As in SQLite, ``frames`` keeps each message's codec
  frame once and ``samples`` a key row per sample (migration 0003). A commit is three
  statements whatever its size: frame ids drawn from the sequence, the frames and the key
  rows each as parallel arrays (``unnest``, sent in binary: in text, the bytea array's hex
  escaping halved the rate); the per-device totals are kept by statement-level triggers
  over the transition table (one upsert per device per batch), and a frame whose last
  sample is deleted is deleted by another.
* **No deadlocks between replicas.** Rows are sorted by key before the insert, so every
  transaction takes the unique-index and ``device_totals`` row locks in the same order.
* ``add_many`` returns only after COMMIT, so the ingestor's ack-after-commit holds.
* Why psycopg 3 and not SQLAlchemy Core here (the registry and run log use Core/ORM on the
  same database): this is the hot path, the array insert and the transition-table triggers
  are PostgreSQL-specific anyway, and the raw driver skips per-call statement compilation.

The schema is Alembic's (``cloud_trainer/storage/migrations``); the store checks the revision
when it opens, it never creates tables.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import psycopg

from cloud_trainer.ingest.store import (
    BY_BOUNDARY,
    COUNT_SAMPLES,
    SELECT_SAMPLES,
    FrameRows,
    Sample,
    SampleStore,
    StoreError,
    StoreLimits,
    _from_i64,
    _Reader,
    where_clause,
)

log = logging.getLogger(__name__)

_FRAME_IDS = "SELECT nextval(pg_get_serial_sequence('frames', 'id')) FROM generate_series(1, %s)"
_INSERT_FRAMES = (
    "INSERT INTO frames (id, received_at, model_id, model_version, boundary, shape, meta, "
    "payload) OVERRIDING SYSTEM VALUE SELECT * FROM unnest(%b::int8[], %b::float8[], "
    "%b::text[], %b::int4[], %b::int4[], %b::text[], %b::text[], %b::bytea[])"
)
_INSERT_SAMPLES = (
    "INSERT INTO samples (frame, device, session, seq, timestamp, label, prediction, "
    "confidence, meta_index, part, size) SELECT * FROM unnest(%b::int8[], %b::text[], "
    "%b::int8[], %b::int8[], %b::float8[], %b::int4[], %b::int4[], %b::float8[], %b::int8[], "
    "%b::int4[], %b::int4[]) ON CONFLICT (device, session, seq) DO NOTHING"
)


class PostgresSampleStore(SampleStore):
    """Samples in PostgreSQL; one connection per thread (a reader never waits on the writer)."""

    def __init__(self, conninfo: str, limits: StoreLimits | None = None,
                 where: str = "postgresql") -> None:
        self.conninfo = conninfo
        self.where = where
        self.limits = limits or StoreLimits()
        self.evicted = 0
        self._local = threading.local()
        self._conns: list[psycopg.Connection[Any]] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self._check_schema()

    # -- connections -----------------------------------------------------------------------
    @property
    def _db(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise StoreError(f"sample store {self.where} is closed")
        db: psycopg.Connection[Any] | None = getattr(self._local, "db", None)
        if db is None or db.closed:
            try:
                db = psycopg.connect(self.conninfo, autocommit=True)
            except psycopg.OperationalError as exc:
                raise StoreError(f"sample store {self.where}: {exc}") from exc
            self._local.db = db
            with self._conns_lock:
                self._conns.append(db)
        return db

    def _check_schema(self) -> None:
        """Refuse a schema other than this build's (an older one names the upgrade command):
        the store's statements are written for exactly one layout."""
        from cloud_trainer.storage.migrate import verdict

        try:
            row = self._db.execute("SELECT version_num FROM alembic_version").fetchone()
        except psycopg.errors.UndefinedTable:
            row = None
        verdict(row[0] if row else None, self.where)

    def close(self) -> None:
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for db in conns:
            try:
                db.close()
            except psycopg.Error:  # pragma: no cover - a dead thread's connection
                log.debug("closing a store connection failed", exc_info=True)

    # -- writing ---------------------------------------------------------------------------
    def add_frames(self, frames: Sequence[FrameRows]) -> int:
        frames = [f for f in frames if f.samples]
        if not frames:
            return 0
        db = self._db
        with db.transaction():
            ids = [int(r[0]) for r in db.execute(_FRAME_IDS, (len(frames),))]
            unique: dict[tuple[str, int, int], tuple[Any, ...]] = {}
            for frame_id, f in zip(ids, frames, strict=True):
                for r in f.samples:
                    unique.setdefault((r[0], r[1], r[2]), (frame_id, *r))
            rows = [unique[k] for k in sorted(unique)]  # one lock order for every replica
            db.execute(_INSERT_FRAMES, [ids, *(list(c) for c in
                                              zip(*(f.frame for f in frames), strict=True))])
            inserted = db.execute(_INSERT_SAMPLES,
                                  [list(c) for c in zip(*rows, strict=True)]).rowcount
            if inserted < sum(len(f.samples) for f in frames):
                db.execute("DELETE FROM frames f WHERE f.id = ANY(%s) AND NOT EXISTS "
                           "(SELECT 1 FROM samples s WHERE s.frame = f.id)", (ids,))
            if inserted:
                self.evicted += self._enforce_sizes(db, sorted({r[1] for r in rows}))
        return int(inserted)

    def expire(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        db = self._db
        with db.transaction():
            n = 0
            if self.limits.max_age_s is not None:
                n += db.execute("DELETE FROM samples s USING frames f WHERE f.id = s.frame "
                                "AND f.received_at < %s", (now - self.limits.max_age_s,)
                                ).rowcount
            devices = [r[0] for r in db.execute("SELECT device FROM device_totals "
                                                "ORDER BY device")]
            n += self._enforce_sizes(db, devices)
            db.execute("DELETE FROM device_totals WHERE count <= 0")
        self.evicted += n
        return n

    def _enforce_sizes(self, db: psycopg.Connection[Any], devices: Iterable[str]) -> int:
        """Evict the oldest samples of each over-quota device, then the oldest overall."""
        lim = self.limits
        n = 0
        if lim.device_max_bytes is not None or lim.device_max_count is not None:
            for device in devices:
                row = db.execute("SELECT count, bytes FROM device_totals WHERE device = %s",
                                 (device,)).fetchone()
                if row is not None:
                    n += _evict_oldest(db, row[0], row[1], lim.device_max_count,
                                       lim.device_max_bytes, device)
        if lim.max_bytes is not None:
            row = db.execute("SELECT COALESCE(SUM(count), 0), COALESCE(SUM(bytes), 0) "
                             "FROM device_totals").fetchone()
            assert row is not None
            n += _evict_oldest(db, int(row[0]), int(row[1]), None, lim.max_bytes, None)
        return n

    # -- reading ---------------------------------------------------------------------------
    def query(self, boundary: int | None = None, model_version: int | None = None,
              since: float | None = None, device: str | None = None,
              limit: int | None = None) -> list[Sample]:
        return list(self.iter_query(boundary, model_version, since, device, limit))

    def iter_query(self, boundary: int | None = None, model_version: int | None = None,
                   since: float | None = None, device: str | None = None,
                   limit: int | None = None) -> Iterator[Sample]:
        """Streams rows through a server-side cursor (one snapshot, bounded memory)."""
        where, args = where_clause(boundary, model_version, since, device, "%s")
        sql = f"{SELECT_SAMPLES}{where} ORDER BY s.id"
        if limit is not None:
            sql += " LIMIT %s"
            args = (*args, int(limit))
        db = self._db

        def fetch(frame_id: int) -> bytes:
            row = db.execute("SELECT payload FROM frames WHERE id = %s", (frame_id,)).fetchone()
            assert row is not None  # the same snapshot as the sample that names it
            return bytes(row[0])

        reader = _Reader(fetch)
        # A unique name: two readers may interleave on one thread's connection.
        with db.transaction(), db.cursor(name=f"knet_q_{uuid.uuid4().hex}") as cur:
            cur.itersize = 2000
            cur.execute(sql, args)
            for row in cur:
                yield reader.sample(row)

    def count(self, boundary: int | None = None, model_version: int | None = None,
              since: float | None = None, device: str | None = None) -> int:
        if boundary is model_version is since is None:
            sql, args = "SELECT COALESCE(SUM(count), 0) FROM device_totals", ()
            if device is not None:
                sql, args = sql + " WHERE device = %s", (device,)
        else:
            where, args = where_clause(boundary, model_version, since, device, "%s")
            sql = f"{COUNT_SAMPLES}{where}"
        row = self._db.execute(sql, args).fetchone()
        return int(row[0]) if row else 0

    def sample_keys(self) -> set[tuple[str, int, int]]:
        return {(d, _from_i64(s), _from_i64(q)) for d, s, q in
                self._db.execute("SELECT device, session, seq FROM samples")}

    def totals(self) -> tuple[int, int]:
        row = self._db.execute("SELECT COALESCE(SUM(count), 0), COALESCE(SUM(bytes), 0) "
                               "FROM device_totals").fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def stats(self) -> dict[str, Any]:
        db = self._db
        devices = {d: {"count": int(c), "bytes": int(b)} for d, c, b in db.execute(
            "SELECT device, count, bytes FROM device_totals WHERE count > 0 ORDER BY device")}
        row = db.execute("SELECT MIN(received_at), MAX(received_at) FROM frames").fetchone()
        oldest, newest = row if row else (None, None)
        by_boundary = {f"{b}/v{v}": int(n) for b, v, n in db.execute(BY_BOUNDARY)}
        size = db.execute("SELECT pg_total_relation_size('samples') + "
                          "pg_total_relation_size('frames')").fetchone()
        return {
            "path": self.where,
            "samples": sum(d["count"] for d in devices.values()),
            "bytes": sum(d["bytes"] for d in devices.values()),
            "file_bytes": int(size[0]) if size else 0,
            "oldest_received_at": oldest,
            "newest_received_at": newest,
            "devices": devices,
            "boundaries": by_boundary,
            "evicted": self.evicted,
        }


def _evict_oldest(db: psycopg.Connection[Any], count: int, total: int, max_count: int | None,
                  max_bytes: int | None, device: str | None) -> int:
    excess_n = max(0, count - max_count) if max_count is not None else 0
    excess_b = max(0, total - max_bytes) if max_bytes is not None else 0
    if not excess_n and not excess_b:
        return 0
    where, args = ("WHERE device = %s", (device,)) if device is not None else ("", ())
    last_id, freed, taken = None, 0, 0
    with db.cursor() as cur:
        cur.execute(f"SELECT id, size FROM samples {where} ORDER BY id", args)
        for row_id, size in cur:
            if taken >= excess_n and freed >= excess_b:
                break
            last_id, freed, taken = row_id, freed + size, taken + 1
    if last_id is None:
        return 0
    return int(db.execute(f"DELETE FROM samples {where}{' AND' if where else 'WHERE'} "
                          "id <= %s", (*args, last_id)).rowcount)
