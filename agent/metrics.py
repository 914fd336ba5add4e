"""The agent's Prometheus metrics and the JSON snapshot it publishes on ``stats``.

A dedicated ``CollectorRegistry`` (not the process-global one) so that several agents in one
process — the fleet benchmark, the tests — keep separate counts.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class FrameLatencies:
    """The partition's and each block's latency histograms and the frame count, fed once
    per frame by the inference thread and exported as ordinary Prometheus families.

    Why not ``prometheus_client.Histogram``: every ``observe`` takes its own lock and walks
    the buckets in Python, and a labelled child costs a lookup; with five blocks that was
    about 25 us per frame, a seventh of the vision student's whole inference time. Here a
    frame is one list append under one lock; the buckets are counted for many frames at
    once with numpy (:meth:`fold`), every ``FOLD_EVERY`` frames and whenever someone reads.
    """

    FOLD_EVERY = 1024

    def __init__(self, buckets: Sequence[float]) -> None:
        self._bounds = tuple(float(b) for b in buckets)
        self._edges = np.asarray(self._bounds)
        self._lock = threading.Lock()
        self._pending: list[tuple[float, Sequence[int], Sequence[float]]] = []
        self._counts = np.zeros(len(self._bounds) + 1, np.int64)  # the last slot is +Inf
        self._sum = 0.0
        self._blocks: dict[int, list[float]] = {}  # counts..., then the sum in the last slot
        self._folded = 0

    @property
    def frames(self) -> int:
        with self._lock:
            return self._folded + len(self._pending)

    def observe(self, seconds: float, blocks: Sequence[int] = (),
                timings: Sequence[float] = ()) -> None:
        with self._lock:
            pending = self._pending
            pending.append((seconds, blocks, timings))
            if len(pending) < self.FOLD_EVERY:
                return
        self.fold()

    def fold(self) -> None:
        """Count the frames observed since the last fold into the histograms."""
        with self._lock:
            pending, self._pending = self._pending, []
            if not pending:
                return
            seconds = np.fromiter((p[0] for p in pending), np.float64, len(pending))
            self._counts += self._histogram(seconds)
            self._sum += float(seconds.sum())
            self._folded += len(pending)
            start = 0  # runs of frames that went through the same blocks (a swap splits)
            for i in range(1, len(pending) + 1):
                if i == len(pending) or pending[i][1] is not pending[start][1]:
                    self._fold_blocks(pending[start:i])
                    start = i

    def _histogram(self, values: np.ndarray) -> np.ndarray:
        # side="left" is "le": a value equal to a bound counts in that bound's bucket
        slots = np.searchsorted(self._edges, values, side="left")
        return np.bincount(slots, minlength=len(self._bounds) + 1)

    def _fold_blocks(self, run: list[tuple[float, Sequence[int], Sequence[float]]]) -> None:
        blocks = run[0][1]
        width = len(blocks)
        if not width:
            return
        rows = [t for _s, _b, t in run if len(t) == width]  # a failed run times fewer
        if not rows:
            return
        table = np.asarray(rows, np.float64)
        for col, block in enumerate(blocks):
            row = self._blocks.setdefault(block, [0.0] * (len(self._bounds) + 2))
            for slot, n in enumerate(self._histogram(table[:, col]).tolist()):
                row[slot] += n
            row[-1] += float(table[:, col].sum())

    def _buckets(self, counts: Sequence[float]) -> list[tuple[str, float]]:
        out, total = [], 0.0
        for bound, n in zip((*self._bounds, float("inf")), counts):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out

    def collect(self) -> Iterator[Metric]:
        self.fold()
        with self._lock:
            counts, total_sum, frames = self._counts.tolist(), self._sum, self._folded
            blocks = {b: list(row) for b, row in self._blocks.items()}
        yield HistogramMetricFamily("knet_inference_seconds",
                                    "Inference latency of the partition",
                                    buckets=self._buckets(counts), sum_value=total_sum)
        per_block = HistogramMetricFamily("knet_block_inference_seconds",
                                          "Inference latency of one block", labels=["block"])
        for block in sorted(blocks):
            row = blocks[block]
            per_block.add_metric([str(block)], self._buckets(row[:-1]), row[-1])
        yield per_block
        yield CounterMetricFamily("knet_frames", "Inputs run through the partition",
                                  value=frames)


class AgentMetrics:
    """Every metric of one agent, plus the recent-window figures for the ``stats`` topic."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latencies = FrameLatencies(_LATENCY_BUCKETS)
        r.register(self.latencies)  # knet_inference_seconds, knet_block_..., knet_frames
        self.uplinked = Counter("knet_uplinked_samples", "Inputs whose activations were queued "
                                "for the trainer", registry=r)
        self.bytes_out = Counter("knet_bytes_out", "Bytes acknowledged by the broker", registry=r)
        self.queue_depth = Gauge("knet_queue_depth", "Items waiting per pipeline stage",
                                 ["stage"], registry=r)
        self.spool_bytes = Gauge("knet_spool_bytes", "Bytes waiting in the spool", registry=r)
        self.spool_records = Gauge("knet_spool_records", "Messages waiting in the spool",
                                   registry=r)
        self.publish_failures = Counter("knet_publish_failures", "Publishes not acknowledged",
                                        ["reason"], registry=r)
        self.bad_inputs = Counter("knet_bad_inputs", "Inputs skipped", ["reason"], registry=r)
        self.update_events = Counter("knet_update_events", "Block update outcomes", ["outcome"],
                                     registry=r)
        self.accuracy = Gauge("knet_accuracy", "Top-1 accuracy on labelled inputs, recent window",
                              registry=r)
        self.accuracy.set_function(lambda: self.recent_accuracy() or 0.0)
        self.model_version = Gauge("knet_model_version", "Active partition version", registry=r)
        self._lock = threading.Lock()
        self._recent: collections.deque[float] = collections.deque(maxlen=2048)
        self._hits: collections.deque[bool] = collections.deque(maxlen=256)
        self._hits_true = 0  # the True entries of _hits, kept as it slides
        self._frames_at_snapshot = 0
        self._bytes_at_snapshot = 0.0
        self._t_snapshot = time.monotonic()
        self.scored = self.correct = 0

    @property
    def frames_total(self) -> int:
        return self.latencies.frames

    def observe_inference(self, seconds: float, correct: bool | None = None,
                          blocks: Sequence[int] = (), timings: Sequence[float] = ()) -> None:
        """One input through the partition (end to end), with each block's seconds
        (``timings[i]`` for block ``blocks[i]``). Called per frame: keep it cheap."""
        self.latencies.observe(seconds, blocks, timings)
        self._recent.append(seconds)  # a deque append is atomic; snapshot() copies it
        if correct is not None:
            self.observe_result(correct)

    def observe_result(self, correct: bool) -> None:
        """A scored prediction: local, or the cloud's answer to a split request."""
        with self._lock:
            hits = self._hits
            if len(hits) == hits.maxlen:
                self._hits_true -= hits[0]
            hits.append(correct)
            self._hits_true += correct
            self.scored += 1
            self.correct += correct

    def recent_accuracy(self) -> float | None:
        with self._lock:
            return self._hits_true / len(self._hits) if self._hits else None

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value from this registry (0 when never set)."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def _by_label(self, metric: Counter | Gauge, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for family in metric.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                out[sample.labels[label]] = sample.value
        return out

    def snapshot(self) -> dict[str, Any]:
        """Rates since the previous snapshot, recent latency percentiles, current levels."""
        bytes_out = self.value("knet_bytes_out_total")
        with self._lock:
            now = time.monotonic()
            dt = max(1e-9, now - self._t_snapshot)
            fps = (self.frames_total - self._frames_at_snapshot) / dt
            bytes_rate = (bytes_out - self._bytes_at_snapshot) / dt
            self._frames_at_snapshot, self._t_snapshot = self.frames_total, now
            self._bytes_at_snapshot = bytes_out
        lat = sorted(self._copy_recent())
        pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3) if lat else None
        return {
            "fps": round(fps, 2),
            "frames": self.frames_total,
            "latency_ms_p50": round(pct(0.5), 3) if pct else None,
            "latency_ms_p95": round(pct(0.95), 3) if pct else None,
            "accuracy": self.recent_accuracy(),
            "accuracy_total": self.correct / self.scored if self.scored else None,
            "bytes_out": int(bytes_out),
            "bytes_out_per_s": round(bytes_rate, 1),
            "queue_depth": {k: int(v) for k, v in self._by_label(self.queue_depth,
                                                                 "stage").items()},
            "spool_bytes": int(self.value("knet_spool_bytes")),
            "spool_records": int(self.value("knet_spool_records")),
            "bad_inputs": {k: int(v) for k, v in self._by_label(self.bad_inputs,
                                                                "reason").items()},
        }

    def _copy_recent(self) -> list[float]:
        # The inference thread appends without a lock; copying a deque that grows under
        # us can raise RuntimeError, so retry (a few appends per copy at most).
        for _ in range(10):
            try:
                return list(self._recent)
            except RuntimeError:
                continue
        return []

    def start_http(self, port: int, addr: str = "127.0.0.1") -> int:
        """Start the /metrics endpoint; returns the bound port (useful with port 0)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(server.server_port)

    serve = start_http  # the name agent.service uses
