"""Over-the-air block updates on the device: verify, fetch, self-test, swap, persist, report.

The retained signed manifest arrives on ``Topics.manifest`` (Link re-subscribes on every
connect, so a device that was away gets it too). paho's thread only keeps the newest
payload; the updater thread does the work, in this order, stopping at the first failure
with the running version untouched and the reason reported:

1. signature (``parse_signed`` against ``[update].public_keys``), fleet, schema, limits;
2. targets this device/profile; same model; version newer than the running one (older
   only for a signed ``rollback``); not installed or refused before (a replay);
3. only the blocks of this device's slice (its signed ``assignments`` entry if the
   manifest has one: a moved cut, same weights) that the cache lacks are fetched
   (``BlobFetcher``: verified chunks, resumable across disconnects and restarts);
4. a new ``BlockRunner`` is built beside the running one and self-tested
   (``agent.update.selftest``) on the device's recent inputs;
5. ``RunnerSlot.swap``: the inference stage reads the slot once per input, so an input is
   processed wholly by the old or wholly by the new chain;
6. the new version is persisted (``agent.update.active``), birth is re-published, ``applied`` is
   reported; for ``[update.health].watch_s`` the new version's error rate and confidence
   are watched, and it is swapped back (``rolled_back``/``health_degraded``) if they
   degrade. Manifests that arrive during the watch wait for it to end.

Every outcome is an ``UpdateReport`` on ``Topics.update(device)`` (QoS 1; spooled when
offline) and a ``knet_update_events`` count.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.compat import zip_strict
from agent.config import UpdateSection
from agent.errors import KnetAgentError
from agent.fsutil import fsync_dir
from agent.infer.manifest import ManifestError, PartitionManifest, sha256_file
from agent.infer.pipeline import RunnerSlot
from agent.infer.profiles import FirmwareProfile
from agent.infer.runtime import BlockRunner, PartitionError
from agent.update.active import ActiveStore, UpdateState, VersionRecord
from agent.update.blobs import BlobCache, BlobFetcher, FetchResult
from agent.update.canary import CanaryRecorder
from agent.update.selftest import self_test
from agent.update.update_manifest import UpdateManifest, UpdateRejected, Variant, parse_signed
from agent.wire.topics import Topics
from agent.wire.update_report import RejectReason, Status, UpdateReport

log = logging.getLogger(__name__)

MAX_KEPT_REPORTS = 256  # reports kept in memory (for the fleet bench and tests)


class _Refused(KnetAgentError):
    """One step refused the update; carries the report's reason."""

    def __init__(self, reason: RejectReason, detail: str, *, retry: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail
        self.retry = retry  # transient (a timeout): the same manifest is tried again


@dataclass
class _Job:
    payload: bytes
    digest: str
    received: float  # monotonic


@dataclass
class _Watch:
    """A version swapped in and on probation."""

    new: BlockRunner
    old: BlockRunner
    state_before: UpdateState
    digest: str
    until: float
    baseline_confidence: float | None
    counts_at_swap: tuple[int, int]
    started: float


def payload_digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class Updater:
    """Applies signed updates to one device's ``RunnerSlot``; see the module docstring."""

    def __init__(
        self,
        cfg: UpdateSection,
        *,
        device: str,
        topics: Topics,
        profile: FirmwareProfile,
        link: Any,  # agent.mqtt.link.Link (subscribe, unsubscribe, publish, publish_reliable)
        slot: RunnerSlot,
        recorder: CanaryRecorder,
        store: ActiveStore,
        cache: BlobCache,
        session: Callable[[], int] = lambda: 0,
        on_swap: Callable[[BlockRunner], None] | None = None,
        prepare: Callable[[BlockRunner], object] | None = None,
        infer_counts: Callable[[], tuple[int, int]] | None = None,
        on_event: Callable[[str], None] | None = None,
        local_blocks: dict[str, Path] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device, self.topics, self.profile = device, topics, profile
        self.link, self.slot, self.recorder = link, slot, recorder
        self.store, self.cache = store, cache
        self.session = session
        self.on_swap = on_swap
        self.prepare = prepare  # builds a candidate's inference fast path before its swap
        self.infer_counts = infer_counts or (lambda: (0, 0))
        self.on_event = on_event
        self.local_blocks = dict(local_blocks or {})  # sha -> file of the configured partition
        self.keys = cfg.load_keys()
        self.fetcher = BlobFetcher(link, topics, device, cache,
                                   request_interval=cfg.request_interval_s,
                                   first_request_after=cfg.first_request_after_s)
        self.state = store.load()
        self.reports: deque[UpdateReport] = deque(maxlen=MAX_KEPT_REPORTS)  # the latest
        self.received = 0  # manifests delivered (the retained one again on each connect)
        self._pending: _Job | None = None
        self._busy: str | None = None  # digest being processed
        self._busy_version: int | None = None  # its version, once verified
        self._checking = False  # a superseding manifest is being verified
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: _Watch | None = None
        self._retry: tuple[_Job, float] | None = None  # a timed-out download, tried again

    # -- lifecycle
    def start(self, boot_note: UpdateReport | None = None) -> Updater:
        if boot_note is not None:
            self._report(boot_note.model_copy(update={"session": self.session()}))
        self._thread = threading.Thread(target=self._loop, name="knet-updater", daemon=True)
        self._thread.start()
        self.link.subscribe(self.topics.manifest, 1, self._on_manifest)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.fetcher.cancel()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._watch is not None and not (self._thread and self._thread.is_alive()):
            # A clean stop is not a failure of the new version: it stays.
            log.info("stopped during the health watch of v%d; it stays active",
                     self._watch.new.version)
            self.state.probation = False
            self.store.save(self.state)

    @property
    def watching(self) -> bool:
        return self._watch is not None

    def idle(self) -> bool:
        """Nothing queued, fetching, installing or on probation."""
        with self._lock:
            return self._pending is None and self._busy is None and self._watch is None

    # -- paho's thread: keep only the newest payload
    def _on_manifest(self, msg: Any) -> None:
        payload = bytes(msg.payload)
        if not payload:
            return  # a cleared retained manifest
        digest = payload_digest(payload)
        with self._lock:
            self.received += 1
            if digest == self._busy:
                return  # the retained copy of what we are installing, after a reconnect
            job = self._pending = _Job(payload, digest, time.monotonic())
            self._retry = None  # the newest manifest wins
            check = self._busy is not None and not self._checking
            self._checking = self._checking or check
        if check:  # verified off paho's thread; only a valid, different version cancels
            threading.Thread(target=self._supersede, args=(job,), name="knet-update-check",
                             daemon=True).start()
        self._wake.set()

    def _supersede(self, job: _Job) -> None:
        """Cancel the download in progress if ``job`` is a valid manifest for this device
        with another version (a forged or replayed one must not stop a good download)."""
        try:
            m = parse_signed(job.payload, self.keys, max_bytes=self.cfg.max_manifest_bytes,
                             allow_unsigned=self.cfg.allow_unsigned and not self.keys,
                             fleet=self.topics.fleet)
            if (m.targets_device(self.device, self.profile.name)
                    and m.version != self._busy_version):
                log.info("v%d supersedes the update in progress", m.version)
                self.fetcher.cancel()
        except UpdateRejected:
            pass  # refused (and reported) when its turn comes
        finally:
            with self._lock:
                self._checking = False

    # -- the updater thread
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            try:
                if self._watch is not None:
                    self._check_health()
                    continue
                with self._lock:
                    if (self._pending is None and self._retry is not None
                            and time.monotonic() >= self._retry[1]):
                        self._pending = _Job(self._retry[0].payload, self._retry[0].digest,
                                             time.monotonic())
                        self._retry = None
                    job, self._pending = self._pending, None
                    self._busy = job.digest if job is not None else None
                if job is not None:
                    self._handle(job)
            except Exception:  # the updater must outlive any bug in one update
                log.exception("update step failed")
            finally:
                with self._lock:
                    self._busy = self._busy_version = None

    def _handle(self, job: _Job) -> None:
        running: BlockRunner = self.slot.current
        base = {"model_id": running.manifest.model_id, "version": 0,
                "from_version": running.version}
        if self._settled(job.digest):
            log.debug("manifest %s seen before; ignored", job.digest[:12])
            return
        try:
            manifest = parse_signed(job.payload, self.keys,
                                    max_bytes=self.cfg.max_manifest_bytes,
                                    allow_unsigned=self.cfg.allow_unsigned and not self.keys,
                                    fleet=self.topics.fleet)
            base.update(model_id=manifest.model_id, version=manifest.version)
            self._busy_version = manifest.version
            variant = self._admit(manifest, job.digest, running)
            part = self._slice(manifest, variant, running)
            recut = part.last != running.manifest.last
            if manifest.version == running.version and not recut:
                self._same_version(part, running, job, base)
                return
            if manifest.version == running.version:
                self._same_blocks(part, running)
            result = self._fetch(variant, part, job, base)
            new = self._build(part, running, recut=recut)
        except (UpdateRejected, _Refused) as exc:
            if not self._stop.is_set():  # a fetch cut off by shutdown resumes next start
                self._refuse(job, exc.reason, exc.detail, base,
                             retry=getattr(exc, "retry", False))
            return
        except Exception as exc:  # a bug or a full disk: said once, tried again later
            log.exception("update failed unexpectedly")
            self._refuse(job, "internal", f"{type(exc).__name__}: {exc}"[:1000], base,
                         retry=True)
            return
        if self._stop.is_set():
            return
        assigned = (self.device in manifest.assignments
                    or (self.state.current is not None and self.state.current.assigned))
        self._install(new, running, part, job, result, base, assigned=assigned)

    def _slice(self, manifest: UpdateManifest, variant: Variant,
               running: BlockRunner) -> PartitionManifest:
        """This device's blocks of the whole model the variant carries: its signed
        assignment (a moved cut) if the manifest has one, else the slice it runs."""
        a = manifest.assignments.get(self.device)
        r = running.manifest
        first, last = (a.first, a.last) if a is not None else (r.first, r.last)
        if first != r.first:
            raise _Refused("incompatible", f"assigned blocks {first}..{last}, this device's "
                                           f"inputs feed block {r.first}")
        try:
            return variant.partition.slice(first, last)
        except ManifestError as exc:
            raise _Refused("incompatible", str(exc)) from None

    @staticmethod
    def _same_blocks(part: PartitionManifest, running: BlockRunner) -> None:
        """A cut moved under the running version number must keep the running weights."""
        mine = {b.index: b.sha256 for b in running.manifest.blocks}
        if any(mine.get(b.index, b.sha256) != b.sha256 for b in part.blocks):
            raise _Refused("replayed", f"v{part.model_version} is already running, with "
                                       f"other blocks")

    def _settled(self, digest: str) -> bool:
        """A manifest already acted on that needs no new report (the retained copy comes
        again on every reconnect)."""
        s = self.state
        return (digest in s.rejected or digest in s.acknowledged
                or (s.current is not None and s.current.digest == digest))

    def _same_version(self, part: PartitionManifest, running: BlockRunner, job: _Job,
                      base: dict[str, Any]) -> None:
        """The running version described again (first manifest after provisioning, a
        widened rollout): ``applied`` with nothing done. Other blocks under the running
        version number are refused: a new version needs a new number."""
        if [b.sha256 for b in part.blocks] != [b.sha256 for b in running.manifest.blocks]:
            raise _Refused("replayed", f"v{part.model_version} is already running, with "
                                       f"other blocks")
        self.state.remember("acknowledged", job.digest)
        self.store.save(self.state)
        self._emit("applied", job, base, detail="already running")

    def _admit(self, manifest: UpdateManifest, digest: str, running: BlockRunner) -> Variant:
        """Target, model, version and replay checks; the variant for this profile."""
        if not manifest.targets_device(self.device, self.profile.name):
            raise _Refused("not_targeted", f"targets {manifest.targets.model_dump()}"[:500])
        variant = manifest.variant_for(self.profile.name)
        if manifest.model_id != running.manifest.model_id:
            raise _Refused("incompatible", f"model {manifest.model_id!r}, this device runs "
                                           f"{running.manifest.model_id!r}")
        if digest in self.state.applied:
            raise _Refused("replayed", f"v{manifest.version} was installed before")
        if manifest.version < running.version and not manifest.rollback:
            raise _Refused("downgrade", f"v{manifest.version} is older than the running "
                                        f"v{running.version} and not a signed rollback")
        p, r = variant.partition, running.manifest
        if p.num_blocks != r.num_blocks:
            raise _Refused("incompatible", f"{p.num_blocks} blocks, this device's model has "
                                           f"{r.num_blocks}")
        return variant

    def _fetch(self, variant: Variant, part: PartitionManifest, job: _Job,
               base: dict[str, Any]) -> FetchResult | None:
        for b in part.blocks:
            self._seed(b.sha256)
        missing = {b.sha256: b.size for b in part.blocks if not self.cache.has(b.sha256)}
        for b in part.blocks:
            if b.sha256 in missing and b.size > self.cfg.max_block_bytes:
                raise _Refused("too_large", f"block {b.index} is {b.size} bytes, "
                                            f"update.max_block_bytes is "
                                            f"{self.cfg.max_block_bytes}")
        if sum(missing.values()) > self.cfg.max_update_bytes:
            raise _Refused("too_large", f"{sum(missing.values())} bytes to fetch > "
                                        f"update.max_update_bytes {self.cfg.max_update_bytes}")
        if not missing:
            return None
        self._emit("downloading", job, base, detail=f"{len(missing)} blocks, "
                                                    f"{sum(missing.values())} bytes")
        result = self.fetcher.fetch(variant, [b.index for b in part.blocks],
                                    timeout=self.cfg.download_timeout_s)
        if not result.ok:
            reason, detail = result.reason or "timeout", result.detail
            if reason == "timeout" and result.stats.get("corrupt"):
                reason = "hash_mismatch"  # the data came, but never matched its hashes
                detail = f"{result.stats['corrupt']} chunks failed their sha256; {detail}"
            if reason == "cancelled":
                detail = "superseded by a newer manifest"
            # Chunks held so far stay: the retained manifest, re-delivered on the next
            # connect, resumes the download.
            raise _Refused(reason, detail, retry=reason in ("timeout", "cancelled")
                           or result.reason == "timeout")
        self._emit("downloaded", job, base, nbytes=result.stats.get("bytes", 0))
        return result

    def _seed(self, sha: str) -> None:
        """Copy a block the configured partition already has into the cache (verified), so
        an update that changes one block downloads one block."""
        src = self.local_blocks.get(sha)
        if src is None or self.cache.has(sha):
            return
        try:
            if sha256_file(src) != sha:
                return
            tmp = self.cache.blob_dir / f".{sha[:16]}.seed.tmp"
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.cache.path(sha))
            fsync_dir(self.cache.blob_dir)
        except OSError as exc:
            log.warning("could not reuse %s for block %s: %s", src, sha[:12], exc)

    def _build(self, part: PartitionManifest, running: BlockRunner, *,
               recut: bool = False) -> BlockRunner:
        try:
            new = BlockRunner(part, self.cache.blob_dir, self.profile)
            new.warmup()
            if self.prepare is not None:
                self.prepare(new)
        except PartitionError as exc:
            raise _Refused("incompatible", str(exc)[:1500]) from None
        except Exception as exc:  # onnxruntime failing on a valid-looking graph
            raise _Refused("self_test_failed", f"warm-up failed: {exc}"[:1500]) from None
        test = self_test(new, running, self.recorder.inputs(),
                         threshold=self.cfg.agreement_threshold,
                         min_canaries=self.cfg.min_canary_inputs, recut=recut)
        if not test.ok:
            raise _Refused(test.reason or "self_test_failed", test.detail)
        log.info("self-test passed for v%d (agreement %s on %d canaries) %s", new.version,
                 test.agreement, test.canaries, test.detail)
        return new

    def _install(self, new: BlockRunner, running: BlockRunner, part: PartitionManifest,
                 job: _Job, result: FetchResult | None, base: dict[str, Any], *,
                 assigned: bool = False) -> None:
        before = self.state.model_copy(deep=True)
        counts = self.infer_counts()
        old = self.slot.swap(new)
        record = VersionRecord(model_id=part.model_id, version=part.model_version,
                               digest=job.digest, partition=part, assigned=assigned)
        h = self.cfg.health
        self.state.last_known_good = self.state.current
        self.state.current = record
        self.state.probation = h.watch_s > 0
        self.state.remember("applied", job.digest)
        self.store.save(self.state)
        log.info("update applied: %s v%d -> v%d, blocks %d..%d", part.model_id, old.version,
                 new.version, part.first, part.last)
        if self.on_swap is not None:
            self.on_swap(new)
        if h.watch_s > 0:  # on probation before anyone hears "applied"
            confs = self.recorder.confidences(old)
            self._watch = _Watch(new=new, old=old, state_before=before, digest=job.digest,
                                 until=time.monotonic() + h.watch_s,
                                 baseline_confidence=sum(confs) / len(confs) if confs
                                 else None, counts_at_swap=counts, started=job.received)
        nbytes = result.stats.get("bytes", 0) if result is not None else 0
        self._emit("applied", job, base, nbytes=nbytes)
        if h.watch_s <= 0:
            self._settle()

    # -- health watch
    def _check_health(self) -> None:
        w = self._watch
        assert w is not None
        h = self.cfg.health
        processed, errors = (a - b for a, b in zip_strict(self.infer_counts(),
                                                           w.counts_at_swap))
        seen = processed + errors
        why = None
        if seen >= h.min_inputs and errors / seen > h.max_error_rate:
            why = f"error rate {errors}/{seen} > {h.max_error_rate}"
        confs = self.recorder.confidences(w.new)
        if (why is None and h.confidence_drop > 0 and w.baseline_confidence
                and len(confs) >= h.min_inputs):
            mean = sum(confs) / len(confs)
            if mean < h.confidence_drop * w.baseline_confidence:
                why = (f"mean confidence {mean:.3f} < {h.confidence_drop} x the previous "
                       f"version's {w.baseline_confidence:.3f} over {len(confs)} inputs")
        if why is not None:
            self._roll_back(w, why)
        elif time.monotonic() >= w.until:
            log.info("v%d healthy through its %.0f s watch (%d inputs)", w.new.version,
                     h.watch_s, seen)
            self._watch = None
            self.state.probation = False
            self.store.save(self.state)
            self._settle()

    def _roll_back(self, w: _Watch, why: str) -> None:
        self.slot.swap(w.old)
        self.state = w.state_before
        self.state.remember("rejected", w.digest)
        self.store.save(self.state)
        self._watch = None
        log.error("rolled back v%d -> v%d: %s", w.new.version, w.old.version, why)
        if self.on_swap is not None:
            self.on_swap(w.old)
        m = w.new.manifest
        self._report(UpdateReport(
            device=self.device, session=self.session(), model_id=m.model_id,
            version=m.model_version, from_version=w.old.version, status="rolled_back",
            reason="health_degraded", detail=why, seconds=time.monotonic() - w.started))
        self._settle()

    def _settle(self) -> None:
        """Drop block files no version here needs any more."""
        removed = self.cache.prune(self.state.keep_shas())
        if removed:
            log.info("pruned %d unused block files", len(removed))

    # -- reports
    def _refuse(self, job: _Job, reason: RejectReason, detail: str,
                base: dict[str, Any], *, retry: bool = False) -> None:
        quiet = reason in ("not_targeted", "replayed")  # normal in a fleet, not an alarm
        log.log(logging.INFO if quiet else logging.WARNING, "update refused (%s): %s",
                reason, detail)
        if not retry:
            self.state.remember("rejected", job.digest)
            self.store.save(self.state)
        elif reason != "cancelled":
            with self._lock:
                if self._pending is None:
                    self._retry = (job, time.monotonic() + self.cfg.retry_after_s)
        self._emit("rejected", job, base, reason=reason, detail=detail)

    def _emit(self, status: Status, job: _Job, base: dict[str, Any], *,
              reason: RejectReason | None = None, detail: str = "", nbytes: int = 0) -> None:
        self._report(UpdateReport(device=self.device, session=self.session(), status=status,
                                  reason=reason, detail=detail[:2000], bytes=nbytes,
                                  seconds=time.monotonic() - job.received, **base))

    def _report(self, report: UpdateReport) -> None:
        self.reports.append(report)
        outcome = report.status if report.reason is None else f"{report.status}_{report.reason}"
        if self.on_event is not None:
            self.on_event(outcome)
        topic, payload = self.topics.update(self.device), report.payload()
        # Immediately when online; spooled (delivered after what is queued) when not.
        if not self.link.publish(topic, payload, qos=1):
            self.link.publish_reliable(topic, payload)
