"""Block benchmark records: measured on the agent side, stored by the trainer, planned on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import REPO, agent_config, exported_digits, write_inputs
from mqtt_helpers import Collector

from agent.infer.blockbench import BenchRecord, BenchRecordError, measure
from agent.infer.manifest import PartitionManifest
from agent.infer.profiles import load_profile
from agent.infer.runtime import BlockRunner
from agent.wire.topics import Topics
from cloud_trainer.plan.store import BenchStore

T = Topics("lab")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported_digits(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def record(model_dir: Path) -> BenchRecord:
    runner = BlockRunner(PartitionManifest.load(model_dir / "manifest.json"), model_dir,
                         load_profile("x86-dev"))
    x = np.random.default_rng(0).random((6, *runner.input_shape), dtype=np.float32)
    return measure(runner, x, device="dev-1", codecs=("raw", "defer", "uint8+lz4"),
                   warmup=1, repeats=5)


def test_record_covers_every_block_and_boundary(record: BenchRecord) -> None:
    assert [b.index for b in record.blocks] == list(range(1, record.num_blocks + 1))
    assert all(0 <= b.median_s <= b.p95_s for b in record.blocks)
    # boundaries 0..N-1 (the output is never sent), each with every codec
    assert {(c.boundary, c.codec) for c in record.codecs} == {
        (b, c) for b in range(record.num_blocks) for c in ("raw", "defer", "uint8+lz4")}
    for c in record.codecs:
        if c.lossless:
            assert c.max_abs_err == 0 and c.accuracy_loss == 0
        assert c.accuracy_loss is not None and 0 <= c.accuracy_loss <= 100
        assert c.raw_bytes == 4 * int(np.prod(record.boundaries[c.boundary]))
    raw = record.codec_at(1, "raw")
    assert raw is not None and raw.bytes > raw.raw_bytes  # frame header on top


def test_partial_partition_has_no_accuracy_loss(model_dir: Path) -> None:
    full = PartitionManifest.load(model_dir / "manifest.json")
    runner = BlockRunner(full.slice(1, 2), model_dir, load_profile("x86-dev"))
    x = np.random.default_rng(0).random((3, *runner.input_shape), dtype=np.float32)
    rec = measure(runner, x, device="dev-1", codecs=("uint8+lz4",), warmup=0, repeats=2)
    assert (rec.first, rec.last) == (1, 2)
    assert {c.boundary for c in rec.codecs} == {0, 1, 2}
    assert all(c.accuracy_loss is None for c in rec.codecs)


def test_record_round_trips_and_hostile_json_is_one_error(record: BenchRecord,
                                                          tmp_path: Path) -> None:
    path = record.dump(tmp_path / "r.json")
    assert BenchRecord.load(path) == record
    data = record.to_json()
    for bad in (b"", b"{", data[: len(data) // 2], b"[]", b'{"device": 1}',
                data.replace(b'"first": 1', b'"first": 9'), b" " * (5 * 2**20)):
        with pytest.raises(BenchRecordError):
            BenchRecord.from_json(bad)


def test_store_keeps_latest_and_refuses_a_spoofed_device(record: BenchRecord,
                                                        tmp_path: Path) -> None:
    store = BenchStore(tmp_path / "bench")
    assert store.ingest(T, T.bench("dev-1"), record.to_json()) == record
    assert store.ingest(T, T.bench("dev-2"), record.to_json()) is None  # claims dev-1
    assert store.ingest(T, T.bench("dev-1"), b"garbage") is None
    assert store.ingest(T, T.stats("dev-1"), record.to_json()) is None
    assert store.rejected == 3
    newer = record.model_copy(update={"repeats": 99})
    store.ingest(T, T.bench("dev-1"), newer.to_json())
    assert [r.repeats for r in store.records("digits")] == [99]
    assert store.records("vision") == []
    assert len(list((tmp_path / "bench" / "history").iterdir())) == 1


@pytest.mark.mqtt
def test_knet_agent_benchmark_writes_and_publishes(tmp_path: Path, model_dir: Path,
                                                   mosquitto) -> None:
    write_inputs(tmp_path / "inputs.npz", 8)
    cfg = agent_config(tmp_path, mosquitto.port, model_dir / "manifest.json")
    with Collector(mosquitto.host, mosquitto.port, T.bench("dev-1")) as sub:
        proc = subprocess.run(
            [sys.executable, "-m", "agent.cli", "benchmark", "--config", str(cfg), "--out",
             str(tmp_path / "rec.json"), "--publish", "--samples", "4", "--repeats", "3",
             "--codecs", "raw", "uint8+lz4"],
            cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert sub.wait_for(lambda m: len(m) >= 1, 10)
    rec = BenchRecord.load(tmp_path / "rec.json")
    assert rec.device == "dev-1" and rec.profile == "x86-dev" and rec.inputs == "source"
    assert rec.samples == 4 and rec.repeats == 3
    published = BenchRecord.from_json(sub.payloads()[0])
    assert published == rec
    assert json.loads(sub.payloads()[0])["model_id"] == "digits"


def test_knet_agent_benchmark_refuses_a_bad_config(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[device]\nid = 'Bad Id'\n")
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "benchmark", "--config",
                           str(tmp_path / "a.toml")], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "device.id" in proc.stderr
