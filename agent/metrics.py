"""The agent's Prometheus metrics and the JSON snapshot it publishes on ``stats``.

A dedicated ``CollectorRegistry`` (not the process-global one) so that several agents in one
process — the fleet benchmark, the tests — keep separate counts.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class AgentMetrics:
    """Every metric of one agent, plus the recent-window figures for the ``stats`` topic."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram("knet_inference_seconds", "Inference latency of the partition",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.block_latency = Histogram("knet_block_inference_seconds",
                                       "Inference latency of one block", ["block"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.frames = Counter("knet_frames", "Inputs run through the partition", registry=r)
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
        self.model_version = Gauge("knet_model_version", "Active partition version", registry=r)
        self._lock = threading.Lock()
        self._recent: collections.deque[float] = collections.deque(maxlen=2048)
        self._hits: collections.deque[bool] = collections.deque(maxlen=256)
        self._frames_at_snapshot = 0
        self._bytes_at_snapshot = 0.0
        self._t_snapshot = time.monotonic()
        self.frames_total = 0
        self.scored = self.correct = 0

    def observe_inference(self, seconds: float, correct: bool | None = None,
                          block_seconds: dict[int, float] | None = None) -> None:
        """One input through the partition (end to end), optionally with per-block times."""
        self.latency.observe(seconds)
        for block, dt in (block_seconds or {}).items():
            self.block_latency.labels(str(block)).observe(dt)
        self.frames.inc()
        with self._lock:
            self.frames_total += 1
            self._recent.append(seconds)
        if correct is not None:
            self.observe_result(correct)

    def observe_result(self, correct: bool) -> None:
        """A scored prediction: local, or the cloud's answer to a split request."""
        with self._lock:
            self._hits.append(correct)
            self.scored += 1
            self.correct += int(correct)
            self.accuracy.set(sum(self._hits) / len(self._hits))

    def recent_accuracy(self) -> float | None:
        with self._lock:
            return sum(self._hits) / len(self._hits) if self._hits else None

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
            lat = sorted(self._recent)
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

    def start_http(self, port: int, addr: str = "127.0.0.1") -> int:
        """Start the /metrics endpoint; returns the bound port (useful with port 0)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(server.server_port)

    serve = start_http  # the name agent.service uses
