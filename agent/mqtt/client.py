"""The one client factory: every knet MQTT connection is a ``KnetClient`` from ``make_client``.

What every connection gets, so that no caller can forget one of them: MQTT v5, paho's
callback API version 2, TLS through the public ``tls_set``, credentials (the password read
only now, from the configured source), reconnect back-off and connect timeout from the
endpoint, the caller's Will, and paho's own log lines in ours.

``KnetClient`` also tracks SUBACKs, because waiting for a subscription used to mean sleeping
"long enough" (tests) or an ad-hoc event per class (the ingestor):

* ``subscribe_and_wait(topics, timeout)`` subscribes and returns the granted QoS per filter
  once the SUBACK is in; a refused filter (e.g. outside the account's ACL: Mosquitto answers
  reason 0x87) raises ``SubscriptionRefused``, no SUBACK in time ``SubscribeTimeout``;
* ``wait_subscribed(filters, timeout)`` waits for filters that another thread subscribes (the
  usual re-subscribe in ``on_connect``, which runs on paho's thread and must not block).

SUBACKs count per connection: a disconnect forgets them, a reconnect must earn them again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.configfile import ConfigError
from agent.errors import KnetAgentError
from agent.mqtt.endpoint import MqttEndpoint

log = logging.getLogger(__name__)


class _BenignPahoNoise(logging.Filter):
    """paho 2.2 logs "Client is not connected" at ERROR when its loop runs once more after a
    clean disconnect: nothing is wrong, and an ERROR line at every stop would hide real ones
    (an exception in a callback, which paho logs here before it re-raises)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


PAHO_LOG = logging.getLogger(f"{__name__}.paho")
PAHO_LOG.addFilter(_BenignPahoNoise())

# What paho's subscribe() takes: a filter, (filter, qos), or a list of (filter, qos).
TopicArg = Union[str, "tuple[str, Any]", "Sequence[tuple[str, Any]]"]


class SubscribeError(KnetAgentError, RuntimeError):
    """A subscription that did not take effect on this connection."""


class SubscriptionRefused(SubscribeError):
    """The broker answered a failure reason for at least one filter (ACL, bad filter)."""

    def __init__(self, refused: dict[str, str]) -> None:
        self.refused = refused
        super().__init__("subscription refused: " +
                         ", ".join(f"{f!r} ({r})" for f, r in refused.items()))


class SubscribeTimeout(SubscribeError, TimeoutError):
    """No SUBACK within the timeout (no connection, or a broker that did not answer)."""


@dataclass(frozen=True)
class Will:
    """The message the broker publishes for us when we vanish without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def filters_of(topics: TopicArg) -> tuple[str, ...]:
    """The topic filters of any argument paho's ``subscribe`` accepts."""
    if isinstance(topics, str):
        return (topics,)
    if isinstance(topics, tuple):
        return (str(topics[0]),)
    return tuple(str(t[0]) for t in topics)


def granted_or_raise(filters: Sequence[str], reasons: Sequence[ReasonCode]) -> list[int]:
    """Granted QoS per filter; ``SubscriptionRefused`` if any filter was refused."""
    refused = {f: str(r) for f, r in zip(filters, reasons) if r.is_failure}
    if refused:
        raise SubscriptionRefused(refused)
    return [int(r.value) for r in reasons]


class KnetClient(mqtt.Client):
    """paho's v5 client plus a ``connected`` event and SUBACK tracking (module doc).

    Callers set ``on_connect``/``on_disconnect``/``on_subscribe`` as with paho; the client
    runs its own bookkeeping around them.
    """

    def __init__(self, endpoint: MqttEndpoint, client_id: str, *, manual_ack: bool = False
                 ) -> None:
        super().__init__(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5, manual_ack=manual_ack)
        self.endpoint = endpoint
        self.connected = threading.Event()
        self._subs = threading.Condition(threading.RLock())
        self._pending: dict[int, tuple[str, ...]] = {}  # mid -> filters awaiting SUBACK
        self._waiting: set[int] = set()  # mids a subscribe_and_wait waits for
        self._results: dict[int, list[ReasonCode]] = {}
        self._granted: dict[str, ReasonCode] = {}  # filter -> SUBACK reason, this connection
        self.on_connect = self.on_disconnect = self.on_subscribe = None  # our bookkeeping

    # -- paho's callbacks, with our bookkeeping around the caller's ------------------------
    # The setters wrap what the caller sets; the getters return the wrapper, so a caller
    # that chains (``previous = client.on_connect``) keeps the bookkeeping, which is
    # idempotent when a chain runs it twice.
    @property
    def on_connect(self) -> Any:
        return self._on_connect

    @on_connect.setter
    def on_connect(self, func: Any) -> None:
        def hooked(client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                   props: Any) -> None:
            try:
                if func is not None:
                    func(client, userdata, flags, reason, props)
            finally:  # after the caller's callback: its subscriptions are already sent
                if not reason.is_failure:
                    self.connected.set()

        with self._callback_mutex:
            self._on_connect = hooked

    @property
    def on_disconnect(self) -> Any:
        return self._on_disconnect

    @on_disconnect.setter
    def on_disconnect(self, func: Any) -> None:
        def hooked(client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                   props: Any) -> None:
            self._forget_subscriptions()
            if func is not None:
                func(client, userdata, flags, reason, props)

        with self._callback_mutex:
            self._on_disconnect = hooked

    @property
    def on_subscribe(self) -> Any:
        return self._on_subscribe

    @on_subscribe.setter
    def on_subscribe(self, func: Any) -> None:
        def hooked(client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                   props: Any) -> None:
            self._suback(mid, reasons)
            if func is not None:
                func(client, userdata, mid, reasons, props)

        with self._callback_mutex:
            self._on_subscribe = hooked

    def _forget_subscriptions(self) -> None:
        """A disconnect: SUBACKs were for that connection, pending ones will never come."""
        self.connected.clear()
        with self._subs:
            self._granted.clear()
            self._pending.clear()
            self._subs.notify_all()

    def _suback(self, mid: int, reasons: list[ReasonCode]) -> None:
        with self._subs:
            filters = self._pending.pop(mid, None)
            if filters is not None:
                self._granted.update(zip(filters, reasons))
                if mid in self._waiting:
                    self._results[mid] = list(reasons)
                self._subs.notify_all()

    # -- subscriptions ---------------------------------------------------------------------
    def subscribe(self, topic: Any, qos: int = 0, options: Any = None,
                  properties: Any = None) -> tuple[MQTTErrorCode, int | None]:
        """paho's ``subscribe``, remembering the filters until their SUBACK."""
        with self._subs:  # before the SUBACK can be handled on paho's thread
            rc, mid = super().subscribe(topic, qos, options, properties)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._pending[mid] = filters_of(topic)
        return rc, mid

    def unsubscribe(self, topic: Any, properties: Any = None
                    ) -> tuple[MQTTErrorCode, int | None]:
        with self._subs:
            for f in filters_of(topic if isinstance(topic, str) else [(t, 0) for t in topic]):
                self._granted.pop(f, None)
        return super().unsubscribe(topic, properties)

    def subscribe_and_wait(self, topics: TopicArg, timeout: float, qos: int = 1) -> list[int]:
        """Subscribe now and return the granted QoS per filter once the SUBACK is in.

        Raises ``SubscriptionRefused`` (a filter refused), ``SubscribeTimeout`` (no SUBACK
        in time) or ``SubscribeError`` (not connected, or the connection dropped first).
        Never call it on paho's network thread: the SUBACK arrives on that thread.
        """
        self._not_on_network_thread()
        filters = filters_of(topics)
        with self._subs:
            rc, mid = self.subscribe(topics, qos)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                raise SubscribeError(f"cannot subscribe to {list(filters)}: "
                                     f"{mqtt.error_string(rc)}")
            self._waiting.add(mid)
            try:
                self._subs.wait_for(lambda: mid in self._results or mid not in self._pending,
                                    timeout)
                reasons = self._results.pop(mid, None)
                pending = mid in self._pending
                self._pending.pop(mid, None)
            finally:
                self._waiting.discard(mid)
        if reasons is None:
            if pending:
                raise SubscribeTimeout(f"no SUBACK for {list(filters)} within {timeout:g} s")
            raise SubscribeError(f"the connection dropped before the SUBACK for "
                                 f"{list(filters)}")
        return granted_or_raise(filters, reasons)

    def wait_subscribed(self, filters: Sequence[str], timeout: float) -> list[int]:
        """Wait until each filter has its SUBACK on the current connection (subscribed by
        anyone, e.g. an ``on_connect`` callback); the granted QoS per filter.

        Raises ``SubscriptionRefused`` or ``SubscribeTimeout`` like ``subscribe_and_wait``.
        """
        self._not_on_network_thread()
        filters = list(filters)
        with self._subs:
            done = self._subs.wait_for(lambda: all(f in self._granted for f in filters),
                                       timeout)
            reasons = [self._granted.get(f) for f in filters]
        if not done:
            missing = [f for f, r in zip(filters, reasons) if r is None]
            raise SubscribeTimeout(f"no SUBACK for {missing} within {timeout:g} s")
        return granted_or_raise(filters, [r for r in reasons if r is not None])

    def _not_on_network_thread(self) -> None:
        if threading.current_thread() is getattr(self, "_thread", None):
            raise RuntimeError("waiting for a SUBACK on paho's network thread, which is the "
                               "thread that would deliver it")

    # -- connection ------------------------------------------------------------------------
    def start(self, *, receive_maximum: int | None = None) -> KnetClient:
        """Connect in the background with the endpoint's keepalive and session, and run
        paho's network loop, which reconnects with the endpoint's back-off."""
        ep = self.endpoint
        props = Properties(PacketTypes.CONNECT)
        if ep.session_expiry:
            props.SessionExpiryInterval = ep.session_expiry
        if receive_maximum is not None:
            props.ReceiveMaximum = receive_maximum
        self.connect_async(ep.host, ep.port, keepalive=ep.keepalive,
                           clean_start=ep.clean_start, properties=props)
        self.loop_start()
        return self

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self.connected.wait(timeout)

    def stop(self) -> None:
        """Disconnect cleanly (the broker then drops the Will) and end the network loop."""
        self.disconnect()
        self.loop_stop()

    def ack_many(self, mids: Sequence[int]) -> MQTTErrorCode:
        """PUBACK these QoS 1 messages (``manual_ack``), in order; ``HighRateClient`` sends
        them as one write."""
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        for mid in mids:
            rc = self.ack(mid, 1) or rc
        return rc


def make_client(endpoint: MqttEndpoint, *, default_client_id: str = "",
                will: Will | None = None, manual_ack: bool = False,
                client_class: type[KnetClient] | None = None) -> KnetClient:
    """A client for ``endpoint`` (not yet connected: ``start()`` connects).

    The client id is the endpoint's, else ``default_client_id`` (empty: the broker assigns
    one). The password is read now, so a missing secret fails here, before any thread runs.
    ``client_class``: a ``KnetClient`` subclass, e.g. ``agent.mqtt.highrate.HighRateClient``
    for a connection receiving thousands of messages per second (the trainer's ingest).
    """
    cls = client_class or KnetClient
    client = cls(endpoint, endpoint.client_id or default_client_id, manual_ack=manual_ack)
    client.enable_logger(PAHO_LOG)
    password = endpoint.resolve_password()
    if endpoint.username is not None:
        client.username_pw_set(endpoint.username,
                               password.get_secret_value() if password is not None else None)
    elif password is not None:
        raise ConfigError("mqtt.password: a password needs a username")
    tls = endpoint.tls
    if tls is not None:
        client.tls_set(ca_certs=_path(tls.ca_file), certfile=_path(tls.cert_file),
                       keyfile=_path(tls.key_file))
    client.reconnect_delay_set(endpoint.reconnect_min_delay,  # type: ignore[arg-type]
                               endpoint.reconnect_max_delay)  # type: ignore[arg-type]
    client.connect_timeout = endpoint.connect_timeout_s
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    return client


def _path(value: Any) -> str | None:
    return None if value is None else str(value)


__all__ = ["KnetClient", "SubscribeError", "SubscribeTimeout", "SubscriptionRefused", "Will",
           "filters_of", "granted_or_raise", "make_client"]
