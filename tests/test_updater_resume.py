"""A download cut off halfway — by a broker restart, or by SIGKILL of the agent — resumes
and applies, and no chunk the device already held is asked for again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from agent_helpers import REPO, write_inputs
from mqtt_helpers import Collector, wait_until
from update_helpers import FLEET, Versions, agent_toml, running_agent, signed_update, versions

from agent.update.update_manifest import SignedManifest
from agent.wire.topics import Topics
from broker.launcher import Mosquitto
from cloud_trainer.release.publisher import BlobPublisher, PublisherSettings

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]
T = Topics(FLEET)


@pytest.fixture(scope="module")
def v(tmp_path_factory: pytest.TempPathFactory) -> Versions:
    return versions(lambda: tmp_path_factory.mktemp("versions"))


@contextmanager
def slow_publisher(broker: Mosquitto, tmp: Path) -> Iterator[BlobPublisher]:
    """Serves only re-requests, about 6 chunks a second: a download takes several seconds."""
    settings = PublisherSettings(host=broker.host, port=broker.port)
    with BlobPublisher(settings, T, tmp / "trainer-blobs", rate_chunks_per_s=6,
                       burst_chunks=2, dedupe_s=0.0) as pub:
        yield pub


def held_chunks(cache_dir: Path, signed: SignedManifest) -> set[tuple[str, int]]:
    """Chunks on the device's disk: partial downloads plus whole blocks already assembled."""
    held = set()
    chunks = signed.manifest.variants[0].chunks
    for sha, info in chunks.items():
        if (cache_dir / "blobs" / f"{sha}.onnx").is_file():
            held |= {(sha, n) for n in range(info.count)}
        for p in (cache_dir / "partial" / sha).glob("*.chunk"):
            held.add((sha, int(p.stem)))
    return held


def requested(col: Collector, since: int) -> set[tuple[str, int]]:
    out = set()
    for p in col.payloads()[since:]:
        req = json.loads(p)
        out |= {(req["sha256"], n) for n in req["chunks"]}
    return out


def statuses(col: Collector) -> list[str]:
    return [json.loads(p)["status"] for p in col.payloads()]


def test_download_resumes_after_a_broker_restart(tmp_path: Path, mosquitto: Mosquitto,
                                                 v: Versions) -> None:
    _p1, d1 = v.get("v1")
    p2, d2 = v.get("v2-full")
    write_inputs(tmp_path / "inputs.npz", 64)
    cfg = agent_toml(tmp_path, mosquitto.port, d1 / "manifest.json", v.pub,
                     update={"agreement_threshold": 0.0})
    signed, files = signed_update(p2, d2, v.key)
    total = sum(i.count for i in signed.manifest.variants[0].chunks.values())
    cache = tmp_path / "state-dev-1" / "update" / "blocks"
    with Collector(mosquitto.host, mosquitto.port, T.blob_request("dev-1"),
                   client_id="req-watch", persistent=True) as reqs, \
            Collector(mosquitto.host, mosquitto.port, T.update("dev-1"), client_id="upd-watch",
                      persistent=True) as col, \
            slow_publisher(mosquitto, tmp_path) as pub, running_agent(cfg) as ag:
        pub.publish_update(signed, files, push_chunks=False)
        assert wait_until(lambda: len(held_chunks(cache, signed)) >= 10, 20)
        mosquitto.stop()
        held = held_chunks(cache, signed)
        mark = len(reqs.payloads())
        assert 10 <= len(held) < total
        frames = ag.metrics.frames_total
        assert wait_until(lambda: ag.metrics.frames_total > frames + 50, 10)  # serving, offline
        assert ag.slot.current.version == 1
        mosquitto.start()
        assert col.wait_for(lambda m: "applied" in statuses(col), 60), statuses(col)
        assert ag.slot.current.version == 2
        assert statuses(col) == ["downloading", "downloaded", "applied"]
        again = requested(reqs, mark)
    assert again, "the device asked for the rest after the restart"
    assert not again & held, f"re-requested held chunks {sorted(again & held)[:5]}"


def start_agent_process(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "agent.cli", "--config", str(config),
                                 "--log-level", "INFO"], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ})


def test_download_resumes_after_the_agent_is_killed(tmp_path: Path, mosquitto: Mosquitto,
                                                    v: Versions) -> None:
    _p1, d1 = v.get("v1")
    p2, d2 = v.get("v2-full")
    write_inputs(tmp_path / "inputs.npz", 64)
    cfg = agent_toml(tmp_path, mosquitto.port, d1 / "manifest.json", v.pub,
                     update={"agreement_threshold": 0.0})
    signed, files = signed_update(p2, d2, v.key)
    chunks = signed.manifest.variants[0].chunks
    total = sum(i.count for i in chunks.values())
    cache = tmp_path / "state-dev-1" / "update" / "blocks"
    log = tmp_path / "agent.log"
    with Collector(mosquitto.host, mosquitto.port, T.blob_request("dev-1")) as reqs, \
            Collector(mosquitto.host, mosquitto.port, T.update("dev-1")) as col, \
            slow_publisher(mosquitto, tmp_path) as pub:
        proc = start_agent_process(cfg, log)
        try:
            pub.publish_update(signed, files, push_chunks=False)
            assert wait_until(lambda: len(held_chunks(cache, signed)) >= 10, 30), \
                log.read_text()[-3000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            held = held_chunks(cache, signed)
            assert 10 <= len(held) < total
            mark = len(reqs.payloads())
            proc = start_agent_process(cfg, log)
            assert col.wait_for(lambda m: "applied" in statuses(col), 60), \
                log.read_text()[-3000:]
            applied = json.loads(col.payloads()[-1])
            again = requested(reqs, mark)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert statuses(col) == ["downloading", "downloading", "downloaded", "applied"]
    assert applied["version"] == 2 and applied["session"] == 2
    assert not again & held, f"re-requested held chunks {sorted(again & held)[:5]}"
    sizes = {b.sha256: b.size for b in p2.blocks}
    held_bytes = sum(chunks[sha].chunk_length(n, sizes[sha]) for sha, n in held)
    assert applied["bytes"] == sum(sizes.values()) - held_bytes  # only what was missing
    with running_agent(cfg) as ag:  # and it comes back on v2
        assert ag.slot.current.version == 2


def test_forged_manifest_does_not_stop_a_download_a_newer_version_does(
        tmp_path: Path, mosquitto: Mosquitto, v: Versions) -> None:
    _p1, d1 = v.get("v1")
    p2, d2 = v.get("v2-full")
    p3, d3 = v.get("v3-head")
    write_inputs(tmp_path / "inputs.npz", 64)
    cfg = agent_toml(tmp_path, mosquitto.port, d1 / "manifest.json", v.pub,
                     update={"agreement_threshold": 0.0})
    s2, f2 = signed_update(p2, d2, v.key)
    cache = tmp_path / "state-dev-1" / "update" / "blocks"
    with Collector(mosquitto.host, mosquitto.port, T.update("dev-1")) as col, \
            slow_publisher(mosquitto, tmp_path) as pub, running_agent(cfg) as ag:
        pub.publish_update(s2, f2, push_chunks=False)
        assert wait_until(lambda: len(held_chunks(cache, s2)) >= 5, 20)
        forged = json.loads(s2.payload())
        forged["manifest"]["version"] = 9  # not what was signed
        pub.client.publish(T.manifest, json.dumps(forged).encode(), qos=1,
                           retain=True).wait_for_publish(5)
        held = len(held_chunks(cache, s2))
        assert wait_until(lambda: len(held_chunks(cache, s2)) >= held + 4, 10)
        assert statuses(col) == ["downloading"]  # still fetching v2
        pub.publish_update(*signed_update(p3, d3, v.key))
        assert col.wait_for(lambda m: "applied" in statuses(col), 30), statuses(col)
        got = [json.loads(p) for p in col.payloads()]
        assert ag.slot.current.version == 3
    assert [(r["status"], r["version"], r["reason"]) for r in got] == [
        ("downloading", 2, None), ("rejected", 2, "cancelled"), ("downloading", 3, None),
        ("downloaded", 3, None), ("applied", 3, None)]


def test_agent_dying_during_the_health_watch_falls_back_a_clean_stop_does_not(
        tmp_path: Path, mosquitto: Mosquitto, v: Versions) -> None:
    _p1, d1 = v.get("v1")
    p2, d2 = v.get("v2-head")
    p3, d3 = v.get("v3-head")
    write_inputs(tmp_path / "inputs.npz", 64)
    cfg = agent_toml(tmp_path, mosquitto.port, d1 / "manifest.json", v.pub,
                     health={"watch_s": 120})
    log = tmp_path / "agent.log"
    with Collector(mosquitto.host, mosquitto.port, T.update("dev-1")) as col, \
            BlobPublisher(PublisherSettings(host=mosquitto.host, port=mosquitto.port), T,
                          tmp_path / "trainer-blobs", push_delay=0.2) as pub:
        with running_agent(cfg) as ag:  # v2 applied, then a clean stop during its watch
            assert wait_until(lambda: ag.metrics.frames_total > 20, 10)
            pub.publish_update(*signed_update(p2, d2, v.key))
            assert col.wait_for(lambda m: "applied" in statuses(col), 30), statuses(col)
            assert ag.updater is not None and ag.updater.watching
        proc = start_agent_process(cfg, log)  # comes back on v2; v3 applied, then SIGKILL
        try:
            n = len(col.payloads())
            pub.publish_update(*signed_update(p3, d3, v.key))
            assert col.wait_for(lambda m: statuses(col)[n:].count("applied") == 1, 30), \
                log.read_text()[-3000:]
            assert json.loads(col.payloads()[-1])["from_version"] == 2
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        n = len(col.payloads())
        with running_agent(cfg) as ag:  # died on probation: v3 is not trusted again
            assert ag.slot.current.version == 2
            assert col.wait_for(lambda m: len(m) > n, 10)
            note = json.loads(col.payloads()[n])
            assert (note["status"], note["reason"], note["version"], note["from_version"]) \
                == ("rolled_back", "health_degraded", 3, 2)
            frames = ag.metrics.frames_total
            assert wait_until(lambda: ag.metrics.frames_total > frames + 20, 10)
            assert ag.slot.current.version == 2 and len(col.payloads()) == n + 1
