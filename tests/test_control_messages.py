"""Typed control messages (agent/wire/control.py) and topic kinds (agent/wire/topics.py): what a
device and the trainer say round-trips, and anything else is refused with a named reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mqtt_helpers import wait_until

from agent.mqtt.client import make_client
from agent.mqtt.endpoint import MqttEndpoint
from agent.wire.control import (
    Birth,
    ControlMessageError,
    DeviceState,
    Stats,
    TrainerState,
    parse_control,
)
from agent.wire.topics import TopicError, TopicKind, Topics
from broker.launcher import Mosquitto
from cloud_trainer.ingest.fleet import FleetTable
from cloud_trainer.ingest.ingestor import Ingestor, IngestSettings
from cloud_trainer.ingest.store import SQLiteSampleStore

T = Topics("lab")
SHA = "ab" * 32


def test_topics_parse_to_their_kind() -> None:
    assert T.parse(T.state("cam-1")).kind is TopicKind.STATE
    assert T.parse(T.act("cam-1")).device == "cam-1"
    assert T.parse(T.blob_request("cam-1")).kind is TopicKind.BLOB_REQUEST
    assert T.parse(T.manifest).kind is TopicKind.MANIFEST
    blob = T.parse(T.blob(SHA, 7))
    assert (blob.kind, blob.sha256, blob.chunk) == (TopicKind.BLOB, SHA, 7)
    trainer = T.parse(T.trainer_state("trainer-1"))
    assert (trainer.kind, trainer.trainer) == (TopicKind.TRAINER_STATE, "trainer-1")
    for leaf in TopicKind:
        if leaf not in (TopicKind.MANIFEST, TopicKind.BLOB, TopicKind.TRAINER_STATE):
            assert T.parse(T.device("d-1", leaf.value)).kind is leaf


@pytest.mark.parametrize("topic", [
    "knet/v1/lab/cam-1/unknown", "knet/v1/lab/cam-1/act/x", "knet/v1/other/cam-1/act",
    "knet/v2/lab/cam-1/act", "knet/v1/lab/Cam_1/act", "knet/v1/lab/model/act",
    f"knet/v1/lab/model/blob/{SHA}/²", f"knet/v1/lab/model/blob/{SHA}/-1",
    "knet/v1/lab/model/blob/xyz/1", "knet/v1/lab/model/other", "knet/v1/trainer/X/state",
    "elsewhere/cam-1/act", "", "knet/v1/lab/cam-1/endswith/act"])
def test_topics_that_are_not_ours_are_refused(topic: str) -> None:
    with pytest.raises(TopicError):
        T.parse(topic)


MESSAGES = [
    DeviceState(state="online", session=3, device="cam-1", ts=1.5),
    DeviceState(state="offline", session=3, device="cam-1"),  # the Will: no ts
    Birth(device="cam-1", session=3, agent_version="0.1.0", model_id="digits",
          model_version=2, partition={"first": 1, "last": 2, "num_blocks": 4},
          blocks={"1": SHA}, providers=["CPUExecutionProvider"], uplink={"codec": "raw"}),
    Stats(model_version=2, session=3, fps=12.5, queue_depth={"infer": 0},
          link={"sent": 4}, network={"rtt_ms": 3.2, "uplink_bytes_per_s": 1e4,
                                     "acked_in_window": 9}),
    TrainerState(state="online", trainer="trainer-1", fleet="lab", pid=7, started_at=1.0,
                 time=2.0, rounds=1, runs={"j": {"run_id": "r1", "status": "pushed",
                                                 "version": 2, "reason": "",
                                                 "started_at": "2026-01-01T00:00:00"}}),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_round_trip_with_their_version(msg: DeviceState) -> None:
    payload = msg.payload()
    body = json.loads(payload)
    assert body["format_version"] == 1
    again = parse_control(msg.KIND, payload)
    assert type(again) is type(msg) and again == msg and again.payload() == payload


def test_unset_fields_stay_off_the_wire_and_unknown_ones_are_kept() -> None:
    assert json.loads(DeviceState(state="offline", session=1).payload()) == {
        "state": "offline", "session": 1, "format_version": 1}
    newer = Birth.parse(b'{"device": "cam-1", "gpu_temp_c": 51, "block_versions": {"1": "x"},'
                        b' "eps": ["CPU"]}')
    assert newer.blocks == {"1": "x"} and newer.providers == ["CPU"]
    assert json.loads(newer.payload())["gpu_temp_c"] == 51
    assert Stats.parse(b'{"fps": NaN}').fps != Stats.parse(b'{"fps": NaN}').fps  # NaN kept


@pytest.mark.parametrize(("cls", "payload", "reason"), [
    (DeviceState, b'{"state": "online", "format_version": 2}', "version"),
    (DeviceState, b'{"state": "online", "format_version": "1"}', "version"),
    (DeviceState, b'{"state": "online", "format_version": true}', "version"),
    (TrainerState, b'{"state": "online", "format_version": 99}', "version"),
    (DeviceState, b'{"state": "napping"}', "invalid"),
    (DeviceState, b'{"state": "online", "session": "3"}', "invalid"),
    (DeviceState, b'{"state": "online", "session": true}', "invalid"),
    (DeviceState, b'{"state": "online", "session": -1}', "invalid"),
    (DeviceState, b'{"state": "online", "ts": NaN}', "malformed"),
    (Birth, b'{"providers": [1]}', "invalid"),
    (Birth, b'{"partition": {"first": "1"}}', "invalid"),
    (TrainerState, b'{"state": "online"}', "invalid"),
    (DeviceState, b"[1, 2]", "malformed"),
    (DeviceState, b"null", "malformed"),
    (DeviceState, b"\xff\xfe", "malformed"),
    (DeviceState, b"{", "malformed"),
    (DeviceState, b"[" * 5000 + b"]" * 5000, "malformed"),
    (DeviceState, b'{"state": "online", "session": ' + b"9" * 5000 + b"}", "malformed"),
    (Stats, b'{"fps": 1' + b" " * (300 * 1024) + b"}", "oversized"),
])
def test_refused_with_a_named_reason(cls: type[DeviceState], payload: bytes,
                                     reason: str) -> None:
    with pytest.raises(ControlMessageError) as err:
        cls.parse(payload)
    assert err.value.reason == reason, err.value


def test_fleet_table_applies_typed_messages_and_ignores_older_sessions() -> None:
    table = FleetTable()
    assert table.update_birth("cam-1", MESSAGES[2].payload(), now=1.0)
    assert table.update_state("cam-1", MESSAGES[0].payload(), now=2.0)
    info = table.get("cam-1")
    assert info is not None and info.online and info.model_version == 2
    assert info.partition == {"first": 1, "last": 2, "num_blocks": 4}
    assert info.block_versions == {"1": SHA} and info.birth["agent_version"] == "0.1.0"
    assert not table.update_state("cam-1", DeviceState(state="offline", session=2).payload())
    assert table.stale_ignored == 1 and table.online() == ["cam-1"]


@pytest.mark.mqtt
def test_ingest_counts_refused_control_messages_by_reason(mosquitto: Mosquitto,
                                                          tmp_path: Path) -> None:
    settings = IngestSettings(port=mosquitto.port, client_id="ingest-ctl",
                              reconnect_min_delay=0.05, reconnect_max_delay=0.5)
    pub = make_client(MqttEndpoint(host=mosquitto.host, port=mosquitto.port)).start()
    store = SQLiteSampleStore(tmp_path / "store")
    try:
        assert pub.wait_connected(10)
        with Ingestor(settings, T, store) as ing:
            assert ing.wait_subscribed(10)
            for topic, body in ((T.state("cam-1"), b'{"state": "online", "format_version": 9}'),
                                (T.birth("cam-1"), b"[[[[]]]]" * 2),
                                (T.state("cam-2"), b'{"state": "online", "session": 1}')):
                pub.publish(topic, body, qos=1).wait_for_publish(5)
            assert wait_until(lambda: ing.stats.fleet_messages == 3, 10)
            counted = ing.metrics()["control_rejects"]
            assert counted == {"state/version": 1, "birth/malformed": 1}, counted
            assert ing.fleet.online() == ["cam-2"]
    finally:
        pub.stop()
        store.close()
