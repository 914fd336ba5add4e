"""`knet bench ingest`: end-to-end ingest throughput, broker to committed rows, zero loss.

A private Mosquitto on loopback, an ``Ingestor`` writing a ``SQLiteSampleStore``, and a
publisher in a separate process (so its CPU is not the ingestor's) with one MQTT connection
per simulated device, each sending realistic activation envelopes at QoS 1 as fast as the
broker takes them. The clock runs from the first publish to the moment the last sample is
committed (and therefore acknowledged); the run fails unless the store then holds exactly
the (device, session, seq) set that was sent.

With ``batch`` > 1 the publisher sends version-2 batch envelopes of ``batch`` samples each
(one codec frame of shape (batch, ...), consecutive seqs per device): the count, the clock
and the zero-loss check are then in samples.

By default the activations are synthetic but shaped like real ones: post-ReLU feature maps
of a small CNN (about half zeros, spatially smooth), which is what makes uint8+lz4 compress.
With ``model`` (``--model effnet-lite0``) they are the zoo student's own activations at a
boundary, computed on onnxruntime from the model's held-out inputs (real photos for
effnet-lite0) as a device computes them, and the publisher sends those, cycling through them.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FLEET = "bench"
DEFAULT_SHAPE = (1, 32, 12, 12)


def activation(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A post-ReLU-looking activation: smooth per-channel maps, about half zeros."""
    n, c, h, w = shape
    coarse = rng.standard_normal((n, c, (h + 1) // 2, (w + 1) // 2)).astype(np.float32)
    fine = coarse.repeat(2, axis=2).repeat(2, axis=3)[:, :, :h, :w]
    fine += 0.25 * rng.standard_normal(fine.shape).astype(np.float32)
    return np.maximum(fine * rng.uniform(0.5, 2.0, (1, c, 1, 1)).astype(np.float32), 0)


def model_activations(model: str, boundary: int, workdir: Path,
                      samples: int = 256) -> np.ndarray:
    """The zoo student's activations at ``boundary`` for ``samples`` held-out inputs, one
    input at a time on onnxruntime as on a device: what a real fleet of this model uplinks."""
    from agent.infer.profiles import load_profile
    from agent.infer.runtime import BlockRunner
    from cloud_trainer.models.export import export_partition
    from cloud_trainer.training.train import model_inputs, trained_pair

    student = trained_pair(model).student.eval()
    manifest = export_partition(student, workdir, model_id=model, model_version=1)
    if not manifest.first <= boundary < manifest.last:
        raise ValueError(f"{model} has boundaries {manifest.first}..{manifest.last - 1}, "
                         f"not {boundary}")
    runner = BlockRunner(manifest, workdir, load_profile("x86-dev"))
    x = model_inputs(model, samples)
    return np.concatenate([runner.run(x[i:i + 1], upto=boundary)[-1].copy()
                           for i in range(len(x))])


@functools.cache
def _pooled_activations(model: str, boundary: int) -> np.ndarray:
    """``model_activations`` once per process: a command's rows share one pool (computing
    it exports the partition and runs 256 inputs, 10-15 s on effnet-lite0)."""
    with tempfile.TemporaryDirectory(prefix="knet-bench-pool-") as tmp:
        return model_activations(model, boundary, Path(tmp))


def activation_pool(model: str | None, boundary: int, workdir: Path,
                    shape: tuple[int, ...]) -> tuple[Path | None, int, tuple[int, ...]]:
    """(pool file for the publisher, boundary, sample shape): ``model``'s activations saved
    under ``workdir``, or no pool (synthetic maps of ``shape`` on boundary 1)."""
    if model is None:
        return None, 1, shape
    acts = _pooled_activations(model, boundary)
    pool = workdir / "activations.npy"
    np.save(pool, acts)
    return pool, boundary, (1, *acts.shape[1:])


class Activations:
    """Where the publisher's samples come from: a pool of real activations (cycled) or, with
    no pool, synthetic maps of ``shape``."""

    def __init__(self, shape: tuple[int, ...], pool: Path | None = None, seed: int = 0):
        self.pool = None if pool is None else np.load(pool)
        self.shape = shape if self.pool is None else (1, *self.pool.shape[1:])
        self._rng = np.random.default_rng(seed)
        self._next = 0

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` samples as one (n, ...) array."""
        if self.pool is None:
            return activation(self._rng, (n, *self.shape[1:]))
        idx = np.arange(self._next, self._next + n) % len(self.pool)
        self._next = int(idx[-1]) + 1
        return np.ascontiguousarray(self.pool[idx])


# The ingest process's threads by role (their names), for the CPU split of the result.
_THREAD_ROLES = (("paho-mqtt-client", "network"), ("ingest-writer", "writer"),
                 ("knet-store-checkpoint", "checkpoint"))


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's live threads by role (network: paho's thread, which
    also validates; writer; checkpoint; other), read from /proc: each thread's own clock,
    so waiting on the GIL, a lock or the network costs nothing. Empty off Linux."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for t in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{t.native_id}/stat").read_text().rsplit(")", 1)[1]
        except (OSError, IndexError):
            continue  # not Linux, or the thread just ended
        utime, stime = fields.split()[11:13]
        role = next((r for prefix, r in _THREAD_ROLES if t.name.startswith(prefix)), "other")
        out[role] = out.get(role, 0.0) + (int(utime) + int(stime)) / tick
    return out


def device_ids(devices: int) -> list[str]:
    return [f"bench-{i:03d}" for i in range(devices)]


def _batch_work(messages: int, codec: str, devices: int, source: Activations, batch: int,
                boundary: int) -> tuple[list[tuple[int, str, bytes]], int]:
    """Version-2 envelopes carrying sample i (device i % devices, seq i) for every i, each
    device's samples in batches of ``batch``; and their total frame bytes."""
    from agent.wire.codec import encode
    from agent.wire.envelope import BatchEnvelope
    from agent.wire.topics import Topics

    topics = Topics(FLEET)
    frames = [encode(source.take(batch), codec) for _ in range(8)]
    ids = device_ids(devices)
    per_device = [list(range(k, messages, devices)) for k in range(devices)]
    chunks = [(k, seqs[j:j + batch]) for j in range(0, max(map(len, per_device)), batch)
              for k, seqs in enumerate(per_device) if seqs[j:j + batch]]
    work, frame_bytes = [], 0
    for m, (k, seqs) in enumerate(chunks):
        n = len(seqs)
        frame = frames[m % len(frames)] if n == batch else encode(source.take(n), codec)
        table = BatchEnvelope.table(seqs, [time.time()] * n, seqs, [s % 10 for s in seqs],
                                    [s % 10 for s in seqs], [0.9] * n)
        env = BatchEnvelope(device=ids[k], session=1, model_version=1, boundary=boundary,
                            samples=table, payload=frame, meta={"model": "bench"})
        work.append((k, topics.act(ids[k]), env.pack()))
        frame_bytes += len(frame)
    return work, frame_bytes


def _publisher(port: int, messages: int, codec: str, devices: int, shape: tuple[int, ...],
               ready: Any, go: Any, result: Any, batch: int = 1, pool: Path | None = None,
               boundary: int = 1) -> None:
    """Child process: pre-build every envelope, then publish them all at QoS 1."""
    from agent.mqtt.client import make_client
    from agent.mqtt.endpoint import MqttEndpoint
    from agent.wire.codec import encode
    from agent.wire.envelope import Envelope
    from agent.wire.topics import Topics

    topics = Topics(FLEET)
    source = Activations(shape, pool)
    frames = [encode(source.take(1), codec) for _ in range(64)]
    ids = device_ids(devices)
    work: list[tuple[int, str, bytes]] = []
    payload_bytes = sum(len(frames[i % len(frames)]) for i in range(messages))
    if batch > 1:
        work, payload_bytes = _batch_work(messages, codec, devices, source, batch, boundary)
    for i in range(messages if batch == 1 else 0):
        dev = ids[i % devices]
        env = Envelope(device=dev, session=1, seq=i, timestamp=time.time(), model_version=1,
                       boundary=boundary, payload=frames[i % len(frames)], label=i % 10,
                       prediction=i % 10, confidence=0.9,
                       meta={"model": "bench", "index": i})  # as agent/service.py sends
        work.append((i % devices, topics.act(dev), env.pack()))
    clients = []
    for dev in ids:
        c = make_client(MqttEndpoint(port=port), default_client_id=f"pub-{dev}")
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.start()
        if not c.wait_connected(30):
            raise ConnectionError(f"publisher {dev}: no broker on port {port}")
        clients.append(c)
    ready.set()
    go.wait()
    t0 = time.perf_counter()
    infos = [clients[k].publish(topic, data, qos=1) for k, topic, data in work]
    for info in infos:
        info.wait_for_publish(120)
    elapsed = time.perf_counter() - t0
    for c in clients:
        c.stop()
    result.put({"publish_s": elapsed, "envelope_bytes": sum(len(d) for _, _, d in work),
                "envelopes": len(work), "payload_bytes": payload_bytes,
                "frame_bytes_mean": payload_bytes / messages})


def run_ingest_bench(messages: int = 20_000, payload_codec: str = "uint8+lz4",
                     devices: int = 4, workdir: Path | None = None,
                     shape: tuple[int, ...] = DEFAULT_SHAPE, validation: str = "decode",
                     batch_size: int = 512, receive_maximum: int = 1000,
                     timeout_s: float = 300.0, batch: int = 1, model: str | None = None,
                     boundary: int = 2, page_size: int | None = None) -> dict[str, Any]:
    """Ingest ``messages`` samples from ``devices`` publishers (``batch`` per envelope);
    figures as a dict. With ``model`` the samples are that zoo student's activations at
    ``boundary`` (``shape`` is then theirs), else synthetic maps of ``shape`` on boundary 1.
    ``page_size``: the new store file's SQLite page size (None: the store's default).

    Raises AssertionError when anything sent is missing from the store (zero loss is part
    of the result, not an afterthought).
    """
    from agent.wire.topics import Topics
    from broker.launcher import Mosquitto
    from cloud_trainer.ingest.ingestor import Ingestor, IngestSettings
    from cloud_trainer.ingest.store import PAGE_SIZE, SQLiteSampleStore

    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="knet-bench-ingest-") as tmp:
            return run_ingest_bench(messages, payload_codec, devices, Path(tmp), shape,
                                    validation, batch_size, receive_maximum, timeout_s, batch,
                                    model, boundary, page_size)
    workdir = Path(workdir)
    pool, boundary, shape = activation_pool(model, boundary, workdir, shape)
    ctx = mp.get_context("spawn")
    ready, go, result = ctx.Event(), ctx.Event(), ctx.Queue()
    with Mosquitto(workdir / "broker") as broker:
        store = SQLiteSampleStore(workdir / "store", page_size=page_size or PAGE_SIZE)
        settings = IngestSettings(port=broker.port, client_id="bench-ingest",
                                  validation=validation,  # type: ignore[arg-type]
                                  batch_size=batch_size, receive_maximum=receive_maximum,
                                  expected_shapes={boundary: shape})
        proc = ctx.Process(target=_publisher, daemon=True,
                           args=(broker.port, messages, payload_codec, devices, shape,
                                 ready, go, result, batch, pool, boundary))
        try:
            with Ingestor(settings, Topics(FLEET), store) as ing:
                proc.start()
                if not ready.wait(120):
                    raise RuntimeError("the publisher process did not start")
                max_depth = 0
                t0, cpu0, threads0 = time.perf_counter(), time.process_time(), thread_cpu()
                go.set()
                deadline = time.monotonic() + timeout_s
                while ing.stats.stored + ing.stats.duplicates < messages:
                    if time.monotonic() > deadline or ing.stats.bad_total:
                        break
                    max_depth = max(max_depth, ing.queue_depth)
                    time.sleep(0.002)
                elapsed = time.perf_counter() - t0
                cpu = time.process_time() - cpu0  # the ingestor's threads (and this poll)
                threads = {role: (sec - threads0.get(role, 0.0)) / messages * 1e6
                           for role, sec in thread_cpu().items()}
                pub = result.get(timeout=120)
                metrics = ing.metrics()
            proc.join(30)
            ids = device_ids(devices)
            expected = {(ids[i % devices], 1, i) for i in range(messages)}
            stored = store.sample_keys()
            missing = len(expected - stored)
            assert not missing and stored == expected, (
                f"{missing} of {messages} messages missing from the store; bad: "
                f"{metrics['bad']}")
            stats = store.stats()
        finally:
            if proc.is_alive():
                proc.kill()
            store.close()
    raw_bytes = 4 * int(np.prod(shape)) * messages
    out = {
        "messages": messages,
        "batch": batch,
        "envelopes": pub["envelopes"],
        "samples_per_s": messages / elapsed,
        "envelopes_per_s": pub["envelopes"] / elapsed,
        "devices": devices,
        "codec": payload_codec,
        "model": model or "synthetic",
        "boundary": boundary,
        "shape": list(shape),
        "validation": validation,
        "page_size": stats["page_size"],
        "batch_size": batch_size,
        "receive_maximum": receive_maximum,
        "seconds": elapsed,
        # CPU of the ingest process per sample: what predicts the rate on a free core
        "ingest_cpu_us_per_sample": cpu / messages * 1e6,
        # ... split by thread (10 ms clock ticks): where to look for the next cut
        "thread_cpu_us_per_sample": threads,
        "messages_per_s": messages / elapsed,
        "mb_per_s_wire": pub["envelope_bytes"] / elapsed / 1e6,
        "mb_per_s_payload": pub["payload_bytes"] / elapsed / 1e6,
        "mb_per_s_float32_equivalent": raw_bytes / elapsed / 1e6,
        "publish_s": pub["publish_s"],
        "envelope_bytes_mean": pub["envelope_bytes"] / pub["envelopes"],
        "frame_bytes_mean": pub["frame_bytes_mean"],
        "compression_ratio": 4 * int(np.prod(shape)) / pub["frame_bytes_mean"],
        "stored": stats["samples"],
        "lost": 0,
        "duplicates": metrics["duplicates"],
        "batches": metrics["batches"],
        "mean_batch": messages / max(1, metrics["batches"]),
        "max_queue_depth": max_depth,
        "store_file_bytes": stats["file_bytes"],
    }
    log.info("ingest bench: %.0f msg/s, %.1f MB/s on the wire", out["messages_per_s"],
             out["mb_per_s_wire"])
    return out
