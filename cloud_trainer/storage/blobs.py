"""Update blocks in PostgreSQL, so that any replica answers chunk re-requests.

A leader's ``BlobPublisher`` (``cloud_trainer/release/publisher.py``) writes every block it serves
into ``update_blobs`` (bytes, size and chunk table; content-addressed, so idempotent and
unfenced). When the leader dies, the replica that takes over has none of those files in its
own ``state_dir``; asked for a chunk of a sha it does not hold, it fetches the block from
here once into its content-addressed ``blobs/`` cache, checks the sha256, and serves it.

Why PostgreSQL rather than a shared path: the same reason as the block weights
(docs/deploy.md): one backup holds versions and their bytes, and no NFS mount becomes a
second thing to keep available. Blocks are kilobytes to a few MB each.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

from sqlalchemy import Engine, text

from agent.update.update_manifest import ChunkInfo

log = logging.getLogger(__name__)


class SharedBlobs:
    """``update_blobs`` on the ``[database]`` engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def put(self, sha256: str, path: Path, chunks: ChunkInfo) -> None:
        """Store one published block (a no-op when it is there already)."""
        with self.engine.begin() as conn:
            if conn.scalar(text("SELECT 1 FROM update_blobs WHERE sha256 = :s"),
                           {"s": sha256}):
                return
            data = Path(path).read_bytes()
            conn.execute(text(
                "INSERT INTO update_blobs (sha256, size, chunks, data, published_at) "
                "VALUES (:s, :n, :c, :d, :t) ON CONFLICT (sha256) DO NOTHING"),
                {"s": sha256, "n": len(data), "c": chunks.model_dump_json(), "d": data,
                 "t": time.time()})

    def fetch(self, sha256: str, dest: Path) -> ChunkInfo | None:
        """Write the block to ``dest`` (atomically) and return its chunk table; None when no
        leader published it. A row whose bytes do not hash to ``sha256`` is refused."""
        with self.engine.connect() as conn:
            row = conn.execute(text("SELECT chunks, data FROM update_blobs WHERE sha256 = :s"),
                               {"s": sha256}).first()
        if row is None:
            return None
        chunks, data = ChunkInfo.model_validate_json(row[0]), bytes(row[1])
        if hashlib.sha256(data).hexdigest() != sha256:
            log.error("update_blobs row %s does not match its sha256: not served", sha256[:12])
            return None
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return chunks
