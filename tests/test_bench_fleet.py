"""`knet bench fleet` end to end at tiny N, sharded over two worker processes.

Real Mosquitto, real trainer process, real Links in two `python -m bench.fleet --worker`
processes; checks the aggregation across workers (every envelope of both shards stored once,
every device updated), and that a worker that dies is reported instead of waited on.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.fleet import Worker, _expect_all, run_fleet_bench


@pytest.mark.slow
def test_fleet_bench_two_workers_hold_without_loss() -> None:
    r = run_fleet_bench(4, duration_s=2.0, rate_hz=2.0, per_worker=2, drain_timeout_s=30.0)
    assert r["errors"] == []
    assert (r["workers"], r["connected"], r["unconnected"]) == (2, 4, 0)
    # 4 devices x 2 Hz x 2 s, give or take the last tick of each shard
    assert 12 <= r["sent"] <= 20
    assert (r["stored"], r["lost"], r["unexpected"], r["undrained"]) == (r["sent"], 0, 0, 0)
    assert r["delay_ms_p50"] is not None and r["delay_ms_p99"] >= r["delay_ms_p50"]
    assert (r["updated"], r["update_failed"]) == (4, 0) and r["rollout_s_all"] is not None
    assert r["rss_mib"]["devices"] >= r["rss_mib"]["worker_max"] > 0
    assert r["rss_mib"]["broker"] > 0 and r["rss_mib"]["trainer"] > 0
    assert r["held"] is True


def test_dead_worker_is_reported_not_waited_on(tmp_path: Path) -> None:
    w = Worker(0, tmp_path / "missing-spec.json", tmp_path / "worker.log")
    errors: list[str] = []
    t0 = time.monotonic()
    got = _expect_all([w], "connected", 60.0, errors)
    assert got == [] and time.monotonic() - t0 < 60.0
    assert len(errors) == 1 and "worker 0: no 'connected'" in errors[0]
    assert "missing-spec.json" in errors[0]  # the worker's own error, from its log
    w.stop(10.0)
    assert w.proc.returncode not in (None, 0)
