"""The device's MQTT v5 connection: Will/birth/state, reconnects, and spooled publishing.

The client comes from the one factory (``agent.mqtt.client.make_client``) with the device's
``LinkSettings`` (the agent's ``[mqtt]`` table); birth and state are the typed messages of
``agent.wire.control``.

Reliable messages (activations) go through the ``Spool`` first, which is the single source
of truth: one drain thread hands spooled records to paho, at most ``max_inflight`` at a time,
and acks a record in the spool only when its PUBACK carries a success reason code.

Two paho 2.x behaviours shape this module:

* paho keeps every unacknowledged QoS>0 message (even one published while disconnected)
  and re-sends it after a reconnect, *after* ``on_connect`` returns. Left alone, that would
  duplicate what we re-send from the spool and could reorder it behind newer records. So
  ``on_connect`` calls ``drop_out_messages()`` and the drain thread restarts from the
  spool's head: order is kept, delivery is at-least-once (the trainer dedups by
  ``(device, session, seq)``).
* ``on_publish`` runs inside paho's ``_out_message_mutex``, which ``publish()`` also takes.
  A lock held around ``publish()`` and taken again in ``on_publish`` deadlocks, so
  ``on_publish`` only appends to a deque and wakes the drain thread, which alone touches
  the in-flight table; and it registers a mid right after ``publish()`` returns, before
  it looks at any PUBACK, so an early PUBACK can never miss its record.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import typing
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.compat import drop_out_messages, zip_strict
from agent.mqtt.client import KnetClient, SubscribeError, Will, make_client
from agent.mqtt.endpoint import LinkSettings
from agent.mqtt.netmeter import NetMeter
from agent.mqtt.spool import Spool
from agent.wire.control import Birth, DeviceState
from agent.wire.topics import Topics, validate_id

log = logging.getLogger(__name__)

SESSION_FILE = "session"
STAT_KEYS = ("sent", "acked", "publish_refused", "spooled", "dropped", "reconnects",
             "bytes_out", "connect_refused")


@dataclass(frozen=True)
class PublishOutcome:
    """What became of one message, for metrics: status is the final word on it."""

    topic: str
    nbytes: int
    reliable: bool
    status: Literal["acked", "refused", "sent", "dropped"]
    reason: str = ""


MessageHandler = typing.Callable[[mqtt.MQTTMessage], None]


@dataclass
class _Inflight:
    gen: int
    record_id: int
    topic: str
    nbytes: int
    sent: float = 0.0  # monotonic time handed to paho (the NetMeter's round trip)


def next_session(state_dir: Path) -> int:
    """Increment and durably persist the session counter; never returns a value twice.

    An unreadable counter falls back to the Unix time, which is larger than any counter a
    device reaches by restarting, so (device, session, seq) stays unique for the trainer.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / SESSION_FILE
    try:
        current = int(path.read_text().strip())
    except FileNotFoundError:
        current = 0
    except (OSError, ValueError) as exc:
        current = int(time.time())
        log.warning("session counter %s unreadable (%s): continuing from %d", path, exc, current)
    session = current + 1
    tmp = path.with_name(SESSION_FILE + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(f"{session}\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return session


def _no_delay(client: mqtt.Client) -> None:
    """TCP_NODELAY on the connection. Without it a chain stage's result waits behind the
    PUBACK it just sent (Nagle) until the broker's delayed ACK, ~40 ms on Linux: measured
    as a 2-stage chain taking 45 ms instead of a few (docs/benchmarks.md)."""
    sock = client.socket()
    if sock is None:
        return
    if not isinstance(sock, socket.socket):  # a websocket proxy
        log.debug("TCP_NODELAY not set: %s is not a socket", type(sock).__name__)
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # not TCP (a unix socket)
        log.debug("TCP_NODELAY not set: %s", exc)


class Link:
    """One MQTT v5 connection per device: ``with Link(...) as link: link.publish_reliable(...)``.

    Entering starts the network loop and returns at once (an offline start is normal: messages
    spool); use ``wait_connected()`` to block. Exiting flushes the spool for up to
    ``close_timeout`` seconds, publishes ``stopped`` and disconnects cleanly (so no Will).
    ``manual_ack``: subscriptions made with ``manual_ack=True`` are acked by ``ack()`` (a
    chain stage acks an input once its output is spooled); every other one is acked as soon
    as its handler returns.
    """

    def __init__(
        self,
        settings: LinkSettings,
        topics: Topics,
        device_id: str,
        spool: Spool,
        birth_payload_fn: Callable[[], dict[str, Any]],
        *,
        state_dir: Path | None = None,
        on_outcome: Callable[[PublishOutcome], None] | None = None,
        close_timeout: float = 5.0,
        manual_ack: bool = False,
    ) -> None:
        self.settings = settings.model_copy()  # shape() changes it: not the caller's copy
        self.manual_ack = manual_ack
        self.topics = topics
        self.device_id = validate_id(device_id)
        self.spool = spool
        self.birth_payload_fn = birth_payload_fn
        self.on_outcome = on_outcome
        self.close_timeout = close_timeout
        self.session = next_session(Path(state_dir) if state_dir else spool.directory)
        self.connected = threading.Event()
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._stats_lock = threading.Lock()
        self._subs: dict[str, tuple[int, MessageHandler]] = {}
        self._lock = threading.Lock()  # guards _gen, _cursor, _inflight, _subs, publish calls
        self._gen = 0
        self._cursor = 0
        self._inflight: dict[int, _Inflight] = {}
        self._acked: list[int] = []  # record ids acked by the broker, to delete (drain thread)
        self._acks: deque[tuple[int, int, ReasonCode]] = deque()
        # record id -> monotonic inference times of its samples (this run's records only)
        self._born: dict[int, tuple[float, ...]] = {}
        self.meter = NetMeter()  # achieved uplink throughput and PUBACK round trip
        self._shaped_until = 0.0  # monotonic: the shaper lets the next record go then
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._stopping = False
        self._ever_connected = False
        self._beat = time.monotonic()
        self._drainer: threading.Thread | None = None
        self._started = False
        self._client = self._make_client()

    # -- setup ---------------------------------------------------------------------------
    def _make_client(self) -> KnetClient:
        s = self.settings
        if s.username is None:  # the device id: the broker's ACL pattern relies on it
            s = s.model_copy(update={"username": self.device_id})
        client = make_client(s, default_client_id=self.device_id, manual_ack=self.manual_ack,
                             will=Will(self.topics.state(self.device_id),
                                       self._state_payload("offline")))
        # Our drain thread bounds the window; paho must never park messages in its own queue.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_unhandled_message
        return client

    def _state_payload(self, state: Literal["online", "stopped", "offline"]) -> bytes:
        if state == "offline":  # the Will is composed once, its time would be misleading
            return DeviceState(state=state, session=self.session, device=self.device_id
                               ).payload()
        return DeviceState(state=state, session=self.session, device=self.device_id,
                           ts=time.time()).payload()

    def _birth_payload(self) -> bytes:
        """What ``birth_payload_fn`` says, as a typed ``Birth``; a minimal one if it fails."""
        try:
            body = dict(self.birth_payload_fn())
            body.setdefault("device", self.device_id)
            body.setdefault("session", self.session)
            body.setdefault("ts", time.time())
            return Birth.model_validate(body).payload()
        except Exception:
            log.exception("birth_payload_fn failed; publishing a minimal birth")
            return Birth(device=self.device_id, session=self.session, ts=time.time()).payload()

    def start(self) -> Link:
        """Start the network loop and the drain thread; does not wait for the connection."""
        if self._started:
            return self
        self._started = True
        self._drainer = threading.Thread(target=self._drain_loop, name="knet-link-drain",
                                         daemon=True)
        self._drainer.start()
        self._client.start()
        log.info("link %s session %d connecting to %s", self.device_id, self.session,
                 self._client.endpoint.describe())
        return self

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self.connected.wait(timeout)

    # -- paho callbacks (network thread) -------------------------------------------------
    def _on_connect(self, client: KnetClient, _userdata: Any, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, _props: Properties | None) -> None:
        if reason.is_failure:
            self._count("connect_refused")
            log.error("broker %s refused the connection: %s (check the device's username, "
                      "password and certificates); retrying with back-off",
                      client.endpoint.describe(), reason)
            return
        _no_delay(client)
        with self._lock:
            # Re-send unacked records from the spool head ourselves (see module docstring).
            dropped = drop_out_messages(client)
            self._gen += 1
            self._cursor = 0
            subs = list(self._subs.items())
        if self._ever_connected:
            self._count("reconnects")
        self._ever_connected = True
        log.info("link %s connected (session present: %s, %d unacked messages to re-send "
                 "from the spool)", self.device_id, flags.session_present, len(dropped))
        for topic_filter, (qos, _handler) in subs:
            client.subscribe(topic_filter, qos)
        client.publish(self.topics.birth(self.device_id), self._birth_payload(), qos=1,
                       retain=True)
        client.publish(self.topics.state(self.device_id), self._state_payload("online"),
                       qos=1, retain=True)
        self.connected.set()
        self._wake.set()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any,
                       _flags: mqtt.DisconnectFlags, reason: ReasonCode,
                       _props: Properties | None) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was and not self._stopping:
            log.warning("link %s disconnected: %s; reconnecting with back-off", self.device_id,
                        reason)

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason: ReasonCode,
                    _props: Properties | None) -> None:
        # Runs under paho's _out_message_mutex: no locks of ours here (see module docstring).
        self._acks.append((self._gen, mid, reason))
        self._wake.set()

    def _on_unhandled_message(self, _client: mqtt.Client, _userdata: Any,
                              msg: mqtt.MQTTMessage) -> None:
        log.debug("no handler for a message on %s", msg.topic)
        if self.manual_ack:
            self.ack(msg.mid, msg.qos)

    # -- drain thread --------------------------------------------------------------------
    def _drain_loop(self) -> None:
        while True:
            self._wake.wait(max(0.001, min(1.0, self._shaped_until - time.monotonic()))
                            if self._shaped_until > time.monotonic() else 1.0)
            self._wake.clear()
            self._beat = time.monotonic()
            try:
                self._process_acks()
                if self._stopping:
                    self._delete_acked()  # a clean stop leaves nothing to send twice
                    return
                self._fill_window()
            except Exception:  # keep draining: a dead drain thread would strand the spool
                log.exception("link drain step failed")
                time.sleep(0.5)

    def _process_acks(self) -> None:
        gen = self._gen  # read first: every ack of an older connection is already queued
        done: list[int] = []
        outcomes: list[PublishOutcome] = []
        while True:
            try:
                ack_gen, mid, reason = self._acks.popleft()
            except IndexError:
                break
            with self._lock:
                entry = self._inflight.pop(mid, None)
                born = (self._born.pop(entry.record_id, None)
                        if entry is not None and entry.gen == ack_gen else None)
            if entry is None or entry.gen != ack_gen:
                continue  # birth/state/best-effort QoS 1, or a connection we gave up on
            done.append(entry.record_id)
            if reason.is_failure:
                self._count("publish_refused")
                log.warning("broker refused a message on %s: %s (%d); dropped from the spool, "
                            "it would be refused again", entry.topic, reason, reason.value)
                outcomes.append(PublishOutcome(entry.topic, entry.nbytes, True, "refused",
                                               str(reason)))
            else:
                self._count("acked", "sent")
                self._count("bytes_out", n=entry.nbytes)
                now = time.monotonic()
                self.meter.acked(now - entry.sent, entry.nbytes)
                if born:
                    self.meter.delivered([now - t for t in born])
                outcomes.append(PublishOutcome(entry.topic, entry.nbytes, True, "acked"))
        with self._lock:
            for mid in [m for m, e in self._inflight.items() if e.gen < gen]:
                del self._inflight[mid]
        # Acked records leave the spool in batches: one DELETE per window, not per PUBACK.
        # A record acked but not yet deleted is sent again only after a SIGKILL (at least
        # once, deduplicated by the trainer); nothing in flight (an idle or a new
        # connection, the end of a run) always deletes at once.
        self._acked.extend(done)
        if len(self._acked) >= self.settings.max_inflight or not self._inflight:
            self._delete_acked()
        for outcome in outcomes:
            self._emit(outcome)

    def _delete_acked(self) -> None:
        if self._acked:
            self.spool.ack_many(self._acked)
            self._acked = []
            with self._progress:
                self._progress.notify_all()

    def _fill_window(self) -> None:
        rate = self.settings.max_uplink_bytes_per_s
        with self._lock:
            if not self.connected.is_set() or (rate and self._shaped_until > time.monotonic()):
                return
            room = self.settings.max_inflight - len(self._inflight)
            if room <= 0 or (self._inflight and 2 * room < self.settings.max_inflight):
                return  # refill by half windows: one spool read for many PUBACKs
            for rec in self.spool.peek(room, self._cursor):
                try:
                    info = self._client.publish(rec.topic, rec.payload, rec.qos)
                except ValueError as exc:  # invalid topic/payload: it can never be sent
                    log.error("spooled message on %r cannot be published (%s): dropped",
                              rec.topic, exc)
                    self.spool.ack(rec.id)
                    self._count("dropped")
                    continue
                # Even on MQTT_ERR_NO_CONN paho kept the message under this mid; the next
                # on_connect drops it and we re-send from the spool.
                self._inflight[info.mid] = _Inflight(self._gen, rec.id, rec.topic,
                                                     len(rec.payload), time.monotonic())
                self._cursor = rec.id
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
                if rate:  # the next record leaves when this one's bytes have drained
                    now = time.monotonic()
                    self._shaped_until = max(self._shaped_until, now) + len(rec.payload) / rate
                    if self._shaped_until > now:
                        break

    # -- public API ----------------------------------------------------------------------
    def shape(self, bytes_per_s: float) -> None:
        """Change ``max_uplink_bytes_per_s`` on a running link (0: unshaped)."""
        if bytes_per_s < 0:
            raise ValueError("bytes_per_s must be >= 0")
        self.settings.max_uplink_bytes_per_s = bytes_per_s
        self._shaped_until = min(self._shaped_until, time.monotonic())
        self._wake.set()

    def publish_reliable(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        """Spool durably, then deliver in order (at least once); False if the spool dropped it."""
        if qos not in (1, 2):
            raise ValueError("reliable messages need QoS 1 or 2")
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"cannot publish to {topic!r}")
        if self._too_big(topic, payload):
            return False
        if not self.spool.append(topic, payload, qos):
            self._emit(PublishOutcome(topic, len(payload), True, "dropped", "spool full"))
            return False
        self._count("spooled")
        self._wake.set()
        return True

    def publish_reliable_many(self, messages: Sequence[tuple[str, bytes]],
                              qos: int = 1,
                              born: Sequence[tuple[float, ...]] | None = None) -> list[bool]:
        """:meth:`publish_reliable` for several messages with one spool commit (group
        commit): all kept ones are durable when this returns; one flag per message.
        ``born[i]``: monotonic inference times of message i's samples, for the meter's
        inference-to-PUBACK delivery delays."""
        if qos not in (1, 2):
            raise ValueError("reliable messages need QoS 1 or 2")
        ok = [False] * len(messages)
        keep: list[int] = []
        for i, (topic, payload) in enumerate(messages):
            if not topic or "+" in topic or "#" in topic:
                raise ValueError(f"cannot publish to {topic!r}")
            if not self._too_big(topic, payload):
                keep.append(i)
        ids: list[int] = []
        stored = self.spool.append_many([(messages[i][0], messages[i][1], qos) for i in keep],
                                        ids)
        if born is not None:
            self._remember_born([born[i] for i, kept in zip_strict(keep, stored) if kept], ids)
        for i, kept in zip_strict(keep, stored):
            ok[i] = kept
            if not kept:
                self._emit(PublishOutcome(messages[i][0], len(messages[i][1]), True, "dropped",
                                          "spool full"))
        if any(stored):
            self._count("spooled", n=sum(stored))
            self._wake.set()
        return ok

    def _remember_born(self, born: list[tuple[float, ...]], ids: list[int]) -> None:
        """Keep inference times until the PUBACK; bounded: records the spool evicted
        unsent never get one, so the oldest entries go beyond 65,536."""
        with self._lock:
            for rid, times in zip_strict(ids, born):
                if times:
                    self._born[rid] = times
            while len(self._born) > 65536:
                del self._born[next(iter(self._born))]

    def publish(self, topic: str, payload: bytes | str, qos: int = 0,
                retain: bool = False, properties: Properties | None = None) -> bool:
        """Best effort (stats and the like): dropped and counted when offline."""
        data = payload.encode() if isinstance(payload, str) else payload
        if self._too_big(topic, data):
            return False
        if not self.connected.is_set():
            self._count("dropped")
            self._emit(PublishOutcome(topic, len(data), False, "dropped", "offline"))
            return False
        info = self._client.publish(topic, data, qos=qos, retain=retain, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._count("dropped")
            self._emit(PublishOutcome(topic, len(data), False, "dropped",
                                      mqtt.error_string(info.rc)))
            return False
        self._count("sent")
        self._count("bytes_out", n=len(data))
        self._emit(PublishOutcome(topic, len(data), False, "sent"))
        return True

    def subscribe(self, topic_filter: str, qos: int, handler: MessageHandler, *,
                  manual_ack: bool = False) -> None:
        """Subscribe now if connected and again on every reconnect; handler runs on paho's
        thread, so it must return quickly (hand work to a queue). ``manual_ack`` (needs
        ``Link(manual_ack=True)``): the message is acked only by a later ``ack()``.
        ``wait_subscribed`` waits for the SUBACK."""
        if manual_ack and not self.manual_ack:
            raise ValueError("manual_ack subscriptions need Link(manual_ack=True)")

        def _call(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                handler(msg)
            except Exception:
                log.exception("handler for %s failed", topic_filter)
            finally:
                if self.manual_ack and not manual_ack:
                    self.ack(msg.mid, msg.qos)

        self._client.message_callback_add(topic_filter, _call)
        with self._lock:
            self._subs[topic_filter] = (qos, handler)
        # paho marks the client connected before on_connect snapshots _subs, so either that
        # snapshot includes this filter or this check sees the connection (a duplicate
        # SUBSCRIBE is harmless); our own `connected` event is set later and would race.
        if self._client.is_connected():
            self._client.subscribe(topic_filter, qos)

    def wait_subscribed(self, topic_filter: str, timeout: float) -> int:
        """Wait for the SUBACK of a ``subscribe()``d filter on the current connection (the
        connection first, if it is down); its granted QoS. ``SubscriptionRefused`` when the
        broker refused it (outside the ACL), ``SubscribeTimeout`` when it did not come."""
        with self._lock:
            if topic_filter not in self._subs:
                raise SubscribeError(f"{topic_filter!r} was never subscribed on this link")
        deadline = time.monotonic() + timeout
        self.connected.wait(timeout)
        return self._client.wait_subscribed([topic_filter],
                                            max(0.0, deadline - time.monotonic()))[0]

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a message of a ``manual_ack`` subscription (PUBACK for QoS 1)."""
        if qos > 0:
            self._client.ack(mid, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        """Forget a subscription here, on the broker, and for every later reconnect."""
        with self._lock:
            known = self._subs.pop(topic_filter, None) is not None
        if known:
            self._client.message_callback_remove(topic_filter)
            if self._client.is_connected():
                self._client.unsubscribe(topic_filter)

    def flush(self, timeout: float) -> bool:
        """Wait until the spool is empty (every record acked or refused); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while len(self.spool):
                left = deadline - time.monotonic()
                if left <= 0 or not self.connected.is_set():
                    return False
                self._progress.wait(min(left, 0.25))
        return True

    def healthy(self, max_beat_age: float = 30.0) -> bool:
        """Both threads alive and the drain loop not wedged; says nothing of the broker
        (an outage is not fixed by restarting the agent: see ``connected``)."""
        loop = getattr(self._client, "_thread", None)
        return (
            self._started and not self._stopping
            and self._drainer is not None and self._drainer.is_alive()
            and loop is not None and loop.is_alive()
            and time.monotonic() - self._beat < max_beat_age
        )

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def close(self) -> None:
        """Flush what we can, publish ``stopped``, disconnect cleanly (so no Will)."""
        if not self._started or self._stopping:
            return
        # A process that ends right after it starts (an empty source, a quick job) may close
        # before its CONNACK: wait for it (bounded), or the broker, which already has the
        # CONNECT and its Will, reports the device `offline` instead of `stopped`.
        if self.connected.wait(self.close_timeout):
            if not self.flush(self.close_timeout):
                log.warning("closing with %d messages still spooled; they go on next start",
                            len(self.spool))
            info = self._client.publish(self.topics.state(self.device_id),
                                        self._state_payload("stopped"), qos=1, retain=True)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                try:
                    info.wait_for_publish(min(self.close_timeout, 5.0))
                except (RuntimeError, ValueError) as exc:
                    log.warning("stopped state not confirmed: %s", exc)
        self._stopping = True
        self._wake.set()
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()
        if self._drainer is not None:
            self._drainer.join(5.0)
        log.info("link %s closed (%s)", self.device_id, self.stats)

    # -- helpers -------------------------------------------------------------------------
    def _count(self, *keys: str, n: int = 1) -> None:
        with self._stats_lock:
            for key in keys:
                self.stats[key] += n

    def _too_big(self, topic: str, payload: bytes) -> bool:
        limit = self.settings.max_payload_bytes
        if len(payload) <= limit:
            return False
        log.error("a %d-byte message for %s exceeds max_payload_bytes (%d): dropped",
                  len(payload), topic, limit)
        self._count("dropped")
        self._emit(PublishOutcome(topic, len(payload), False, "dropped", "too large"))
        return True

    def _emit(self, outcome: PublishOutcome) -> None:
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome)
            except Exception:
                log.exception("publish outcome hook failed")

    def __enter__(self) -> Link:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["Link", "LinkSettings", "PublishOutcome", "next_session"]
