"""Two trainer replicas in one shared-subscription group split the activation stream:
every envelope is stored exactly once across both, and both get a share (docs/deploy.md)."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mqtt_helpers import REPO, eventually, wait_until

from bench.fleet import SimDevice, _payloads
from broker.config import BrokerSettings
from broker.launcher import Mosquitto, free_port
from cloud_trainer.release.keys import generate_keypair
from knet_lab.fleet import toml_text

pytestmark = [pytest.mark.slow]


def _config(root: Path, trainer_id: str, port: int, key: Path) -> Path:
    doc = {"trainer": {"id": trainer_id, "fleet": "bench", "state_dir": root / trainer_id,
                       "signing_key_file": key, "log_format": "json"},
           "mqtt": {"host": "127.0.0.1", "port": port},
           "models": {"digits": {"zoo": "digits", "profiles": ["jetson-nano"]}},
           "ingest": {"enabled": True, "shared": True, "share_group": "trainers"}}
    path = root / f"{trainer_id}.toml"
    path.write_text(toml_text(doc))
    return path


def _keys(db: Path) -> list[tuple[str, int, int]]:
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return [tuple(r) for r in con.execute("SELECT device, session, seq FROM samples")]
    finally:
        con.close()


def test_two_ingest_replicas_split_the_stream_exactly_once(tmp_path: Path) -> None:
    port = free_port()
    key, _pub = generate_keypair(tmp_path / "keys")
    settings = BrokerSettings(port=port, allow_anonymous=True, persistence=False)
    frames, _ = _payloads(tmp_path, "uint8+lz4", n=8)
    with Mosquitto(tmp_path / "broker", settings):
        procs = []
        try:
            for tid in ("trainer-a", "trainer-b"):
                log = open(tmp_path / f"{tid}.log", "wb")  # noqa: SIM115
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "cloud_trainer.trainer_cli", "--config",
                     str(_config(tmp_path, tid, port, key))], cwd=REPO, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True))
            assert wait_until(lambda: all(
                b"ingestor knet-ingest-" in (tmp_path / f"{t}.log").read_bytes()
                for t in ("trainer-a", "trainer-b")), 120, interval=0.2)
            dbs = [tmp_path / t / "store" / "samples.sqlite3"
                   for t in ("trainer-a", "trainer-b")]
            devs = [SimDevice(f"sim-{i}", port, tmp_path) for i in range(4)]
            probe = SimDevice("probe", port, tmp_path)  # its envelopes are not counted

            def probed_both(after: int) -> bool:
                """Send a probe; True once each replica stored one numbered past ``after``.
                A replica is sent its share in order and stores it in order, so that probe
                follows everything the broker had routed to it (duplicates included)."""
                probe.send(frames[0])
                return all(any(d == "probe" and q > after for d, _s, q in _keys(db))
                           for db in dbs)

            with contextlib.ExitStack() as stack:
                for d in [*devs, probe]:
                    stack.enter_context(d.link)
                    assert d.link.wait_connected(20)
                # both replicas' shared subscriptions are in place before the stream starts
                eventually(lambda: probed_both(0), 60, "a probe stored by each replica",
                           interval=0.2)
                for k in range(400):
                    devs[k % 4].send(frames[k % len(frames)])
                expected = {(d.device, d.link.session, q) for d in devs
                            for q in range(1, d.seq + 1)}
                for d in devs:
                    assert d.link.flush(30), f"{d.device} still has envelopes spooled"
                assert probe.link.flush(30)
                last = probe.seq
                eventually(lambda: probed_both(last), 60,
                           "each replica to store a probe sent after the stream", interval=0.2)
            a, b = ([k for k in _keys(db) if k[0] != "probe"] for db in dbs)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
    assert len(a) == len(set(a)) and len(b) == len(set(b))
    assert not set(a) & set(b), "a message was stored by both replicas"
    assert set(a) | set(b) == expected
    assert len(a) > 0.2 * len(expected) and len(b) > 0.2 * len(expected), (len(a), len(b))
