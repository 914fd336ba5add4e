"""The trainer's Prometheus metrics (``[metrics] prometheus_port``), read at scrape time.

One collector over the daemon's live state rather than counters sprinkled through the hot
paths: ingest already counts per message (``IngestStats``, one thread each), the store keeps
per-device totals, and runs, gate scores and update reports are rows; a scrape reads them
once. A dedicated ``CollectorRegistry`` (as the agent's ``agent/metrics.py``), so two trainers
in one test process keep apart. Every family is ``knet_trainer_*``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class TrainerCollector(Collector):
    """Everything a dashboard needs from one ``TrainerService``; a failing part is skipped
    (logged) so one locked table never empties the whole scrape."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        for part in (self._ingest, self._store, self._runs, self._models, self._process):
            try:
                yield from part()
            except Exception:
                log.warning("metrics: %s failed", part.__name__, exc_info=True)

    def _ingest(self) -> Iterator[Metric]:
        ing = self.service.ingestor
        if ing is None:
            return
        st = ing.stats
        msgs = CounterMetricFamily("knet_trainer_ingest_messages",
                                   "Activations received, by what became of them",
                                   labels=["outcome"])
        for outcome, value in (("stored", st.stored), ("duplicate", st.duplicates),
                               ("rejected", st.rejected),
                               ("other_replica", getattr(st, "other_replica", 0))):
            msgs.add_metric([outcome], value)
        yield msgs
        rejected = CounterMetricFamily("knet_trainer_ingest_rejected",
                                       "Device messages refused, by reason", labels=["reason"])
        by_reason: Tally[str] = Tally()
        for reasons in st.bad_snapshot().values():
            by_reason.update(reasons)
        for reason, n in sorted(by_reason.items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily("knet_trainer_ingest_bytes", "Activation bytes committed",
                                  value=st.bytes_committed)
        yield CounterMetricFamily("knet_trainer_ingest_store_errors",
                                  "Store writes that failed (retried, nothing acked)",
                                  value=st.store_errors)
        yield GaugeMetricFamily("knet_trainer_ingest_queue_depth",
                                "Received messages waiting for their commit",
                                value=ing.queue_depth)
        lag = getattr(st, "lag_s", None)
        if lag is not None:
            yield GaugeMetricFamily("knet_trainer_ingest_lag_seconds",
                                    "Commit time minus the newest envelope's device "
                                    "timestamp, last batch (device clock skew included)",
                                    value=lag)
        last = getattr(st, "last_commit", 0.0)
        if last:
            yield GaugeMetricFamily("knet_trainer_ingest_last_commit_age_seconds",
                                    "Seconds since the last stored batch",
                                    value=time.time() - last)

    def _store(self) -> Iterator[Metric]:
        store = getattr(self.service, "store", None)
        if store is None:
            return
        rows, size = store.totals()
        yield GaugeMetricFamily("knet_trainer_store_rows", "Samples in the store", value=rows)
        yield GaugeMetricFamily("knet_trainer_store_bytes", "Payload bytes in the store",
                                value=size)

    def _runs(self) -> Iterator[Metric]:
        runs = getattr(self.service, "runs", None)
        if runs is None:
            return
        fam = CounterMetricFamily("knet_trainer_runs", "Retraining runs by outcome",
                                  labels=["job", "status"])
        for (job, status), n in sorted(runs.status_counts().items()):
            fam.add_metric([job, status], n)
        yield fam

    def _models(self) -> Iterator[Metric]:
        registry = getattr(self.service, "registry", None)
        if registry is None:
            return
        gate = GaugeMetricFamily("knet_trainer_gate_score",
                                 "Last gated version's scores (points, 0..100)",
                                 labels=["model", "version", "which"])
        deployed = GaugeMetricFamily("knet_trainer_deployed_version",
                                     "Version pushed to the fleet", labels=["model"])
        reports = GaugeMetricFamily("knet_trainer_rollout_devices",
                                    "Devices' last update report for the deployed version",
                                    labels=["model", "version", "status"])
        for model_id in self.service.models:
            gated = [v for v in registry.versions(model_id) if "gate" in v.scores]
            if gated:
                g = gated[-1].scores["gate"]
                for which in ("candidate_score", "deployed_score", "delta"):
                    if isinstance(g.get(which), int | float):
                        gate.add_metric([model_id, str(gated[-1].version),
                                         which.removesuffix("_score")], float(g[which]))
            v = registry.deployed(model_id)
            if v is None:
                continue
            deployed.add_metric([model_id], v.version)
            counts = Tally(r.status for r in self.service.runs.reports(model_id,
                                                                       v.version).values())
            for status, n in sorted(counts.items()):
                reports.add_metric([model_id, str(v.version), status], n)
        yield gate
        yield deployed
        yield reports

    def _process(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("knet_trainer_leader",
                                "1 when this replica runs the scheduler",
                                value=1.0 if self.service.is_leader else 0.0)
        yield GaugeMetricFamily("knet_trainer_devices_online", "Devices whose state is online",
                                value=len(self.service.fleet.online()))


class MetricsEndpoint:
    """The ``/metrics`` endpoint as a part of the daemon (start/stop: a Subsystem)."""

    def __init__(self, service: Any, port: int, bind: str) -> None:
        self.service, self.bind = service, bind
        self.port: int | None = None  # the port bound, once started (0 asks for any)
        self._requested = port
        self._server: Any = None

    def start(self) -> MetricsEndpoint:
        self._server, self.port = serve(self.service, self._requested, self.bind)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()


def serve(service: Any, port: int, bind: str) -> tuple[Any, int]:
    """Start the endpoint on its own thread; returns (server, the port actually bound)."""
    registry = CollectorRegistry()
    registry.register(TrainerCollector(service))
    server, _thread = start_http_server(port, addr=bind, registry=registry)
    bound = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", bind, bound)
    return server, bound
