"""The device's block cache and fetcher, against an in-process stand-in for link + publisher."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_update_manifest import FLEET, toy_model

from agent.update.blobs import BlobCache, BlobFetcher, chunk_index
from agent.update.update_manifest import ChunkInfo, Variant
from agent.wire.topics import Topics
from cloud_trainer.release.publisher import chunk_table, make_update

TOPICS = Topics(FLEET)
DEVICE = "cam-1"
CHUNK = 64 * 1024


@dataclass
class Msg:
    topic: str
    payload: bytes


class FakeLink:
    """Link-like: a request is answered at once from ``files`` (the publisher's job).

    ``corrupt`` chunks are sent damaged the first time; after ``serve_limit`` chunks it
    goes silent, like a connection cut halfway.
    """

    def __init__(self, files: dict[str, Path], chunk_size: int = CHUNK, *,
                 corrupt: set[tuple[str, int]] | None = None,
                 serve_limit: int | None = None) -> None:
        self.files, self.chunk_size = files, chunk_size
        self.corrupt = set(corrupt or ())
        self.serve_limit = serve_limit
        self.handlers: dict[str, object] = {}
        self.requests: list[dict[str, object]] = []
        self.served = 0

    def subscribe(self, topic_filter: str, qos: int, handler: object) -> None:
        self.handlers[topic_filter] = handler

    def unsubscribe(self, topic_filter: str) -> None:
        del self.handlers[topic_filter]

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> bool:
        assert topic == TOPICS.blob_request(DEVICE)
        req = json.loads(payload)
        self.requests.append(req)
        for n in req["chunks"]:
            if self.serve_limit is not None and self.served >= self.serve_limit:
                break
            self.deliver(req["sha256"], n)
        return True

    def deliver(self, sha: str, n: int, data: bytes | None = None) -> None:
        if data is None:
            with open(self.files[sha], "rb") as fh:
                fh.seek(n * self.chunk_size)
                data = fh.read(self.chunk_size)
            if (sha, n) in self.corrupt:
                self.corrupt.discard((sha, n))
                data = bytes([data[0] ^ 1]) + data[1:]
        self.served += 1
        topic = TOPICS.blob(sha, n)
        for topic_filter, handler in list(self.handlers.items()):
            if topic.startswith(topic_filter.rstrip("+")):
                handler(Msg(topic, data))  # type: ignore[operator]

    def requested(self, sha: str) -> list[int]:
        return [n for r in self.requests if r["sha256"] == sha for n in r["chunks"]]  # type: ignore[union-attr]


def fast_fetcher(link: FakeLink, cache: BlobCache, **kw: float) -> BlobFetcher:
    return BlobFetcher(link, TOPICS, DEVICE, cache, first_request_after=0.0, quiet=0.0,
                       request_interval=kw.pop("request_interval", 0.2), **kw)  # type: ignore[arg-type]


@pytest.fixture
def model(tmp_path: Path) -> tuple[Variant, dict[str, Path]]:
    part = toy_model(tmp_path / "export", [300_000, 700_000, 10_000])
    manifest, files = make_update(FLEET, "toy", 1, {"": (part, tmp_path / "export")},
                                  chunk_size=CHUNK)
    return manifest.variants[0], files


def test_cache_verifies_chunks_and_assembles(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes: chunks of 4096, 4096, 2048
    (tmp_path / "f").write_bytes(data)
    sha, size, info = chunk_table(tmp_path / "f", 4096)
    cache = BlobCache(tmp_path / "cache")
    cache.begin(sha, info, size)
    assert cache.missing(sha, info) == [0, 1, 2]
    assert not cache.put_chunk(sha, 0, data[:4095] + b"x", info, size)  # wrong hash
    assert not cache.put_chunk(sha, 2, data[8192:] + b"x", info, size)  # too long
    assert not cache.put_chunk(sha, 3, b"", info, size)  # no such chunk
    assert cache.missing(sha, info) == [0, 1, 2]
    for n in (2, 0, 1):
        assert cache.put_chunk(sha, n, data[n * 4096:(n + 1) * 4096], info, size)
    assert cache.held(sha, info) == {0, 1, 2}
    assert not list((tmp_path / "cache" / "partial" / sha).glob("*.tmp"))
    path = cache.assemble(sha, info, size)
    assert path.read_bytes() == data and cache.has(sha)
    assert not (tmp_path / "cache" / "partial" / sha).exists()
    assert cache.prune(keep=[]) == [sha] and not cache.has(sha)
    with pytest.raises(ValueError):
        cache.path("../etc/passwd")


def test_pull_fetch_assembles_identical_files(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    variant, files = model
    link = FakeLink(files)
    cache = BlobCache(tmp_path / "device")
    result = fast_fetcher(link, cache).fetch(variant, [1, 2, 3], timeout=10)
    assert result.ok, result
    for i in (1, 2, 3):
        sha = variant.partition.block(i).sha256
        assert result.paths[i].read_bytes() == files[sha].read_bytes()
        assert link.requested(sha) == list(range(variant.chunks[sha].count))  # once each
    assert not link.handlers  # unsubscribed when done
    assert result.stats["corrupt"] == 0


def test_corrupted_chunk_is_dropped_and_requested_again(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    variant, files = model
    sha = variant.partition.block(2).sha256
    link = FakeLink(files, corrupt={(sha, 3)})
    fetcher = fast_fetcher(link, BlobCache(tmp_path / "device"))
    result = fetcher.fetch(variant, [2], timeout=10)
    assert result.ok, result
    assert result.stats["corrupt"] == 1
    assert link.requested(sha).count(3) == 2
    assert result.paths[2].read_bytes() == files[sha].read_bytes()


def test_oversized_and_foreign_chunks_are_ignored(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    variant, files = model
    sha = variant.partition.block(1).sha256
    link = FakeLink(files)
    fetcher = fast_fetcher(link, BlobCache(tmp_path / "device"), request_interval=0.2)
    link.handlers[f"{TOPICS.fleet_root}/model/blob/+"] = fetcher._on_message
    fetcher._active[sha] = CHUNK
    link.deliver(sha, 0, b"\0" * (CHUNK + 1))
    assert fetcher.stats["corrupt"] == 1 and fetcher._queue.empty()
    link.deliver("f" * 64, 0, b"x")  # a block nobody asked for
    assert fetcher._queue.empty()


@pytest.mark.parametrize("level", ["\u00b2", "\u0663", "-1", "1e3", "", "0" * 10])
def test_chunk_index_that_is_not_ascii_digits_is_counted_and_dropped(
        tmp_path: Path, model, level: str) -> None:  # type: ignore[no-untyped-def]
    """``"²".isdigit()`` is True and ``int("²")`` raises: such a topic level on the network
    thread is dropped and counted, never a traceback."""
    variant, files = model
    sha = variant.partition.block(1).sha256
    fetcher = fast_fetcher(FakeLink(files), BlobCache(tmp_path / "device"))
    fetcher._active[sha] = CHUNK
    msg = SimpleNamespace(topic=f"{TOPICS.fleet_root}/model/blob/{sha}/{level}", payload=b"x")
    fetcher._on_message(msg)
    assert fetcher.stats["bad_index"] == 1 and fetcher._queue.empty()
    assert chunk_index("\u00b2") is None and chunk_index("12") == 12


def test_cut_off_fetch_resumes_without_refetching(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    variant, files = model
    cache = BlobCache(tmp_path / "device")
    first = FakeLink(files, serve_limit=7)
    result = fast_fetcher(first, cache).fetch(variant, [1, 2, 3], timeout=0.5)
    assert not result.ok and result.reason == "timeout"
    held = {sha: set(range(variant.chunks[sha].count)) if cache.has(sha)
            else cache.held(sha, variant.chunks[sha]) for sha in files}
    assert sum(len(h) for h in held.values()) == 7
    second = FakeLink(files)  # a new fetcher (after a restart) over the same cache
    result = fast_fetcher(second, cache).fetch(variant, [1, 2, 3], timeout=10)
    assert result.ok, result
    for sha, chunks in held.items():
        assert not set(second.requested(sha)) & chunks
        count = variant.chunks[sha].count
        assert sorted(second.requested(sha)) == sorted(set(range(count)) - chunks)
        assert cache.path(sha).read_bytes() == files[sha].read_bytes()


def test_held_blocks_are_not_fetched(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    variant, files = model
    cache = BlobCache(tmp_path / "device")
    assert fast_fetcher(FakeLink(files), cache).fetch(variant, [1, 2, 3], timeout=10).ok
    link = FakeLink(files)
    result = fast_fetcher(link, cache).fetch(variant, [1, 2, 3], timeout=10)
    assert result.ok and result.fetched == [] and not link.requests and not link.handlers


def test_damaged_chunk_on_disk_is_fetched_again(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    variant, files = model
    sha = variant.partition.block(2).sha256
    cache = BlobCache(tmp_path / "device")
    assert not fast_fetcher(FakeLink(files, serve_limit=10), cache).fetch(
        variant, [2], timeout=0.3).ok
    chunk = tmp_path / "device" / "partial" / sha / "0.chunk"
    chunk.write_bytes(b"rot" + chunk.read_bytes()[3:])
    link = FakeLink(files)
    result = fast_fetcher(link, cache).fetch(variant, [2], timeout=10)
    assert result.ok, result
    assert link.requested(sha) == [10, 0]  # the missing one, then the damaged one
    assert cache.path(sha).read_bytes() == files[sha].read_bytes()


def test_whole_block_hash_mismatch_deletes_it(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    variant, files = model
    block = variant.partition.block(3)
    liar = hashlib.sha256(b"something else").hexdigest()  # chunks good, block hash wrong
    part = variant.partition.model_copy(update={"blocks": (
        *variant.partition.blocks[:2],
        block.model_copy(update={"sha256": liar, "file": f"{liar}.onnx"}))})
    chunks = {k: v for k, v in variant.chunks.items() if k != block.sha256}
    chunks[liar] = variant.chunks[block.sha256]
    bad = Variant(partition=part, chunks=chunks)
    cache = BlobCache(tmp_path / "device")
    result = fast_fetcher(FakeLink({liar: files[block.sha256]}), cache).fetch(bad, [3], timeout=5)
    assert not result.ok and result.reason == "hash_mismatch"
    assert not cache.has(liar)
    assert not (tmp_path / "device" / "partial" / liar).exists()
    assert not list((tmp_path / "device" / "blobs").iterdir())


def test_too_large_for_the_cache_allocates_nothing(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    variant, files = model
    cache = BlobCache(tmp_path / "device", max_bytes=100_000)
    link = FakeLink(files)
    result = fast_fetcher(link, cache).fetch(variant, [1, 2, 3], timeout=5)
    assert not result.ok and result.reason == "too_large"
    assert not link.requests and not list((tmp_path / "device" / "partial").iterdir())


def test_changed_chunking_discards_old_partials(tmp_path: Path) -> None:
    data = bytes(20_000)
    (tmp_path / "f").write_bytes(data)
    sha, size, small = chunk_table(tmp_path / "f", 4096)
    _, _, big = chunk_table(tmp_path / "f", 8192)
    cache = BlobCache(tmp_path / "c")
    cache.begin(sha, small, size)
    assert cache.put_chunk(sha, 0, data[:4096], small, size)
    cache.begin(sha, big, size)
    assert cache.held(sha, big) == set()
    assert isinstance(big, ChunkInfo)
