"""Hostile and broken updates: each is refused with the right reason while the agent keeps
serving on its running version (one agent and broker for the module; every case publishes
a new retained manifest and waits for the device's report)."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import write_inputs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mqtt_helpers import Collector, eventually, wait_until
from update_helpers import (
    FLEET,
    Versions,
    agent_toml,
    running_agent,
    signed_update,
    versions,
)

from agent.infer.manifest import PartitionManifest, sha256_file
from agent.service import Agent
from agent.update.signing import key_id
from agent.update.update_manifest import SignedManifest, Targets, canonical_json, unsigned_payload
from agent.wire.envelope import Envelope
from agent.wire.topics import Topics
from broker.launcher import Mosquitto
from cloud_trainer.release.publisher import BlobPublisher, PublisherSettings

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]
T = Topics(FLEET)
MAX_BLOCK = 50_000  # the device's own limit: block 3 (131 KB) may not be downloaded


@dataclass
class Rig:
    v: Versions
    agent: Agent
    pub: BlobPublisher
    reports: Collector
    acts: Collector
    tmp: Path
    broker: Mosquitto

    def publish_raw(self, payload: bytes) -> None:
        self.pub.client.publish(T.manifest, payload, qos=1, retain=True).wait_for_publish(5)

    def expect_refused(self, reason: str, timeout: float = 30) -> dict[str, Any]:
        """Wait for the refusal, then check the agent still serves v1 and never swapped."""
        frames = self.agent.metrics.frames_total
        acts = len(self.acts.payloads())

        def refused() -> dict[str, Any] | None:
            for p in self.reports.payloads()[self.seen:]:
                r = json.loads(p)
                if r["status"] == "rejected":
                    return r  # type: ignore[no-any-return]
            return None

        assert wait_until(lambda: refused() is not None, timeout), \
            self.reports.payloads()[self.seen:]
        report = refused()
        assert report is not None
        statuses = [json.loads(p)["status"] for p in self.reports.payloads()[self.seen:]]
        self.seen = len(self.reports.payloads())
        assert report["reason"] == reason, report
        assert report["device"] == "dev-1" and report["from_version"] == 1
        assert "applied" not in statuses
        assert self.agent.slot.current.version == 1
        # still serving, on the old version
        assert wait_until(lambda: self.agent.metrics.frames_total > frames + 20, 10)
        assert wait_until(lambda: len(self.acts.payloads()) > acts + 20, 10)
        assert {Envelope.unpack(p).model_version for p in self.acts.payloads()[acts:]} == {1}
        assert self.agent.metrics.value("knet_update_events_total",
                                        {"outcome": f"rejected_{reason}"}) >= 1
        return report

    seen: int = 0


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    v = versions(lambda: tmp_path_factory.mktemp("versions"))
    tmp = tmp_path_factory.mktemp("hostile")
    _p1, d1 = v.get("v1")
    write_inputs(tmp / "inputs.npz", 64)
    cfg = agent_toml(tmp, 0, d1 / "manifest.json", v.pub,
                     update={"download_timeout_s": 4, "max_block_bytes": MAX_BLOCK})
    with Mosquitto(tmp / "broker") as broker:
        cfg.write_text(cfg.read_text().replace("port = 0", f"port = {broker.port}"))
        settings = PublisherSettings(host=broker.host, port=broker.port)
        with Collector(broker.host, broker.port, T.update("dev-1")) as reports, \
                Collector(broker.host, broker.port, T.act("dev-1")) as acts, \
                BlobPublisher(settings, T, tmp / "trainer-blobs", push_delay=0.2) as pub, \
                running_agent(cfg) as agent:
            assert wait_until(lambda: agent.metrics.frames_total > 20, 10)
            yield Rig(v, agent, pub, reports, acts, tmp, broker)


def _doc(signed: SignedManifest) -> dict[str, Any]:
    return json.loads(signed.payload())  # type: ignore[no-any-return]


def _sign_doc(manifest: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """Sign raw manifest JSON, bypassing the schema a well-behaved trainer enforces."""
    sig = base64.b64encode(key.sign(canonical_json(manifest))).decode()
    return json.dumps({"manifest": manifest, "key_id": key_id(key.public_key()),
                       "signature": sig}).encode()


def test_forged_manifest_bad_signature(rig: Rig) -> None:
    p2, d2 = rig.v.get("v2-head")
    doc = _doc(signed_update(p2, d2, rig.v.key)[0])
    doc["manifest"]["targets"]["devices"] = ["dev-1"]  # altered after signing
    rig.publish_raw(json.dumps(doc).encode())
    rig.expect_refused("bad_signature")


def test_unsigned_manifest(rig: Rig) -> None:
    p2, d2 = rig.v.get("v2-head")
    rig.publish_raw(unsigned_payload(signed_update(p2, d2, rig.v.key)[0].manifest))
    rig.expect_refused("unsigned")


def test_manifest_signed_by_an_unknown_key(rig: Rig) -> None:
    p2, d2 = rig.v.get("v2-head")
    rig.publish_raw(signed_update(p2, d2, rig.v.other_key)[0].payload())
    rig.expect_refused("unknown_key")


def test_running_version_is_acknowledged_and_other_blocks_under_its_number_refused(
        rig: Rig) -> None:
    p1, d1 = rig.v.get("v1")
    rig.publish_raw(signed_update(p1, d1, rig.v.key)[0].payload())
    assert wait_until(lambda: len(rig.reports.payloads()) > rig.seen, 10)
    ack = json.loads(rig.reports.payloads()[rig.seen])
    rig.seen += 1
    assert (ack["status"], ack["version"], ack["bytes"]) == ("applied", 1, 0)
    assert ack["detail"] == "already running" and rig.agent.slot.current.version == 1
    po, do = rig.v.get("v1-other")
    rig.publish_raw(signed_update(po, do, rig.v.key)[0].payload())
    assert "other blocks" in rig.expect_refused("replayed")["detail"]


def test_manifest_for_other_devices(rig: Rig) -> None:
    p2, d2 = rig.v.get("v2-head")
    signed, _ = signed_update(p2, d2, rig.v.key, targets=Targets(devices=["dev-9"]))
    rig.publish_raw(signed.payload())
    rig.expect_refused("not_targeted")


def _serve_damaged(rig: Rig, name: str, damage: Any) -> tuple[str, int]:
    """Publish a good signed update whose block 4 the trainer serves damaged."""
    part, directory = rig.v.get(name)
    signed, files = signed_update(part, directory, rig.v.key)
    sha = part.blocks[3].sha256
    rig.pub.serve(signed, files)
    kept = rig.tmp / "trainer-blobs" / f"{sha}.onnx"
    kept.write_bytes(damage(kept.read_bytes()))
    rig.pub.publish_update(signed, files)
    return sha, part.blocks[3].size


def test_corrupted_chunks_are_refused(rig: Rig) -> None:
    sha, _size = _serve_damaged(rig, "v2-head",
                                lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:])
    report = rig.expect_refused("hash_mismatch")
    assert "sha256" in report["detail"]
    assert not (rig.agent.updater.cache.has(sha))  # type: ignore[union-attr]


def test_truncated_block_is_refused(rig: Rig) -> None:
    _serve_damaged(rig, "v3-head", lambda b: b[: len(b) // 2])
    rig.expect_refused("hash_mismatch")


def test_oversized_block_in_a_signed_manifest(rig: Rig) -> None:
    p2, d2 = rig.v.get("v2-head")
    doc = _doc(signed_update(p2, d2, rig.v.key)[0])["manifest"]
    block = doc["variants"][0]["partition"]["blocks"][3]
    block["size"] = 1 << 30  # 1 GiB: refused before anything is allocated
    rig.publish_raw(_sign_doc(doc, rig.v.key))
    assert "block 4 declares" in rig.expect_refused("too_large")["detail"]


def test_block_over_the_device_limit(rig: Rig) -> None:
    p2, d2 = rig.v.get("v2-full")  # block 3 changed: 131 KB > update.max_block_bytes
    signed, files = signed_update(p2, d2, rig.v.key)
    rig.pub.publish_update(signed, files)
    report = rig.expect_refused("too_large")
    assert "max_block_bytes" in report["detail"] and report["bytes"] == 0


def test_block_with_the_wrong_input_shape(rig: Rig) -> None:
    p1, d1 = rig.v.get("v1")
    pf, df = rig.v.get("v2-full")
    out = rig.tmp / "v2-shape"
    shutil.copytree(d1, out)
    # Block 3's file is really a block-4 file: it takes (64,), the partition says (32,4,4).
    target = out / p1.blocks[2].file
    shutil.copyfile(df / pf.blocks[3].file, target)
    wrong = p1.blocks[2].model_copy(update={"sha256": sha256_file(target),
                                            "size": target.stat().st_size})
    part = PartitionManifest.model_validate({
        **p1.model_dump(), "model_version": 2,
        "blocks": [*p1.blocks[:2], wrong, p1.blocks[3]]})
    signed, files = signed_update(part, out, rig.v.key)
    rig.pub.publish_update(signed, files)
    report = rig.expect_refused("incompatible")
    assert "block 3" in report["detail"]


def test_block_that_outputs_nan(rig: Rig) -> None:
    part, directory = rig.v.get("v2-nan")
    signed, files = signed_update(part, directory, rig.v.key)
    rig.pub.publish_update(signed, files)
    report = rig.expect_refused("self_test_failed")
    assert "NaN" in report["detail"]


def test_deeply_nested_manifest_is_malformed_not_internal(rig: Rig) -> None:
    """A RecursionError in the parser was reported as ``internal`` and retried; bounded
    parsing refuses it as ``malformed`` (remembered: the next test checks a reconnect)."""
    rig.publish_raw(b'{"manifest": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
    rig.expect_refused("malformed")
    rig.publish_raw(b'{"manifest": {"version": ' + b"7" * 5000 + b"}}")
    rig.expect_refused("malformed")


def test_refused_manifest_is_not_reported_again_after_a_reconnect(rig: Rig) -> None:
    updater = rig.agent.updater
    assert updater is not None
    n, received = len(updater.reports), updater.received
    rig.broker.restart()  # the retained (refused) manifest is delivered again on connect
    eventually(lambda: updater.received > received and updater.idle(), 20,
               "the updater to handle the re-delivered manifest")
    assert len(updater.reports) == n and rig.agent.slot.current.version == 1
    rig.seen = len(rig.reports.payloads())
