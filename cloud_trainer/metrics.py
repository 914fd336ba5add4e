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

# Every family the trainer exports: name -> (type, help, labels). One table, so that the
# Grafana dashboard's test (tests/test_grafana.py) checks its queries against what a scrape
# can return, and the scrape test checks that nothing is exported outside it.
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "knet_trainer_ingest_messages": (
        "counter", "Activations received, by what became of them", ("outcome",)),
    "knet_trainer_ingest_rejected": (
        "counter", "Device messages refused, by reason", ("reason",)),
    "knet_trainer_ingest_bytes": ("counter", "Activation bytes committed", ()),
    "knet_trainer_ingest_store_errors": (
        "counter", "Store writes that failed (retried, nothing acked)", ()),
    "knet_trainer_ingest_queue_depth": (
        "gauge", "Received messages waiting for their commit", ()),
    "knet_trainer_ingest_lag_seconds": (
        "gauge", "Commit time minus the newest envelope's device timestamp, last batch "
        "(device clock skew included)", ()),
    "knet_trainer_ingest_last_commit_age_seconds": (
        "gauge", "Seconds since the last stored batch", ()),
    "knet_trainer_store_rows": ("gauge", "Samples in the store", ()),
    "knet_trainer_store_bytes": ("gauge", "Payload bytes in the store", ()),
    "knet_trainer_runs": ("counter", "Retraining runs by outcome", ("job", "status")),
    "knet_trainer_gate_score": (
        "gauge", "Last gated version's scores (points, 0..100)", ("model", "version", "which")),
    "knet_trainer_deployed_version": ("gauge", "Version pushed to the fleet", ("model",)),
    "knet_trainer_rollout_devices": (
        "gauge", "Devices' last update report for the deployed version",
        ("model", "version", "status")),
    "knet_trainer_leader": ("gauge", "1 when this replica runs the scheduler", ()),
    "knet_trainer_devices_online": ("gauge", "Devices whose state is online", ()),
}


def family(name: str, value: float | None = None) -> CounterMetricFamily | GaugeMetricFamily:
    """A family from ``FAMILIES``: labelled when it has labels, else with ``value``."""
    kind, doc, labels = FAMILIES[name]
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    if labels:
        return cls(name, doc, labels=list(labels))
    return cls(name, doc, value=value)


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
        msgs = family("knet_trainer_ingest_messages")
        for outcome, value in (("stored", st.stored), ("duplicate", st.duplicates),
                               ("rejected", st.rejected),
                               ("other_replica", getattr(st, "other_replica", 0))):
            msgs.add_metric([outcome], value)
        yield msgs
        rejected = family("knet_trainer_ingest_rejected")
        by_reason: Tally[str] = Tally()
        for reasons in st.bad_snapshot().values():
            by_reason.update(reasons)
        for reason, n in sorted(by_reason.items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield family("knet_trainer_ingest_bytes", st.bytes_committed)
        yield family("knet_trainer_ingest_store_errors", st.store_errors)
        yield family("knet_trainer_ingest_queue_depth", ing.queue_depth)
        lag = getattr(st, "lag_s", None)
        if lag is not None:
            yield family("knet_trainer_ingest_lag_seconds", lag)
        last = getattr(st, "last_commit", 0.0)
        if last:
            yield family("knet_trainer_ingest_last_commit_age_seconds", time.time() - last)

    def _store(self) -> Iterator[Metric]:
        store = getattr(self.service, "store", None)
        if store is None:
            return
        rows, size = store.totals()
        yield family("knet_trainer_store_rows", rows)
        yield family("knet_trainer_store_bytes", size)

    def _runs(self) -> Iterator[Metric]:
        runs = getattr(self.service, "runs", None)
        if runs is None:
            return
        fam = family("knet_trainer_runs")
        for (job, status), n in sorted(runs.status_counts().items()):
            fam.add_metric([job, status], n)
        yield fam

    def _models(self) -> Iterator[Metric]:
        registry = getattr(self.service, "registry", None)
        if registry is None:
            return
        gate = family("knet_trainer_gate_score")
        deployed = family("knet_trainer_deployed_version")
        reports = family("knet_trainer_rollout_devices")
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
        yield family("knet_trainer_leader", 1.0 if self.service.is_leader else 0.0)
        yield family("knet_trainer_devices_online", len(self.service.fleet.online()))


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
