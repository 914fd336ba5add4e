"""Ingest: activation envelopes from the broker into the sample store, nothing acknowledged lost.

Data path::

    paho network thread (on_message)            writer thread
    ─ parse topic, Envelope.unpack,    bounded   ─ take a batch (group commit: batch_size,
      codec frame check, shape check ─ queue ──▶   or batch_wait_s after its oldest message)
    ─ bad: count per device/reason,              ─ store.add_frames (one transaction)
      ack token only                             ─ then PUBACK every message of the batch,
                                                   in the order they arrived, in one write

Per-message cost is what limits one process (docs/benchmarks.md, "Ingest"): the connection
is an ``agent.mqtt.highrate.HighRateClient`` (paho's PUBLISH parsing, reads and PUBACKs made
cheap), the queue wakes the writer once per batch (``cloud_trainer/ingest/batchqueue.py``), and the
frame shape read by the validation goes to the store instead of being parsed again.

Guarantees and why:

* **Ack after commit.** The client runs with ``manual_ack=True`` (paho 2.x): paho does not
  PUBACK a QoS 1 message when ``on_message`` returns; ``client.ack(mid, 1)`` is called by
  the writer thread after the batch's transaction committed. With a persistent session
  (``clean_start=False`` + session expiry) the broker re-sends every un-acked message after
  a crash, and ``UNIQUE(device, session, seq)`` turns the re-delivery into a no-op.
* **Acks never cross connections.** A packet id names a message only within one session;
  after a reconnect whose session was lost, an old id could name a different, unstored
  message. Each item carries the connection generation it arrived on and is acked only on
  that same connection; anything older is simply re-delivered and deduplicated. The
  generation changes in ``on_disconnect`` (paho's network thread, before it reconnects)
  under the same lock the writer holds around ``ack``, so a stale PUBACK can never be queued
  into a new connection.
* **PUBACKs in arrival order** (MQTT v5 §4.6): bad messages are acked through the same queue
  as good ones, as ack-only tokens, instead of straight from the callback.
* **Back-pressure is MQTT's own flow control first.** ``receive_maximum`` (a CONNECT
  property) caps how many un-acked messages the broker sends us, and every queued item is
  un-acked. Mosquitto 2.0.11 honours it exactly when we never ack, but while acks flow it was
  measured overshooting (87 outstanding for a maximum of 50), so the queue (twice the
  maximum) is the hard bound: when full, ``on_message`` blocks paho's thread, TCP fills, and
  the broker queues for us; its ``max_queued_messages``/``bytes`` are sized for that
  (``broker/config.py``). The writer drains continuously, so such a block is short, far
  below the keepalive.
* **Fairness.** Messages reach us in the order the broker queued them, on one session, and
  PUBACK order must follow arrival order, so re-ordering a batch per device buys nothing:
  a device's share of our throughput is its share of the broker's queue. A flooding device
  must be limited upstream (its agent's uplink budget, a broker rate limit) or its storage
  capped by the store's per-device quota. What this module guarantees is that a *bad*
  device costs a header parse and a CRC per message, never a database write or a crash.
* **Batches** (envelope version 2, ``agent.wire.envelope.BatchEnvelope``): one message, N
  samples. The header, CRC, codec frame (one LZ4 pass and, with ``validation =
  "decode"``, every value), shape and model are checked once per batch; finiteness per
  sample, so one NaN sample is refused alone. An 8-bit quantised frame is not decoded for
  it: its checked scales decide that every value is finite (``agent.wire.codec.check_values``).
  The batch's frame is stored once, as received, with a key row per sample
  (``cloud_trainer.ingest.store.batch_rows``), in the same transaction as the rest of the commit
  (``add_frames``), each sample under its own ``(device, session, seq)``: a replayed
  batch, or one overlapping stored samples, stores nothing twice.
  Counters count samples: ``received`` grows by N and a batch-wide refusal counts N under
  its reason, so received == stored + duplicates + rejected at rest.
* **Never crash on input.** Every failure of a message is caught, counted in
  ``stats.bad[device][reason]`` and logged at most once per ``log_interval_s`` per
  (device, reason). A failing store (disk full, lock timeout) is retried with back-off;
  nothing is acked meanwhile.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import paho.mqtt.client as mqtt
from pydantic import Field

from agent.mqtt.client import KnetClient, SubscribeError, make_client
from agent.mqtt.endpoint import SESSION_EXPIRY_MAX, MqttEndpoint
from agent.mqtt.highrate import HighRateClient
from agent.wire.codec import (
    CodecError,
    OversizedFrameError,
    UnknownCodecError,
    check_values,
    split_batch,
)
from agent.wire.codec.frame import parse_frame
from agent.wire.control import ControlMessageError
from agent.wire.envelope import (
    AnyEnvelope,
    BatchEnvelope,
    Envelope,
    EnvelopeError,
    EnvelopeVersionError,
    unpack_any,
)
from agent.wire.topics import TopicError, TopicKind, Topics
from cloud_trainer.ingest.batchqueue import BatchQueue, QueueFull
from cloud_trainer.ingest.fleet import FleetTable
from cloud_trainer.ingest.partition import DevicePartition
from cloud_trainer.ingest.store import FrameRows, SampleStore, batch_rows, envelope_rows

log = logging.getLogger(__name__)

BAD_REASONS = ("malformed", "oversized", "version", "spoofed", "bad_frame", "wrong_shape",
               "empty_tensor", "non_finite", "bad_boundary", "unknown_model", "internal",
               "bad_topic", "bad_state", "bad_birth")
INVALID_DEVICE = "?invalid"  # bad_topic counts go here: the topic's id is not a device id


class IngestSettings(MqttEndpoint):
    """How the trainer reads the fleet's activations: the trainer's endpoint (derived from its
    ``[mqtt]``) plus the ingest connection's own session and flow control."""

    # Stable across restarts (the broker keeps the session under it) and distinct per replica.
    client_id: str | None = Field(default_factory=lambda: f"knet-ingest-{socket.gethostname()}")
    # A persistent session: what devices publish while the trainer restarts is queued for it.
    clean_start: bool = False
    session_expiry: int = Field(24 * 3600, ge=0, le=SESSION_EXPIRY_MAX)
    share_group: str = "trainers"
    # False: a plain subscription, for a single trainer on Mosquitto, which does not restore
    # shared subscriptions from persistence after a restart (measured on 2.0.11: activations
    # published between the restart and the ingestor's re-subscribe had no subscriber and were
    # lost; a plain persistent subscription is restored and queued). docs/deploy.md.
    shared: bool = True
    # With plain subscriptions, replicas split the fleet by device hash: this one stores
    # the devices ``partition`` owns and acks the rest unstored (cloud_trainer/ingest/partition.py).
    partitions: int = Field(1, ge=1)
    partition: int = Field(0, ge=0)
    receive_maximum: int = Field(1000, ge=1, le=65535)
    max_payload: int = Field(4 << 20, ge=1)  # codec frame bytes inside an envelope
    max_decoded_bytes: int = Field(16 << 20, ge=1)  # float32 bytes a frame may declare
    # "decode": every stored sample is known to decode to finite values (costs a
    # decompression per message, and a decode where the codec's header does not decide);
    # "header": frame header, size and CRC only (an unknown codec id is caught at training).
    validation: Literal["decode", "header"] = "decode"
    # boundary -> expected shape, without or with the batch dimension; unknown: accepted.
    expected_shapes: dict[int, tuple[int, ...]] = Field(default_factory=dict)
    # model id -> boundary -> shape (without the batch dimension) of the deployed model:
    # when set, an envelope of another model ("unknown_model"), at a boundary the model
    # does not have ("bad_boundary") or of another shape ("wrong_shape") is not stored. An
    # envelope without meta "model" is checked against the only model, if there is one.
    model_boundaries: dict[str, dict[int, tuple[int, ...]]] = Field(default_factory=dict)
    batch_size: int = Field(512, ge=1)  # messages per commit (a batch envelope: all its samples)
    # How long the writer lets a batch fill after its first message: fewer, larger commits
    # (and less GIL contention with paho's thread) for at most this much added latency.
    batch_wait_s: float = Field(0.01, ge=0)
    store_retry_s: float = Field(1.0, gt=0)
    expire_interval_s: float = Field(60.0, gt=0)
    log_interval_s: float = Field(10.0, ge=0)
    subscribe_timeout_s: float = Field(10.0, gt=0)


@dataclass
class IngestStats:
    """Counters for Prometheus; each field is written by one thread only."""

    received: int = 0  # activation samples (a batch envelope counts its N)
    batch_messages: int = 0  # version-2 envelopes among the messages received
    bytes_received: int = 0
    stored: int = 0
    bytes_committed: int = 0
    duplicates: int = 0
    acked: int = 0
    ack_skipped: int = 0  # arrived on an older connection: the broker re-delivers them
    batches: int = 0
    store_errors: int = 0
    connects: int = 0
    fleet_messages: int = 0
    # Activations refused, in total and per reason: received == stored + duplicates +
    # rejected + what is still queued.
    rejected: int = 0
    other_replica: int = 0  # activations of devices another replica owns (acked, not stored)
    lag_s: float | None = None  # last commit's time minus its newest envelope's timestamp
    last_commit: float = 0.0
    bad: dict[str, Counter[str]] = field(default_factory=dict)
    rejects: Counter[str] = field(default_factory=Counter)
    # Refused state/birth messages by "<kind>/<reason>" (agent.wire.control.REJECT_REASONS).
    control_rejects: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_bad(self, device: str, reason: str, act: bool = False, n: int = 1) -> None:
        with self._lock:
            self.bad.setdefault(device, Counter())[reason] += n
            if act:
                self.rejected += n
                self.rejects[reason] += n

    def count_control_reject(self, kind: TopicKind, reason: str) -> None:
        with self._lock:
            self.control_rejects[f"{kind.value}/{reason}"] += 1

    def bad_snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {d: dict(c) for d, c in self.bad.items()}

    @property
    def bad_total(self) -> int:
        with self._lock:
            return sum(sum(c.values()) for c in self.bad.values())

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items()
               if not k.startswith("_") and k not in ("bad", "rejects", "control_rejects")}
        out["bad"] = self.bad_snapshot()
        with self._lock:
            out["rejects"] = dict(self.rejects)
            out["control_rejects"] = dict(self.control_rejects)
        out["bad_total"] = self.bad_total
        return out


@dataclass(frozen=True)
class _One:
    """A version-1 envelope that passed, with its frame's shape read by the validation (so
    that the store does not parse the frame again)."""

    env: Envelope
    shape: tuple[int, ...]

    def rows(self, now: float) -> FrameRows:
        return envelope_rows(self.env, now, self.shape)

    @property
    def newest(self) -> float:
        return self.env.timestamp


@dataclass(frozen=True)
class _Batch:
    """A batch envelope that passed, kept whole: the store keeps its frame once and a key
    row per sample (``cloud_trainer.ingest.store.batch_rows``)."""

    env: BatchEnvelope
    shape: tuple[int, ...]  # one sample's: (1, ...)
    keep: list[bool] | None  # None: every sample; else False for those refused

    def rows(self, now: float) -> FrameRows:
        return batch_rows(self.env, self.shape, now, self.keep)

    @property
    def newest(self) -> float:
        return float(self.env.samples["timestamp"].max())


@dataclass(frozen=True)
class _Item:
    """One received QoS>0 message waiting for its PUBACK; ``stored`` None: ack only."""

    mid: int
    qos: int
    generation: int
    stored: _One | _Batch | None = None
    size: int = 0


class _RateLimitedLog:
    """At most one line per key per interval, with a count of what was suppressed."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def warning(self, key: tuple[str, str], msg: str, *args: Any) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-1e18, 0))
        if now - last >= self.interval:
            extra = f" ({suppressed} similar suppressed)" if suppressed else ""
            log.warning(msg + extra, *args)
            self._last[key] = (now, 0)
        else:
            self._last[key] = (last, suppressed + 1)


class Ingestor:
    """Subscribe, validate, store in batches, acknowledge after commit. A context manager."""

    def __init__(self, settings: IngestSettings, topics: Topics, store: SampleStore,
                 fleet: FleetTable | None = None) -> None:
        self.settings = settings
        self.topics = topics
        self.store = store
        self.fleet = fleet if fleet is not None else FleetTable()
        self.stats = IngestStats()
        self._act_filter = (topics.shared(settings.share_group, topics.all_devices("act"))
                            if settings.shared else topics.all_devices("act"))
        self._filters = [(self._act_filter, 1), (topics.all_devices("state"), 1),
                         (topics.all_devices("birth"), 1)]
        self._filter_names = [f for f, _qos in self._filters]
        # Twice receive_maximum: the hard bound behind the broker's flow control (module doc).
        self._queue: BatchQueue[_Item] = BatchQueue(2 * settings.receive_maximum)
        self._ack_lock = threading.Lock()
        self._generation = 0
        self._stopping = threading.Event()
        self._writer_stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._busy = False
        self._bad_log = _RateLimitedLog(settings.log_interval_s)
        self._last_expire = time.monotonic()
        self._partition = DevicePartition(settings.partitions, settings.partition)
        self.client = self._make_client()

    # -- lifecycle -------------------------------------------------------------------------
    def _make_client(self) -> KnetClient:
        client = make_client(self.settings, manual_ack=True, client_class=HighRateClient)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def start(self, wait: bool = True) -> Ingestor:
        """Start the writer and the network loop; by default wait for the SUBACK."""
        s = self.settings
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer",
                                        daemon=True)
        self._writer.start()
        self.client.start(receive_maximum=s.receive_maximum)
        if wait and not self.wait_subscribed(s.subscribe_timeout_s):
            log.warning("ingestor %s: not subscribed at %s within %.0f s; still trying",
                        s.client_id, s.describe(), s.subscribe_timeout_s)
        return self

    def wait_subscribed(self, timeout: float) -> bool:
        """True once the broker granted every subscription on the current connection."""
        deadline = time.monotonic() + timeout
        if not self.client.wait_connected(timeout):
            return False
        try:
            self.client.wait_subscribed(self._filter_names,
                                        max(0.0, deadline - time.monotonic()))
        except SubscribeError as exc:
            log.debug("ingestor %s: %s", self.settings.client_id, exc)
            return False
        return True

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Store and acknowledge what is queued, then disconnect (the session stays)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        deadline = time.monotonic() + drain_timeout
        while (self._queue.unfinished_tasks or self._busy) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.client.stop()  # the DISCONNECT is queued after the PUBACKs: they go out first
        self._writer_stop.set()  # anything left is stored; the broker re-delivers it anyway
        if self._writer is not None:
            self._writer.join(timeout=30)

    def __enter__(self) -> Ingestor:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def metrics(self) -> dict[str, Any]:
        """Counters plus gauges, ready for a Prometheus collector."""
        out = self.stats.as_dict()
        out["queue_depth"] = self.queue_depth
        out["fleet_devices"] = len(self.fleet)
        out["fleet_online"] = len(self.fleet.online())
        out["fleet_stale_ignored"] = self.fleet.stale_ignored
        return out

    # -- paho callbacks (network thread) ---------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any,
                    _p: Any) -> None:
        if reason.is_failure:
            log.warning("ingestor %s: connection refused: %s", self.settings.client_id, reason)
            return
        with self._ack_lock:
            self._generation += 1
        self.stats.connects += 1
        log.info("ingestor %s connected (session present: %s)", self.settings.client_id,
                 flags.session_present)
        client.subscribe(self._filters)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, reasons: Any,
                      _p: Any) -> None:
        bad = [r for r in reasons if r.is_failure]
        if bad:
            log.error("ingestor %s: subscription refused: %s", self.settings.client_id, bad)
        else:  # the replica tests and operators read this line after every (re)connect
            log.info("ingestor %s subscribed", self.settings.client_id)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        with self._ack_lock:
            self._generation += 1  # nothing received so far may be acked any more
        if not self._stopping.is_set():
            log.warning("ingestor %s disconnected: %s", self.settings.client_id, reason)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            accepted = self._accept(msg)
        except Exception as exc:  # a bug must not kill paho's thread nor leave it un-acked
            topic = str(msg.topic)
            try:
                device, leaf = self.topics.parse_device_topic(topic)
            except Exception:
                device, leaf = INVALID_DEVICE, ""
            self._bad(device, "internal", repr(exc)[:200], act=leaf == "act")
            accepted = None
        if msg.qos:
            self._put(_Item(msg.mid, msg.qos, self._generation, accepted, len(msg.payload)))

    def _put(self, item: _Item) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except QueueFull:
                if self._writer_stop.is_set():
                    return  # shutting down: not acked, so the broker re-delivers it
                log.warning("ingest queue full (%d): receive_maximum not honoured?",
                            self._queue.maxsize)

    def _bad(self, device: str, reason: str, detail: object, act: bool = True,
             n: int = 1) -> None:
        """Count a dropped message (``act``: an activation, of ``n`` samples) and log it,
        rate-limited."""
        self.stats.count_bad(device, reason, act, n)
        self._bad_log.warning((device, reason), "dropped a message from %s: %s: %s",
                              device, reason, detail)

    def _accept(self, msg: mqtt.MQTTMessage) -> _One | _Batch | None:
        """Validate one message; what to store of it (None: nothing), with the frame's shape
        read by the validation so that the store does not parse the frame again."""
        data = msg.payload
        try:
            topic = self.topics.parse(msg.topic)
        except (TopicError, UnicodeDecodeError) as exc:
            self._bad(INVALID_DEVICE, "bad_topic", exc, act=False)
            return None
        device, now = str(topic.device), time.time()
        if topic.kind in (TopicKind.STATE, TopicKind.BIRTH):
            self._fleet_message(topic.kind, device, data, now)
            return None
        if topic.kind is not TopicKind.ACT:
            return None
        if not self._partition.owns(device):
            self.stats.other_replica += 1
            return None
        self.stats.bytes_received += len(data)
        s = self.settings
        try:
            parsed = unpack_any(data, max_payload=s.max_payload)
        except EnvelopeVersionError as exc:
            self.stats.received += 1
            self._bad(device, "version", exc)
            return None
        except EnvelopeError as exc:
            self.stats.received += 1
            self._bad(device, "oversized" if len(data) > s.max_payload else "malformed", exc)
            return None
        if isinstance(parsed, BatchEnvelope):
            kept = self._accept_batch(device, parsed)
        else:
            self.stats.received += 1
            kept = self._accept_one(device, parsed)
        if kept is not None:
            self.fleet.seen(device, now)
        return kept

    def _accept_one(self, device: str, env: Envelope) -> _One | None:
        """The checks of a version-1 envelope; it and its frame's shape, when it should be
        stored."""
        s = self.settings
        if env.device != device:
            self._bad(device, "spoofed", f"envelope names {env.device!r}")
            return None
        finite = True
        try:
            if s.validation == "decode":
                shape, finite = check_values(env.payload, max_bytes=s.max_decoded_bytes)
            else:
                shape = parse_frame(env.payload, s.max_decoded_bytes).shape
        except OversizedFrameError as exc:
            self._bad(device, "oversized", exc)
            return None
        except UnknownCodecError as exc:
            self._bad(device, "version", exc)
            return None
        except CodecError as exc:
            self._bad(device, "bad_frame", exc)
            return None
        if len(shape) == 0 or 0 in tuple(shape):
            self._bad(device, "empty_tensor", f"shape {tuple(shape)}")
            return None
        if not self._shape_ok(device, env, tuple(shape)):
            return None
        if not finite:
            self._bad(device, "non_finite", f"boundary {env.boundary} holds NaN or Inf")
            return None
        return _One(env, tuple(shape))

    def _shape_ok(self, device: str, env: AnyEnvelope, shape: tuple[int, ...],
                  n: int = 1) -> bool:
        """The model, boundary and shape checks; False (counted for ``n`` samples) when
        the samples must not be stored."""
        s = self.settings
        expected = s.expected_shapes.get(env.boundary)
        if s.model_boundaries:
            boundaries = self._boundaries_of(env)
            if boundaries is None:
                self._bad(device, "unknown_model", f"model {env.meta.get('model')!r}", n=n)
                return False
            expected = boundaries.get(env.boundary)
            if expected is None:
                self._bad(device, "bad_boundary", f"boundary {env.boundary} not in "
                                                  f"{sorted(boundaries)}", n=n)
                return False
        if expected is not None and shape != tuple(expected) and (
                len(shape) != len(expected) + 1 or shape[1:] != tuple(expected)):
            self._bad(device, "wrong_shape",
                      f"boundary {env.boundary} shape {shape}, expected {expected}", n=n)
            return False
        return True

    def _accept_batch(self, device: str, env: BatchEnvelope) -> _Batch | None:
        """A version-2 envelope: checked once as a whole, then finiteness per sample; the
        batch with the samples to store."""
        s, n = self.settings, len(env)
        self.stats.received += n
        self.stats.batch_messages += 1
        if env.device != device:
            self._bad(device, "spoofed", f"envelope names {env.device!r}", n=n)
            return None
        try:
            split = split_batch(env.payload, max_bytes=s.max_decoded_bytes,
                                values=s.validation == "decode")
        except OversizedFrameError as exc:
            self._bad(device, "oversized", exc, n=n)
            return None
        except UnknownCodecError as exc:
            self._bad(device, "version", exc, n=n)
            return None
        except CodecError as exc:
            self._bad(device, "bad_frame", exc, n=n)
            return None
        if split.shape[0] != n:
            self._bad(device, "malformed", f"{n} samples but a frame of shape {split.shape}",
                      n=n)
            return None
        if not self._shape_ok(device, env, (1, *split.shape[1:]), n):
            return None
        keep: list[bool] | None = None
        finite = split.finite
        if finite is not None and not finite.all():
            bad = int(n - finite.sum())
            self._bad(device, "non_finite", f"{bad} of {n} samples at boundary "
                                            f"{env.boundary} hold NaN or Inf", n=bad)
            if bad == n:
                return None
            keep = finite.tolist()
        return _Batch(env, (1, *split.shape[1:]), keep)

    def _fleet_message(self, kind: TopicKind, device: str, data: bytes, now: float) -> None:
        """A device's state or birth into the fleet table; refused ones counted by reason."""
        self.stats.fleet_messages += 1
        try:
            if kind is TopicKind.STATE:
                self.fleet.update_state(device, data, now)
            else:
                self.fleet.update_birth(device, data, now)
        except ControlMessageError as exc:
            self.stats.count_control_reject(kind, exc.reason)
            self._bad(device, f"bad_{kind.value}", exc, act=False)

    def _boundaries_of(self, env: AnyEnvelope) -> dict[int, tuple[int, ...]] | None:
        """The deployed boundary shapes for the envelope's model; None: not a model here."""
        models = self.settings.model_boundaries
        model = env.meta.get("model")
        if model is None and len(models) == 1:
            return next(iter(models.values()))
        return models.get(model) if isinstance(model, str) else None

    # -- writer thread ---------------------------------------------------------------------
    def _write_loop(self) -> None:
        batch: list[_Item] = []
        s = self.settings
        while True:
            if not batch:
                # Group commit: woken once per batch (batch_size, or batch_wait_s after its
                # oldest message), not per message (cloud_trainer/ingest/batchqueue.py).
                batch = self._queue.get_batch(s.batch_size, s.batch_wait_s, timeout=0.1)
                if not batch:
                    if self._writer_stop.is_set():
                        return
                    self._maybe_expire()
                    continue
            self._busy = True
            try:
                if self._commit(batch):
                    self._queue.task_done(len(batch))
                    batch = []
                elif self._writer_stop.wait(self.settings.store_retry_s):
                    return  # stopping with a failing store: the broker keeps these
            finally:
                self._busy = False

    def _commit(self, batch: list[_Item]) -> bool:
        now = time.time()
        frames: list[FrameRows] = []
        newest = -math.inf
        for i in batch:
            if i.stored is not None:
                frames.append(i.stored.rows(now))
                newest = max(newest, i.stored.newest)
        samples = sum(len(f.samples) for f in frames)
        try:
            inserted = self.store.add_frames(frames) if frames else 0
        except Exception as exc:
            self.stats.store_errors += 1
            log.error("sample store write of %d samples failed (retrying, nothing acked): %s",
                      samples, exc)
            return False
        st = self.stats
        if frames:
            st.last_commit = time.time()
            st.lag_s = st.last_commit - newest
        st.batches += 1
        st.stored += inserted
        st.duplicates += samples - inserted
        st.bytes_committed += sum(i.size for i in batch if i.stored is not None)
        with self._ack_lock:
            generation = self._generation
            current = [i for i in batch if i.generation == generation]
            if all(i.qos == 1 for i in current):
                self.client.ack_many([i.mid for i in current])  # one write for the batch
            else:
                for item in current:
                    self.client.ack(item.mid, item.qos)
            st.acked += len(current)
            st.ack_skipped += len(batch) - len(current)
        return True

    def _maybe_expire(self) -> None:
        now = time.monotonic()
        if now - self._last_expire < self.settings.expire_interval_s:
            return
        self._last_expire = now
        try:
            n = self.store.expire()
            if n:
                log.info("retention evicted %d samples", n)
        except Exception as exc:
            log.error("sample store retention failed: %s", exc)
