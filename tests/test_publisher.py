"""Signed updates end to end over a real Mosquitto: push, pull, corruption, resume, limits."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mqtt_helpers import Collector, wait_until
from test_update_manifest import FLEET, toy_model

from agent.mqtt.link import Link, LinkSettings
from agent.mqtt.spool import Spool
from agent.update.blobs import BlobCache, BlobFetcher, FetchResult
from agent.update.update_manifest import SignedManifest, UpdateManifest, parse_signed
from agent.wire.topics import Topics
from broker.launcher import Mosquitto
from cloud_trainer.release.keys import sign_manifest
from cloud_trainer.release.publisher import BlobPublisher, PublisherSettings, make_update

pytestmark = pytest.mark.mqtt

TOPICS = Topics(FLEET)
KEY = Ed25519PrivateKey.generate()
SIZES = [400_000, 900_000, 300_000]  # 2 + 4 + 2 chunks of 256 KiB


@contextmanager
def device(broker: Mosquitto, tmp_path: Path, name: str = "cam-1") -> Iterator[Link]:
    settings = LinkSettings(host=broker.host, port=broker.port, reconnect_min_delay=0.05,
                            reconnect_max_delay=0.5, keepalive=5, connect_timeout_s=2)
    link = Link(settings, TOPICS, name, Spool(tmp_path / name / "spool", 1 << 20), dict)
    with link:
        assert link.wait_connected(10)
        yield link


@contextmanager
def publisher(broker: Mosquitto, tmp_path: Path, **kw: float) -> Iterator[BlobPublisher]:
    settings = PublisherSettings(host=broker.host, port=broker.port)
    with BlobPublisher(settings, TOPICS, tmp_path / "trainer-blobs", **kw) as pub:  # type: ignore[arg-type]
        yield pub


def signed_update(tmp_path: Path, version: int = 1, seed: int = 0, sizes: list[int] = SIZES,
                  **kw: int) -> tuple[SignedManifest, dict[str, Path]]:
    export = tmp_path / f"export-v{version}"
    part = toy_model(export, sizes, version=version, seed=seed)
    manifest, files = make_update(FLEET, "toy", version, {"": (part, export)}, **kw)  # type: ignore[arg-type]
    return sign_manifest(manifest, KEY), files


def receive_manifest(link: Link, timeout: float = 10.0) -> UpdateManifest:
    """What the updater does first: take the retained manifest and verify it."""
    got: queue.Queue[bytes] = queue.Queue()
    link.subscribe(TOPICS.manifest, 1, lambda msg: got.put(bytes(msg.payload)))
    return parse_signed(got.get(timeout=timeout), [KEY.public_key()], fleet=FLEET)


def in_thread(fn, *args, **kw) -> tuple[threading.Thread, list]:  # type: ignore[no-untyped-def]
    out: list = []  # type: ignore[type-arg]
    t = threading.Thread(target=lambda: out.append(fn(*args, **kw)), daemon=True)
    t.start()
    return t, out


def assert_identical(result: FetchResult, manifest: UpdateManifest,
                     files: dict[str, Path]) -> None:
    assert result.ok, result
    for i, path in result.paths.items():
        sha = manifest.variants[0].partition.block(i).sha256
        assert path.read_bytes() == files[sha].read_bytes()


def test_pushed_update_arrives_without_requests(mosquitto: Mosquitto, tmp_path: Path) -> None:
    signed, files = signed_update(tmp_path)
    with device(mosquitto, tmp_path) as link, publisher(mosquitto, tmp_path,
                                                        push_delay=0.5) as pub:
        pushing, report = in_thread(pub.publish_update, signed, files)
        manifest = receive_manifest(link)
        variant = manifest.variant_for("x86")
        fetcher = BlobFetcher(link, TOPICS, "cam-1", BlobCache(tmp_path / "cache"))
        result = fetcher.fetch(variant, [1, 2, 3], timeout=20)
        pushing.join(10)
    assert_identical(result, manifest, files)
    assert report[0].pushed_blocks == 3 and report[0].pushed_chunks == 8
    assert result.stats["requests"] == 0 and result.stats["stored"] == 8
    assert sorted(result.fetched) == sorted(files)


def test_pull_only_then_only_the_changed_block(mosquitto: Mosquitto, tmp_path: Path) -> None:
    v1, files1 = signed_update(tmp_path)
    cache = BlobCache(tmp_path / "cache")
    with device(mosquitto, tmp_path) as link, publisher(mosquitto, tmp_path) as pub:
        report = pub.publish_update(v1, files1, push_chunks=False)
        assert report.pushed_chunks == 0
        manifest = receive_manifest(link)
        fetcher = BlobFetcher(link, TOPICS, "cam-1", cache, first_request_after=0.2)
        result = fetcher.fetch(manifest.variants[0], [1, 2, 3], timeout=20)
        assert_identical(result, manifest, files1)
        assert result.stats["requested_chunks"] == 8 and pub.stats["served_chunks"] == 8

        # v2 retrains block 3 only: blocks 1 and 2 are content-addressed, already held.
        export = tmp_path / "export-v2"
        old = manifest.variants[0].partition
        part = toy_model(export, SIZES, version=2, seed=7)
        for i in (1, 2):
            (export / f"block{i}.onnx").write_bytes(files1[old.block(i).sha256].read_bytes())
        part = part.model_copy(update={"blocks": (
            *(old.block(i).model_copy(update={"file": f"block{i}.onnx"}) for i in (1, 2)),
            part.block(3))})
        m2, files2 = make_update(FLEET, "toy", 2, {"": (part, export)})
        sha3 = m2.variants[0].partition.block(3).sha256
        pushing, report2 = in_thread(pub.publish_update, sign_manifest(m2, KEY), files2)
        wait_until(lambda: bool(report2) or not pushing.is_alive(), 10)
        got = receive_manifest(link)
        assert got.version == 2
        result = BlobFetcher(link, TOPICS, "cam-1", cache, first_request_after=0.2).fetch(
            got.variants[0], [1, 2, 3], timeout=20)
        pushing.join(10)
    assert report2[0].pushed_blocks == 1  # only the changed block went out
    assert_identical(result, got, files2)
    assert result.fetched == [sha3]
    assert set(result.requested) <= {sha3}


def test_corrupted_chunk_is_rejected_and_requested_again(mosquitto: Mosquitto,
                                                         tmp_path: Path) -> None:
    signed, files = signed_update(tmp_path)
    sha = signed.manifest.variants[0].partition.block(1).sha256
    with device(mosquitto, tmp_path) as link, publisher(mosquitto, tmp_path) as pub, \
            Collector(mosquitto.host, mosquitto.port, "unused/#") as attacker:
        pub.publish_update(signed, files, push_chunks=False)
        manifest = receive_manifest(link)
        fetcher = BlobFetcher(link, TOPICS, "cam-1", BlobCache(tmp_path / "cache"),
                              first_request_after=2.0)
        fetching, out = in_thread(fetcher.fetch, manifest.variants[0], [1, 2, 3], timeout=20)
        good = files[sha].read_bytes()[: 256 * 1024]
        assert wait_until(lambda: sha in fetcher._subscribed, 5)
        link.wait_subscribed(f"{TOPICS.fleet_root}/model/blob/{sha}/+", 5)  # before a request
        attacker.client.publish(TOPICS.blob(sha, 0), b"X" + good[1:], qos=1).wait_for_publish(5)
        fetching.join(20)
    result = out[0]
    assert_identical(result, manifest, files)
    assert result.stats["corrupt"] == 1
    assert 0 in result.requested[sha]


def test_cut_off_fetch_resumes_without_rerequesting(mosquitto: Mosquitto,
                                                     tmp_path: Path) -> None:
    signed, files = signed_update(tmp_path)
    cache = BlobCache(tmp_path / "cache")
    shas = list(files)
    with device(mosquitto, tmp_path) as link:
        # A slow trainer (2 chunks/s) so the fetch can be cut off halfway.
        with publisher(mosquitto, tmp_path, rate_chunks_per_s=2, burst_chunks=1) as pub:
            pub.publish_update(signed, files, push_chunks=False)
            manifest = receive_manifest(link)
            variant = manifest.variants[0]
            fetcher = BlobFetcher(link, TOPICS, "cam-1", cache, first_request_after=0.1,
                                  request_interval=0.5)
            fetching, out = in_thread(fetcher.fetch, variant, [1, 2, 3], timeout=30)

            def held() -> dict[str, set[int]]:
                return {s: set(range(variant.chunks[s].count)) if cache.has(s)
                        else cache.held(s, variant.chunks[s]) for s in shas}

            assert wait_until(lambda: sum(map(len, held().values())) >= 3, 15)
            fetcher.cancel()
            fetching.join(5)
        assert out[0].reason == "cancelled"
        before = held()
        assert 3 <= sum(map(len, before.values())) < 8
        with publisher(mosquitto, tmp_path) as pub:
            pub.serve(signed)  # a restarted trainer serves from its blob_dir
            result = BlobFetcher(link, TOPICS, "cam-1", cache, first_request_after=0.1,
                                 request_interval=0.5).fetch(variant, [1, 2, 3], timeout=20)
    assert_identical(result, manifest, files)
    for s in shas:
        assert not result.requested.get(s, set()) & before[s]
        assert before[s] | result.requested.get(s, set()) == set(range(variant.chunks[s].count))


def test_fetch_survives_a_broker_restart(tmp_path: Path) -> None:
    signed, files = signed_update(tmp_path)
    with Mosquitto(tmp_path / "broker") as broker, device(broker, tmp_path) as link, \
            publisher(broker, tmp_path, rate_chunks_per_s=4, burst_chunks=1) as pub:
        pub.publish_update(signed, files, push_chunks=False)
        manifest = receive_manifest(link)
        cache = BlobCache(tmp_path / "cache")
        fetcher = BlobFetcher(link, TOPICS, "cam-1", cache, first_request_after=0.1,
                              request_interval=0.5)
        fetching, out = in_thread(fetcher.fetch, manifest.variants[0], [1, 2, 3], timeout=40)
        assert wait_until(lambda: fetcher.stats["stored"] >= 2, 15)
        broker.restart()
        fetching.join(40)
    assert_identical(out[0], manifest, files)


def test_requests_are_bounded(mosquitto: Mosquitto, tmp_path: Path) -> None:
    signed, files = signed_update(tmp_path, sizes=[100_000], chunk_size=4096)  # 25 chunks
    sha = next(iter(files))
    topic = TOPICS.blob_request("evil")
    with publisher(mosquitto, tmp_path, max_chunks_per_request=4, burst_chunks=6,
                   rate_chunks_per_s=0.01, dedupe_s=0) as pub, \
            Collector(mosquitto.host, mosquitto.port, f"{TOPICS.fleet_root}/model/blob/#") as c:
        pub.serve(signed, files)

        def ask(payload: bytes) -> None:
            c.client.publish(topic, payload, qos=1).wait_for_publish(5)

        ask(json.dumps({"sha256": "f" * 64, "chunks": [0]}).encode())
        ask(b"{not json")
        ask(b"x" * 10_000)
        ask(json.dumps({"sha256": sha, "chunks": list(range(1000))}).encode())
        ask(json.dumps({"sha256": sha, "chunks": [10, 11, 12, 13]}).encode())
        assert wait_until(lambda: pub.stats["requests"] == 4 and pub.stats["rate_limited"] == 2,
                          5), pub.stats
        assert c.wait_for(lambda m: len(m) >= 6, 5)
    assert pub.stats["unknown_sha"] == 1 and pub.stats["bad_requests"] == 2
    assert pub.stats["served_chunks"] == 6  # 4 (the cap), then the bucket's last 2
    assert sorted(t.rsplit("/", 1)[1] for t, _p, _r in c.messages) == \
        ["0", "1", "10", "11", "2", "3"]
    assert not any(r for _t, _p, r in c.messages)  # chunks are never retained
