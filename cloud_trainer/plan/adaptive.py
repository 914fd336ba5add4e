"""Moving a device's cut when its uplink changes: live ``stats`` → ``Replanner`` → a signed
manifest with the device's new slice → the devices' OTA path (``agent/update/updater.py``).

The device runs student blocks ``first..k`` and the cloud (``cloud_trainer/serve/split.py``)
finishes ``k+1..N`` for any ``k``, so moving the cut only changes ``k``: the weights stay
those of the deployed manifest. ``CutAdapter`` feeds every device's ``stats["network"]``
(``agent/mqtt/netmeter.py``) into that device's ``Replanner`` (margin + sustain hysteresis); when
it switches, the deployed manifest is re-issued under the same version with
``assignments`` naming every moved device's slice, signed and published retained. A device
builds, self-tests and swaps the assigned slice without a restart; its split requests
follow its new last block.

Stats arrive on paho's thread; solving is cheap, but publishing waits for PUBACKs, so the
push runs on a worker thread (the newest assignment set wins).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.update.update_manifest import SignedManifest, SliceAssignment, UpdateManifest
from agent.wire.control import Stats
from agent.wire.topics import TopicError, TopicKind, Topics
from cloud_trainer.errors import KnetTrainerError
from cloud_trainer.plan.adapt import Decision, LinkFigures, Replanner, figures_from_stats
from cloud_trainer.plan.solver import Plan

log = logging.getLogger(__name__)

MAX_STATS_BYTES = Stats.MAX_BYTES  # a stats message is a few kB; anything far bigger is hostile


def sane(f: LinkFigures) -> LinkFigures:
    """Figures a solver can use: a finite positive rate, a finite non-negative round trip
    (anything else, e.g. a hostile NaN or a string, is dropped: the configured figure)."""
    bw, rtt = f.bandwidth_mbps, f.rtt_ms
    ok_bw = isinstance(bw, int | float) and math.isfinite(bw) and bw > 0
    ok_rtt = isinstance(rtt, int | float) and math.isfinite(rtt) and 0 <= rtt <= 600_000
    return LinkFigures(bandwidth_mbps=bw if ok_bw else None, rtt_ms=rtt if ok_rtt else None)


class NotTargeted(KnetTrainerError):
    """The push must wait: the deployed manifest does not reach a device whose cut moved
    (or, in the daemon, there is nothing deployed yet or a retraining run is going)."""


def device_slice(plan: Plan, node: int = 0) -> SliceAssignment:
    """The device node's blocks in ``plan`` (the planner keeps >= 1 block on the device
    when ``constraints.min_device_blocks`` >= 1)."""
    for s in plan.slices:
        if s.node == node and s.first <= s.last:
            return SliceAssignment(first=s.first, last=s.last)
    raise ValueError(f"plan {plan.key()} runs nothing on node {node}")


class CutAdapter:
    """One ``Replanner`` per device; a switch re-issues ``base`` with the new assignments.

    ``sign`` turns an ``UpdateManifest`` into a ``SignedManifest`` (``keys.sign_manifest``
    with the operator key); ``publish`` sends it (``BlobPublisher.publish_update``).
    """

    def __init__(self, base: UpdateManifest | Callable[[], UpdateManifest],
                 replanners: Mapping[str, Replanner],
                 sign: Callable[[UpdateManifest], SignedManifest],
                 publish: Callable[[SignedManifest], Any], *, link: int = 0,
                 device_node: int = 0, profiles: Mapping[str, str] | None = None) -> None:
        # ``base``: the deployed manifest, or a callable returning the newest one (a
        # retrained version is then re-issued with the assignments, never an older one)
        self.base = base
        self.replanners = dict(replanners)
        self.sign, self.publish = sign, publish
        self.link, self.device_node = link, device_node
        self.profiles = dict(profiles or {})  # device -> firmware profile, for targets
        self.assignments: dict[str, SliceAssignment] = {}
        self.stats = {"observed": 0, "bad_stats": 0, "switches": 0, "published": 0,
                      "publish_failed": 0, "deferred": 0}
        self.decisions: list[tuple[str, Decision]] = []  # the switches, oldest first
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> CutAdapter:
        self._worker = threading.Thread(target=self._loop, name="knet-cut-adapter",
                                        daemon=True)
        self._worker.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._dirty.set()
        if self._worker is not None:
            self._worker.join(timeout)

    topics: Topics

    def attach(self, client: mqtt.Client, topics: Topics) -> None:
        """Take every device's stats from ``client`` (connected and looping by the caller;
        subscribe again in its ``on_connect``)."""
        self.topics = topics
        client.message_callback_add(topics.all_devices("stats"), self._on_stats)
        client.subscribe(topics.all_devices("stats"), 0)

    # -- input
    def _on_stats(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = self.topics.parse(msg.topic)
            if topic.kind is not TopicKind.STATS or topic.device is None:
                raise TopicError(f"{msg.topic!r} is not a stats topic")
            # Bounded, versioned, typed (agent/wire/control.py); NaN/Infinity are allowed
            # there (an agent may send them) and figures_from_stats drops them.
            stats = Stats.parse(msg.payload)
            self.observe(topic.device, stats.model_dump(exclude_unset=True))
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError, TopicError) as exc:
            self.stats["bad_stats"] += 1
            log.warning("stats on %s ignored: %s", msg.topic, str(exc)[:200])
        except Exception:  # never kill paho's thread
            self.stats["bad_stats"] += 1
            log.exception("re-planning on the stats on %s failed", msg.topic)

    def observe(self, device: str, stats: Mapping[str, Any]) -> Decision | None:
        """One stats message of ``device``; None for a device with no re-planner."""
        r = self.replanners.get(device)
        if r is None:
            return None
        net = stats.get("network")
        if net is not None and not isinstance(net, dict):
            raise ValueError("stats.network is not an object")
        figures = sane(figures_from_stats(stats))
        with self._lock:
            self.stats["observed"] += 1
            d = r.observe({self.link: figures})
            if not d.switched:
                return d
            new = device_slice(d.plan, self.device_node)
            self.stats["switches"] += 1
            self.decisions.append((device, d))
            log.info("cut of %s moves to blocks %d..%d (%s -> %s on %s)", device, new.first,
                     new.last, f"{d.current_value:.4g}", f"{d.best_value:.4g}", figures)
            self.assignments[device] = new
        self._dirty.set()
        return d

    # -- output
    def manifest(self) -> UpdateManifest:
        """``base`` with the current assignments (validated again: a slice must fit).

        NotTargeted when ``base`` does not target a moved device (a staged rollout still
        at its canaries): re-issuing it must neither widen the rollout nor carry a slice
        the device would never act on, so the push waits."""
        base = self.base() if callable(self.base) else self.base
        with self._lock:
            mine = dict(self.assignments)
        for device in mine:
            if not base.targets_device(device, self.profiles.get(device, "")):
                raise NotTargeted(f"v{base.version} does not target {device}")
        assignments = {**base.assignments, **mine}
        doc = base.model_dump(mode="json")
        doc.update(assignments={d: a.model_dump() for d, a in sorted(assignments.items())},
                   created_at=datetime.now(UTC).isoformat())
        return UpdateManifest.model_validate(doc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait(1.0)
            if self._stop.is_set():
                return
            if not self._dirty.is_set():
                continue
            self._dirty.clear()
            try:
                self.publish(self.sign(self.manifest()))
                self.stats["published"] += 1
            except NotTargeted as exc:
                self.stats["deferred"] += 1
                log.info("re-cut manifest deferred: %s", exc)
                self._stop.wait(5.0)
                self._dirty.set()
            except Exception:  # a broker outage or a bug: the re-cut thread must not die of it
                self.stats["publish_failed"] += 1
                log.exception("publishing the re-cut manifest failed; retrying")
                self._stop.wait(2.0)
                self._dirty.set()


def replanners_for(network: Path, devices: list[str], model_id: str, *, margin: float,
                   sustain: int) -> dict[str, Replanner]:
    """One ``Replanner`` per device on ``network.toml`` (its nodes' ``bench`` records)."""
    from agent.infer.blockbench import BenchRecord
    from cloud_trainer.plan.network import load_network

    net = load_network(network)
    records = [BenchRecord.load(n.bench) for n in net.nodes if n.bench is not None]
    return {d: Replanner(net, records, model_id, margin=margin, sustain=sustain)
            for d in devices}


def for_service(svc: Any) -> CutAdapter:
    """The trainer daemon's adapter (``[adapt]``): the base is the model's current signed
    manifest (``current.json``), or before the first retraining the deployed version as
    exported for the model's profiles. A push waits while a retraining run holds the run
    lock, so a re-cut of the old version never replaces the new version's retained
    manifest."""
    from cloud_trainer.release.keys import sign_manifest
    from cloud_trainer.release.publisher import make_update

    cfg = svc.config
    a = cfg.adapt
    model_id = a.model or next(iter(cfg.models))
    files: dict[str, Path] = {}

    def base() -> UpdateManifest:
        path = svc.retrainer.current_manifest_path(model_id)
        if path.is_file():
            return SignedManifest.model_validate_json(path.read_bytes()).manifest
        rt = svc.models[model_id]
        v = svc.registry.deployed(model_id)
        if v is None:
            raise NotTargeted(f"{model_id} has no deployed version")
        variants = svc.retrainer._export_step(rt, rt.student(svc.registry, v), v.version)
        manifest, found = make_update(cfg.trainer.fleet, model_id, v.version, variants)
        files.update(found)
        return manifest

    def publish(signed: SignedManifest) -> None:
        if not svc._run_lock.acquire(blocking=False):
            raise NotTargeted("a retraining run is in progress")
        try:
            shas = {b.sha256 for v in signed.manifest.variants for b in v.partition.blocks}
            svc.publisher.publish_update(signed, files or None, held=sorted(shas))
        finally:
            svc._run_lock.release()

    return CutAdapter(base, replanners_for(a.network, a.devices, model_id, margin=a.margin,
                                           sustain=a.sustain),
                      sign=lambda m: sign_manifest(m, svc.key), publish=publish)
