"""Trainer replicas on one PostgreSQL and one Mosquitto, as real processes.

* the broker restarts mid-stream under 3 replicas: every envelope stored, once;
* one replica is SIGKILLed and another restarted mid-stream (the killed one comes back, as
  systemd would bring it): every envelope stored, once;
* the scheduler's leader is SIGKILLed: another replica takes the advisory lock and runs the
  next job; runs never overlap and none runs twice.

Each replica has a plain persistent ingest session and stores the devices its index owns by
hash (cloud_trainer/ingest/partition.py); the store's unique key makes any re-delivery a no-op.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from mqtt_helpers import REPO, wait_until

from bench.fleet import SimDevice, _payloads
from broker.launcher import Mosquitto
from cloud_trainer.ingest.partition import DevicePartition
from cloud_trainer.release.keys import generate_keypair
from cloud_trainer.storage.config import DatabaseSection
from cloud_trainer.storage.launcher import PostgresServer
from knet_lab.fleet import toml_text

# Three torch processes start per test: on a loaded 2-core machine that alone takes minutes.
pytestmark = [pytest.mark.slow, pytest.mark.mqtt, pytest.mark.timeout(900)]
MakeDb = Callable[..., DatabaseSection]


class Replica:
    """One `knet-trainer --config` process whose log lines (JSON) go to a file."""

    def __init__(self, root: Path, tid: str, config: Path) -> None:
        self.tid, self.config, self.log = tid, config, root / f"{tid}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cloud_trainer.trainer_cli", "--config",
                 str(self.config)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
        return self

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log.read_bytes().splitlines() if self.log.exists() else []:
            with contextlib.suppress(ValueError):
                out.append(json.loads(raw))
        return out

    def logged(self, text: str) -> int:
        return sum(text in ln.get("message", "") for ln in self.lines())

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _configs(root: Path, port: int, db: DatabaseSection, n: int,
             jobs: list[dict[str, Any]] | None = None, ingest: bool = True) -> list[Replica]:
    key = root / "keys" / "knet-update.key"
    if not key.exists():
        generate_keypair(root / "keys")
    out = []
    for i in range(n):
        tid = f"trainer-{i}"
        doc: dict[str, Any] = {
            "trainer": {"id": tid, "fleet": "bench", "state_dir": root / tid,
                        "signing_key_file": key, "log_format": "json"},
            "mqtt": {"host": "127.0.0.1", "port": port},
            "models": {"digits": {"zoo": "digits", "profiles": ["x86-dev"]}},
            "ingest": {"enabled": ingest, "replicas": n, "replica": i},
            "database": {"url": db.url, "password_file": db.password_file,
                         "leader_poll_s": 0.5},
        }
        if jobs:
            doc["jobs"] = jobs
        path = root / f"{tid}.toml"
        path.write_text(toml_text(doc))
        out.append(Replica(root, tid, path))
    return out


@contextlib.contextmanager
def _running(replicas: list[Replica]) -> Iterator[list[Replica]]:
    try:
        for r in replicas:
            r.start()
        yield replicas
    finally:
        for r in replicas:
            r.stop()


def _rows(pg: PostgresServer, db: DatabaseSection, sql: str) -> list[tuple[Any, ...]]:
    assert db.url is not None
    with psycopg.connect(pg.conninfo(db.url.rsplit("/", 1)[1])) as conn:
        return list(conn.execute(sql).fetchall())


class Stream:
    """Devices (each a real agent Link with its own spool) sending at a steady pace."""

    def __init__(self, root: Path, port: int, devices: list[str], rate_hz: float) -> None:
        self.devs = [SimDevice(d, port, root) for d in devices]
        self.frames, _ = _payloads(root, "uint8+lz4", n=8)
        self.rate_hz = rate_hz
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> Stream:
        for d in self.devs:
            self.stack.enter_context(d.link)
            assert d.link.wait_connected(30)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.devs[self.sent % len(self.devs)].send(self.frames[self.sent % 8])
            self.sent += 1
            self._stop.wait(1.0 / self.rate_hz)  # pacing, not a wait for anything

    def finish(self) -> set[tuple[str, int, int]]:
        self._stop.set()
        self._thread.join(10)
        return {(d.device, d.link.session, q) for d in self.devs for q in range(1, d.seq + 1)}

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self.stack.close()


def _devices(n: int, per_replica: int) -> list[str]:
    """Device ids such that each of ``n`` replicas owns ``per_replica`` of them."""
    out: dict[int, list[str]] = {i: [] for i in range(n)}
    k = 0
    while any(len(v) < per_replica for v in out.values()):
        d = f"cam-{k}"
        owner = DevicePartition(n, 0).owner(d)
        if len(out[owner]) < per_replica:
            out[owner].append(d)
        k += 1
    return [d for v in out.values() for d in v]


def _subscribed(replicas: list[Replica], n: int = 1) -> Callable[[], bool]:
    return lambda: all(r.logged("ingestor knet-ingest-") and r.logged("subscribed") >= n
                       for r in replicas)


def _stored(pg: PostgresServer, db: DatabaseSection) -> set[tuple[str, int, int]]:
    return {(d, s, q) for d, s, q in _rows(pg, db, "SELECT device, session, seq FROM samples")}


def test_three_replicas_lose_nothing_when_the_broker_restarts_mid_stream(
        tmp_path: Path, pg_database: MakeDb, postgres: PostgresServer) -> None:
    db = pg_database()
    with Mosquitto(tmp_path / "broker") as broker, \
            _running(_configs(tmp_path, broker.port, db, 3)) as replicas:
        assert wait_until(_subscribed(replicas), 180, interval=0.2), replicas[0].lines()[-5:]
        with Stream(tmp_path, broker.port, _devices(3, 2), rate_hz=150) as stream:
            assert wait_until(lambda: len(_stored(pg=postgres, db=db)) >= 300, 60, 0.2)
            broker.restart()  # SIGTERM, then the same port and persistence file
            assert wait_until(_subscribed(replicas, 2), 60, interval=0.2)
            sent_at_restart = stream.sent
            assert wait_until(lambda: stream.sent >= sent_at_restart + 300, 60, 0.2)
            expected = stream.finish()
            assert wait_until(lambda: _stored(postgres, db) >= expected, 90, 0.5), \
                len(expected - _stored(postgres, db))
        rows = _rows(postgres, db, "SELECT count(*) FROM samples")[0][0]
    assert _stored(postgres, db) == expected and rows == len(expected)  # every one, once
    assert all(r.proc is not None and r.proc.returncode == 0 for r in replicas)


def test_replica_killed_and_another_restarted_mid_stream_stores_each_envelope_once(
        tmp_path: Path, pg_database: MakeDb, postgres: PostgresServer) -> None:
    db = pg_database()
    with Mosquitto(tmp_path / "broker") as broker, \
            _running(_configs(tmp_path, broker.port, db, 3)) as replicas:
        assert wait_until(_subscribed(replicas), 180, interval=0.2)
        with Stream(tmp_path, broker.port, _devices(3, 2), rate_hz=150) as stream:
            assert wait_until(lambda: len(_stored(postgres, db)) >= 300, 60, 0.2)
            replicas[1].kill()          # SIGKILL: un-acked messages stay in its session
            replicas[2].stop()          # a clean restart of another, mid-stream
            replicas[2].start()
            assert wait_until(_subscribed([replicas[2]], 2), 180, interval=0.2)
            before = stream.sent
            assert wait_until(lambda: stream.sent >= before + 300, 60, 0.2)
            replicas[1].start()         # back, as its supervisor would bring it
            assert wait_until(_subscribed([replicas[1]], 2), 180, interval=0.2)
            expected = stream.finish()
            assert wait_until(lambda: _stored(postgres, db) >= expected, 90, 0.5), \
                len(expected - _stored(postgres, db))
        rows = _rows(postgres, db, "SELECT count(*) FROM samples")[0][0]
    assert _stored(postgres, db) == expected and rows == len(expected)


def test_leader_killed_another_replica_runs_the_next_job_and_no_run_twice(
        tmp_path: Path, pg_database: MakeDb, postgres: PostgresServer) -> None:
    db = pg_database()
    jobs = [{"id": "tick", "model": "digits", "interval_s": 2, "min_new_samples": 1_000_000,
             "misfire_grace_s": 30}]  # every run is a quick 'skipped': the schedule is tested

    def runs() -> list[tuple[Any, ...]]:
        return _rows(postgres, db, "SELECT run_id, detail, started_at, finished_at, status "
                                   "FROM trainer_runs WHERE kind = 'run' ORDER BY started_at")

    with Mosquitto(tmp_path / "broker") as broker, \
            _running(_configs(tmp_path, broker.port, db, 2, jobs, ingest=False)) as replicas:
        assert wait_until(lambda: sum(r.logged("this replica leads") for r in replicas) == 1
                          and all(r.logged("started for fleet") for r in replicas), 180, 0.2)
        leader, standby = sorted(replicas, key=lambda r: -r.logged("this replica leads"))
        assert wait_until(lambda: len(runs()) >= 2, 60, 0.2)
        leader.kill()
        killed_at = datetime.now().astimezone()
        assert wait_until(lambda: standby.logged("this replica leads") == 1, 30, 0.1)
        elected = next(ln["time"] for ln in standby.lines()
                       if "this replica leads" in ln.get("message", ""))
        assert wait_until(lambda: any(r[1].get("trainer") == standby.tid and r[2] > killed_at
                                      for r in runs()), 30, 0.2)
        all_runs = runs()
    takeover = elected - killed_at.timestamp()
    print(f"leader takeover after SIGKILL: {takeover:.2f} s")
    assert 0 <= takeover < 5.0, takeover  # one poll (0.5 s) plus the scheduler's start
    owners = [r[1].get("trainer") for r in all_runs]
    assert set(owners) == {leader.tid, standby.tid}
    assert len({r[0] for r in all_runs}) == len(all_runs)
    for a, b in itertools.pairwise(all_runs):  # never two runs at once
        assert a[3] is not None and a[3] <= b[2], (a, b)
    assert all(r[4] == "skipped" for r in all_runs if r[3] is not None)
