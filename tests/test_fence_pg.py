"""Fencing (cloud_trainer/storage/fence.py) on a real PostgreSQL: a leader whose lock session
was dropped, after another replica took over, can no longer write its run, register a
version or publish; the new leader can; a process that never led is not fenced."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import torch
from mqtt_helpers import wait_until

from cloud_trainer.release.registry import Registry
from cloud_trainer.release.runs import RunLog
from cloud_trainer.storage import fence
from cloud_trainer.storage.config import DatabaseSection
from cloud_trainer.storage.engine import make_engine
from cloud_trainer.storage.launcher import PostgresServer
from cloud_trainer.storage.leader import LeaderLock, leader_pid

MakeDb = Callable[..., DatabaseSection]
BLOCK = {"w": torch.ones(2, 2)}


def test_a_deposed_leader_cannot_finish_its_run_version_or_publish(
        tmp_path: Path, pg_database: MakeDb, postgres: PostgresServer) -> None:
    db = pg_database()
    lost: list[str] = []
    locks = {name: LeaderLock(db.conninfo(), "lab", on_elected=lambda: None,
                              on_lost=lost.append, poll_s=0.1, holder=f"trainer-{name}")
             for name in ("a", "b")}
    engines = {name: make_engine(db) for name in locks}
    for name, engine in engines.items():
        fence.install(engine, "lab", lambda n=name: locks[n].epoch)
    a_runs = RunLog(tmp_path / "a", engine=engines["a"], owner="trainer-a")
    a_registry = Registry(tmp_path / "a", engine=engines["a"])
    try:
        locks["a"].start()
        assert wait_until(lambda: locks["a"].is_leader, 20)
        # Leading: a opens its run and registers a version (epoch 1, current).
        run = a_runs.open_run("job", "digits", "schedule", since=0.0, until=1.0,
                              deployed_version=1)
        a_registry.add_version("digits", [BLOCK], status="candidate")
        fence.check(engines["a"], "lab", locks["a"].epoch)
        locks["b"].start()
        holder = leader_pid(db.conninfo(), "lab")
        assert holder is not None
        with psycopg.connect(postgres.conninfo("postgres"), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (holder,))  # a's session dies
        assert wait_until(lambda: locks["b"].is_leader, 20)
        assert locks["b"].epoch == locks["a"].epoch + 1  # type: ignore[operator]
        assert wait_until(lambda: bool(lost), 20)  # a knows, but its run is still going
        # a goes on as if nothing happened: every write and the publish are refused.
        with pytest.raises(fence.FencedError, match="epoch 1 of fleet lab is over"):
            a_runs.update(run.run_id, status="pushed", step="done")
        with pytest.raises(fence.FencedError):
            a_registry.add_version("digits", [{"w": torch.zeros(2, 2)}], status="candidate")
        with pytest.raises(fence.FencedError):
            a_registry.set_status("digits", 1, "approved")
        with pytest.raises(fence.FencedError):
            fence.check(engines["a"], "lab", locks["a"].epoch)
        # Nothing of it landed; the new leader resumes the run and writes.
        b_runs = RunLog(tmp_path / "b", engine=engines["b"], owner="trainer-b")
        assert b_runs.get(run.run_id).status == "running"
        b_registry = Registry(tmp_path / "b", engine=engines["b"])
        assert [v.status for v in b_registry.versions("digits")] == ["candidate"]
        b_runs.update(run.run_id, status="failed", step="done")
        b_registry.set_status("digits", 1, "rejected")
        fence.check(engines["b"], "lab", locks["b"].epoch)
        # Tools that never led (CLI, tests) are not fenced.
        tool = make_engine(db)
        RunLog(tmp_path / "c", engine=tool).update(run.run_id, reason="audited")
        tool.dispose()
    finally:
        for lock in locks.values():
            lock.stop()
        for engine in engines.values():
            engine.dispose()
