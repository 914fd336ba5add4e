"""The PostgreSQL backend beyond the shared store tests: the config's secret handling, the
schema check and `knet-trainer db upgrade`, cross-replica dedup without deadlocks, the
registry's weights in the database, and the scheduler's advisory lock."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import torch
from mqtt_helpers import wait_until
from test_store import FRAME, env
from trainer_helpers import trainer_cli, trainer_toml

from agent.configfile import ConfigError
from cloud_trainer.ingest.postgres import PostgresSampleStore
from cloud_trainer.release.registry import Registry
from cloud_trainer.release.runs import RunLog
from cloud_trainer.storage import migrate
from cloud_trainer.storage.config import DatabaseSection
from cloud_trainer.storage.engine import make_engine
from cloud_trainer.storage.launcher import PostgresServer
from cloud_trainer.storage.leader import LeaderLock, leader_pid
from cloud_trainer.trainer_config import load_trainer_config

MakeDb = Callable[..., DatabaseSection]


def test_database_section_keeps_the_password_out_of_the_toml(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    path = trainer_toml(tmp_path, 1883, database={"url": "postgresql://knet:s3cret@db/knet"})
    with pytest.raises(ConfigError, match=r"database\.url.*password_file"):
        load_trainer_config(path)
    path = trainer_toml(tmp_path, 1883, database={"url": "mysql://knet@db/knet"})
    with pytest.raises(ConfigError, match=r"database\.url.*only postgresql"):
        load_trainer_config(path)
    path = trainer_toml(tmp_path, 1883, database={"url": "postgresql://knet@db/knet",
                                                  "password_credential": "knet-db"})
    db = load_trainer_config(path).database
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match=r"database\.password_credential.*CREDENTIALS_DIR"):
        db.password()
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "knet-db").write_text("pw-from-systemd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    assert db.password() == "pw-from-systemd"
    assert "pw-from-systemd" in db.conninfo() and "pw-from" not in db.display()


def test_schema_check_names_the_upgrade_command(tmp_path: Path, pg_database: MakeDb,
                                                postgres: PostgresServer) -> None:
    db = pg_database("fresh", migrated=False)
    path = trainer_toml(tmp_path, 1883, database={"url": db.url,
                                                  "password_file": postgres.password_file})
    done = trainer_cli(path, "db", "check")
    assert done.returncode == 2 and "has no knet schema" in done.stderr
    assert "knet-trainer db upgrade --config trainer.toml" in done.stderr
    daemon = trainer_cli(path)  # the daemon refuses to start on it, naming the command
    assert daemon.returncode == 2 and "knet-trainer db upgrade" in daemon.stderr, daemon.stderr
    done = trainer_cli(path, "db", "upgrade")
    assert done.returncode == 0 and f"none -> {migrate.head()}" in done.stdout, done.stderr
    assert trainer_cli(path, "db", "check").returncode == 0
    assert trainer_cli(path, "db", "upgrade").returncode == 0  # idempotent
    engine = make_engine(db)
    with engine.begin() as conn:  # a schema from a newer knet
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(migrate.SchemaError, match="unknown to this build"):
        migrate.check(engine, "db")
    with engine.begin() as conn:  # an older one: stamped back to before the first revision
        conn.exec_driver_sql("DELETE FROM alembic_version")
    with pytest.raises(migrate.SchemaError, match="db upgrade"):
        migrate.check(engine, "db")
    engine.dispose()


def test_two_replicas_insert_overlapping_batches_once_without_deadlock(
        pg_database: MakeDb) -> None:
    """Each writer sends every key, in opposite orders, in batches: exactly one row each."""
    db = pg_database()
    stores = [PostgresSampleStore(db.conninfo()) for _ in range(2)]
    keys = [(f"dev-{d}", 1, s) for d in range(4) for s in range(300)]
    inserted = [0, 0]
    errors: list[BaseException] = []

    def write(i: int) -> None:
        order = keys if i == 0 else keys[::-1]
        try:
            for k in range(0, len(order), 97):
                inserted[i] += stores[i].add_many(
                    env(device=d, session=s, seq=q) for d, s, q in order[k:k + 97])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(inserted) == len(keys)  # every key inserted by exactly one of them
    assert stores[0].sample_keys() == set(keys)
    assert stores[1].stats()["devices"]["dev-2"] == {"count": 300, "bytes": 300 * len(FRAME)}
    for s in stores:
        s.close()


def test_registry_weights_and_runs_are_shared(tmp_path: Path, pg_database: MakeDb) -> None:
    db = pg_database()
    engine = make_engine(db)
    a = Registry(tmp_path / "a", engine=engine)
    block = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    v = a.add_version("digits", [block], status="pushed")
    b = Registry(tmp_path / "b", engine=engine)  # another replica: an empty local cache
    assert b.deployed("digits") == v
    assert torch.equal(b.load_block(v.blocks[1])["w"], block["w"])
    assert (tmp_path / "b" / "blocks" / f"{v.blocks[1]}.pt").exists()
    run = RunLog(tmp_path / "a", engine=engine, owner="trainer-a").open_run(
        "job", "digits", "schedule", since=0.0, until=1.0, deployed_version=1)
    assert RunLog(tmp_path / "b", engine=engine).get(run.run_id).detail == {
        "trainer": "trainer-a"}
    engine.dispose()


def test_advisory_lock_elects_one_and_passes_on_when_the_session_dies(
        pg_database: MakeDb, postgres: PostgresServer) -> None:
    db = pg_database()
    elected: list[str] = []
    lost: list[str] = []
    locks = {name: LeaderLock(db.conninfo(), "lab", on_elected=lambda n=name: elected.append(n),
                              on_lost=lost.append, poll_s=0.2) for name in ("a", "b")}
    locks["a"].start()
    assert wait_until(lambda: elected == ["a"], 20)
    locks["b"].start()
    assert not wait_until(lambda: len(elected) > 1, 1.0)  # b keeps trying, never gets it
    holder = leader_pid(db.conninfo(), "lab")
    assert holder is not None
    with psycopg.connect(postgres.conninfo("postgres"), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (holder,))  # the leader's session dies
    assert wait_until(lambda: elected == ["a", "b"], 20), elected
    assert wait_until(lambda: bool(lost), 20)  # a noticed it no longer leads
    for lock in locks.values():
        lock.stop()


def test_migration_0003_keeps_samples_and_downgrades_batch_frames(pg_database: MakeDb) -> None:
    """0002 → 0003 turns every sample row into a frame of its own and its key row (readers
    see the same samples, totals kept); 0003 → 0002 cuts batch frames back into per-sample
    frames; upgrading again reads the same."""
    from alembic import command
    from test_store import RNG, _fields

    from agent.wire.codec import encode
    from agent.wire.envelope import BatchEnvelope
    from cloud_trainer.ingest.store import batch_rows

    db = pg_database("mig", migrated=False)
    engine = make_engine(db)
    migrate.upgrade(engine, "0002")
    with psycopg.connect(db.conninfo(), autocommit=True) as con:
        for i in range(3):
            con.execute(
                "INSERT INTO samples (device, session, seq, timestamp, received_at, model_id, "
                "model_version, boundary, label, shape, meta, size, payload) VALUES "
                "('dev-a', 1, %s, %s, 50.0, 'digits', 1, 1, %s, '1,4,3,3', "
                "'{\"model\":\"digits\",\"index\":3}', %s, %s)",
                (i, 1000.0 + i, i, len(FRAME), FRAME))
    with pytest.raises(migrate.SchemaError, match="db upgrade"):
        PostgresSampleStore(db.conninfo())  # an older schema is named, not misread
    assert migrate.upgrade(engine) == ("0002", migrate.head())
    x = RNG.standard_normal((4, 4, 3, 3)).astype("float32")
    batch = BatchEnvelope(device="dev-b", session=1, model_version=1, boundary=1,
                          samples=BatchEnvelope.table(list(range(4)), [1.0] * 4, [0, 1, 2, 3],
                                                      [None] * 4, [None] * 4, [None] * 4),
                          payload=encode(x, "uint8+lz4"), meta={"model": "digits"})
    with PostgresSampleStore(db.conninfo()) as store:
        old = store.query()
        assert [(s.seq, s.label, s.meta, s.payload, s.received_at) for s in old] == [
            (i, i, {"model": "digits", "index": 3}, FRAME, 50.0) for i in range(3)]
        assert store.add_many([env(seq=i) for i in range(4)]) == 1
        assert store.add_frames([batch_rows(batch, (1, 4, 3, 3), 60.0)]) == 4
        before = [_fields(s) for s in store.query()]
        totals = store.totals()
    cfg = migrate._config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0002")
    with psycopg.connect(db.conninfo(), autocommit=True) as con:
        rows = con.execute("SELECT seq, size, length(payload), meta FROM samples "
                           "WHERE device = 'dev-b' ORDER BY seq").fetchall()
        assert [r[0] for r in rows] == [0, 1, 2, 3] and all(r[1] == r[2] for r in rows)
        total = con.execute("SELECT count, bytes FROM device_totals WHERE device = 'dev-b'"
                            ).fetchone()
        assert total == (4, sum(r[1] for r in rows))
    migrate.upgrade(engine)
    with PostgresSampleStore(db.conninfo()) as store:
        assert [_fields(s) for s in store.query()] == before
        assert store.totals()[0] == totals[0]
    engine.dispose()
