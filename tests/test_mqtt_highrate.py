"""HighRateClient (agent/mqtt/highrate.py) against a real Mosquitto: every message arrives
exactly as paho's own path delivers it, properties included, and ``ack_many`` acknowledges
exactly the messages it names (the broker re-delivers the others to the persistent session)."""

from __future__ import annotations

import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt.client import KnetClient, make_client
from agent.mqtt.endpoint import MqttEndpoint
from agent.mqtt.highrate import READ_AHEAD, HighRateClient
from broker.launcher import Mosquitto


class _Sink:
    """Records every message with the fields a callback can see."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.cond = threading.Condition()

    def __call__(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        with self.cond:
            self.got.append({
                "topic": msg.topic, "payload": bytes(msg.payload), "qos": msg.qos,
                "retain": bool(msg.retain), "mid": msg.mid,
                "user": list(getattr(props, "UserProperty", [])),
                "response": getattr(props, "ResponseTopic", None),
                "correlation": getattr(props, "CorrelationData", None),
            })
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.got) >= n, timeout), \
                f"{len(self.got)} of {n} messages arrived"
            return list(self.got)


def _subscriber(port: int, client_id: str, sink: _Sink, cls: type[KnetClient],
                manual_ack: bool = False) -> KnetClient:
    ep = MqttEndpoint(port=port, client_id=client_id, clean_start=False, session_expiry=600)
    client = make_client(ep, manual_ack=manual_ack, client_class=cls)
    client.on_message = sink
    client.start()
    assert client.wait_connected(10)
    client.subscribe_and_wait([("hr/#", 1)], 10)
    return client


def _publisher(port: int) -> KnetClient:
    client = make_client(MqttEndpoint(port=port), default_client_id="hr-pub")
    client.start()
    assert client.wait_connected(10)
    return client


def _mixed_stream(pub: KnetClient, n: int) -> list[dict[str, Any]]:
    """n messages: big and small payloads (so reads cross the read-ahead buffer's edges),
    QoS 0 and 1, some with properties; what a subscriber should see."""
    sent = []
    infos = []
    for i in range(n):
        size = (i * 977) % (READ_AHEAD // 4) if i % 7 else READ_AHEAD + 1234
        payload = i.to_bytes(4, "big") + bytes([i % 251]) * size
        qos = 0 if i % 11 == 0 else 1
        props = None
        if i % 5 == 0:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = [("i", str(i))]
            props.ResponseTopic = f"hr/reply/{i}"
            props.CorrelationData = i.to_bytes(4, "big")
        topic = f"hr/dev-{i % 3}/act"
        infos.append(pub.publish(topic, payload, qos=qos, properties=props))
        sent.append({"topic": topic, "payload": payload, "qos": qos, "retain": False,
                     "user": [("i", str(i))] if props else [],
                     "response": f"hr/reply/{i}" if props else None,
                     "correlation": i.to_bytes(4, "big") if props else None})
    for info in infos:
        info.wait_for_publish(20)
    return sent


def test_high_rate_client_delivers_what_paho_delivers(mosquitto: Mosquitto) -> None:
    fast_sink, plain_sink = _Sink(), _Sink()
    fast = _subscriber(mosquitto.port, "hr-fast", fast_sink, HighRateClient)
    plain = _subscriber(mosquitto.port, "hr-plain", plain_sink, KnetClient)
    pub = _publisher(mosquitto.port)
    try:
        sent = _mixed_stream(pub, 300)
        fast_got, plain_got = fast_sink.wait(len(sent)), plain_sink.wait(len(sent))
        # A QoS 0 message may overtake queued QoS 1 ones (publisher's and broker's in-flight
        # windows), differently per subscriber: compare in the order sent. Within QoS 1 the
        # order is kept.
        def key(m: dict[str, Any]) -> bytes:
            return bytes(m["payload"][:4])

        def fields(got: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return sorted(({k: v for k, v in m.items() if k != "mid"} for m in got), key=key)

        assert fields(fast_got) == fields(plain_got) == sorted(sent, key=key)
        assert [key(m) for m in fast_got if m["qos"] == 1] == \
            [key(m) for m in sent if m["qos"] == 1]
        # Retained: the flag comes through the fast path too.
        pub.publish("hr/retained", b"kept", qos=1, retain=True).wait_for_publish(10)
        late_sink = _Sink()
        late = _subscriber(mosquitto.port, "hr-late", late_sink, HighRateClient)
        got = late_sink.wait(1)
        assert got[0]["topic"] == "hr/retained" and got[0]["retain"] is True
        late.stop()
    finally:
        for c in (fast, plain, pub):
            c.stop()


def test_ack_many_acknowledges_exactly_the_named_messages(mosquitto: Mosquitto) -> None:
    sink = _Sink()
    sub = _subscriber(mosquitto.port, "hr-acks", sink, HighRateClient, manual_ack=True)
    assert isinstance(sub, HighRateClient)
    pub = _publisher(mosquitto.port)
    n = 90  # below the broker's in-flight window (100, broker/config.py): none acked yet
    for i in range(n):
        pub.publish("hr/dev/act", i.to_bytes(4, "big"), qos=1).wait_for_publish(10)
    got = sink.wait(n)
    by_seq = {int.from_bytes(m["payload"], "big"): m["mid"] for m in got}
    acked = [by_seq[i] for i in range(n) if i % 3]  # every message but each third
    sub.ack_many(acked)
    # The PUBACKs are out once a round trip after them returns (one connection, in order).
    sub.subscribe_and_wait([("hr/sync", 1)], 10)
    sub.stop()
    again = _Sink()
    resumed = _subscriber(mosquitto.port, "hr-acks", again, HighRateClient, manual_ack=True)
    try:
        # Queued re-deliveries come before anything published after the resume.
        pub.publish("hr/end", b"end", qos=1).wait_for_publish(10)
        with again.cond:
            assert again.cond.wait_for(lambda: any(m["topic"] == "hr/end" for m in again.got),
                                       20), "the end marker did not arrive"
        redelivered = [int.from_bytes(m["payload"], "big") for m in again.got
                       if m["topic"] == "hr/dev/act"]
        assert sorted(redelivered) == [i for i in range(n) if i % 3 == 0]
    finally:
        resumed.stop()
        pub.stop()
