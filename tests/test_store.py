"""The sample store, on SQLite and on PostgreSQL: dedup, retention, quotas, reopen, and a
reader beside a writer. Every test runs against both backends (``kind``)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from mqtt_helpers import eventually

from agent.wire.codec import encode, split_batch
from agent.wire.envelope import BatchEnvelope, Envelope
from cloud_trainer.ingest.postgres import PostgresSampleStore
from cloud_trainer.ingest.store import (
    PAGE_SIZE,
    SCHEMA_VERSION,
    Sample,
    SampleStore,
    SQLiteSampleStore,
    StoreError,
    StoreLimits,
    batch_rows,
)
from cloud_trainer.storage.config import DatabaseSection

RNG = np.random.default_rng(0)
FRAME = encode(np.maximum(RNG.standard_normal((1, 4, 3, 3)), 0).astype(np.float32), "uint8+lz4")


def env(device: str = "dev-a", session: int = 1, seq: int = 0, boundary: int = 1,
        model_version: int = 1, payload: bytes = FRAME, **kw: object) -> Envelope:
    return Envelope(device=device, session=session, seq=seq, timestamp=1000.0 + seq,
                    model_version=model_version, boundary=boundary, payload=payload, **kw)


OpenStore = Callable[..., SampleStore]


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> OpenStore:
    """``open_store(name="a", limits=None)``: the same name opens the same store again."""
    kind = request.param

    def open_(name: str = "a", limits: StoreLimits | None = None) -> SampleStore:
        if kind == "sqlite":
            return SQLiteSampleStore(tmp_path / name, limits)
        db: DatabaseSection = request.getfixturevalue("pg_database")(name)
        return PostgresSampleStore(db.conninfo(), limits)

    return open_


def test_dedup_and_fields(open_store: OpenStore) -> None:
    with open_store() as store:
        e = env(label=3, prediction=4, confidence=0.5, meta={"model": "digits", "index": 7})
        assert store.add(e) is True
        assert store.add(e) is False
        batch = [env(seq=i) for i in range(5)] + [env(seq=1), env(session=2, seq=1)]
        assert store.add_many(batch) == 5  # seq 0 already there, seq 1 twice in the batch
        assert store.count() == 6
        first = store.query(device="dev-a", limit=1)[0]
        assert first.key == ("dev-a", 1, 0)
        assert (first.label, first.prediction, first.confidence) == (3, 4, 0.5)
        assert first.model_id == "digits" and first.meta["index"] == 7
        assert first.shape == (1, 4, 3, 3) and first.payload == FRAME
        # u64 extremes survive SQLite's signed integers, and stay distinct
        big = 2**64 - 1
        assert store.add(env(session=big, seq=big)) and store.add(env(session=big, seq=big - 1))
        assert {("dev-a", big, big), ("dev-a", big, big - 1)} <= store.sample_keys()


def test_query_filters_and_load_arrays(open_store: OpenStore) -> None:
    with open_store() as store:
        store.add_many([env(seq=i, boundary=1, model_version=1) for i in range(3)], 100.0)
        store.add_many([env(seq=10 + i, boundary=1, model_version=2) for i in range(4)], 200.0)
        store.add_many([env(device="dev-b", seq=i, boundary=2) for i in range(2)], 300.0)
        assert store.count(boundary=1) == 7
        assert store.count(boundary=1, model_version=2) == 4
        assert store.count(since=150.0) == 6
        assert store.count(device="dev-b") == 2 and store.count() == 9
        assert [s.seq for s in store.query(boundary=1, model_version=2, limit=2)] == [10, 11]
        arrays = store.load_arrays(1, model_version=1)
        assert arrays.shape == (3, 4, 3, 3) and arrays.dtype == np.float32
        assert store.load_arrays(7).shape == (0,)
        stats = store.stats()
        assert stats["samples"] == 9 and stats["devices"]["dev-b"]["count"] == 2
        assert stats["bytes"] == 9 * len(FRAME)


def test_retention_by_age_and_bytes(open_store: OpenStore) -> None:
    limits = StoreLimits(max_age_s=100.0)
    with open_store("a", limits) as store:
        store.add_many([env(seq=i) for i in range(5)], received_at=1000.0)
        store.add_many([env(seq=10 + i) for i in range(3)], received_at=1090.0)
        assert store.expire(now=1150.0) == 5
        assert sorted(k[2] for k in store.sample_keys()) == [10, 11, 12]
    size = len(FRAME)
    with open_store("b", StoreLimits(max_bytes=10 * size)) as store:
        store.add_many([env(device="dev-a", seq=i) for i in range(6)])
        store.add_many([env(device="dev-b", seq=i) for i in range(6)])  # 12 > 10: evict 2
        assert store.count() == 10 and store.stats()["bytes"] <= 10 * size
        assert not {("dev-a", 1, 0), ("dev-a", 1, 1)} & store.sample_keys()
        assert store.count(device="dev-b") == 6  # the oldest overall went, not the newest


def test_per_device_quotas(open_store: OpenStore) -> None:
    size = len(FRAME)
    limits = StoreLimits(device_max_count=4, device_max_bytes=3 * size)
    with open_store("a", limits) as store:
        store.add_many([env(device="noisy", seq=i) for i in range(20)])
        store.add_many([env(device="quiet", seq=i) for i in range(2)])
        assert store.count(device="noisy") == 3  # the byte quota is the tighter one here
        assert sorted(k[2] for k in store.sample_keys() if k[0] == "noisy") == [17, 18, 19]
        assert store.count(device="quiet") == 2
    with open_store("c", StoreLimits(device_max_count=2)) as store:
        for i in range(5):
            store.add(env(seq=i))
        assert [s.seq for s in store.query()] == [3, 4]
        assert store.evicted == 3


def test_survives_reopen(open_store: OpenStore) -> None:
    store = open_store()
    store.add_many([env(seq=i) for i in range(10)])
    store.close()
    with pytest.raises(StoreError):
        store.count()
    with open_store() as again:
        assert again.count() == 10
        assert again.add_many([env(seq=i) for i in range(12)]) == 2  # dedup across restarts
        assert again.stats()["devices"]["dev-a"] == {"count": 12, "bytes": 12 * len(FRAME)}


def test_concurrent_reader_while_writer_writes(open_store: OpenStore) -> None:
    """A reader (own connection, other thread and other store object) never blocks the
    writer and sees whole batches only (SQLite: WAL snapshots; PostgreSQL: MVCC)."""
    writer = open_store()
    reader = open_store()
    stop = threading.Event()
    counts: list[int] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not stop.is_set():
                n = reader.count(boundary=1)
                assert len(reader.query(boundary=1, limit=50)) >= min(n, 50)  # later snapshot
                counts.append(n)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=read)
    t.start()
    try:
        for b in range(40):
            reads = len(counts)
            writer.add_many([env(seq=b * 50 + i) for i in range(50)])
            # the reader reads between the writes too, however loaded the machine
            eventually(lambda r=reads: len(counts) > r or errors, 10, "a read")
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert counts == sorted(counts) and len(counts) > 5  # monotone: every read a snapshot
    assert reader.count() == 2000
    writer.close()
    reader.close()


def test_totals_count_only_the_new_rows_of_a_batch(open_store: OpenStore) -> None:
    """Per-device totals (quotas, metrics) after a batch with replays and in-batch repeats
    of different sizes: only the rows stored count, with the bytes of those rows."""
    big = encode(RNG.standard_normal((1, 8, 5, 5)).astype(np.float32), "raw")
    with open_store() as store:
        store.add(env(seq=0))
        batch = [env(seq=0, payload=big), env(seq=1), env(seq=1, payload=big),
                 env(device="dev-b", seq=0, payload=big), env(device="dev-b", seq=1)]
        assert store.add_many(batch) == 3
        assert store.stats()["devices"] == {
            "dev-a": {"count": 2, "bytes": 2 * len(FRAME)},
            "dev-b": {"count": 2, "bytes": len(big) + len(FRAME)}}
        assert store.add_many([env(seq=i) for i in range(4)]) == 2  # all-new fast path beside
        assert store.totals() == (6, 4 * len(FRAME) + len(big) + len(FRAME))


def _fields(s: Sample) -> tuple[object, ...]:
    """What a reader sees of a sample, less its row id and its share of the stored bytes."""
    return (s.key, s.timestamp, s.received_at, s.model_id, s.model_version, s.boundary,
            s.label, s.prediction, s.confidence, s.shape, s.payload, s.meta)


def test_a_batch_reads_back_as_its_envelopes(open_store: OpenStore) -> None:
    """A batch stored as one frame (the ingestor's path for version-2 envelopes) reads back
    sample by sample exactly as the per-sample envelopes stored one by one: meta with the
    index per sample, absent fields, refused samples, u64 keys, each sample's own frame."""
    x = np.maximum(RNG.standard_normal((6, 4, 3, 3)), 0).astype(np.float32)
    seqs = [5, 6, 7, 2**63 + 1, 2**64 - 2, 2**64 - 1]
    table = BatchEnvelope.table(seqs, [1000.5 + i for i in range(6)],
                                [i if i % 2 else None for i in range(6)],
                                [i if i % 3 else None for i in range(6)], [None, 1, 2, 3, 4, 5],
                                [0.25, None, float("nan"), 0.5, 0.75, 1.0])
    frame = encode(x, "uint8+lz4")
    split = split_batch(frame)
    cases = [(meta, keep) for meta in ({}, {"model": "m", "k": [1, "é"]},
                                       {"index": 9, "model_id": "x"})
             for keep in (None, [True, False, True, True, False, True])]
    with open_store("batch") as batched, open_store("single") as single:
        for session, (meta, keep) in enumerate(cases):
            b = BatchEnvelope(device="dev-ü", session=session, model_version=3, boundary=2,
                              samples=table, payload=frame, meta=meta)
            kept = [e for i, e in enumerate(b.envelopes(split.frames))
                    if keep is None or keep[i]]
            assert batched.add_frames([batch_rows(b, (1, 4, 3, 3), 5.0, keep)]) == len(kept)
            assert single.add_many(kept, 5.0) == len(kept)
        got, want = batched.query(), single.query()
        assert [_fields(s) for s in got] == [_fields(s) for s in want] and len(got) == 30
        assert np.array_equal(batched.load_arrays(2), single.load_arrays(2))
        assert batched.totals() == (30, sum(s.size for s in got))
        assert batched.count(boundary=2, model_version=3, device="dev-ü") == 30


def test_replayed_and_overlapping_batches_store_each_sample_once(
        open_store: OpenStore) -> None:
    """A batch replayed whole stores nothing (its frame is not kept); one overlapping stored
    samples stores the new ones only; evicting a frame's last sample deletes the frame."""
    x = np.maximum(RNG.standard_normal((4, 4, 3, 3)), 0).astype(np.float32)
    frame = encode(x, "uint8+lz4")

    def batch(first: int) -> BatchEnvelope:
        seqs = list(range(first, first + 4))
        return BatchEnvelope(device="dev-a", session=1, model_version=1, boundary=1,
                             samples=BatchEnvelope.table(seqs, [1.0] * 4, [None] * 4, [None] * 4,
                                                          [None] * 4, [None] * 4),
                             payload=frame)

    with open_store("a", StoreLimits(device_max_count=6)) as store:
        assert store.add_frames([batch_rows(batch(0), (1, 4, 3, 3), 1.0)]) == 4
        assert store.add_frames([batch_rows(batch(0), (1, 4, 3, 3), 2.0)]) == 0
        assert _frame_rows(store) == 1
        assert store.add_frames([batch_rows(batch(2), (1, 4, 3, 3), 3.0)]) == 2
        assert sorted(k[2] for k in store.sample_keys()) == [0, 1, 2, 3, 4, 5]
        share = [len(frame) // 4 + (i < len(frame) % 4) for i in range(4)]  # bytes a sample
        assert store.totals() == (6, len(frame) + share[2] + share[3])
        assert store.add_frames([batch_rows(batch(6), (1, 4, 3, 3), 4.0)]) == 4
        # quota 6: seqs 0-3 evicted, so the first frame went with its last sample
        assert sorted(k[2] for k in store.sample_keys()) == [4, 5, 6, 7, 8, 9]
        assert _frame_rows(store) == 2
        assert np.allclose(store.load_arrays(1), np.concatenate([x[2:], x]), atol=0.05)


def _frame_rows(store: SampleStore) -> int:
    if isinstance(store, SQLiteSampleStore):
        return int(store._db.execute("SELECT COUNT(*) FROM frames").fetchone()[0])
    assert isinstance(store, PostgresSampleStore)
    row = store._db.execute("SELECT COUNT(*) FROM frames").fetchone()
    return int(row[0]) if row else -1


# Schema 2 as a build before 3 created it (schema 1: the same plus a per-row insert trigger).
_SCHEMA_2 = """
CREATE TABLE samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, session INTEGER NOT NULL,
    seq INTEGER NOT NULL, timestamp REAL NOT NULL, received_at REAL NOT NULL, model_id TEXT,
    model_version INTEGER NOT NULL, boundary INTEGER NOT NULL, label INTEGER,
    prediction INTEGER, confidence REAL, shape TEXT, meta TEXT, size INTEGER NOT NULL,
    payload BLOB NOT NULL, UNIQUE (device, session, seq));
CREATE INDEX samples_boundary_version_time ON samples (boundary, model_version, received_at);
CREATE INDEX samples_received ON samples (received_at);
CREATE INDEX samples_device ON samples (device, id);
CREATE TABLE device_totals (device TEXT PRIMARY KEY, count INTEGER NOT NULL,
                            bytes INTEGER NOT NULL);
CREATE TRIGGER samples_del AFTER DELETE ON samples BEGIN
    UPDATE device_totals SET count = count - 1, bytes = bytes - OLD.size
    WHERE device = OLD.device;
END;
"""
_TRIGGER_1 = """
CREATE TRIGGER samples_ins AFTER INSERT ON samples BEGIN
    INSERT INTO device_totals (device, count, bytes) VALUES (NEW.device, 1, NEW.size)
    ON CONFLICT (device) DO UPDATE SET count = count + 1, bytes = bytes + NEW.size;
END;
"""


@pytest.mark.parametrize("version", [1, 2])
def test_sqlite_schema_1_and_2_are_upgraded_keeping_samples_and_totals(
        tmp_path: Path, version: int) -> None:
    """A file of one row per sample (schema 1 or 2) opens upgraded: every sample reads back
    as it was, ids and totals kept, and dedup still holds against the old rows; a file
    from a newer build is refused by name."""
    db = sqlite3.connect(tmp_path / "samples.sqlite3")
    db.executescript(_SCHEMA_2 + (_TRIGGER_1 if version == 1 else ""))
    for i in range(3):
        db.execute("INSERT INTO samples (device, session, seq, timestamp, received_at, "
                   "model_id, model_version, boundary, label, shape, meta, size, payload) "
                   "VALUES ('dev-a', 1, ?, ?, 50.0, 'digits', 1, 1, ?, '1,4,3,3', "
                   "'{\"model\":\"digits\",\"index\":3}', ?, ?)",
                   (i, 1000.0 + i, i, len(FRAME), FRAME))
    if version == 2:
        db.execute("INSERT INTO device_totals VALUES ('dev-a', 3, ?)", (3 * len(FRAME),))
    db.execute(f"PRAGMA user_version = {version}")
    db.commit()
    db.close()
    with SQLiteSampleStore(tmp_path) as store:
        old = store.query()
        assert [(s.id, s.seq, s.label, s.meta, s.payload, s.shape, s.received_at)
                for s in old] == [(i + 1, i, i, {"model": "digits", "index": 3}, FRAME,
                                   (1, 4, 3, 3), 50.0) for i in range(3)]
        assert store.add_many([env(seq=i) for i in range(5)]) == 2
        assert store.totals() == (5, 5 * len(FRAME)) and store.count(boundary=1) == 5
        assert [s.seq for s in store.query()] == [0, 1, 2, 3, 4]
    db = sqlite3.connect(tmp_path / "samples.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99, this build reads"):
        SQLiteSampleStore(tmp_path)


def test_sqlite_page_size_is_a_new_files_and_an_old_file_keeps_its_own(
        tmp_path: Path) -> None:
    """A new file is made in ``PAGE_SIZE`` pages (a batch frame in a few pages, not ~45);
    a file made in 4 KiB pages (an older build's) keeps them, is reported as it is, and
    reads and writes as before. A page size SQLite cannot use is refused by name."""
    big = encode(RNG.standard_normal((32, 40, 12, 12)).astype(np.float32), "uint8")
    batch = BatchEnvelope(device="dev-a", session=1, model_version=1, boundary=1,
                          samples=BatchEnvelope.table(list(range(32)), [1000.0] * 32,
                                                      *[[None] * 32] * 4),
                          payload=big)
    for name, asked, made in (("new", None, PAGE_SIZE), ("old", 4096, 4096)):
        with (SQLiteSampleStore(tmp_path / name) if asked is None else
              SQLiteSampleStore(tmp_path / name, page_size=asked)) as store:
            assert store.stats()["page_size"] == made
            assert store.add_frames([batch_rows(batch, (1, 40, 12, 12), 1.0)]) == 32
        with SQLiteSampleStore(tmp_path / name) as store:  # reopened with the default
            assert store.stats()["page_size"] == made
            assert store.load_arrays(1).shape == (32, 40, 12, 12)
        db = sqlite3.connect(tmp_path / name / "samples.sqlite3")
        assert db.execute("PRAGMA page_size").fetchone()[0] == made
        db.close()
    # docs/deploy.md's conversion of an old file: the samples stay, the pages grow
    db = sqlite3.connect(tmp_path / "old" / "samples.sqlite3", isolation_level=None)
    for stmt in ("PRAGMA journal_mode=DELETE", "PRAGMA page_size=65536", "VACUUM",
                 "PRAGMA journal_mode=WAL"):
        db.execute(stmt)
    db.close()
    with SQLiteSampleStore(tmp_path / "old") as store:
        assert store.stats()["page_size"] == PAGE_SIZE == 65536
        assert store.load_arrays(1).shape == (32, 40, 12, 12)
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        SQLiteSampleStore(tmp_path / "bad", page_size=3000)


def test_sqlite_wal_stays_bounded_with_checkpoints_off_the_writer(tmp_path: Path) -> None:
    """Checkpoints run on the store's own thread, not in the writer's COMMIT; the writer
    waits for one to copy the WAL whole once it passes ``MAX_WAL_BYTES``, so the WAL is
    rewound and stays bounded however long the writer writes."""
    big = encode(RNG.standard_normal((1, 64, 32, 32)).astype(np.float32), "raw")  # 256 kB
    with SQLiteSampleStore(tmp_path) as store:
        store.WAL_CHECKPOINT_BYTES, store.MAX_WAL_BYTES = 512 << 10, 2 << 20
        wal = tmp_path / "samples.sqlite3-wal"
        sizes = []
        for i in range(60):  # 15 MB in all
            store.add_many([env(seq=2 * i, payload=big), env(seq=2 * i + 1, payload=big)])
            sizes.append(wal.stat().st_size)
        assert max(sizes) < 4 * store.MAX_WAL_BYTES, sizes
        assert store.count() == 120 and store.load_arrays(1).shape == (120, 64, 32, 32)
        # A reader holding an old snapshot keeps the WAL from being copied whole: the writer
        # waits for one checkpoint per bound, not for the reader (busy_timeout is 30 s).
        reading, done = threading.Event(), threading.Event()

        def read() -> None:
            rows = store.iter_query()
            next(rows)
            reading.set()
            done.wait(30)
            rows.close()

        reader = threading.Thread(target=read)
        reader.start()
        assert reading.wait(10)
        t0 = time.monotonic()
        for i in range(60, 90):
            store.add_many([env(seq=2 * i, payload=big), env(seq=2 * i + 1, payload=big)])
        assert time.monotonic() - t0 < 10
        done.set()
        reader.join()
        assert store.count() == 180
