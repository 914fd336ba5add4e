"""One device's ACL-legal but pathological JSON must never take the trainer down: bounded
parsing (agent/safejson.py), per-message catch-all callbacks, and a dead network thread that
ends the process instead of leaving a zombie (cloud_trainer/guard.py)."""

from __future__ import annotations

import json
import logging
import struct
import threading
import zlib
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from mqtt_helpers import Collector
from paho.mqtt.enums import CallbackAPIVersion
from trainer_helpers import FLEET, start_trainer, trainer_toml

from agent import safejson
from agent.update.update_manifest import UpdateRejected, parse_signed
from agent.wire.envelope import _FIXED, Envelope, EnvelopeError
from agent.wire.topics import Topics
from agent.wire.update_report import UpdateReport, UpdateReportError
from broker.launcher import Mosquitto
from cloud_trainer.guard import RateLimitedLog, ThreadDeathWatch, guard_callback
from cloud_trainer.ingest.fleet import FleetMessageError, FleetTable

T = Topics(FLEET)
DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"session": 1, "state": "online", "x": ' + b'{"a":' * 5000 + b"1" + \
    b"}" * 5000 + b"}"
HUGE_INT = b'{"state": "online", "session": ' + b"9" * 5000 + b"}"
HOSTILE = [DEEP, DEEP_OBJECT, HUGE_INT, b'{"state": "online", "session": NaN}',
           b'{"state": "online"' + b" " * (300 * 1024) + b"}", b"\xff\xfe", b"[1, 2"]


@pytest.mark.parametrize("doc", HOSTILE)
def test_safejson_refuses_with_one_named_error(doc: bytes) -> None:
    with pytest.raises(safejson.UnsafeJSONError):
        safejson.loads(doc, max_bytes=256 * 1024)


def test_safejson_depth_scan_ignores_brackets_inside_strings() -> None:
    doc = json.dumps({"a": "[[[[{{{{" * 1000, "b": [[1]]}).encode()
    assert safejson.nesting_depth(doc) == 3
    assert safejson.loads(doc)["b"] == [[1]]
    assert safejson.loads(b'{"n": -' + b"9" * 40 + b"}")["n"] == -int("9" * 40)


@pytest.mark.parametrize("doc", [b'{"manifest": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                                 b'{"manifest": {"version": ' + b"7" * 5000 + b"}}"])
def test_pathological_manifest_is_malformed(doc: bytes) -> None:
    with pytest.raises(UpdateRejected) as info:
        parse_signed(doc, None, allow_unsigned=True)
    assert info.value.reason == "malformed"


@pytest.mark.parametrize("doc", HOSTILE)
def test_fleet_table_refuses_pathological_state_and_birth(doc: bytes) -> None:
    table = FleetTable()
    with pytest.raises(FleetMessageError):
        table.update_state("evil", doc)
    with pytest.raises(FleetMessageError):
        table.update_birth("evil", doc)
    assert table.update_state("good", b'{"state": "online", "session": 3}')
    assert table.online() == ["good"]


def test_envelope_meta_and_update_report_are_bounded() -> None:
    env = Envelope("dev-1", 1, 1, 0.0, 1, 0, b"x", meta={"m": 1})
    assert Envelope.unpack(env.pack()).meta == {"m": 1}
    # json.dumps cannot write a 30,000-deep meta, so the envelope is spliced by hand.
    deep_meta = b"[" * 30_000 + b"]" * 30_000
    fixed = Envelope("dev-1", 1, 1, 0.0, 1, 0, b"x").pack()[:_FIXED.size]
    body = fixed + struct.pack("<B", 5) + b"dev-1" + struct.pack("<H", len(deep_meta)) + \
        deep_meta + struct.pack("<I", 1) + b"x"
    with pytest.raises(EnvelopeError, match="meta"):
        Envelope.unpack(body + struct.pack("<I", zlib.crc32(body)))
    with pytest.raises(UpdateReportError):
        UpdateReport.parse(b"[" * 10_000)


def test_guarded_callback_counts_and_drops_and_rate_limits(caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    errors: Counter[str] = Counter()

    def boom(_c: object, _u: object, _m: object) -> None:
        raise RecursionError("deep")

    guarded = guard_callback("state", boom, errors, RateLimitedLog(logging.getLogger("t"), 60))
    msg = mqtt.MQTTMessage(topic=b"knet/v1/lab/evil/state")
    for _ in range(5):
        guarded(None, None, msg)
    assert errors["state"] == 5
    assert sum("message on" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.mqtt
def test_thread_death_watch_sees_a_paho_network_thread_die(mosquitto: Mosquitto) -> None:
    """Without the guard, a raising on_message ends paho's network thread (the zombie)."""
    died = threading.Event()
    names: list[str] = []
    watch = ThreadDeathWatch(lambda name, _e: (names.append(name), died.set())).install()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="victim", protocol=mqtt.MQTTv5)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_connect = lambda c, *_: c.subscribe("x/#", 1)

    def on_message(*_: object) -> None:
        raise RecursionError("a callback without a guard")

    client.on_message = on_message
    try:
        client.connect(mosquitto.host, mosquitto.port)
        client.loop_start()
        assert subscribed.wait(10)
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect(mosquitto.host, mosquitto.port)
        pub.loop_start()
        pub.publish("x/1", b"1", qos=1).wait_for_publish(10)
        pub.disconnect()
        pub.loop_stop()
        assert died.wait(10), "the network thread did not die"
        assert names and names[0].startswith("paho-mqtt-client")
    finally:
        watch.uninstall()
        client.disconnect()
    assert threading.excepthook is not watch._hook


@pytest.mark.mqtt
@pytest.mark.slow
def test_trainer_survives_retained_pathological_state_and_birth(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Retained hostile documents on a device's own state/birth topics: the trainer stays
    online, keeps processing later messages, and counts the drops."""
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()
    for i, doc in enumerate(HOSTILE):
        pub.publish(T.state(f"evil-{i}"), doc, qos=1, retain=True).wait_for_publish(10)
        pub.publish(T.birth(f"evil-{i}"), doc, qos=1, retain=True).wait_for_publish(10)
    config = trainer_toml(tmp_path, mosquitto.port, ingest={"enabled": True})
    state_topic = T.trainer_state("trainer-t")
    with Collector(mosquitto.host, mosquitto.port, state_topic) as states:
        daemon = start_trainer(config)
        try:
            assert states.wait_for(lambda m: any(
                json.loads(p).get("state") == "online" for _t, p, _r in m), 90)
            # After the hostile retained messages, a good one is still processed.
            pub.publish(T.state("good-1"), json.dumps({"state": "online", "session": 1}),
                        qos=1, retain=True).wait_for_publish(10)
            assert states.wait_for(lambda m: json.loads(m[-1][1]).get("devices_online") == 1,
                                   30), states.payloads()[-1]
            last = json.loads(states.payloads()[-1])
            assert last["state"] == "online"
            assert last["ingest"]["bad_total"] == 2 * len(HOSTILE)
            assert last["dropped"]["fleet_bad"] == 2 * len(HOSTILE)
            assert last["dropped"]["callback_errors"] == {}
            assert daemon.poll() is None
        finally:
            daemon.terminate()
            out, _ = daemon.communicate(timeout=60)
            pub.disconnect()
            pub.loop_stop()
    assert daemon.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
