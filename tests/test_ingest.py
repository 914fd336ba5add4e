"""Ingest against a real Mosquitto: bad input, dedup, kill -9 and restart, a share group."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.wire.codec import encode
from agent.wire.envelope import Envelope
from agent.wire.topics import Topics
from broker.launcher import Mosquitto
from cloud_trainer.ingest.fleet import FleetTable
from cloud_trainer.ingest.ingestor import Ingestor, IngestSettings
from cloud_trainer.ingest.store import SQLiteSampleStore
from tests.mqtt_helpers import REPO, read_until, wait_until

pytestmark = pytest.mark.mqtt

FLEET = "lab"
TOPICS = Topics(FLEET)
SHAPE = (1, 8, 6, 6)
RNG = np.random.default_rng(1)


def frame(shape: tuple[int, ...] = SHAPE) -> bytes:
    return encode(np.maximum(RNG.standard_normal(shape), 0).astype(np.float32), "uint8+lz4")


FRAME = frame()


def envelope(device: str, seq: int, session: int = 1, payload: bytes = FRAME,
             boundary: int = 1) -> bytes:
    return Envelope(device=device, session=session, seq=seq, timestamp=time.time(),
                    model_version=1, boundary=boundary, payload=payload, label=seq % 10).pack()


class Publisher:
    """A plain paho v5 publisher that waits for every PUBACK."""

    def __init__(self, broker: Mosquitto, inflight: int = 100) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(inflight)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.infos.append(self.client.publish(topic, payload, qos=1, retain=retain))

    def send_acts(self, items: Iterable[tuple[str, bytes]]) -> None:
        for device, payload in items:
            self.send(TOPICS.act(device), payload)

    def flush(self, timeout: float = 20.0) -> None:
        for info in self.infos:
            info.wait_for_publish(timeout)
        self.infos.clear()

    def close(self) -> None:
        self.flush()
        self.client.disconnect()
        self.client.loop_stop()


def settings(broker: Mosquitto, **kw: object) -> IngestSettings:
    return IngestSettings(port=broker.port, client_id=kw.pop("client_id", "ingest-test"),
                          reconnect_min_delay=0.05, reconnect_max_delay=0.5, **kw)


def test_stream_with_duplicates_and_bad_messages(mosquitto: Mosquitto, tmp_path: Path) -> None:
    store = SQLiteSampleStore(tmp_path / "store")
    s = settings(mosquitto, expected_shapes={1: SHAPE[1:]}, max_payload=64 << 10,
                 log_interval_s=60)
    pub = Publisher(mosquitto)
    with Ingestor(s, TOPICS, store) as ing:
        good = [(d, envelope(d, i)) for d in ("dev-a", "dev-b") for i in range(50)]
        dups = good[:10] + good[60:70]
        ok = envelope("dev-a", 999)
        versioned = bytearray(ok)
        versioned[4] = 3  # 1 is one sample, 2 a batch (agent.wire.envelope)
        bad = [
            ("dev-a", RNG.bytes(200)),  # random bytes
            ("dev-a", RNG.bytes(5)),
            ("dev-a", ok[:-10]),  # truncated
            ("dev-a", b"XXXX" + ok[4:]),  # wrong magic
            ("dev-b", ok),  # spoofed: dev-b's topic, dev-a's envelope
            ("dev-b", envelope("dev-b", 500, payload=frame((1, 3, 6, 6)))),  # wrong shape
            ("dev-b", envelope("dev-b", 501, payload=RNG.bytes(64))),  # not a codec frame
            ("dev-b", envelope("dev-b", 502, payload=FRAME[:-1] + b"\0")),  # frame CRC
            ("dev-c", bytes(versioned)),  # unknown envelope version
            ("dev-c", envelope("dev-c", 0, payload=RNG.bytes(100 << 10))),  # oversized
            ("dev-c", b""),
        ]
        stream = good[:50] + bad[:6] + dups + good[50:] + bad[6:]
        pub.send_acts(stream)
        pub.send(TOPICS.state("dev-a"), b"{not json")
        pub.send(f"{TOPICS.fleet_root}/BAD_ID/act", ok)
        pub.flush()
        assert wait_until(lambda: ing.stats.received == len(stream)
                          and ing.stats.acked == len(stream) + 2, 15), ing.metrics()
        assert store.count() == 100 and store.count(device="dev-a") == 50
        assert store.sample_keys() == {(d, 1, i) for d in ("dev-a", "dev-b") for i in range(50)}
        assert ing.stats.stored == 100 and ing.stats.duplicates == 20
        assert ing.stats.bad_snapshot() == {
            "dev-a": {"malformed": 4, "bad_state": 1},
            "dev-b": {"spoofed": 1, "wrong_shape": 1, "bad_frame": 2},
            "dev-c": {"version": 1, "oversized": 1, "malformed": 1},
            "?invalid": {"bad_topic": 1},
        }
        # still alive and storing
        pub.send_acts([("dev-c", envelope("dev-c", 1))])
        pub.flush()
        assert wait_until(lambda: store.count() == 101, 10)
        metrics = ing.metrics()
        assert metrics["queue_depth"] == 0 and metrics["bad_total"] == 13
        assert metrics["ack_skipped"] == 0 and metrics["store_errors"] == 0
    pub.close()
    store.close()


def test_fleet_table_state_and_birth(mosquitto: Mosquitto, tmp_path: Path) -> None:
    pub = Publisher(mosquitto)
    birth = {"agent_version": "0.1.0", "profile": "rpi4", "model_id": "digits",
             "model_version": 3, "partition": {"first": 1, "last": 2, "num_blocks": 4},
             "blocks": {"1": "aa" * 32, "2": "bb" * 32}, "providers": ["CPUExecutionProvider"],
             "session": 2, "some_future_key": {"x": 1}}
    # retained before the trainer starts: delivered on subscribe
    pub.send(TOPICS.birth("dev-a"), json.dumps(birth).encode(), retain=True)
    pub.send(TOPICS.state("dev-a"), b'{"state":"online","session":2}', retain=True)
    pub.flush()
    fleet = FleetTable()
    with SQLiteSampleStore(tmp_path) as store, \
            Ingestor(settings(mosquitto), TOPICS, store, fleet=fleet) as ing:
        # two retained topics: their order on subscribe is the broker's, so wait for both
        assert wait_until(lambda: (fleet.get("dev-a") or DummyInfo).state == "online" and
                          (fleet.get("dev-a") or DummyInfo).profile is not None, 10)
        info = fleet.get("dev-a")
        assert info is not None
        assert (info.profile, info.agent_version, info.model_version) == ("rpi4", "0.1.0", 3)
        assert info.block_versions["2"] == "bb" * 32
        assert info.providers == ["CPUExecutionProvider"]
        assert info.partition == {"first": 1, "last": 2, "num_blocks": 4}
        assert info.birth["some_future_key"] == {"x": 1}
        # the previous run's Will arrives late: ignored
        pub.send(TOPICS.state("dev-a"), b'{"state":"offline","session":1}', retain=True)
        pub.send(TOPICS.state("dev-b"), b'{"state":"online","session":7,"extra":1}')
        pub.flush()
        assert wait_until(lambda: fleet.stale_ignored == 1 and len(fleet) == 2, 10)
        assert fleet.get("dev-a").state == "online"  # type: ignore[union-attr]
        assert fleet.online() == ["dev-a", "dev-b"]
        pub.send(TOPICS.state("dev-a"), b'{"state":"stopped","session":2}')
        pub.send(TOPICS.state("dev-b"), b'{"state":"offline","session":7}')
        pub.flush()
        assert wait_until(lambda: fleet.online() == [], 10)
        assert fleet.get("dev-a").state == "stopped"  # type: ignore[union-attr]
        # a new session's offline (its Will) is news
        pub.send(TOPICS.state("dev-a"), b'{"state":"offline","session":3}')
        pub.send(TOPICS.act("dev-a"), envelope("dev-a", 0, session=3))
        pub.flush()
        assert wait_until(lambda: store.count() == 1, 10)
        info = fleet.get("dev-a")
        assert info is not None and info.state == "offline" and info.session == 3
        assert ing.metrics()["fleet_devices"] == 2
        assert fleet.snapshot()["dev-a"]["profile"] == "rpi4"
    pub.close()


class DummyInfo:
    state = "missing"
    profile = None


# -- child processes -----------------------------------------------------------------------
CHILD = """
import json, logging, signal, sys, threading
from pathlib import Path
from agent.wire.topics import Topics
from cloud_trainer.ingest.ingestor import Ingestor, IngestSettings
from cloud_trainer.ingest.store import SQLiteSampleStore
logging.basicConfig(level=logging.WARNING)
port, client_id, store_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
store = SQLiteSampleStore(Path(store_dir))
delay = float(sys.argv[4])
if delay:  # a slow disk: widens the window between receiving a message and storing it
    import time
    add_many = store.add_many
    store.add_many = lambda envs, at=None, **kw: (time.sleep(delay), add_many(envs, at, **kw))[1]
s = IngestSettings(port=port, client_id=client_id, reconnect_min_delay=0.05,
                   reconnect_max_delay=0.5, receive_maximum=200, batch_size=64)
ing = Ingestor(s, Topics("lab"), store).start()
print("ready", flush=True)
stop.wait()
ing.stop()
print(json.dumps(ing.metrics()), flush=True)
"""


def spawn_ingestor(broker: Mosquitto, client_id: str, store_dir: Path,
                   store_delay: float = 0.0) -> subprocess.Popen[str]:
    """An ingestor in a child process (``python -c``), running until SIGTERM or SIGKILL."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(broker.port), client_id,
                             str(store_dir), str(store_delay)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    read_until(proc, lambda line: line == "ready")
    return proc


def stop_ingestor(proc: subprocess.Popen[str]) -> dict[str, object]:
    proc.send_signal(signal.SIGTERM)
    line = read_until(proc, lambda ln: ln.startswith("{"))
    proc.wait(10)
    return dict(json.loads(line))


def test_kill_9_mid_ingest_loses_nothing_acknowledged(mosquitto: Mosquitto,
                                                      tmp_path: Path) -> None:
    n = 3000
    store_dir = tmp_path / "store"
    reader = SQLiteSampleStore(store_dir)
    # A slow store keeps ~receive_maximum messages received but unstored at any instant: with
    # paho's automatic PUBACK those were lost on SIGKILL (about 250 of 3000 here).
    child = spawn_ingestor(mosquitto, "ingest-kill", store_dir, store_delay=0.03)
    pub = Publisher(mosquitto)
    try:
        devices = ("dev-a", "dev-b", "dev-c")
        pub.send_acts((devices[i % 3], envelope(devices[i % 3], i)) for i in range(n))
        assert wait_until(lambda: reader.count() >= n // 5, 20)
        child.kill()  # SIGKILL mid-ingest: stored-but-unacked and queued-unstored both exist
        child.wait()
        killed_at = reader.count()
        assert killed_at < n, "the kill came too late to test anything"
        pub.flush()  # the broker accepted every message while the trainer was down
        child = spawn_ingestor(mosquitto, "ingest-kill", store_dir)
        assert wait_until(lambda: reader.count() >= n, 30), (killed_at, reader.count())
        metrics = stop_ingestor(child)
        assert reader.count() == n
        assert reader.sample_keys() == {(devices[i % 3], 1, i) for i in range(n)}
        assert metrics["store_errors"] == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        pub.close()
        reader.close()


def test_two_replicas_split_the_stream(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """One shared SQLite file (WAL + busy_timeout) behind two processes in one share group."""
    n = 2000
    store_dir = tmp_path / "store"
    reader = SQLiteSampleStore(store_dir)
    procs = [spawn_ingestor(mosquitto, f"ingest-{k}", store_dir) for k in (1, 2)]
    pub = Publisher(mosquitto)
    try:
        devices = [f"dev-{k}" for k in range(4)]
        pub.send_acts((devices[i % 4], envelope(devices[i % 4], i)) for i in range(n))
        pub.flush()
        assert wait_until(lambda: reader.count() >= n, 30), reader.count()
        m1, m2 = (stop_ingestor(p) for p in procs)
        assert reader.sample_keys() == {(devices[i % 4], 1, i) for i in range(n)}
        assert m1["received"] > 0 and m2["received"] > 0, (m1, m2)
        assert m1["received"] + m2["received"] == n  # strictly split: nobody saw one twice
        assert m1["stored"] + m2["stored"] == n
        assert m1["duplicates"] == m2["duplicates"] == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        pub.close()
        reader.close()


def test_envelope_layout_assumption() -> None:
    """The version-byte tamper above relies on the envelope's fixed header layout."""
    data = envelope("dev-a", 1)
    assert data[:4] == b"KNAE" and struct.unpack_from("<B", data, 4)[0] == 1


def test_only_what_the_deployed_model_can_use_is_stored_and_rejects_add_up(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """NaN/Inf, 0-dim and zero-size tensors, boundaries the model lacks, shapes that do not
    match the boundary and other models' envelopes: one named reason each, none stored."""
    store = SQLiteSampleStore(tmp_path / "store")
    s = settings(mosquitto, log_interval_s=60,
                 model_boundaries={"digits": {0: (1, 6, 6), 1: SHAPE[1:]}})
    pub = Publisher(mosquitto)
    nan = np.full(SHAPE, np.nan, np.float32)
    inf = np.full(SHAPE, np.inf, np.float32)

    def env(seq: int, payload: bytes, boundary: int = 1, model: str | None = "digits") -> bytes:
        return Envelope(device="dev-a", session=1, seq=seq, timestamp=time.time(),
                        model_version=1, boundary=boundary, payload=payload,
                        meta={"model": model} if model else {}).pack()

    cases = {
        "non_finite": [env(1, encode(nan, "raw")), env(2, encode(inf, "raw")),
                       env(3, encode(nan, "fp16"))],
        "empty_tensor": [env(4, encode(np.float32(1.0).reshape(()), "raw")),
                         env(5, encode(np.zeros((1, 0, 6, 6), np.float32), "raw"))],
        "bad_boundary": [env(6, FRAME, boundary=7), env(7, FRAME, boundary=2)],
        "wrong_shape": [env(8, frame((1, 8, 6, 5))), env(9, FRAME, boundary=0)],
        "unknown_model": [env(10, FRAME, model="other")],
    }
    good = [env(100, FRAME), env(101, FRAME, model=None),  # no meta: the only model
            env(102, encode(np.zeros((1, 1, 6, 6), np.float32), "raw"), boundary=0)]
    with Ingestor(s, TOPICS, store) as ing:
        stream = [p for ps in cases.values() for p in ps] + good
        pub.send_acts(("dev-a", p) for p in stream)
        pub.flush()
        assert wait_until(lambda: ing.stats.acked == len(stream), 15), ing.metrics()
        m = ing.metrics()
    pub.close()
    assert store.count() == len(good)
    store.close()
    assert m["rejects"] == {reason: len(ps) for reason, ps in cases.items()}
    assert m["rejected"] == sum(len(ps) for ps in cases.values()) == m["bad_total"]
    assert m["received"] == m["stored"] + m["duplicates"] + m["rejected"] == len(stream)
