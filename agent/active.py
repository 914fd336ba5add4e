"""What a device persists about its updates: the active version, the last known good one,
and which manifests it has already installed or refused.

One JSON file, ``<state_dir>/update/active.json``, replaced atomically (temporary file,
fsync, rename, fsync of the directory), so a power cut at any moment leaves either the old
or the new state, never a torn one. A record's partition is this device's slice with its
block files named ``<sha256>.onnx`` in the block cache (``agent.blobs.BlobCache``); the
configured partition (``model.manifest``) is the record ``None``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.fsutil import atomic_write, fsync_dir
from agent.manifest import PartitionManifest, sha256_file

log = logging.getLogger(__name__)

STATE_FILE = "active.json"
MAX_SEEN = 256  # manifest digests remembered per list; older ones fall out
MAX_STATE_BYTES = 4 * 1024 * 1024


class VersionRecord(BaseModel):
    """A version installed by an update."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_id: str
    version: int = Field(ge=1)
    digest: str = Field(description="sha256 of the manifest payload that installed it")
    partition: PartitionManifest
    applied_at: float = Field(default_factory=time.time)

    @property
    def shas(self) -> set[str]:
        return {b.sha256 for b in self.partition.blocks}


class UpdateState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = 1
    current: VersionRecord | None = None  # None: the configured partition
    last_known_good: VersionRecord | None = None  # what ran before ``current``
    applied: list[str] = Field(default_factory=list)  # digests installed, oldest first
    rejected: list[str] = Field(default_factory=list)  # digests refused or rolled back
    # digests of manifests for the version that was already running (nothing to install)
    acknowledged: list[str] = Field(default_factory=list)

    def remember(self, which: Literal["applied", "rejected", "acknowledged"],
                 digest: str) -> None:
        seen = getattr(self, which)
        if digest in seen:
            seen.remove(digest)
        seen.append(digest)
        del seen[:-MAX_SEEN]

    def forget(self, digest: str) -> None:
        for seen in (self.applied, self.rejected, self.acknowledged):
            while digest in seen:
                seen.remove(digest)

    def keep_shas(self) -> set[str]:
        """Block files the device may need again (the running and the fallback version)."""
        out: set[str] = set()
        for rec in (self.current, self.last_known_good):
            if rec is not None:
                out |= rec.shas
        return out


class ActiveStore:
    """Loads and durably saves ``UpdateState``; an unreadable file is set aside, not fatal."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / STATE_FILE

    def load(self) -> UpdateState:
        try:
            if self.path.stat().st_size > MAX_STATE_BYTES:
                raise ValueError(f"{self.path.stat().st_size} bytes > {MAX_STATE_BYTES}")
            return UpdateState.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return UpdateState()
        except (OSError, ValueError, ValidationError) as exc:
            aside = self.path.with_suffix(".json.corrupt")
            log.error("update state %s unreadable (%s): set aside as %s; running the "
                      "configured partition", self.path, str(exc)[:300], aside)
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            return UpdateState()

    def save(self, state: UpdateState) -> None:
        atomic_write(self.path, state.model_dump_json(indent=1).encode())
        fsync_dir(self.directory)


def damaged_blocks(record: VersionRecord, block_dir: Path) -> list[str]:
    """The shas of the record's block files that are missing or no longer match."""
    bad = []
    for b in record.partition.blocks:
        path = block_dir / b.file
        try:
            ok = path.stat().st_size == b.size and sha256_file(path) == b.sha256
        except OSError:
            ok = False
        if not ok:
            bad.append(b.sha256)
    return bad
