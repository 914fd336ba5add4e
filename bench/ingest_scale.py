"""`knet bench ingest --store sqlite postgresql --replicas 1 2`: stored msg/s, zero lost,
per store backend and replica count, side by side in one run.

Each replica is its own process (an ``Ingestor`` with a plain persistent session, storing
the devices its index owns by hash: ``cloud_trainer/ingest/partition.py``), as `knet-trainer`
replicas are; the publisher is another process (``bench/ingest.py``), the broker a private
Mosquitto, PostgreSQL a private server with fsync on (``cloud_trainer/storage/launcher.py``).
The clock runs from the first publish until the store holds every message; the run fails
unless it then holds exactly the (device, session, seq) set sent. Each process's CPU seconds
are read from /proc, so the per-message cost that predicts the rate on more cores is part of
the result.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.ingest import DEFAULT_SHAPE, FLEET, _publisher, activation_pool, device_ids

log = logging.getLogger(__name__)
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _open_store(spec: dict[str, Any]) -> Any:
    if spec["kind"] == "sqlite":
        from cloud_trainer.ingest.store import SQLiteSampleStore

        return SQLiteSampleStore(Path(spec["path"]))
    from cloud_trainer.ingest.postgres import PostgresSampleStore

    return PostgresSampleStore(spec["conninfo"])


def _replica(port: int, spec: dict[str, Any], index: int, count: int, validation: str,
             shape: tuple[int, ...], boundary: int, ready: Any, stop: Any,
             result: Any) -> None:
    """Child process: one ingest replica until ``stop``; reports its counters."""
    from agent.wire.topics import Topics
    from cloud_trainer.ingest.ingestor import Ingestor, IngestSettings

    store = _open_store(spec)
    settings = IngestSettings(port=port, client_id=f"bench-ingest-{index}", shared=False,
                              partitions=count, partition=index,
                              validation=validation,  # type: ignore[arg-type]
                              expected_shapes={boundary: shape})
    with Ingestor(settings, Topics(FLEET), store) as ing:
        if not ing.wait_subscribed(30):
            raise RuntimeError(f"replica {index}: no SUBACK")
        ready.set()
        stop.wait()
        st = ing.stats
        result.put({"index": index, "stored": st.stored, "duplicates": st.duplicates,
                    "other_replica": st.other_replica, "batches": st.batches,
                    "bad": st.bad_total})
    store.close()


def run_scale_bench(store_kind: str, replicas: int, messages: int = 20_000, devices: int = 8,  # noqa: C901, PLR0912, PLR0915 -- one linear benchmark script: start, stream, collect
                    validation: str = "header", payload_codec: str = "uint8+lz4",
                    shape: tuple[int, ...] = DEFAULT_SHAPE, workdir: Path | None = None,
                    timeout_s: float = 300.0, model: str | None = None,
                    boundary: int = 2) -> dict[str, Any]:
    """One configuration; figures as a dict. AssertionError when anything sent is missing.
    ``model``/``boundary``: as in ``bench.ingest.run_ingest_bench``."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="knet-bench-scale-") as tmp:
            return run_scale_bench(store_kind, replicas, messages, devices, validation,
                                   payload_codec, shape, Path(tmp), timeout_s, model, boundary)
    from broker.launcher import Mosquitto

    pool, boundary, shape = activation_pool(model, boundary, workdir, shape)

    pg = None
    if store_kind == "postgresql":
        from cloud_trainer.storage import migrate
        from cloud_trainer.storage.config import DatabaseSection
        from cloud_trainer.storage.engine import make_engine
        from cloud_trainer.storage.launcher import PostgresServer

        pg = PostgresServer(durable=True).start()
        db = DatabaseSection(url=pg.create_database("bench"), password_file=pg.password_file)
        engine = make_engine(db, pool_size=1)
        migrate.upgrade(engine)
        engine.dispose()
        spec: dict[str, Any] = {"kind": "postgresql", "conninfo": db.conninfo()}
    elif store_kind == "sqlite":
        spec = {"kind": "sqlite", "path": str(workdir / "store")}
    else:
        raise ValueError(f"store {store_kind!r}: sqlite or postgresql")
    ctx = mp.get_context("spawn")
    stop, result = ctx.Event(), ctx.Queue()
    procs: list[Any] = []
    try:
        with Mosquitto(workdir / "broker") as broker:
            readies = []
            for i in range(replicas):
                ready = ctx.Event()
                p = ctx.Process(target=_replica, daemon=True,
                                args=(broker.port, spec, i, replicas, validation, shape,
                                      boundary, ready, stop, result))
                p.start()
                procs.append(p)
                readies.append(ready)
            for r in readies:
                if not r.wait(120):
                    raise RuntimeError("an ingest replica did not subscribe")
            pub_ready, go, pub_result = ctx.Event(), ctx.Event(), ctx.Queue()
            pub = ctx.Process(target=_publisher, daemon=True,
                              args=(broker.port, messages, payload_codec, devices, shape,
                                    pub_ready, go, pub_result, 1, pool, boundary))
            pub.start()
            if not pub_ready.wait(120):
                raise RuntimeError("the publisher process did not start")
            reader = _open_store(spec)
            pids = {"broker": broker.pid, "publisher": pub.pid,
                    **{f"replica-{i}": p.pid for i, p in enumerate(procs)}}
            if pg is not None:
                pids["postgres"] = pg.pid
            cpu0 = {k: _cpu_tree(v) for k, v in pids.items() if v}
            t0 = time.perf_counter()
            go.set()
            deadline = time.monotonic() + timeout_s
            while reader.count() < messages and time.monotonic() < deadline:
                time.sleep(0.005)
            elapsed = time.perf_counter() - t0
            cpu = {k: _cpu_tree(v) - cpu0[k] for k, v in pids.items() if v}
            ids = device_ids(devices)
            expected = {(ids[i % devices], 1, i) for i in range(messages)}
            stored = reader.sample_keys()
            reader.close()
            stop.set()
            counters = sorted((result.get(timeout=60) for _ in procs),
                              key=lambda c: c["index"])
            pub.join(30)
    finally:
        stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        if pg is not None:
            pg.stop()
    missing = len(expected - stored)
    assert not missing and stored == expected, f"{missing} of {messages} missing from the store"
    replica_cpu = sum(v for k, v in cpu.items() if k.startswith("replica"))
    out = {
        "store": store_kind, "replicas": replicas, "messages": messages, "devices": devices,
        "validation": validation, "model": model or "synthetic", "boundary": boundary,
        "shape": list(shape), "seconds": elapsed, "messages_per_s": messages / elapsed,
        "lost": missing, "stored_per_replica": [c["stored"] for c in counters],
        "duplicates": sum(c["duplicates"] for c in counters),
        "cpu_s": cpu, "replica_cpu_us_per_msg": 1e6 * replica_cpu / messages,
        "postgres_cpu_us_per_msg": 1e6 * cpu.get("postgres", 0.0) / messages,
        "broker_cpu_us_per_msg": 1e6 * cpu.get("broker", 0.0) / messages,
        "publisher_cpu_us_per_msg": 1e6 * cpu.get("publisher", 0.0) / messages,
        "cores": os.cpu_count(),
    }
    log.info("%s x%d: %.0f msg/s", store_kind, replicas, out["messages_per_s"])
    return out


def _cpu_tree(pid: int) -> float:
    """CPU seconds of a process and its children (PostgreSQL's backends are children)."""
    total = 0.0
    try:
        total += cpu_seconds(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    for child in _children(pid):
        total += _cpu_tree(child)
    return total


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ValueError):
            continue
    return out
