"""The device's telemetry: one ``stats`` message (agent/wire/control.py ``Stats``) gathered
from the agent's parts, published every ``stats_interval_s`` and once more on the way out,
with the level gauges (queue depths, spool) refreshed at the same moment."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from agent.infer.frames import BadInputs
from agent.infer.pipeline import Pipeline, RunnerSlot
from agent.infer.split_client import SplitClient
from agent.metrics import AgentMetrics
from agent.mqtt.link import Link
from agent.mqtt.spool import Spool
from agent.wire.control import Stats


class Relay(Protocol):
    """A chain stage (agent/infer/chain.py) as far as telemetry reads it."""

    stats: dict[str, int]


@dataclass(frozen=True)
class StatsSources:
    """Everything a stats message reads. ``uplink_counts`` is a function because a reload
    replaces the uplink policy (and its counters) while the agent runs."""

    metrics: AgentMetrics
    slot: RunnerSlot
    link: Link
    spool: Spool
    pipeline: Pipeline
    bad_inputs: BadInputs
    uplink_counts: Callable[[], Mapping[str, Any]]
    split: SplitClient
    chain: Relay | None = None


class StatsReporter:
    """Builds and publishes the ``stats`` message; ``due`` paces it on the supervisor."""

    def __init__(self, sources: StatsSources, topic: str) -> None:
        self.sources = sources
        self.topic = topic
        self._next = time.monotonic()  # the first tick publishes at once

    def snapshot(self) -> dict[str, Any]:
        """The fields of the message (the metrics' rates cover the time since the last)."""
        s = self.sources
        snap = s.metrics.snapshot()
        snap.update({
            "model_version": s.slot.current.version,
            "session": s.link.session,
            "queue_depth": s.pipeline.depths(),
            "spool_bytes": s.spool.bytes, "spool_records": len(s.spool),
            "spool_dropped": s.spool.dropped_oldest + s.spool.dropped_newest,
            "link": dict(s.link.stats), "bad_inputs": dict(s.bad_inputs.counts),
            "uplink": dict(s.uplink_counts()),
            "split": s.split.counts().as_dict(),
            **({"chain": dict(s.chain.stats)} if s.chain is not None else {}),
            "network": s.link.meter.snapshot(),  # agent/mqtt/netmeter.py
            "time": time.time(),
        })
        return snap

    def message(self) -> Stats:
        """``snapshot()`` as the typed message the trainer and dashboards parse."""
        return Stats.model_validate(self.snapshot())

    def publish(self) -> bool:
        """Refresh the level gauges and publish one message (QoS 0); False when offline."""
        s = self.sources
        for stage, depth in s.pipeline.depths().items():
            s.metrics.queue_depth.labels(stage).set(depth)
        s.metrics.spool_bytes.set(s.spool.bytes)
        s.metrics.spool_records.set(len(s.spool))
        return s.link.publish(self.topic, self.message().payload())

    def due(self, now: float, interval_s: float) -> bool:
        """True once per ``interval_s`` of ``time.monotonic()`` (the caller then publishes)."""
        if now < self._next:
            return False
        self._next = now + interval_s
        return True
