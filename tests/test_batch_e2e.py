"""Batch envelopes end to end with real processes: the agent batching across a broker
restart (at least once, in order), and ingest of mixed formats, replays, bad samples and
hostile batches into SQLite and PostgreSQL."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import agent_config, exported_digits, spooled, start_agent, write_inputs
from mqtt_helpers import Collector, eventually, wait_until

from agent.wire.codec import decode, encode
from agent.wire.envelope import BatchEnvelope, Envelope, unpack_any
from agent.wire.topics import Topics
from broker.launcher import Mosquitto
from cloud_trainer.ingest.ingestor import Ingestor, IngestSettings
from cloud_trainer.ingest.postgres import PostgresSampleStore
from cloud_trainer.ingest.store import SampleStore, SQLiteSampleStore
from tests.test_ingest import Publisher

pytestmark = pytest.mark.mqtt
T = Topics("lab")
RNG = np.random.default_rng(3)
SHAPE = (8, 6, 6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported_digits(tmp_path_factory.mktemp("model"))


def samples_of(payloads: list[bytes]) -> list[list[int]]:
    """The seqs each message carried (one for a version-1 envelope)."""
    out = []
    for p in payloads:
        env = unpack_any(p)
        out.append([int(s) for s in env.samples["seq"]] if isinstance(env, BatchEnvelope)
                   else [env.seq])
    return out


def test_agent_batches_survive_a_broker_restart_in_order(
        tmp_path: Path, mosquitto: Mosquitto, model_dir: Path) -> None:
    n = 400
    write_inputs(tmp_path / "inputs.npz", n)
    cfg = agent_config(tmp_path, mosquitto.port, model_dir / "manifest.json",
                       source={"kind": "npz", "path": tmp_path / "inputs.npz", "rate_hz": 200},
                       uplink={"boundaries": [2], "batch_size": 8, "batch_wait_s": 0.2})
    sub = Collector(mosquitto.host, mosquitto.port, T.act("dev-1"), client_id="trainer",
                    persistent=True).start()
    proc = start_agent(cfg, "--exit-when-done")
    assert sub.wait_for(lambda m: len(m) >= 5, 10)
    mosquitto.stop()  # while the agent keeps batching into its spool
    eventually(lambda: spooled(tmp_path / "state-dev-1") >= 5, 30,
               "the agent to spool 5 batches while the broker is down")
    mosquitto.start()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert sub.wait_for(lambda m: len({s for b in samples_of([p for _, p, _ in m])
                                       for s in b}) >= n, 20)
    batches = samples_of(sub.payloads())
    sub.stop()
    seen = [s for b in batches for s in b]
    assert sorted(set(seen)) == list(range(1, n + 1))  # every sample; duplicates allowed
    assert max(map(len, batches)) == 8 and len(batches) < n / 4  # batched, not one by one
    # without its re-deliveries, the stream is in the device's order
    assert list(dict.fromkeys(seen)) == list(range(1, n + 1))


def test_agent_time_bound_sends_part_batches_at_low_rates(
        tmp_path: Path, mosquitto: Mosquitto, model_dir: Path) -> None:
    write_inputs(tmp_path / "inputs.npz", 20)
    cfg = agent_config(tmp_path, mosquitto.port, model_dir / "manifest.json",
                       source={"kind": "npz", "path": tmp_path / "inputs.npz", "rate_hz": 10},
                       uplink={"boundaries": [1], "batch_size": 64, "batch_wait_s": 0.2})
    with Collector(mosquitto.host, mosquitto.port, T.act("dev-1")) as sub:
        proc = start_agent(cfg, "--exit-when-done")
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]
        assert sub.wait_for(lambda m: sum(map(len, samples_of([p for _, p, _ in m]))) >= 20,
                            10)
        payloads = sub.payloads()
    batches = samples_of(payloads)
    assert [s for b in batches for s in b] == list(range(1, 21))
    # 20 inputs at 10/s take 2 s: a 0.2 s bound sends several part batches, not one of 20
    assert len(batches) >= 3 and max(map(len, batches)) < 20
    env = unpack_any(payloads[0])
    assert isinstance(env, BatchEnvelope)
    assert decode(env.payload).shape == (len(env), 16, 8, 8)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> SampleStore:
    if request.param == "sqlite":
        s: SampleStore = SQLiteSampleStore(tmp_path / "store")
    else:
        s = PostgresSampleStore(request.getfixturevalue("pg_database")("batch").conninfo())
    yield s
    s.close()


def batch_env(device: str, seqs: list[int], codec: str = "uint8+lz4",
              x: np.ndarray | None = None) -> bytes:
    n = len(seqs)
    if x is None:
        x = np.maximum(RNG.standard_normal((n, *SHAPE)), 0).astype(np.float32)
    table = BatchEnvelope.table(seqs, [time.time()] * n, seqs, [s % 10 for s in seqs],
                                [None] * n, [None] * n)
    return BatchEnvelope(device=device, session=1, model_version=1, boundary=1,
                         samples=table, payload=encode(x, codec)).pack()


def one_env(device: str, seq: int) -> bytes:
    x = np.maximum(RNG.standard_normal((1, *SHAPE)), 0).astype(np.float32)
    return Envelope(device=device, session=1, seq=seq, timestamp=time.time(), model_version=1,
                    boundary=1, payload=encode(x, "uint8+lz4")).pack()


def test_ingest_mixed_formats_replays_bad_samples_and_hostile_batches(
        mosquitto: Mosquitto, store: SampleStore) -> None:
    settings = IngestSettings(port=mosquitto.port, client_id="ingest-batch",
                              expected_shapes={1: SHAPE}, reconnect_min_delay=0.05,
                              reconnect_max_delay=0.5, log_interval_s=60)
    nan_batch = np.ones((4, *SHAPE), np.float32)
    nan_batch[2, 0, 0, 0] = np.nan
    good = batch_env("dev-a", list(range(0, 32)))
    hostile = bytearray(good[:-4])
    struct.pack_into("<I", hostile, 20, 2**32 - 1)  # four billion samples declared
    wrong_shape = batch_env("dev-b", [300, 301], x=np.ones((2, 8, 3, 3), np.float32))
    stream = [
        ("dev-a", good),
        ("dev-a", one_env("dev-a", 100)),  # version 1 from the same device
        ("dev-b", batch_env("dev-b", list(range(0, 16)))),
        ("dev-a", good),  # the same batch again: a replay after a reconnect
        ("dev-b", batch_env("dev-b", [200, 201, 202, 203], codec="raw", x=nan_batch)),
        ("dev-b", wrong_shape),
        ("dev-a", bytes(hostile) + struct.pack("<I", zlib.crc32(bytes(hostile)))),
        ("dev-a", good[:100]),  # truncated
        ("dev-b", batch_env("dev-a", [400, 401])),  # spoofed: dev-a's batch on dev-b's topic
    ]
    pub = Publisher(mosquitto)
    with Ingestor(settings, T, store) as ing:
        pub.send_acts(stream)
        pub.flush()
        # 32 + 1 + 16 + 32 + 4 + 2 samples + two unparsable messages (one each) + 2 spoofed
        assert wait_until(lambda: ing.stats.acked == len(stream)
                          and ing.stats.received == 91, 20), ing.metrics()
        m = ing.metrics()
    pub.close()
    want = ({("dev-a", 1, s) for s in range(32)} | {("dev-a", 1, 100)}
            | {("dev-b", 1, s) for s in range(16)} | {("dev-b", 1, s) for s in (200, 201, 203)})
    assert store.sample_keys() == want
    assert m["stored"] == len(want) and m["duplicates"] == 32  # the replay stored nothing
    assert m["rejects"] == {"non_finite": 1, "wrong_shape": 2, "malformed": 2, "spoofed": 2}
    assert m["received"] == m["stored"] + m["duplicates"] + m["rejected"]
    assert sum(m["rejects"].values()) == m["rejected"] and m["batch_messages"] == 6
    row = {s.seq: s for s in store.query(device="dev-a")}
    assert row[5].meta == {"index": 5} and row[5].label == 5 and row[5].shape == (1, *SHAPE)
    assert decode(row[5].payload).shape == (1, *SHAPE)
    arrays = store.load_arrays(1, device="dev-b")
    assert arrays.shape == (19, *SHAPE) and np.isfinite(arrays).all()
