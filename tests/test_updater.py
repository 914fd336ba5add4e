"""The agent's update path against a real Mosquitto and the trainer's real publisher:
a signed update of exported digits blocks applies live, survives a restart, and replays,
downgrades, damaged active blocks and unhealthy versions are handled."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import write_inputs
from mqtt_helpers import Collector, wait_until
from update_helpers import (
    FLEET,
    Versions,
    agent_toml,
    reports,
    running_agent,
    signed_update,
    versions,
)

from agent.topics import Topics
from broker.launcher import Mosquitto
from cloud_trainer.publisher import BlobPublisher, PublisherSettings

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]
T = Topics(FLEET)


@pytest.fixture(scope="module")
def v(tmp_path_factory: pytest.TempPathFactory) -> Versions:
    return versions(lambda: tmp_path_factory.mktemp("versions"))


@contextmanager
def publisher(broker: Mosquitto, tmp: Path) -> Iterator[BlobPublisher]:
    settings = PublisherSettings(host=broker.host, port=broker.port)
    with BlobPublisher(settings, T, tmp / "trainer-blobs", push_delay=0.2) as pub:
        yield pub


def wait_report(col: Collector, pred: Any, timeout: float = 30) -> list[dict[str, Any]]:
    assert col.wait_for(lambda m: any(pred(json.loads(p)) for _t, p, _r in m), timeout), \
        reports(col.payloads())
    return reports(col.payloads())


def terminal(status: str, version: int) -> Any:
    return lambda r: r["status"] == status and r["version"] == version


def republish(pub: BlobPublisher, payload: bytes) -> None:
    pub.client.publish(T.manifest, payload, qos=1, retain=True).wait_for_publish(5)


def test_update_applies_live_survives_restart_and_refuses_replay_and_downgrade(
        tmp_path: Path, mosquitto: Mosquitto, v: Versions) -> None:
    p1, d1 = v.get("v1")
    p2, d2 = v.get("v2-head")
    p3, d3 = v.get("v3-head")
    write_inputs(tmp_path / "inputs.npz", 64)
    cfg = agent_toml(tmp_path, mosquitto.port, d1 / "manifest.json", v.pub)
    s2, f2 = signed_update(p2, d2, v.key)
    assert [b.sha256 for b in p2.blocks[:3]] == [b.sha256 for b in p1.blocks[:3]]
    with Collector(mosquitto.host, mosquitto.port, T.update("dev-1")) as col, \
            Collector(mosquitto.host, mosquitto.port, T.birth("dev-1")) as births, \
            publisher(mosquitto, tmp_path) as pub:
        with running_agent(cfg) as ag:
            assert wait_until(lambda: ag.metrics.frames_total > 20, 10)
            pub.publish_update(s2, f2)
            got = wait_report(col, terminal("applied", 2))
            assert [r["status"] for r in got] == ["downloading", "downloaded", "applied"]
            assert got[-1]["from_version"] == 1 and got[-1]["bytes"] == p2.blocks[3].size
            assert ag.slot.current.version == 2
            assert wait_until(lambda: json.loads(births.payloads()[-1])["model_version"] == 2,
                              5)
            assert json.loads(births.payloads()[-1])["blocks"]["4"] == p2.blocks[3].sha256
            frames = ag.metrics.frames_total
            assert wait_until(lambda: ag.metrics.frames_total > frames + 20, 10)
            assert ag.metrics.value("knet_update_events_total", {"outcome": "applied"}) == 1

        n = len(col.payloads())
        with running_agent(cfg) as ag:  # restart: back on v2, the retained v2 is ignored
            assert ag.slot.current.version == 2
            assert wait_until(lambda: ag.metrics.frames_total > 20, 10)
            s3, f3 = signed_update(p3, d3, v.key)
            pub.publish_update(s3, f3)
            wait_report(col, terminal("applied", 3))
            assert [r["status"] for r in reports(col.payloads()[n:])] == [
                "downloading", "downloaded", "applied"]

            republish(pub, s2.payload())  # an old manifest replayed
            wait_report(col, lambda r: r.get("reason") == "replayed")
            s1, _ = signed_update(p1, d1, v.key)  # signed, never seen, but older
            republish(pub, s1.payload())
            wait_report(col, lambda r: r.get("reason") == "downgrade")
            assert ag.slot.current.version == 3

            r1, f1 = signed_update(p1, d1, v.key, rollback=True)  # the operator's rollback
            pub.publish_update(r1, f1)
            got = wait_report(col, terminal("applied", 1))
            assert got[-1]["bytes"] == 0  # v1's blocks were on the device already
            assert ag.slot.current.version == 1
            frames = ag.metrics.frames_total
            assert wait_until(lambda: ag.metrics.frames_total > frames + 20, 10)
