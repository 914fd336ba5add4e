"""The knet-agent daemon: source → inference → encode → publish, plus status and health.

Runs as a systemd ``Type=notify`` service: READY once the sessions are warm, WATCHDOG only
while both the inference pipeline and the MQTT loop are healthy, STOPPING on SIGTERM (then
``stopped`` is published, the spool flushed and the process exits 0), and SIGHUP reloads
what can change without a restart (uplink policy and codec, stats interval).
"""

from __future__ import annotations

import json
import logging
import math
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple, cast

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

import agent
from agent.config import (
    AgentConfig,
    ImagesSource,
    MqttSource,
    NpzSource,
    UpstreamSource,
    load_config,
)
from agent.infer.chain import chain_stage
from agent.infer.manifest import PartitionManifest
from agent.infer.pipeline import Pipeline, RunnerSlot, Stage
from agent.infer.profiles import FirmwareProfile, load_profile
from agent.infer.runtime import BlockRunner
from agent.infer.sources import BadInputs, MqttFrames, Sample, make_source
from agent.infer.split_client import SplitClient
from agent.metrics import AgentMetrics
from agent.mqtt.batcher import Batch, Batcher
from agent.mqtt.link import Link, PublishOutcome
from agent.mqtt.spool import Spool
from agent.mqtt.uplink import UplinkPolicy
from agent.notify import Notifier, watchdog_interval
from agent.stats_reporter import StatsReporter, StatsSources
from agent.update.active import BootChoice, boot_runner, update_paths
from agent.update.canary import CanaryRecorder
from agent.update.updater import Updater
from agent.wire.codec import encode
from agent.wire.control import Birth, Stats
from agent.wire.envelope import BatchEnvelope, Envelope

log = logging.getLogger(__name__)
_LABEL = re.compile(r"-?[0-9]{1,9}")
# (topic, payload, properties, monotonic inference times of its samples: for act messages)
Message = Tuple[str, bytes, Optional[Properties], Optional[Tuple[float, ...]]]
# What a batch groups samples by: boundary, model id, model version, codec (agent/mqtt/batcher.py).
_BatchKey = Tuple[int, str, int, str]


@dataclass(frozen=True)
class Inference:
    sample: Sample
    acts: list[np.ndarray]  # boundaries first..last, batch 1; those no stage reads: empty
    runner: BlockRunner
    prediction: int | None
    confidence: float | None
    uplink: bool = False  # the uplink policy chose this input (decided in the inference stage)
    born: float = 0.0  # monotonic time of the inference: its uplink's delivery latency


# Stands in for an activation no later stage reads (an empty array: misuse fails loudly
# on its shape instead of reading another input's data).
_NOT_KEPT = np.empty(0, np.float32)


def softmax_top1(logits: np.ndarray) -> tuple[int, float]:
    """Top class and its softmax probability, 1 / sum(exp(z - z_top)). Runs once per frame:
    for a head of a few dozen classes plain floats beat numpy's per-call overhead (4 vs 9 us)."""
    if logits.size <= 64:
        z = logits.tolist()
        top = max(z)
        return z.index(top), 1.0 / sum([math.exp(v - top) for v in z])
    k = int(logits.argmax())
    return k, float(1.0 / np.exp(logits - logits[k]).sum(dtype=np.float64))


def inline_source(cfg: AgentConfig) -> bool:
    """A local replay is read on the inference thread (one hand-off less per input) when
    its pace keeps that thread beating well within the watchdog's stall limit."""
    src = cfg.source
    if not isinstance(src, (NpzSource, ImagesSource)):
        return False
    return src.rate_hz == 0 or 1 / src.rate_hz < cfg.watchdog.max_stall_s / 2


def make_policy(cfg: AgentConfig) -> UplinkPolicy:
    u = cfg.uplink
    return UplinkPolicy(every_n=u.every_n if u.enabled else 0,
                        max_samples_per_s=u.max_samples_per_s, max_bytes_per_s=u.max_bytes_per_s,
                        hard_threshold=u.hard_threshold if u.enabled else None)


class Agent:
    """One device agent. ``run()`` blocks until stopped and returns the exit status."""

    def __init__(self, config: AgentConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.device = config.device.id
        self.topics = config.topics
        self.profile: FirmwareProfile = load_profile(config.model.profile,
                                                     [config.model.profiles_dir])
        manifest = PartitionManifest.load(config.model.manifest)
        upd = config.update
        boot: BootChoice | None = None
        if upd.enabled:  # a version installed by an update, if it still verifies
            store, cache = update_paths(config.device.state_dir)
            boot = boot_runner(manifest, config.model.manifest.parent, self.profile, store,
                               cache, self.device)
            runner = boot.runner
        else:
            runner = BlockRunner(manifest, config.model.manifest.parent, self.profile)
        runner.warmup()
        runner.bound(config.model.fuse)  # built now, not on the first input
        self.slot = RunnerSlot(runner)
        self.canary = CanaryRecorder(upd.canary_inputs if upd.enabled else 0)
        self.metrics = AgentMetrics()
        self.metrics.model_version.set(runner.version)
        self.bad = BadInputs(listener=lambda reason: self.metrics.bad_inputs.labels(reason).inc())
        self.policy = make_policy(config)
        # A batch also closes at 2 MiB of float32: even raw, its message stays under the
        # trainer's default [ingest] max_payload (4 MiB) and the link's limit.
        self.batcher = Batcher(config.uplink.batch_size, config.uplink.batch_wait_s,
                               max_bytes=min(2 << 20, config.mqtt.max_payload_bytes // 2))
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self.split = SplitClient(self.topics, self.device, config.split.timeout_s,
                                 on_result=self.metrics.observe_result)
        self.notifier = Notifier()
        state_dir = config.device.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.spool = Spool(state_dir / "spool", config.spool.max_bytes, config.spool.policy)
        self.link = Link(config.mqtt, self.topics, self.device, self.spool, self.birth,
                         state_dir=state_dir, on_outcome=self._on_outcome,
                         # agent/infer/chain.py
                         manual_ack=isinstance(config.source, UpstreamSource))
        self._act_topic = self.topics.act(self.device)
        self.source = make_source(config.source, runner.input_shape, self.bad)
        q = config.pipeline.queue_size
        self.chain = chain_stage(config, runner.manifest, self.source, self.next_seq)
        relay = [Stage("chain", self.chain, q)] if self.chain is not None else []
        self._pipeline = Pipeline(self.source, [Stage("infer", self._infer, q), *relay,
                                                Stage("encode", self._encode_batch, q,
                                                      batch=q, flush=self._flush_batches,
                                                      due_in=self.batcher.due_in),
                                                Stage("publish", self._publish, q, batch=q)],
                                  inline_source=inline_source(config))
        self.reporter = StatsReporter(StatsSources(
            metrics=self.metrics, slot=self.slot, link=self.link, spool=self.spool,
            pipeline=self._pipeline, bad_inputs=self.bad, split=self.split, chain=self.chain,
            uplink_counts=lambda: self.policy.counts), self.topics.stats(self.device))
        self.updater: Updater | None = None
        self._boot_note = boot.note if boot is not None else None
        if upd.enabled:
            self.updater = Updater(
                upd, device=self.device, topics=self.topics, profile=self.profile,
                link=self.link, slot=self.slot, recorder=self.canary, store=store,
                cache=cache, session=lambda: self.link.session, on_swap=self._on_swap,
                infer_counts=self._infer_counts,
                prepare=lambda candidate: candidate.bound(config.model.fuse),
                on_event=lambda outcome: self.metrics.update_events.labels(outcome).inc(),
                local_blocks={b.sha256: config.model_dir / b.file for b in manifest.blocks})

    # --- what the device announces
    def birth(self) -> dict[str, Any]:
        runner: BlockRunner = self.slot.current
        m = runner.manifest
        return {
            "agent_version": agent.__version__, "hostname": socket.gethostname(),
            "profile": self.profile.name, "onnxruntime": self.profile.onnxruntime,
            "model_id": m.model_id, "model_version": m.model_version,
            "partition": {"first": m.first, "last": m.last, "num_blocks": m.num_blocks},
            "blocks": {str(b.index): b.sha256 for b in m.blocks},
            "providers": runner.active_providers,
            "uplink": {"boundaries": self.config.uplink.boundaries,
                       "codec": self.config.uplink.codec},
            "session": self.link.session,
        }

    def publish_birth(self) -> bool:
        """Re-announce the device (retained), e.g. after an update swapped its version."""
        body = Birth.model_validate({**self.birth(), "device": self.device, "ts": time.time()})
        return self.link.publish(self.topics.birth(self.device), body.payload(), qos=1,
                                 retain=True)

    def _on_swap(self, runner: BlockRunner) -> None:
        self.metrics.model_version.set(runner.version)
        self.publish_birth()

    def _infer_counts(self) -> tuple[int, int]:
        """(inputs inferred, inference failures) so far, for the update health watch."""
        stage = self._pipeline.stages[0]
        return stage.processed, stage.errors

    def stats_message(self) -> Stats:
        """The ``stats`` message as it would be published now (agent/stats_reporter.py)."""
        return self.reporter.message()

    def stats(self) -> dict[str, Any]:
        return self.reporter.snapshot()

    # --- pipeline stages
    def _infer(self, sample: Sample) -> Inference | None:
        """Run the partition; hand the input on only when a message will be sent for it.

        The uplink policy decides here, so the inputs it skips (most of them, usually) never
        cross to the encode thread: at sub-millisecond inference a queue hand-off per frame
        costs as much as the student itself.
        """
        runner: BlockRunner = self.slot.current  # read once: one chain per input
        chain = runner.bound(self.config.model.fuse)  # built before READY or the swap
        timings: list[float] = []
        t0 = time.perf_counter()
        if chain is not None:  # sources validated the input
            acts = chain.run(sample.x[None], timings)
        else:
            acts = runner.run(sample.x[None], checked=True, timings=timings)
        elapsed = time.perf_counter() - t0
        pred = conf = None
        m = runner.manifest
        if m.is_complete:
            pred, conf = softmax_top1(acts[-1][0])
        correct = (pred == sample.label) if pred is not None and sample.label is not None else None
        self.metrics.observe_inference(elapsed, correct, runner.blocks, timings)
        self.canary.record(sample.x, runner, conf, acts[-1])  # O(1): the update self-test
        uplink = self.policy.decide(sample.index, conf).send
        if not (uplink or (self.config.split.enabled and not m.is_complete)
                or (self.config.metrics.publish_results and pred is not None)
                or self.chain is not None):  # a chain stage relays every input
            return None
        if chain is not None:  # the bound buffers belong to the next input: copy what is read
            keep = self._kept_acts(m) if uplink else {len(acts) - 1}
            acts = [a.copy() if i in keep else _NOT_KEPT for i, a in enumerate(acts)]
        return Inference(sample, acts, runner, pred, conf, uplink, time.monotonic())

    def _kept_acts(self, m: PartitionManifest) -> set[int]:
        """Indices into ``Inference.acts`` that the later stages read for an uplinked input:
        the uplinked boundaries this partition produces, and its last (split, chain)."""
        return {b - m.first for b in self.config.uplink.boundaries
                if m.first <= b <= m.last} | {m.last - m.first}

    def next_seq(self) -> int:
        with self._seq_lock:
            self._seq += 1
            return self._seq

    def next_seqs(self, n: int) -> range:
        """``n`` consecutive sequence numbers in one lock round trip (a batch's)."""
        with self._seq_lock:
            first = self._seq + 1
            self._seq += n
            return range(first, first + n)

    def _encode_batch(self, batch: list[Inference]) -> list[Message] | None:
        """The messages of every waiting input, in order: one hand-off to the publish
        stage per batch instead of one per input."""
        out = [msg for inf in batch for msg in self._encode(inf) or ()]
        return out or None

    def _encode(self, inf: Inference) -> list[Message] | None:
        out: list[Message] = []
        m = inf.runner.manifest
        if self.config.metrics.publish_results and inf.prediction is not None:
            out.append((self.topics.result(self.device), json.dumps(
                {"index": inf.sample.index, "prediction": inf.prediction,
                 "confidence": inf.confidence, "label": inf.sample.label}).encode(), None,
                None))
        if self.config.split.enabled and not m.is_complete:
            out.append(self._split_request(inf))
        if inf.uplink:
            u = self.config.uplink
            for b in u.boundaries:
                if not m.first - 1 <= b <= m.last:
                    continue  # this partition neither receives nor produces that boundary
                arr = inf.sample.x[None] if b == m.first - 1 else inf.acts[b - m.first]
                if arr is _NOT_KEPT:
                    continue  # a reload added this boundary after the input was inferred
                if u.batch_size > 1:  # one message per batch_size samples (agent/mqtt/batcher.py)
                    if b == m.first - 1:
                        arr = arr.copy()  # the source may reuse its input buffer
                    key = (b, m.model_id, m.model_version, u.codec)
                    out += self._batch_messages(self.batcher.add(key, arr, inf))
                    continue
                env = Envelope(
                    device=self.device, session=self.link.session, seq=self.next_seq(),
                    timestamp=time.time(), model_version=m.model_version, boundary=b,
                    payload=encode(arr, self.config.uplink.codec), label=inf.sample.label,
                    prediction=inf.prediction, confidence=inf.confidence,
                    meta={"model": m.model_id, "index": inf.sample.index},
                ).pack()
                self.policy.charge(len(env))
                out.append((self._act_topic, env, None, (inf.born,)))
            self.metrics.uplinked.inc()
        return out or None

    def _flush_batches(self, force: bool) -> list[Message] | None:
        """The batches whose time bound passed (all of them at the end of the stream)."""
        return self._batch_messages(self.batcher.take_due(force)) or None

    def _batch_messages(self, batches: list[Batch]) -> list[Message]:
        """One version-2 envelope per batch: one encode (quantisation range, LZ4) over the
        stacked (N, ...) samples, one header, one spool row and one PUBLISH."""
        out: list[Message] = []
        for batch in batches:
            boundary, model_id, model_version, codec = cast(_BatchKey, batch.key)
            infs: list[Inference] = batch.items
            now = time.time()
            table = BatchEnvelope.table(
                list(self.next_seqs(len(infs))),
                [now - (time.monotonic() - i.born) for i in infs],
                [i.sample.index for i in infs], [i.sample.label for i in infs],
                [i.prediction for i in infs], [i.confidence for i in infs])
            env = BatchEnvelope(device=self.device, session=self.link.session,
                                model_version=model_version, boundary=boundary,
                                samples=table, payload=encode(batch.stacked(), codec),
                                meta={"model": model_id}).pack()
            self.policy.charge(len(env))
            out.append((self._act_topic, env, None, tuple(i.born for i in infs)))
        return out

    def _split_request(self, inf: Inference) -> Message:
        m = inf.runner.manifest
        seq = self.next_seq()
        env = Envelope(device=self.device, session=self.link.session, seq=seq,
                       timestamp=time.time(), model_version=m.model_version, boundary=m.last,
                       payload=encode(inf.acts[-1], "raw"), label=inf.sample.label,
                       meta={"model": m.model_id, "index": inf.sample.index}).pack()
        topic, payload, props = self.split.request(seq, env, inf.sample.label)
        return topic, payload, props, None

    def _publish(self, batch: list[list[Message]]) -> None:
        """The messages of every batch waiting from the encode stage: all their activations
        go into the spool in one transaction, a group commit."""
        reliable: list[tuple[str, bytes]] = []
        born: list[tuple[float, ...]] = []
        for messages in batch:
            for topic, payload, props, times in messages:
                if topic == self._act_topic:
                    reliable.append((topic, payload))
                    born.append(times or ())
                elif props is not None:  # a split request: fails at once when offline
                    if not self.link.publish(topic, payload, qos=1, properties=props):
                        self.split.unsent(props)
                else:
                    self.link.publish(topic, payload)
        if reliable:
            self.link.publish_reliable_many(reliable, born=born)

    def _on_outcome(self, outcome: PublishOutcome) -> None:
        if outcome.status in ("acked", "sent"):
            self.metrics.bytes_out.inc(outcome.nbytes)
        else:
            self.metrics.publish_failures.labels(outcome.reason or outcome.status).inc()

    def _on_frame(self, msg: mqtt.MQTTMessage) -> None:
        label = None
        for key, value in getattr(msg.properties, "UserProperty", None) or []:
            if key == "label" and _LABEL.fullmatch(value):  # not isdigit(): "²" passes it
                label = int(value)
        assert isinstance(self.source, MqttFrames)
        self.source.offer(bytes(msg.payload), label, timeout=5.0)

    # --- lifecycle
    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def request_reload(self, *_: Any) -> None:
        self._reload.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    def _apply_reload(self) -> None:
        self._reload.clear()
        if self.config_path is None:
            return
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except Exception as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
        else:
            self.config = self.config.model_copy(update={"uplink": new.uplink,
                                                         "metrics": new.metrics})
            self.policy = make_policy(self.config)
            # read by the encode thread; open batches go out on their time bound
            self.batcher.size, self.batcher.wait_s = (new.uplink.batch_size,
                                                      new.uplink.batch_wait_s)
            log.info("configuration reloaded (uplink, metrics); other changes need a restart")
        self.notifier.ready()

    def healthy(self) -> bool:
        stall = self.config.watchdog.max_stall_s
        return self._pipeline.healthy(max_beat_age=stall) and self.link.healthy()

    def run(self) -> int:
        cfg = self.config
        if cfg.metrics.prometheus_port is not None:
            port = self.metrics.serve(cfg.metrics.prometheus_port, cfg.metrics.prometheus_bind)
            log.info("prometheus metrics on %s:%d", cfg.metrics.prometheus_bind, port)
        with self.link:
            if isinstance(cfg.source, MqttSource):
                self.link.subscribe(cfg.source.topic or self.topics.input(self.device),
                                    cfg.source.qos, self._on_frame)
            if cfg.split.enabled:
                self.link.subscribe(self.split.reply_topic, 1, self.split.on_reply)
            if self.chain is not None:
                self.chain.attach(self.link)  # subscribes a later stage to its upstream
            if hasattr(self.source, "prepare"):
                self.source.prepare()  # e.g. verify an archive before READY (NpzReplay)
            self._pipeline.start()
            if self.updater is not None:
                self.updater.start(self._boot_note)
            self.notifier.ready(f"running {self.slot.current.manifest.model_id} "
                                f"v{self.slot.current.version}")
            self._supervise()
            self.notifier.stopping()
            if self.updater is not None:
                self.updater.stop()
            self._pipeline.stop()
            if isinstance(self.source, MqttFrames):
                self.source.close()
            if self.chain is not None:
                self.chain.close()
            self.reporter.publish()
        self.spool.close()
        log.info("agent stopped cleanly")
        return 0

    def _supervise(self) -> None:
        """The main thread: watchdog, stats, reloads, and the end of a finite source."""
        wd = watchdog_interval() if self.config.watchdog.enabled else None
        next_wd = time.monotonic()
        exit_when_done = self.config.pipeline.exit_when_done
        while not self._wait_tick(exit_when_done):
            now = time.monotonic()
            if self._reload.is_set():
                self._apply_reload()
            if wd is not None and now >= next_wd:
                if self.healthy():
                    self.notifier.watchdog()
                else:
                    log.error("unhealthy (pipeline or MQTT loop stalled): withholding the "
                              "watchdog ping so systemd restarts the agent")
                next_wd = now + wd
            if self.reporter.due(now, self.config.metrics.stats_interval_s):
                self.reporter.publish()
                self.split.expire(now)
            if (self.config.pipeline.exit_when_done and self._pipeline.finished()
                    and len(self.spool) == 0 and self.link.inflight == 0
                    and not self.split.pending):
                log.info("source finished and every message acknowledged; exiting")
                return

    def _wait_tick(self, exit_when_done: bool) -> bool:
        """Sleep until the next supervision step; True once a stop was requested.

        Every wake-up takes the GIL from the inference thread, so the loop ticks at 10 Hz.
        With ``exit_when_done`` (benchmarks, batch jobs) it wakes the moment the source ends
        and then polls every 5 ms until the last message is acknowledged.
        """
        source_done = self._pipeline.source_done
        if exit_when_done and not source_done.is_set():
            source_done.wait(0.1)
            return self._stop.is_set()
        return self._stop.wait(0.005 if exit_when_done else 0.1)
