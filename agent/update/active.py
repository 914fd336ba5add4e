"""What a device persists about its updates: the active version, the last known good one,
and which manifests it has already installed or refused; and, at start, which version runs.

One JSON file, ``<state_dir>/update/active.json``, replaced atomically (temporary file,
fsync, rename, fsync of the directory), so a power cut at any moment leaves either the old
or the new state, never a torn one. A record's partition is this device's slice with its
block files named ``<sha256>.onnx`` in the block cache (``agent.update.blobs.BlobCache``); the
configured partition (``model.manifest``) is the record ``None``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.fsutil import atomic_write, fsync_dir
from agent.infer.manifest import PartitionManifest, sha256_file
from agent.infer.profiles import FirmwareProfile
from agent.infer.runtime import BlockRunner, PartitionError
from agent.update.blobs import BlobCache
from agent.wire.update_report import UpdateReport

log = logging.getLogger(__name__)

UPDATE_DIR = "update"
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
    # the slice came from a signed assignment (a moved cut): it may differ from the
    # configured slice in ``last``
    assigned: bool = False

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
    # ``current`` was swapped in and its health watch has not ended: an agent that starts
    # and finds this set died during the watch (a crash, a watchdog kill, a power cut)
    probation: bool = False

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


@dataclass(frozen=True)
class BootChoice:
    """What the agent runs at start, and what to report about it once connected."""

    runner: BlockRunner
    note: UpdateReport | None = None


def update_paths(state_dir: Path) -> tuple[ActiveStore, BlobCache]:
    """The persisted state and the block cache, both under ``<state_dir>/update`` (blocks
    of the active version are state, not cache: losing them would lose the version)."""
    root = Path(state_dir) / UPDATE_DIR
    return ActiveStore(root), BlobCache(root / "blocks")


def _usable(rec: VersionRecord, configured: PartitionManifest) -> str | None:
    p, c = rec.partition, configured
    last = p.last if rec.assigned else c.last  # a signed assignment moved the cut
    if (p.model_id, p.first, p.last, p.num_blocks) != (c.model_id, c.first, last,
                                                      c.num_blocks):
        return (f"it is {p.model_id} blocks {p.first}..{p.last}, the configuration says "
                f"{c.model_id} blocks {c.first}..{c.last}")
    if c.model_version > rec.version:
        return f"the configured partition (v{c.model_version}) is newer"
    return None


def _died_on_probation(state: UpdateState, device: str) -> UpdateReport:
    """The agent died while the current version was on probation: never trust it again
    (else a version that crashes the agent would be restarted into for ever)."""
    rec = state.current
    assert rec is not None
    fallback = state.last_known_good
    log.error("the agent stopped uncleanly during the health watch of v%d: back to %s",
              rec.version, f"v{fallback.version}" if fallback else "the configured partition")
    state.remember("rejected", rec.digest)
    state.current, state.last_known_good, state.probation = fallback, None, False
    return UpdateReport(device=device, session=0, model_id=rec.model_id, version=rec.version,
                        from_version=fallback.version if fallback else None,
                        status="rolled_back", reason="health_degraded",
                        detail="the agent stopped uncleanly during the health watch")


def _runner_from_cache(rec: VersionRecord, cache: BlobCache, profile: FirmwareProfile
                       ) -> tuple[BlockRunner | None, list[str], str]:
    """A runner for ``rec``'s blocks in the cache, or None with the damaged blocks and why."""
    bad = damaged_blocks(rec, cache.blob_dir)
    if bad:
        return None, bad, f"blocks {[s[:12] for s in bad]} missing or damaged"
    try:
        return BlockRunner(rec.partition, cache.blob_dir, profile, verify=False), [], ""
    except PartitionError as exc:
        return None, [], str(exc)


def boot_runner(configured: PartitionManifest, model_dir: Path, profile: FirmwareProfile,
                store: ActiveStore, cache: BlobCache, device: str) -> BootChoice:
    """The persisted active version if its blocks still verify, else the last known good
    one, else the configured partition; a damaged version is reported ``active_corrupt``.

    The damaged block files are deleted and the damaged manifest forgotten, so the retained
    manifest re-installs it (fetching only what was damaged).
    """
    state = store.load()
    note: UpdateReport | None = None
    if state.current is not None and state.probation:
        note = _died_on_probation(state, device)
        store.save(state)
    candidates = ([("active", state.current), ("last known good", state.last_known_good)]
                  if state.current is not None else [])  # None: the configured partition
    for label, rec in candidates:
        if rec is None:
            continue
        why = _usable(rec, configured)
        if why is not None:
            log.warning("not starting the persisted %s version %d: %s", label, rec.version, why)
            continue
        runner, bad, detail = _runner_from_cache(rec, cache, profile)
        if runner is not None:
            if rec is not state.current:
                state.current, state.last_known_good = rec, None
                store.save(state)
                if note is not None:
                    note = note.model_copy(update={"from_version": rec.version})
            log.info("starting on the persisted %s version %s v%d", label, rec.model_id,
                     rec.version)
            return BootChoice(runner, note)
        log.error("persisted %s version %d cannot run (%s): falling back", label,
                  rec.version, detail)
        for sha in bad:
            cache.path(sha).unlink(missing_ok=True)
        state.forget(rec.digest)
        if note is None:
            note = UpdateReport(device=device, session=0, model_id=rec.model_id,
                                version=rec.version, status="rolled_back",
                                reason="active_corrupt", detail=f"{label}: {detail}"[:2000])
    if state.current is not None or state.last_known_good is not None:
        state.current = state.last_known_good = None
        store.save(state)
    runner = BlockRunner(configured, model_dir, profile)
    if note is not None:  # whatever went wrong, the configured partition runs now
        note = note.model_copy(update={"from_version": configured.model_version})
    return BootChoice(runner, note)
