"""`knet bench ingest` at tiny N: real Mosquitto, a publisher process, zero loss checked.

With ``model`` the publisher sends the zoo student's own activations (here the digits
student's boundary 2 on its test images), so the figures the issue asks for "on the real
model" come from the same code as the synthetic ones.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from bench.ingest import Activations, model_activations, run_ingest_bench, thread_cpu
from bench.ingest_scale import run_scale_bench
from cloud_trainer.ingest.store import PAGE_SIZE


@pytest.mark.slow
@pytest.mark.mqtt
@pytest.mark.parametrize("batch", [1, 8])
def test_ingest_bench_sends_a_students_activations_without_loss(batch: int) -> None:
    r = run_ingest_bench(messages=200, batch=batch, model="digits", boundary=2,
                         validation="decode")
    assert (r["model"], r["boundary"], r["stored"], r["lost"]) == ("digits", 2, 200, 0)
    assert r["shape"][0] == 1 and len(r["shape"]) == 4
    assert r["envelopes"] == (200 if batch == 1 else 4 * -(-50 // batch))  # per device
    assert r["samples_per_s"] > 0 and r["ingest_cpu_us_per_sample"] > 0
    assert r["page_size"] == PAGE_SIZE  # the store's default, as the trainer makes it
    # the CPU split by thread: paho's (which validates) and the writer's did the work
    threads = r["thread_cpu_us_per_sample"]
    assert {"network", "writer"} <= set(threads) <= {"network", "writer", "checkpoint",
                                                     "other"}
    assert all(v >= 0 for v in threads.values())


def test_thread_cpu_finds_this_threads_clock() -> None:
    """The per-thread split reads each thread's own CPU clock: a busy thread's grows by
    what it spent."""
    before = thread_cpu()["other"]
    deadline = time.thread_time() + 0.2
    while time.thread_time() < deadline:
        pass
    assert thread_cpu()["other"] - before >= 0.1


@pytest.mark.slow
@pytest.mark.mqtt
def test_replica_bench_sends_a_students_activations_without_loss() -> None:
    r = run_scale_bench("sqlite", 2, messages=120, devices=4, model="digits", boundary=1)
    assert (r["model"], r["boundary"], r["lost"]) == ("digits", 1, 0)
    assert sum(r["stored_per_replica"]) == 120


def test_activations_cycle_through_the_pool_in_order(tmp_path: Path) -> None:
    pool = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    np.save(tmp_path / "pool.npy", pool)
    src = Activations((1, 9, 9), tmp_path / "pool.npy")
    assert src.shape == (1, 2, 3)
    got = np.concatenate([src.take(3), src.take(4)])
    assert np.array_equal(got, pool[[0, 1, 2, 3, 4, 0, 1]])
    synthetic = Activations((1, 4, 6, 6)).take(2)
    assert synthetic.shape == (2, 4, 6, 6) and (synthetic >= 0).all()


def test_a_boundary_the_model_lacks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"boundaries 1\.\.3, not 4"):
        model_activations("digits", 4, tmp_path)
