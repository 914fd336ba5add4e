"""Block files on the device: a content-addressed cache and a resumable chunked fetcher.

Layout under the cache directory::

    blobs/<sha256>.onnx            complete, verified block files (named by their hash)
    partial/<sha256>/<n>.chunk     verified chunks of a block still being downloaded
    partial/<sha256>/chunk_size    the chunking those chunks belong to

Every chunk is checked against its sha256 from the (already verified) manifest before it is
written, and written atomically (tmp + fsync + rename), so whatever is on disk is good and a
restart resumes where it stopped. A block enters ``blobs/`` only after its whole-file sha256
matched, by an atomic rename.

The fetcher never trusts the network for sizes: it takes them from the validated manifest,
checks them against the limits and the cache's budget before writing anything, and drops a
chunk longer than its declared length before hashing it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from agent.errors import KnetAgentError
from agent.fsutil import atomic_write, fsync_dir
from agent.infer.manifest import BlockEntry
from agent.update.update_manifest import MAX_BLOCK_SIZE, ChunkInfo, Variant
from agent.wire.topics import Topics

log = logging.getLogger(__name__)

_SHA = re.compile(r"[0-9a-f]{64}")
FetchReason = Literal["hash_mismatch", "timeout", "too_large", "cancelled"]


class BlobError(KnetAgentError):
    """A block cannot be stored; ``reason`` is machine-readable (as in update reports)."""

    def __init__(self, reason: FetchReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ChunkDamaged(BlobError):
    """A stored chunk no longer matches its hash (disk corruption); it was deleted."""

    def __init__(self, sha: str, n: int) -> None:
        super().__init__("hash_mismatch", f"stored chunk {n} of {sha[:12]} is damaged")
        self.chunk = n


_INDEX = re.compile(r"[0-9]{1,9}")


def chunk_index(text: str) -> int | None:
    """A chunk number from a topic level or file name; None unless plain ASCII digits.

    ``str.isdigit`` accepts ``²`` and other Unicode digits that ``int`` then refuses: a topic
    level like that raised ``ValueError`` on the network thread.
    """
    return int(text) if _INDEX.fullmatch(text) else None


class MessageLike(Protocol):
    topic: str
    payload: bytes


class LinkLike(Protocol):
    """What the fetcher needs of a connection (``agent.mqtt.link.Link`` has it)."""

    def subscribe(self, topic_filter: str, qos: int,
                  handler: Callable[[Any], None]) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> bool: ...


def _check_sha(sha: str) -> str:
    if not _SHA.fullmatch(sha):  # it becomes a path component
        raise ValueError(f"{sha[:70]!r} is not a sha256 hex digest")
    return sha


class BlobCache:
    """Content-addressed block files plus resumable partial downloads.

    ``max_bytes`` bounds complete + partial data; ``None`` only checks free disk space.
    """

    def __init__(self, directory: Path | str, max_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.blob_dir = self.directory / "blobs"
        self.partial_dir = self.directory / "partial"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes

    # -- complete blocks
    def path(self, sha: str) -> Path:
        return self.blob_dir / f"{_check_sha(sha)}.onnx"

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Delete complete and partial blocks not in ``keep`` (after an update settled)."""
        keep = set(keep)
        removed = []
        for p in self.blob_dir.glob("*.onnx"):
            if p.stem not in keep:
                p.unlink(missing_ok=True)
                removed.append(p.stem)
        for d in self.partial_dir.iterdir():
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        return removed

    # -- space
    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.rglob("*") if p.is_file())

    def check_space(self, nbytes: int) -> None:
        """Raise ``too_large`` unless ``nbytes`` more (plus one assembled copy) fit."""
        if self.max_bytes is not None and self.used_bytes() + nbytes > self.max_bytes:
            raise BlobError("too_large", f"{nbytes} bytes would exceed the cache budget "
                                         f"of {self.max_bytes}")
        free = shutil.disk_usage(self.directory).free
        if 2 * nbytes > free:  # chunks and the assembled file coexist for a moment
            raise BlobError("too_large", f"{nbytes} bytes need {2 * nbytes} free, disk has {free}")

    # -- partial downloads
    def _partial(self, sha: str) -> Path:
        return self.partial_dir / _check_sha(sha)

    def begin(self, sha: str, info: ChunkInfo, size: int) -> None:
        """Prepare a partial download; chunks of a different chunking are discarded."""
        if size > MAX_BLOCK_SIZE or size > info.count * info.chunk_size:
            raise BlobError("too_large", f"block {sha[:12]}: {size} bytes declared")
        d = self._partial(sha)
        marker = d / "chunk_size"
        try:
            if int(marker.read_text()) == info.chunk_size:
                return
        except (OSError, ValueError):
            pass
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        atomic_write(marker, f"{info.chunk_size}\n".encode())

    def held(self, sha: str, info: ChunkInfo) -> set[int]:
        d = self._partial(sha)
        if not d.is_dir():
            return set()
        out = set()
        for p in d.glob("*.chunk"):
            n = chunk_index(p.stem)
            if n is not None and n < info.count:
                out.add(n)
        return out

    def missing(self, sha: str, info: ChunkInfo) -> list[int]:
        held = self.held(sha, info)
        return [n for n in range(info.count) if n not in held]

    def put_chunk(self, sha: str, n: int, data: bytes, info: ChunkInfo, size: int) -> bool:
        """Verify chunk ``n`` and store it atomically; False (nothing written) if it is bad."""
        if not 0 <= n < info.count or len(data) != info.chunk_length(n, size):
            return False
        if hashlib.sha256(data).hexdigest() != info.sha256[n]:
            return False
        d = self._partial(sha)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / f"{n}.chunk", data)
        return True

    def assemble(self, sha: str, info: ChunkInfo, size: int) -> Path:
        """Join the chunks, check the whole sha256, move into ``blobs/`` atomically.

        A chunk that no longer matches its hash (disk corruption) is deleted and reported
        as ``ChunkDamaged`` with the rest of the partial download kept, so only it is
        fetched again; a whole-file mismatch with every chunk good means the manifest is
        inconsistent: the partial download is deleted.
        """
        d = self._partial(sha)
        whole = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.blob_dir, prefix=sha[:16], suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                for n in range(info.count):
                    chunk_path = d / f"{n}.chunk"
                    data = chunk_path.read_bytes()
                    if (len(data) != info.chunk_length(n, size)
                            or hashlib.sha256(data).hexdigest() != info.sha256[n]):
                        chunk_path.unlink(missing_ok=True)
                        raise ChunkDamaged(sha, n)
                    whole.update(data)
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
            if whole.hexdigest() != sha:
                shutil.rmtree(d, ignore_errors=True)
                raise BlobError("hash_mismatch", f"block {sha[:12]} assembled to "
                                                 f"{whole.hexdigest()[:12]}")
            target = self.path(sha)
            os.replace(tmp, target)
            fsync_dir(self.blob_dir)
        except BaseException:  # no half-assembled file left, whatever stopped us; re-raised
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        shutil.rmtree(d, ignore_errors=True)
        return target


@dataclass
class FetchResult:
    ok: bool
    reason: FetchReason | None = None
    detail: str = ""
    paths: dict[int, Path] = field(default_factory=dict)  # block index -> cached file
    fetched: list[str] = field(default_factory=list)  # shas assembled by this fetch
    requested: dict[str, set[int]] = field(default_factory=dict)  # every chunk we asked for
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class _Want:
    block: BlockEntry
    info: ChunkInfo
    missing: set[int]


class BlobFetcher:
    """Downloads the blocks a device needs, from pushed chunks and its own re-requests.

    Chunks arrive on ``Topics.blob(sha, n)`` (subscribed per needed sha); the paho thread only
    filters them and puts them on a bounded queue; the fetching thread verifies and writes.
    Requests are pipelined: at most ``window`` chunks are outstanding; a chunk not received
    ``request_interval`` seconds after it was asked for is asked for again. While chunks we
    did not ask for keep arriving (a push, or another device's re-requests), we wait until
    they pause for ``quiet`` seconds instead of asking for duplicates; the first request
    waits ``first_request_after`` seconds (longer than the publisher's ``push_delay``).
    """

    def __init__(
        self,
        link: LinkLike,
        topics: Topics,
        device: str,
        cache: BlobCache,
        *,
        request_interval: float = 2.0,
        window: int = 32,
        max_request_chunks: int = 64,
        first_request_after: float = 2.0,
        quiet: float = 0.5,
        max_queued_chunks: int = 64,
    ) -> None:
        self.link, self.topics, self.device, self.cache = link, topics, device, cache
        self.request_interval = request_interval
        self.window = window
        self.max_request_chunks = max_request_chunks
        self.quiet = quiet
        self.first_request_after = first_request_after
        self._queue: queue.Queue[tuple[str, int, bytes]] = queue.Queue(max_queued_chunks)
        self._active: dict[str, int] = {}  # sha -> max chunk length, read on paho's thread
        self._subscribed: set[str] = set()
        self._cancel = threading.Event()
        self._blob_prefix = f"{topics.fleet_root}/model/blob/"
        self.stats: dict[str, int] = dict.fromkeys(
            ("received", "stored", "duplicate", "corrupt", "queue_full", "requests",
             "requested_chunks", "bytes", "bad_index"), 0)

    def cancel(self) -> None:
        """Stop a running ``fetch`` (from another thread); chunks held so far stay."""
        self._cancel.set()

    # -- paho thread
    def _on_message(self, msg: MessageLike) -> None:
        topic = msg.topic
        if not topic.startswith(self._blob_prefix):
            return
        sha, _, level = topic[len(self._blob_prefix):].partition("/")
        limit = self._active.get(sha)
        n = chunk_index(level)
        if limit is None or n is None:
            if limit is not None:
                self.stats["bad_index"] += 1
            return  # a block we do not need (now), or no chunk number
        payload = bytes(msg.payload)
        if len(payload) > limit:
            self.stats["corrupt"] += 1
            return
        try:
            self._queue.put_nowait((sha, n, payload))
        except queue.Full:  # the chunk is asked for again later; memory stays bounded
            self.stats["queue_full"] += 1

    # -- fetching thread
    def fetch(self, variant: Variant, indices: Iterable[int], timeout: float = 300.0
              ) -> FetchResult:
        """Make every block in ``indices`` present in the cache; never raises for network
        or data problems: the result says why it failed."""
        self._cancel.clear()
        for key in self.stats:  # per fetch; the result keeps a copy
            self.stats[key] = 0
        result = FetchResult(ok=False)
        wants: dict[str, _Want] = {}
        for i in indices:
            block = variant.partition.block(i)
            result.paths[i] = self.cache.path(block.sha256)
            if not self.cache.has(block.sha256):
                info = variant.chunks[block.sha256]
                wants[block.sha256] = _Want(block, info, set())
        try:
            self.cache.check_space(sum(w.block.size for w in wants.values()))
            for sha, w in list(wants.items()):
                self.cache.begin(sha, w.info, w.block.size)
                w.missing = set(self.cache.missing(sha, w.info))
                if not w.missing:
                    self._assemble(sha, w, wants, result)
            if wants:
                self._run(wants, result, timeout)
            result.ok = True
        except BlobError as exc:
            result.reason, result.detail = exc.reason, exc.detail
            log.warning("block fetch failed: %s", exc)
        finally:
            self._active.clear()
            self._unsubscribe()
            self._drain_queue()
            result.stats = dict(self.stats)
        return result

    def _run(self, wants: dict[str, _Want], result: FetchResult, timeout: float) -> None:
        start = time.monotonic()
        deadline = start + timeout
        outstanding: dict[tuple[str, int], float] = {}  # requested, not yet received
        # The first request waits for a push that may be on its way (the publisher pushes
        # ``push_delay`` after the manifest): first_request_after = last_unsolicited + quiet.
        last_unsolicited = start + self.first_request_after - self.quiet
        for sha, w in wants.items():
            self._active[sha] = w.info.chunk_size
            self._subscribe(sha)
        while wants:
            now = time.monotonic()
            if self._cancel.is_set():
                raise BlobError("cancelled", "fetch cancelled")
            if now >= deadline:
                left = sum(len(w.missing) for w in wants.values())
                raise BlobError("timeout", f"{left} chunks of {len(wants)} blocks still "
                                           f"missing after {timeout:.0f} s")
            if now - last_unsolicited >= self.quiet:
                self._request(wants, outstanding, result, now)
            try:
                sha, n, data = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            self.stats["received"] += 1
            want = wants.get(sha)
            if want is None or n not in want.missing:
                self.stats["duplicate"] += 1
                continue
            if not self.cache.put_chunk(sha, n, data, want.info, want.block.size):
                self.stats["corrupt"] += 1
                outstanding.pop((sha, n), None)  # ask again at the next request
                log.warning("dropped a bad chunk %d of block %s", n, sha[:12])
                continue
            self.stats["stored"] += 1
            self.stats["bytes"] += len(data)
            want.missing.discard(n)
            if outstanding.pop((sha, n), None) is None:
                last_unsolicited = time.monotonic()
            if not want.missing:
                self._assemble(sha, want, wants, result)

    def _assemble(self, sha: str, w: _Want, wants: dict[str, _Want],
                  result: FetchResult) -> None:
        try:
            self.cache.assemble(sha, w.info, w.block.size)
        except ChunkDamaged as exc:
            w.missing.add(exc.chunk)  # fetch just that chunk again
            log.warning("%s; fetching it again", exc)
            return
        del wants[sha]
        self._active.pop(sha, None)
        result.fetched.append(sha)
        log.info("block %d (%s, %d bytes) complete", w.block.index, sha[:12], w.block.size)

    def _request(self, wants: dict[str, _Want], outstanding: dict[tuple[str, int], float],
                 result: FetchResult, now: float) -> None:
        for key in [k for k, t in outstanding.items() if now - t >= self.request_interval]:
            del outstanding[key]  # lost or dropped: eligible again
        room = self.window - len(outstanding)
        for sha, w in wants.items():
            if room <= 0:
                return
            todo = sorted(n for n in w.missing if (sha, n) not in outstanding)
            todo = todo[:min(room, self.max_request_chunks)]
            if not todo:
                continue
            body = json.dumps({"sha256": sha, "chunks": todo}, separators=(",", ":")).encode()
            if not self.link.publish(self.topics.blob_request(self.device), body, qos=1):
                return  # offline: try again on a later pass
            self.stats["requests"] += 1
            self.stats["requested_chunks"] += len(todo)
            result.requested.setdefault(sha, set()).update(todo)
            for n in todo:
                outstanding[(sha, n)] = now
            room -= len(todo)

    # -- subscriptions
    def _subscribe(self, sha: str) -> None:
        if sha not in self._subscribed:
            self.link.subscribe(f"{self._blob_prefix}{sha}/+", 1, self._on_message)
            self._subscribed.add(sha)

    def _unsubscribe(self) -> None:
        """Drop the per-sha subscriptions if the link can; otherwise ``_active`` filters."""
        unsubscribe = getattr(self.link, "unsubscribe", None)
        if unsubscribe is None:
            return
        for sha in list(self._subscribed):
            try:
                unsubscribe(f"{self._blob_prefix}{sha}/+")
            except Exception:  # the others are still dropped; a stale one is only filtered
                log.exception("unsubscribe of block %s failed", sha[:12])
        self._subscribed.clear()

    def _drain_queue(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
