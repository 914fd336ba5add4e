"""Publish a signed update: the retained manifest, block chunks, and re-requested chunks.

Order: the signed manifest goes out first (retained, QoS 1), then, after ``push_delay``,
the chunks of the blocks that changed. Devices subscribe to ``blob/<sha>/+`` only once
they have verified a manifest naming that sha, so chunks pushed *before* the manifest would
reach nobody; pushed after it, they reach every online device at once.

Chunks are QoS 1 and never retained: a retained message per chunk would stay on the broker
for ever (every block of every version, re-sent to every new subscriber of a wildcard), and
nothing expires it. Whatever a device missed — it was offline, subscribed late, a chunk was
dropped or corrupted — it asks for on its ``blobreq`` topic, and this publisher answers by
republishing those chunks. So the manifest alone is enough (``push_chunks=False``: devices
pull everything) and the push is an optimisation for a fleet that is online.

Re-requests are bounded: at most ``max_chunks_per_request`` chunks per request, a token
bucket of chunks per device, unknown shas ignored, a bounded request queue served by one
worker thread (never paho's network thread), and a chunk already sent in the last
``dedupe_s`` seconds is not sent again (every device that wants it is subscribed anyway).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from agent import safejson
from agent.infer.manifest import PartitionManifest, sha256_file
from agent.mqtt.client import KnetClient, SubscribeError, make_client
from agent.mqtt.endpoint import MqttEndpoint
from agent.update.update_manifest import (
    MAX_CHUNK_SIZE,
    MAX_MANIFEST_BYTES,
    ChunkInfo,
    SignedManifest,
    Targets,
    UpdateManifest,
    Variant,
)
from agent.wire.topics import TopicError, Topics

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192
ABSENT_TTL_S = 10.0


class BlobShare(Protocol):
    """Blocks shared by trainer replicas (``cloud_trainer/storage/blobs.py``)."""

    def put(self, sha256: str, path: Path, chunks: ChunkInfo) -> None: ...

    def fetch(self, sha256: str, dest: Path) -> ChunkInfo | None: ...

ProfileSelector = str | Sequence[str]


class PublisherSettings(MqttEndpoint):
    """A publisher with its own connection (tools, tests); the trainer shares its main one."""

    client_id: str | None = "knet-publisher"


@dataclass(frozen=True)
class PublishReport:
    manifest_bytes: int
    pushed_blocks: int
    pushed_chunks: int
    pushed_bytes: int
    seconds: float


@dataclass(frozen=True)
class _Blob:
    path: Path
    size: int
    info: ChunkInfo


# -- building an update --------------------------------------------------------------------
def chunk_table(path: Path, chunk_size: int = MAX_CHUNK_SIZE) -> tuple[str, int, ChunkInfo]:
    """``(sha256, size, ChunkInfo)`` of a block file."""
    whole, hashes, size = hashlib.sha256(), [], 0
    with open(path, "rb") as fh:
        while data := fh.read(chunk_size):
            whole.update(data)
            hashes.append(hashlib.sha256(data).hexdigest())
            size += len(data)
    return whole.hexdigest(), size, ChunkInfo(chunk_size=chunk_size, count=len(hashes),
                                              sha256=hashes)


def _profiles(selector: ProfileSelector) -> list[str]:
    if isinstance(selector, str):
        return [p.strip() for p in selector.split(",") if p.strip() not in ("", "*")]
    return list(selector)


def make_update(
    fleet: str,
    model_id: str,
    version: int,
    variants_files: Mapping[ProfileSelector, tuple[PartitionManifest, Path]],
    targets: Targets | None = None,
    rollback: bool = False,
    *,
    chunk_size: int = MAX_CHUNK_SIZE,
) -> tuple[UpdateManifest, dict[str, Path]]:
    """An unsigned manifest for exported partitions and ``{sha256: source file}``.

    ``variants_files`` maps a profile selector ("" or "*" = default, "a,b" or a list of
    profile names) to ``(partition, directory holding its block files)``; each block file
    is verified against the partition before it is chunked.
    """
    files: dict[str, Path] = {}
    variants = []
    for selector, (partition, directory) in variants_files.items():
        if partition.model_id != model_id or partition.model_version != version:
            raise ValueError(f"partition is {partition.model_id} v{partition.model_version}, "
                             f"the update {model_id} v{version}")
        paths = partition.verify_files(Path(directory))
        blocks, chunks = [], {}
        for block in partition.blocks:
            sha, _size, info = chunk_table(paths[block.index], chunk_size)
            chunks[sha] = info
            files[sha] = paths[block.index]
            blocks.append(block.model_copy(update={"file": f"{sha}.onnx"}))
        renamed = partition.model_copy(update={"blocks": tuple(blocks)})
        variants.append(Variant(profiles=_profiles(selector), partition=renamed, chunks=chunks))
    manifest = UpdateManifest(fleet=fleet, model_id=model_id, version=version,
                              rollback=rollback, targets=targets or Targets(),
                              variants=variants)
    return manifest, files


# -- publishing ----------------------------------------------------------------------------
class _Bucket:
    """Token bucket in chunks: ``rate`` per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = float(burst), time.monotonic()

    def take(self, n: int) -> int:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        granted = min(n, int(self.tokens))
        self.tokens -= granted
        return granted


class BlobPublisher:
    """Publishes updates for one fleet and serves the chunks devices ask for again.

    Give it ``PublisherSettings`` (it then owns its connection) or a paho v5 client the
    caller connects and loops (its ``on_connect`` is chained to re-subscribe).
    ``blob_dir``, if set, keeps a content-addressed copy of every published block, so a
    restarted trainer can ``serve()`` the retained manifest again without the export dir.
    """

    def __init__(
        self,
        client_or_settings: mqtt.Client | PublisherSettings,
        topics: Topics,
        blob_dir: Path | str | None = None,
        *,
        max_chunks_per_request: int = 64,
        rate_chunks_per_s: float = 400.0,
        burst_chunks: int = 256,
        window: int = 64,
        push_delay: float = 1.0,
        dedupe_s: float = 0.25,
        max_pending_requests: int = 256,
        max_devices: int = 10_000,
        shared: BlobShare | None = None,
        answers: Callable[[], bool] | None = None,
    ) -> None:
        self.topics = topics
        # With replicas: every served block also goes to ``shared``, and a sha not held here
        # is looked up there; ``answers`` says whether this replica answers re-requests now
        # (the leader does; every replica hears them).
        self.shared, self._answers = shared, answers
        self._absent: dict[str, float] = {}  # shas ``shared`` did not have, and when
        self.blob_dir = Path(blob_dir) if blob_dir is not None else None
        if self.blob_dir is not None:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.max_chunks_per_request = max_chunks_per_request
        self.rate, self.burst = rate_chunks_per_s, burst_chunks
        self.window, self.push_delay, self.dedupe_s = window, push_delay, dedupe_s
        self.max_devices = max_devices
        self.stats: dict[str, int] = dict.fromkeys(
            ("requests", "served_chunks", "served_bytes", "rate_limited", "deduped",
             "unknown_sha", "bad_requests", "queue_full", "not_answering", "from_shared"),
            0)
        self._blobs: dict[str, _Blob] = {}
        self._previous: set[str] = set()  # shas of the last manifest published
        self._buckets: dict[str, _Bucket] = {}
        self._sent: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()
        self._requests: queue.Queue[tuple[str, bytes] | None] = queue.Queue(max_pending_requests)
        self._worker: threading.Thread | None = None
        self.connected = threading.Event()
        self._req_filter = topics.all_devices("blobreq")
        if isinstance(client_or_settings, mqtt.Client):
            self._settings = None
            self.client = client_or_settings
            previous = self.client.on_connect

            def chained(*args: Any) -> None:
                if previous is not None:
                    previous(*args)
                self._on_connect(*args)

            self.client.on_connect = chained
        else:
            self._settings = client_or_settings
            self.client = make_client(client_or_settings)
            self.client.on_connect = self._on_connect
        self.client.message_callback_add(self._req_filter, self._on_request)

    # -- lifecycle
    def start(self) -> BlobPublisher:
        if self._worker is None:
            self._worker = threading.Thread(target=self._serve_loop, name="knet-blob-serve",
                                            daemon=True)
            self._worker.start()
        if self._settings is not None:
            self._start_own(self._settings)
        elif self.client.is_connected():
            self.client.subscribe(self._req_filter, 1)
            self.connected.set()
        return self

    def _start_own(self, s: PublisherSettings) -> None:
        """Connect our own client and return once chunk re-requests reach us (SUBACK)."""
        assert isinstance(self.client, KnetClient)
        self.client.start()
        deadline = time.monotonic() + s.connect_timeout_s
        if not self.client.wait_connected(s.connect_timeout_s):
            raise ConnectionError(f"publisher: no connection to {s.describe()} within "
                                  f"{s.connect_timeout_s:g} s")
        try:
            self.client.wait_subscribed([self._req_filter],
                                        max(0.0, deadline - time.monotonic()))
        except SubscribeError as exc:
            raise ConnectionError(f"publisher: chunk re-requests not subscribed: {exc}") from None

    def close(self) -> None:
        if self._worker is not None:
            with contextlib.suppress(queue.Full):
                self._requests.put(None, timeout=1.0)
            self._worker.join(5.0)
            self._worker = None
        self.client.message_callback_remove(self._req_filter)
        if isinstance(self.client, KnetClient) and self._settings is not None:
            self.client.stop()

    def __enter__(self) -> BlobPublisher:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def _on_connect(self, client: mqtt.Client, _u: Any, _flags: Any, reason: Any,
                    _props: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            log.error("publisher connection refused: %s", reason)
            return
        client.subscribe(self._req_filter, 1)
        self.connected.set()

    # -- updates
    def serve(self, signed: SignedManifest, files: Mapping[str, Path] | None = None) -> None:
        """Make the blocks of ``signed`` available to re-requests (verified first)."""
        new: dict[str, _Blob] = {}
        for variant in signed.manifest.variants:
            for block in variant.partition.blocks:
                if block.sha256 in new:
                    continue
                path = self._source(block.sha256, files or {})
                size = path.stat().st_size
                if size != block.size or sha256_file(path) != block.sha256:
                    raise ValueError(f"{path} does not match block {block.index} "
                                     f"({block.sha256[:12]}, {block.size} bytes)")
                new[block.sha256] = _Blob(self._keep(block.sha256, path), size,
                                          variant.chunks[block.sha256])
        if self.shared is not None:
            for sha, blob in new.items():
                self.shared.put(sha, blob.path, blob.info)
        with self._lock:
            self._blobs.update(new)

    def publish_update(
        self,
        signed: SignedManifest,
        files: Mapping[str, Path] | None = None,
        *,
        push_chunks: bool = True,
        timeout: float = 120.0,
        held: Sequence[str] = (),
    ) -> PublishReport:
        """Serve, publish the manifest (retained), then push the changed blocks' chunks.

        With ``push_chunks`` the blocks that were not in the previous manifest published
        here are pushed (devices hold the others); False leaves everything to pulls.
        ``held`` names more shas devices already hold (e.g. the deployed version's blocks
        after a trainer restart, when this publisher has no previous manifest).
        """
        started = time.monotonic()
        payload = signed.payload()
        if len(payload) > MAX_MANIFEST_BYTES:
            raise ValueError(f"manifest of {len(payload)} bytes exceeds {MAX_MANIFEST_BYTES}")
        self.serve(signed, files)
        info = self.client.publish(self.topics.manifest, payload, qos=1, retain=True)
        self._wait(info, timeout, "manifest")
        shas = {b.sha256 for v in signed.manifest.variants for b in v.partition.blocks}
        m = signed.manifest
        log.info("published manifest %s v%d (%d bytes, rollback=%s)", m.model_id, m.version,
                 len(payload), m.rollback)
        chunks = nbytes = 0
        push = sorted(shas - self._previous - set(held)) if push_chunks else []
        self._previous = shas
        if push:
            time.sleep(self.push_delay)  # let online devices subscribe to the new shas
        deadline = time.monotonic() + timeout
        pending: deque[mqtt.MQTTMessageInfo] = deque()
        for sha in push:
            blob = self._blobs[sha]
            with open(blob.path, "rb") as fh:
                for n in range(blob.info.count):
                    data = fh.read(blob.info.chunk_size)
                    pending.append(self.client.publish(self.topics.blob(sha, n), data, qos=1))
                    with self._lock:
                        self._sent[(sha, n)] = time.monotonic()
                    chunks, nbytes = chunks + 1, nbytes + len(data)
                    while len(pending) >= self.window:
                        self._wait(pending.popleft(), deadline - time.monotonic(), "chunk")
        while pending:
            self._wait(pending.popleft(), deadline - time.monotonic(), "chunk")
        report = PublishReport(len(payload), len(push), chunks, nbytes,
                               time.monotonic() - started)
        log.info("pushed %d blocks, %d chunks, %d bytes in %.2f s", report.pushed_blocks,
                 chunks, nbytes, report.seconds)
        return report

    def _wait(self, info: mqtt.MQTTMessageInfo, timeout: float, what: str) -> None:
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publishing the {what} failed: {mqtt.error_string(info.rc)}")
        try:
            info.wait_for_publish(max(timeout, 0.0))
        except (RuntimeError, ValueError) as exc:
            raise ConnectionError(f"publishing the {what} failed: {exc}") from None
        if not info.is_published():
            raise TimeoutError(f"no PUBACK for the {what} within the timeout")

    def _source(self, sha: str, files: Mapping[str, Path]) -> Path:
        if sha in files:
            return Path(files[sha])
        with self._lock:
            if sha in self._blobs:
                return self._blobs[sha].path
        if self.blob_dir is not None and (self.blob_dir / f"{sha}.onnx").is_file():
            return self.blob_dir / f"{sha}.onnx"
        raise FileNotFoundError(f"no file for block {sha[:12]}")

    def _keep(self, sha: str, path: Path) -> Path:
        """Copy into the content-addressed ``blob_dir`` (atomically) if there is one."""
        if self.blob_dir is None:
            return path
        target = self.blob_dir / f"{sha}.onnx"
        if target.is_file() or path.resolve() == target.resolve():
            return target
        fd, tmp = tempfile.mkstemp(dir=self.blob_dir, suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return target

    # -- re-requests
    def _on_request(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        """paho's thread: only parse the device and queue the request."""
        try:
            device, _leaf = self.topics.parse_device_topic(msg.topic)
        except TopicError:
            return
        if len(msg.payload) > MAX_REQUEST_BYTES:
            self.stats["bad_requests"] += 1
            return
        try:
            self._requests.put_nowait((device, bytes(msg.payload)))
        except queue.Full:  # the device asks again after its request interval
            self.stats["queue_full"] += 1

    def _serve_loop(self) -> None:
        while (item := self._requests.get()) is not None:
            try:
                self._serve_request(*item)
            except Exception:
                log.exception("serving a chunk request failed")

    def _serve_request(self, device: str, payload: bytes) -> None:
        self.stats["requests"] += 1
        if self._answers is not None and not self._answers():
            self.stats["not_answering"] += 1
            return
        try:
            req = safejson.loads(payload, max_bytes=MAX_REQUEST_BYTES)
            if not isinstance(req, dict):
                raise TypeError
            sha, wanted = req["sha256"], req["chunks"]
            if not isinstance(sha, str) or not isinstance(wanted, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):  # UnsafeJSONError is a ValueError
            self.stats["bad_requests"] += 1
            return
        with self._lock:
            blob = self._blobs.get(sha)
        if blob is None:
            blob = self._from_shared(sha)
        if blob is None:
            self.stats["unknown_sha"] += 1
            return
        chunks = sorted({n for n in wanted[: self.max_chunks_per_request]
                         if isinstance(n, int) and 0 <= n < blob.info.count})
        now = time.monotonic()
        with self._lock:
            asked = len(chunks)
            chunks = [n for n in chunks if now - self._sent.get((sha, n), -math.inf)
                      >= self.dedupe_s]
            self.stats["deduped"] += asked - len(chunks)
            granted = self._bucket(device).take(len(chunks))
        if granted < len(chunks):
            self.stats["rate_limited"] += len(chunks) - granted
            chunks = chunks[:granted]
        if not chunks:
            return
        with open(blob.path, "rb") as fh:
            for n in chunks:
                fh.seek(n * blob.info.chunk_size)
                data = fh.read(blob.info.chunk_size)
                self.client.publish(self.topics.blob(sha, n), data, qos=1)
                self.stats["served_chunks"] += 1
                self.stats["served_bytes"] += len(data)
        with self._lock:
            sent_at = time.monotonic()
            for n in chunks:
                self._sent[(sha, n)] = sent_at
            if len(self._sent) > 100_000:
                cutoff = sent_at - self.dedupe_s
                self._sent = {k: t for k, t in self._sent.items() if t >= cutoff}
        log.debug("served %d chunks of %s to %s", len(chunks), sha[:12], device)

    def _from_shared(self, sha: str) -> _Blob | None:
        """A block another replica published, into ``blob_dir``; None if nobody did (such
        answers are remembered for ``ABSENT_TTL_S``, so junk shas cost no query each)."""
        if self.shared is None or self.blob_dir is None or len(sha) != 64:
            return None
        now = time.monotonic()
        if now - self._absent.get(sha, -math.inf) < ABSENT_TTL_S:
            return None
        path = self.blob_dir / f"{sha}.onnx"
        info = self.shared.fetch(sha, path)
        if info is None:
            if len(self._absent) >= 10_000:
                self._absent.clear()
            self._absent[sha] = now
            return None
        blob = _Blob(path, path.stat().st_size, info)
        with self._lock:
            self._blobs[sha] = blob
        self.stats["from_shared"] += 1
        log.info("serving block %s published by another replica", sha[:12])
        return blob

    def _bucket(self, device: str) -> _Bucket:
        bucket = self._buckets.get(device)
        if bucket is None:
            if len(self._buckets) >= self.max_devices:
                self._buckets.clear()  # crude but bounded: every device starts with a burst
            bucket = self._buckets[device] = _Bucket(self.rate, self.burst)
        return bucket
