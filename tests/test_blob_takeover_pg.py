"""A new leader serves chunk re-requests for an update the dead leader pushed.

Leader A (a real process: tests/blob_leader.py) holds the fleet's scheduler lock and pushes
a signed update, its blocks shared in PostgreSQL (``update_blobs``); replica B, standing by
with an empty blob folder, hears re-requests but does not answer them. A is SIGKILLed, B
takes the lock, and a device's re-request for a chunk is answered by B, byte for byte, from
the block A left in the database.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from mqtt_helpers import REPO, eventually
from test_publisher import signed_update

from agent.mqtt.client import make_client
from agent.mqtt.endpoint import MqttEndpoint
from agent.wire.topics import Topics
from broker.launcher import Mosquitto
from cloud_trainer.release.publisher import BlobPublisher, PublisherSettings
from cloud_trainer.storage.blobs import SharedBlobs
from cloud_trainer.storage.config import DatabaseSection
from cloud_trainer.storage.engine import make_engine
from cloud_trainer.storage.leader import LeaderLock

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]
TOPICS = Topics("lab")


def test_new_leader_serves_chunks_of_the_dead_leaders_update(
        tmp_path: Path, mosquitto: Mosquitto,
        pg_database: Callable[..., DatabaseSection]) -> None:
    db = pg_database()
    signed, files = signed_update(tmp_path)
    spec = tmp_path / "update.json"
    (tmp_path / "manifest.json").write_bytes(signed.payload())
    spec.write_text(json.dumps({"manifest": str(tmp_path / "manifest.json"),
                                "files": {sha: str(p) for sha, p in files.items()}}))
    sha = sorted(files)[0]
    info = signed.manifest.variants[0].chunks[sha]
    data = files[sha].read_bytes()

    def chunk(n: int) -> bytes:
        return data[n * info.chunk_size:(n + 1) * info.chunk_size]

    leader_a = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "blob_leader.py"), str(mosquitto.port), str(db.url),
         str(db.password_file), str(tmp_path / "a"), str(spec)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    engine = make_engine(db)
    elected = threading.Event()
    lock_b = LeaderLock(db.conninfo(), "lab", on_elected=elected.set, on_lost=print, poll_s=0.2,
                        holder="replica-b")
    pub_b = BlobPublisher(PublisherSettings(port=mosquitto.port, client_id="replica-b"),
                          TOPICS, tmp_path / "b" / "blobs", shared=SharedBlobs(engine),
                          answers=lambda: lock_b.is_leader)
    got: queue.Queue[tuple[int, bytes]] = queue.Queue()
    dev = make_client(MqttEndpoint(port=mosquitto.port), default_client_id="cam-1")
    dev.on_message = lambda _c, _u, m: got.put((int(m.topic.rsplit("/", 1)[1]), m.payload))
    try:
        assert leader_a.stdout is not None
        assert leader_a.stdout.readline().strip() == b"pushed", "leader A did not push"
        lock_b.start()
        pub_b.start()
        dev.start()
        assert dev.wait_connected(10)
        dev.subscribe_and_wait([(f"{TOPICS.fleet_root}/model/blob/{sha}/+", 1)], 10)

        def ask(n: int) -> bool:
            """Re-request chunk n as a device does, until it arrives (A's push may still
            be within the publisher's dedupe window)."""
            dev.publish(TOPICS.blob_request("cam-1"),
                        json.dumps({"sha256": sha, "chunks": [n]}).encode(), qos=1)
            try:
                return got.get(timeout=0.5) == (n, chunk(n))
            except queue.Empty:
                return False

        eventually(lambda: ask(0), 30, "leader A to serve a re-requested chunk")
        eventually(lambda: pub_b.stats["not_answering"] >= 1, 10,
                   "replica B to hear the request and leave it to the leader")
        assert pub_b.stats["served_chunks"] == 0 and not elected.is_set()

        leader_a.send_signal(signal.SIGKILL)
        leader_a.wait(30)
        assert elected.wait(30), "replica B did not take the lock"
        last = info.count - 1
        eventually(lambda: ask(last), 30, "replica B to serve the dead leader's chunk")
        # B counts a chunk once its publish call returns, which may be after it arrived.
        eventually(lambda: pub_b.stats["served_chunks"] >= 1, 10, "replica B to count it")
        assert pub_b.stats["from_shared"] == 1
        assert (tmp_path / "b" / "blobs" / f"{sha}.onnx").read_bytes() == data
        # Only B answers now: one request, one chunk.
        while not got.empty():
            got.get_nowait()
        dev.publish(TOPICS.blob_request("cam-1"),
                    json.dumps({"sha256": sha, "chunks": [0]}).encode(), qos=1)
        assert got.get(timeout=10) == (0, chunk(0))
    finally:
        if leader_a.poll() is None:
            leader_a.kill()
            leader_a.wait(30)
        dev.stop()
        pub_b.close()
        lock_b.stop()
        engine.dispose()
