"""Multi-device chains (DEFER): a node runs its slice and relays activations to the next.

A chain is a sequence of agents, each with a partition manifest slice from the planner.
The head reads a normal source; a later stage has ``[source] kind = "upstream"`` and
subscribes to the previous stage's ``chain`` topic. Every stage with ``[chain] enabled``
publishes, for every input, either its boundary activation (an ``Envelope`` carrying a
codec frame, codec chosen per link) on its own ``chain`` topic, or — the stage holding the
last block — a JSON result on its ``result`` topic.

Completeness and order, through broker and stage restarts:

- every output goes through the stage's spool (``Link.publish_reliable``): durable,
  re-sent in order until PUBACKed;
- an upstream message is acknowledged (MQTT v5 manual ack) only after its output is in the
  spool, so a stage that dies mid-input gets the input again from the broker (persistent
  session, ``clean_start=False``);
- redelivery means duplicates: each envelope names its *origin* (head device, head session,
  input index), and a stage drops an origin index it has already taken or finished
  (per-origin high-water marks, persisted in the state directory), so each input yields
  one result, in the head's order.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Tuple

import numpy as np

from agent.errors import KnetAgentError
from agent.infer.frames import BadInputs, FrameError, MqttFrames, Sample, coerce
from agent.wire.codec import CodecError, decode, encode
from agent.wire.envelope import Envelope, EnvelopeError

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

    from agent.config import AgentConfig, ChainSection, UpstreamSource
    from agent.infer.manifest import PartitionManifest
    from agent.mqtt.link import Link

log = logging.getLogger(__name__)

Origin = Tuple[str, int, int]  # (head device, head session, input index at the head)
DEDUP_FILE = "chain-dedup.json"
MAX_ORIGINS = 64  # head sessions remembered; older ones are long finished
MAX_LOGITS = 1024
FLUSH_S = 0.5  # how stale the persisted marks may get (a write per input costs ~1 ms)


class ChainError(KnetAgentError, ValueError):
    """An upstream message that does not belong to this stage's chain."""


@dataclass(frozen=True)
class ChainSample(Sample):
    """An input that came from the previous stage: its origin and the message to ack."""

    origin: Origin = ("", 0, 0)
    mid: int = 0
    qos: int = 1
    t0: float = 0.0  # wall-clock time the head read the input (end-to-end latency)


class Dedup:
    """Per-origin high-water marks: ``taken`` (in this process) and ``done`` (persisted)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._taken: dict[tuple[str, int], int] = {}
        self._done: OrderedDict[tuple[str, int], int] = OrderedDict()
        if path is not None and path.exists():
            try:
                for dev, sess, idx in json.loads(path.read_text()):
                    self._done[(str(dev), int(sess))] = int(idx)
            except (OSError, ValueError, TypeError) as exc:
                log.warning("chain dedup state %s unreadable (%s): starting empty", path, exc)
        self._taken.update(self._done)
        self._flushed = 0.0

    def take(self, origin: Origin) -> bool:
        """True the first time ``origin`` is seen (in order per head session)."""
        key, idx = (origin[0], origin[1]), origin[2]
        with self._lock:
            if idx <= self._taken.get(key, -1):
                return False
            self._taken[key] = idx
            return True

    def done(self, origin: Origin) -> None:
        key, idx = (origin[0], origin[1]), origin[2]
        with self._lock:
            if idx <= self._done.get(key, -1):
                return
            self._done[key] = idx
            self._done.move_to_end(key)
            while len(self._done) > MAX_ORIGINS:
                self._done.popitem(last=False)
            due = time.monotonic() - self._flushed >= FLUSH_S
        if due:
            self.flush()

    def flush(self) -> None:
        """Persist the ``done`` marks. Marks a crash loses only let a few inputs through
        again; the next stage (and the result consumer) drops them by origin."""
        if self.path is None:
            return
        with self._lock:
            snapshot = [[k[0], k[1], v] for k, v in self._done.items()]
            self._flushed = time.monotonic()
        tmp = self.path.with_name(self.path.name + ".tmp")  # no fsync: see above
        tmp.write_text(json.dumps(snapshot))
        os.replace(tmp, self.path)


def _origin(meta: dict[str, Any]) -> Origin:
    o = meta.get("origin")
    if (not isinstance(o, list) or len(o) != 3 or not isinstance(o[0], str)
            or not all(isinstance(v, int) and v >= 0 for v in o[1:])):
        raise ChainError(f"envelope meta has no valid origin: {o!r}")
    return (o[0], o[1], o[2])


class UpstreamFrames(MqttFrames):
    """The source of a middle or last stage: envelopes from the previous stage's topic.

    ``offer_message`` runs on paho's thread. Rejected and duplicate messages are acked at
    once (re-delivering them cannot help); accepted ones are acked by the chain stage once
    their output is spooled. It blocks while the queue is full — the broker's in-flight
    window bounds how many unacked messages can be waiting — so nothing is dropped.
    """

    def __init__(self, cfg: UpstreamSource, input_shape: tuple[int, ...], bad: BadInputs
                 ) -> None:
        super().__init__(cfg, input_shape, bad, queue_size=cfg.queue_size)  # type: ignore[arg-type]
        self.upstream = cfg.device
        self.name = f"upstream:{cfg.device}"
        self.max_payload = cfg.max_payload_bytes
        self.boundary: int | None = None  # set by bind(): the partition's input boundary
        self.model_id: str | None = None
        self.dedup = Dedup(None)
        self.ack: Callable[[int, int], None] = lambda _mid, _qos: None
        self.duplicates = 0
        self._closed = threading.Event()

    def bind(self, manifest: PartitionManifest, dedup: Dedup,
             ack: Callable[[int, int], None]) -> None:
        self.boundary, self.model_id = manifest.first - 1, manifest.model_id
        self.dedup, self.ack = dedup, ack

    def parse(self, payload: bytes) -> tuple[Envelope, Origin, np.ndarray]:
        env = Envelope.unpack(payload, max_payload=self.max_payload)
        if env.device != self.upstream:
            raise ChainError(f"envelope from {env.device!r}, expected {self.upstream!r}")
        if env.meta.get("model") != self.model_id or env.boundary != self.boundary:
            raise ChainError(f"envelope of model {env.meta.get('model')!r} boundary "
                             f"{env.boundary}; this stage takes {self.model_id!r} boundary "
                             f"{self.boundary}")
        origin = _origin(env.meta)
        x = coerce(decode(env.payload, max_bytes=self.max_payload), self.input_shape)
        return env, origin, x

    def offer_message(self, msg: mqtt.MQTTMessage) -> None:
        try:
            env, origin, x = self.parse(bytes(msg.payload))  # paho's bytes: not a copy
        except (EnvelopeError, CodecError, FrameError, ChainError) as exc:
            self.bad.add("chain", f"{msg.topic}: {exc}")
            self.ack(msg.mid, msg.qos)
            return
        if not self.dedup.take(origin):
            self.duplicates += 1
            self.ack(msg.mid, msg.qos)
            return
        t0 = env.meta.get("t0")
        sample = ChainSample(x, env.label, self.name, self._index, origin=origin,
                             mid=msg.mid, qos=msg.qos,
                             t0=float(t0) if isinstance(t0, (int, float)) else 0.0)
        self._index += 1
        while not self._closed.is_set():
            try:
                self._queue.put(sample, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self._closed.set()
        super().close()


class ChainStage:
    """The pipeline stage after inference: relay the boundary (or the result), then ack."""

    def __init__(self, config: AgentConfig, manifest: PartitionManifest,
                 source: object, next_seq: Callable[[], int]) -> None:
        self.cfg: ChainSection = config.chain
        self.device = config.device.id
        self.topics = config.topics
        self.next_seq = next_seq
        self.is_last = manifest.last == manifest.num_blocks
        self.dedup = Dedup(config.device.state_dir / DEDUP_FILE)
        self.upstream = source if isinstance(source, UpstreamFrames) else None
        self.link: Link | None = None
        self.stats = {"relayed": 0, "results": 0, "spool_dropped": 0}
        if self.upstream is not None:
            self.upstream.bind(manifest, self.dedup, self._ack)

    @property
    def out_topic(self) -> str:
        if self.is_last:
            return self.topics.result(self.device)
        return self.cfg.topic or self.topics.chain(self.device)

    def attach(self, link: Link) -> None:
        """Subscribe to the previous stage (manual acks) once the link exists."""
        self.link = link
        if self.upstream is not None:
            topic = self.upstream.cfg.topic or self.topics.chain(self.upstream.upstream)
            link.subscribe(topic, 1, self.upstream.offer_message, manual_ack=True)

    def close(self) -> None:
        """At shutdown: persist the dedup marks (the pipeline has stopped)."""
        self.dedup.flush()

    def _ack(self, mid: int, qos: int) -> None:
        if self.link is not None:
            self.link.ack(mid, qos)

    def __call__(self, inf: Any) -> Any:
        assert self.link is not None, "attach() the link first"
        sample, m = inf.sample, inf.runner.manifest
        if isinstance(sample, ChainSample):
            origin, t0 = sample.origin, sample.t0
        else:
            # the head: when the source read the input, on the wall clock the stages share
            t0 = time.time() - (time.monotonic() - sample.t_read)
            origin = (self.device, self.link.session, sample.index)
        meta = {"model": m.model_id, "origin": list(origin), "t0": t0}
        if self.is_last:
            logits = np.asarray(inf.acts[-1][0], dtype=np.float64).ravel()
            k = int(logits.argmax())
            payload = json.dumps({
                **meta, "stage": self.device, "model_version": m.model_version,
                "prediction": k, "label": sample.label,
                "logits": logits[:MAX_LOGITS].tolist()}).encode()
        else:
            payload = Envelope(
                device=self.device, session=self.link.session, seq=self.next_seq(),
                timestamp=time.time(), model_version=m.model_version, boundary=m.last,
                payload=encode(inf.acts[-1], self.cfg.codec), label=sample.label,
                meta=meta).pack()
        if self.link.publish_reliable(self.out_topic, payload):
            self.stats["results" if self.is_last else "relayed"] += 1
        else:
            self.stats["spool_dropped"] += 1
        self.dedup.done(origin)
        if isinstance(sample, ChainSample):
            self._ack(sample.mid, sample.qos)
        return inf


def chain_stage(config: AgentConfig, manifest: PartitionManifest, source: object,
                next_seq: Callable[[], int]) -> ChainStage | None:
    """The chain stage of this agent, or None when it is not part of a chain."""
    if not config.chain.enabled:
        return None
    return ChainStage(config, manifest, source, next_seq)

