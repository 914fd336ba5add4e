"""The agent's update path against a real Mosquitto and the trainer's real publisher:
a signed update of exported digits blocks applies live, survives a restart, and replays,
downgrades, damaged active blocks and unhealthy versions are handled."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_helpers import write_inputs
from mqtt_helpers import Collector, eventually, wait_until
from update_helpers import (
    FLEET,
    Versions,
    agent_toml,
    reports,
    running_agent,
    signed_update,
    versions,
)

from agent.infer.manifest import PartitionManifest
from agent.infer.profiles import load_profile
from agent.infer.runtime import BlockRunner
from agent.wire.codec import decode
from agent.wire.envelope import Envelope
from agent.wire.topics import Topics
from broker.launcher import Mosquitto
from cloud_trainer.release.publisher import BlobPublisher, PublisherSettings

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


def wait_report(col: Collector, pred: Any, timeout: float = 30, since: int = 0
                ) -> list[dict[str, Any]]:
    """Wait for a report (from index ``since`` on) matching ``pred``; all reports so far."""
    assert col.wait_for(lambda m: any(pred(json.loads(p)) for _t, p, _r in m[since:]),
                        timeout), reports(col.payloads())
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
            wait_report(col, terminal("applied", 3), since=n)
            assert [r["status"] for r in reports(col.payloads()[n:])] == [
                "downloading", "downloaded", "applied"]

            republish(pub, s2.payload())  # an old manifest replayed
            wait_report(col, lambda r: r.get("reason") == "replayed", since=n)
            s1, _ = signed_update(p1, d1, v.key)  # signed, never seen, but older
            republish(pub, s1.payload())
            wait_report(col, lambda r: r.get("reason") == "downgrade")
            assert ag.slot.current.version == 3

            r1, f1 = signed_update(p1, d1, v.key, rollback=True)  # the operator's rollback
            pub.publish_update(r1, f1)
            got = wait_report(col, terminal("applied", 1), since=n)
            assert got[-1]["bytes"] == 0  # v1's blocks were on the device already
            assert ag.slot.current.version == 1
            frames = ag.metrics.frames_total
            assert wait_until(lambda: ag.metrics.frames_total > frames + 20, 10)


def chain_outputs(part_dir: Path, x: np.ndarray) -> np.ndarray:
    """The logits of every input through one version's whole chain, one input at a time
    (batch 1, exactly as the agent runs them)."""
    part = PartitionManifest.load(part_dir / "manifest.json")
    runner = BlockRunner(part, part_dir, load_profile("x86-dev"))
    return np.stack([runner.run(x[i:i + 1])[-1][0] for i in range(len(x))])


def test_swap_under_a_full_speed_stream_loses_nothing_and_mixes_no_chains(
        tmp_path: Path, mosquitto: Mosquitto, v: Versions) -> None:
    n = 2000  # distinct inputs, replayed in a loop as fast as the agent takes them
    _p1, d1 = v.get("v1")
    p2, d2 = v.get("v2-full")  # every block changes: a mixed chain matches neither version
    write_inputs(tmp_path / "inputs.npz", n)
    x = np.load(tmp_path / "inputs.npz")["x"]
    old, new = chain_outputs(d1, x), chain_outputs(d2, x)
    assert np.abs(old - new).max(axis=1).min() > 1e-4  # the versions are distinguishable
    cfg = agent_toml(tmp_path, mosquitto.port, d1 / "manifest.json", v.pub,
                     source={"kind": "npz", "path": tmp_path / "inputs.npz", "loop": True},
                     update={"agreement_threshold": 0.0})
    s2, f2 = signed_update(p2, d2, v.key)
    # The agent's state topic too, on the same connection: `stopped` comes after its acts.
    with Collector(mosquitto.host, mosquitto.port, [T.act("dev-1"), T.state("dev-1")]) \
            as acts, \
            Collector(mosquitto.host, mosquitto.port, T.update("dev-1")) as col, \
            publisher(mosquitto, tmp_path) as pub:

        def n_acts(m: list[tuple[str, bytes, bool]]) -> list[bytes]:
            return [p for t, p, _r in m if t == T.act("dev-1")]

        with running_agent(cfg) as ag:
            assert acts.wait_for(lambda m: len(n_acts(m)) >= 300, 20)
            pub.publish_update(s2, f2)
            wait_report(col, terminal("applied", 2))
            assert ag.slot.current.version == 2
            # v1 envelopes still spooled at the swap arrive first: wait for 1000 of v2.
            assert acts.wait_for(lambda m: len(n_acts(m)) >= 1000 and Envelope.unpack(
                n_acts(m)[-1000]).model_version == 2, 60)
        # The stop flushed the spool, then published `stopped`: the acts before it are all.
        acts.expect(lambda m: any(t == T.state("dev-1") and b'"stopped"' in p
                                  for t, p, _r in m), 10, "the agent's stopped state")
        envs = [Envelope.unpack(p) for p in acts.payloads(T.act("dev-1"))]
    # Stopping drops only what was still queued, the newest inputs: the rest is a prefix.
    m = len(envs)
    assert [e.seq for e in envs] == list(range(1, m + 1))  # nothing lost, nothing twice
    assert [e.meta["index"] for e in envs] == list(range(m))
    versions_seen = [e.model_version for e in envs]
    k = versions_seen.index(2)
    assert k >= 300 and m - k >= 1000 and versions_seen == [1] * k + [2] * (m - k), \
        "not one clean switch"
    for e in envs:
        out = decode(e.payload)[0]
        i = e.meta["index"]
        want = (old if e.model_version == 1 else new)[i % n]
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6,
                                   err_msg=f"input {i} v{e.model_version}")


def test_damaged_active_block_on_start_falls_back_to_last_known_good_and_reinstalls(
        tmp_path: Path, mosquitto: Mosquitto, v: Versions) -> None:
    _p1, d1 = v.get("v1")
    p2, d2 = v.get("v2-head")
    p3, d3 = v.get("v3-head")
    write_inputs(tmp_path / "inputs.npz", 64)
    cfg = agent_toml(tmp_path, mosquitto.port, d1 / "manifest.json", v.pub)
    with Collector(mosquitto.host, mosquitto.port, T.update("dev-1")) as col, \
            publisher(mosquitto, tmp_path) as pub:
        with running_agent(cfg) as ag:
            assert wait_until(lambda: ag.metrics.frames_total > 20, 10)
            for part, directory in ((p2, d2), (p3, d3)):
                pub.publish_update(*signed_update(part, directory, v.key))
                wait_report(col, terminal("applied", part.model_version))
            cache = ag.updater.cache  # type: ignore[union-attr]
        damaged = cache.path(p3.blocks[3].sha256)
        data = bytearray(damaged.read_bytes())
        data[len(data) // 2] ^= 0xFF  # a flipped bit on the SD card while powered off
        damaged.write_bytes(bytes(data))
        n = len(col.payloads())
        with running_agent(cfg) as ag:
            got = wait_report(col, lambda r: r.get("reason") == "active_corrupt", since=n)
            note = got[n]
            assert note["status"] == "rolled_back" and note["version"] == 3
            assert note["from_version"] == 2  # the last known good version
            # the retained v3 manifest then re-installs v3, fetching only the damaged block
            got = wait_report(col, terminal("applied", 3), since=n)
            assert [r["status"] for r in got[n:]] == ["rolled_back", "downloading",
                                                      "downloaded", "applied"]
            assert got[-1]["from_version"] == 2 and got[-1]["bytes"] == p3.blocks[3].size
            assert ag.slot.current.version == 3


def test_confidence_collapse_after_a_swap_rolls_back(
        tmp_path: Path, mosquitto: Mosquitto, v: Versions) -> None:
    _p1, d1 = v.get("v1-confident")
    p2, d2 = v.get("v2-unsure")  # same top-1 (passes the self-test), far less confident
    write_inputs(tmp_path / "inputs.npz", 64)
    cfg = agent_toml(tmp_path, mosquitto.port, d1 / "manifest.json", v.pub,
                     health={"watch_s": 30, "min_inputs": 20, "confidence_drop": 0.5})
    with Collector(mosquitto.host, mosquitto.port, T.update("dev-1")) as col, \
            Collector(mosquitto.host, mosquitto.port, T.birth("dev-1")) as births, \
            publisher(mosquitto, tmp_path) as pub:
        with running_agent(cfg) as ag:
            assert wait_until(lambda: ag.metrics.frames_total > 50, 10)
            pub.publish_update(*signed_update(p2, d2, v.key))
            got = wait_report(col, terminal("rolled_back", 2))
            assert [r["status"] for r in got] == ["downloading", "downloaded", "applied",
                                                  "rolled_back"]
            assert got[-1]["reason"] == "health_degraded" and got[-1]["from_version"] == 1
            assert "confidence" in got[-1]["detail"]
            assert ag.slot.current.version == 1
            assert wait_until(lambda: json.loads(births.payloads()[-1])["model_version"] == 1,
                              5)
            frames = ag.metrics.frames_total
            assert wait_until(lambda: ag.metrics.frames_total > frames + 20, 10)
        n = len(col.payloads())
        with running_agent(cfg) as ag:  # persisted: v1, and the retained v2 stays refused
            assert ag.slot.current.version == 1
            updater = ag.updater
            assert updater is not None
            eventually(lambda: updater.received >= 1 and updater.idle(), 10,
                       "the updater to handle the retained v2 manifest")
            assert ag.link.flush(5)  # a report, had there been one, is at the broker
            assert ag.slot.current.version == 1 and len(col.payloads()) == n


def test_timed_out_download_is_tried_again_from_the_chunks_held(
        tmp_path: Path, mosquitto: Mosquitto, v: Versions) -> None:
    _p1, d1 = v.get("v1")
    p2, d2 = v.get("v2-head")
    write_inputs(tmp_path / "inputs.npz", 64)
    cfg = agent_toml(tmp_path, mosquitto.port, d1 / "manifest.json", v.pub,
                     update={"download_timeout_s": 1.5, "retry_after_s": 1.0})
    signed, files = signed_update(p2, d2, v.key)
    with Collector(mosquitto.host, mosquitto.port, T.update("dev-1")) as col, \
            running_agent(cfg) as ag:
        # the manifest is out, but no trainer serves its blocks (it crashed right after)
        col.client.publish(T.manifest, signed.payload(), qos=1, retain=True).wait_for_publish(5)
        got = wait_report(col, lambda r: r.get("reason") == "timeout")
        assert ag.slot.current.version == 1
        with publisher(mosquitto, tmp_path) as pub:  # the trainer is back; no new manifest
            pub.serve(signed, files)
            got = wait_report(col, terminal("applied", 2))
        assert [r["status"] for r in got][:2] == ["downloading", "rejected"]
        assert got[-1]["bytes"] == p2.blocks[3].size and ag.slot.current.version == 2
