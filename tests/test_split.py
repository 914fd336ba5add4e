"""A device with a partial partition asks the cloud to finish; the reply matches local
teacher inference, and bad requests get error replies rather than silence."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import torch
from agent_helpers import agent_config, start_agent, write_inputs
from mqtt_helpers import Collector
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt.endpoint import MqttEndpoint
from agent.wire.codec import encode
from agent.wire.envelope import Envelope
from agent.wire.topics import Topics
from broker.launcher import Mosquitto
from cloud_trainer.models.export import export_partition
from cloud_trainer.models.zoo import get_pair
from cloud_trainer.serve.split import SplitServer

pytestmark = pytest.mark.mqtt
T = Topics("lab")


def endpoint(broker: Mosquitto) -> MqttEndpoint:
    return MqttEndpoint(host=broker.host, port=broker.port)


def request(port: int, payload: bytes, topic: str, *, listen: str = "dev-1",
            response_topic: str | None = None, corr: bytes = b"\x00\x07") -> dict:
    """Publish one request and wait for the reply on ``listen``'s reply topic."""
    got: dict = {}
    done = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c, _u, msg):
        got.update(json.loads(msg.payload), corr=getattr(msg.properties, "CorrelationData", None))
        done.set()

    subscribed = threading.Event()
    c.on_message = on_message
    c.on_subscribe = lambda *_: subscribed.set()
    c.connect("127.0.0.1", port)
    c.subscribe(T.reply(listen), 1)
    c.loop_start()
    assert subscribed.wait(10), "no SUBACK"
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = response_topic or T.reply(listen)
    props.CorrelationData = corr
    c.publish(topic, payload, qos=1, properties=props)
    assert done.wait(10), "no reply"
    c.disconnect()
    c.loop_stop()
    return got


def test_reply_matches_local_teacher_inference_and_errors_are_answered(
        mosquitto: Mosquitto) -> None:
    pair = get_pair("digits", seed=2)
    pair.student.eval()
    pair.teacher.eval()
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a2 = pair.student.run(x, 1, 2)
        expected = pair.teacher.run(a2, 3).argmax(1).item()
    env = Envelope("dev-1", 1, 1, 0.0, 1, 2, encode(a2.numpy(), "raw"), meta={"model": "digits"})
    with SplitServer(pair.teacher, "digits", T, endpoint(mosquitto)) as server:
        assert server.wait_ready(5)
        got = request(mosquitto.port, env.pack(), T.infer("dev-1"))
        assert got["prediction"] == expected and got["corr"] == b"\x00\x07"
        assert 0 < got["confidence"] <= 1
        bad = request(mosquitto.port, b"garbage", T.infer("dev-1"))
        assert "error" in bad
        wrong = Envelope("dev-1", 1, 2, 0.0, 1, 2, encode(np.zeros((1, 5)), "raw"))
        assert "shape" in request(mosquitto.port, wrong.pack(), T.infer("dev-1"))["error"]
        spoof = request(mosquitto.port, env.pack(), T.infer("dev-2"), listen="dev-2")
        assert "topic device" in spoof["error"]
        assert server.stats["replies"] == 1 and server.stats["errors"] == 3


def test_agent_with_a_partial_partition_gets_its_answers(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    pair = get_pair("digits", seed=0)
    export_partition(pair.student, tmp_path / "model", model_id="digits", model_version=1,
                     first=1, last=2, ort_version="1.16.3")
    write_inputs(tmp_path / "inputs.npz", 80)
    cfg = agent_config(tmp_path, mosquitto.port, tmp_path / "model" / "manifest.json",
                       source={"kind": "npz", "path": tmp_path / "inputs.npz", "rate_hz": 40},
                       split={"enabled": True}, uplink={"enabled": False})
    with SplitServer(pair.teacher, "digits", T, endpoint(mosquitto)) as server, \
            Collector(mosquitto.host, mosquitto.port, T.stats("dev-1")) as sub:
        assert server.wait_ready(5)
        proc = start_agent(cfg, "--exit-when-done")  # waits for every reply or timeout
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-2000:]
        last = json.loads(sub.payloads()[-1])
    split = last["split"]
    # Every request is accounted for: answered, or failed at once while still connecting.
    assert split["errors"] == 0 and split["timeouts"] == 0
    assert split["replies"] + split["offline"] == split["requests"]
    assert last["accuracy"] is not None  # replies were scored against the labels
    assert server.stats["replies"] >= 60


def test_reply_goes_only_to_the_requesters_own_topic_whatever_responsetopic_names(
        mosquitto: Mosquitto) -> None:
    """Confused deputy: a request naming another device's reply topic, the manifest or a
    trainer topic as its ResponseTopic is answered on the requester's own reply topic."""
    pair = get_pair("digits", seed=2)
    pair.teacher.eval()
    a2 = torch.zeros(1, *pair.teacher.boundary_shapes[2])
    env = Envelope("dev-1", 1, 1, 0.0, 1, 2, encode(a2.numpy(), "raw"), meta={"model": "digits"})
    victims = [T.reply("dev-2"), T.manifest, T.trainer_state("trainer-1"), T.input("dev-2"),
               "elsewhere/#"]
    with SplitServer(pair.teacher, "digits", T, endpoint(mosquitto)) as server, \
            Collector(mosquitto.host, mosquitto.port, "#") as everything:
        assert server.wait_ready(5)
        for i, victim in enumerate(victims):
            got = request(mosquitto.port, env.pack(), T.infer("dev-1"), response_topic=victim,
                          corr=bytes([i]))
            assert got["corr"] == bytes([i]) and "prediction" in got
        # Oversized correlation data is not echoed: an error reply on the own topic.
        got = request(mosquitto.port, env.pack(), T.infer("dev-1"), corr=b"x" * 65)
        assert "CorrelationData" in got["error"] and got["corr"] is None
        n = len(victims) + 1
        assert everything.wait_for(
            lambda m: sum(t == T.reply("dev-1") for t, _p, _r in m) == n, 10)
        topics = {t for t, _p, _r in everything.messages}
    assert topics == {T.infer("dev-1"), T.reply("dev-1")}, topics
    assert server.stats["foreign_response_topic"] == len(victims)
    assert server.stats["internal"] == 0


def test_replicas_in_one_share_group_answer_each_request_once(mosquitto: Mosquitto) -> None:
    """Split inference served by any replica: two servers, every request answered once."""
    pair = get_pair("digits", seed=2)
    pair.student.eval()
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a2 = pair.student.run(x, 1, 2)
    replies: list[bytes] = []
    got_all = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda _c, _u, m: (replies.append(m.properties.CorrelationData),
                                      len(replies) >= 40 and got_all.set())
    subscribed = threading.Event()
    c.on_subscribe = lambda *_: subscribed.set()
    c.connect("127.0.0.1", mosquitto.port)
    c.subscribe(T.reply("dev-1"), 1)
    c.loop_start()
    servers = [SplitServer(pair.teacher, "digits", T,
                           MqttEndpoint(host=mosquitto.host, port=mosquitto.port,
                                        client_id=f"split-{i}"),
                           share_group="trainers-split")
               for i in range(2)]
    with servers[0], servers[1]:
        assert subscribed.wait(10) and all(s.wait_ready(10) for s in servers)
        for n in range(40):
            env = Envelope("dev-1", 1, n, 0.0, 1, 2, encode(a2.numpy(), "raw"),
                           meta={"model": "digits"})
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = T.reply("dev-1")
            props.CorrelationData = n.to_bytes(2, "big")
            c.publish(T.device("dev-1", "infer"), env.pack(), qos=1, properties=props)
        assert got_all.wait(30), len(replies)
    c.disconnect()
    c.loop_stop()
    assert sorted(replies) == [n.to_bytes(2, "big") for n in range(40)]  # once each
    assert sum(s.stats["replies"] for s in servers) == 40
    assert all(s.stats["replies"] > 0 for s in servers), [s.stats for s in servers]
