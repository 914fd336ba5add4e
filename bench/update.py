"""`knet bench update`: a signed block update reaching a fleet of agents on loopback.

For N real ``agent.service.Agent`` objects (in this process, each with its own MQTT
connection, block cache and ``Updater``) against a private Mosquitto and the trainer's
``BlobPublisher``, two changes of the digits student are published:

* ``one-block``: only block 4 (the head) was retrained: devices fetch one block;
* ``full-model``: every block changed.

Measured: wall time from "manifest published" to "every device reported applied", the
bytes the trainer published (manifest + pushed chunks + re-requested chunks) and the block
bytes the devices stored. Then, separately, one agent inferring as fast as it can: the
longest gap between two consecutive inferences while the update is fetched, built,
self-tested and swapped in, beside the longest gap in an equally long window just before
(the same run, so the ratio is what the update costs).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.update.canary import CanaryRecorder

log = logging.getLogger(__name__)

FLEET = "bench"
CHANGES = {"one-block": (4,), "full-model": (1, 2, 3, 4)}


# -- versions of the digits student ----------------------------------------------------
def perturb(blocks: tuple[int, ...], scale: float = 0.05, seed: int = 1) -> Callable[[Any], None]:
    """Multiply the weights of ``blocks`` by ``1 + scale * noise``: a small retraining."""
    def apply(model: Any) -> None:
        import torch

        g = torch.Generator().manual_seed(seed)
        for i in blocks:
            for p in model.block(i).parameters():
                p.mul_(1 + scale * torch.randn(p.shape, generator=g))
    return apply


def export_version(out: Path, version: int, transform: Callable[[Any], None] | None = None,
                   *, verify: bool = True) -> Any:
    """The (untrained, deterministic) digits student, changed by ``transform``, exported for
    the x86-dev profile; returns its ``PartitionManifest``."""
    import torch

    from agent.infer.manifest import PartitionManifest
    from cloud_trainer.models.export import export_partition
    from cloud_trainer.models.zoo import get_pair

    if (out / "manifest.json").is_file():
        return PartitionManifest.load(out / "manifest.json")
    model = copy.deepcopy(get_pair("digits").student)
    if transform is not None:
        with torch.no_grad():
            transform(model)
    return export_partition(model, out, model_id="digits", model_version=version,
                            ort_version="1.16.3", verify=verify)


# -- agents ----------------------------------------------------------------------------
class TimedRecorder(CanaryRecorder):
    """The canary hook, plus the time of every inference (the hook runs once per input)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.times: deque[float] = deque(maxlen=500_000)

    def record(self, x: np.ndarray, runner: Any, confidence: float | None,
               output: np.ndarray | None = None) -> None:
        self.times.append(time.perf_counter())
        super().record(x, runner, confidence, output)


def _agent_config(root: Path, device: str, port: int, manifest: Path, key: Path,
                  inputs: Path, rate_hz: float) -> Any:
    from agent.config import AgentConfig

    return AgentConfig.model_validate({
        "device": {"id": device, "fleet": FLEET, "state_dir": root / device / "state",
                   "cache_dir": root / device / "cache"},
        "model": {"manifest": manifest, "profile": "x86-dev"},
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_delay": 0.1,
                 "reconnect_max_delay": 1.0},
        "source": {"kind": "npz", "path": inputs, "rate_hz": rate_hz, "loop": True},
        "uplink": {"enabled": False},
        "metrics": {"stats_interval_s": 5.0},
        "update": {"enabled": True, "public_keys": [key], "agreement_threshold": 0.0,
                   "health": {"watch_s": 0}},
    })


class _Running:
    def __init__(self, agents: list[Any]) -> None:
        self.agents = agents
        self.threads = [threading.Thread(target=a.run, daemon=True) for a in agents]

    def __enter__(self) -> _Running:
        for t in self.threads:
            t.start()
        for a in self.agents:
            if not a.link.wait_connected(20):
                raise RuntimeError(f"{a.device} did not connect")
        return self

    def __exit__(self, *_: object) -> None:
        for a in self.agents:
            a.request_stop()
        for t in self.threads:
            t.join(30)


def _make_agents(root: Path, n: int, port: int, manifest: Path, key: Path, inputs: Path,
                 rate_hz: float, prefix: str) -> list[Any]:
    from agent.service import Agent

    agents = []
    for i in range(n):
        agent = Agent(_agent_config(root, f"{prefix}-{i:03d}", port, manifest, key, inputs,
                                    rate_hz))
        timed = TimedRecorder(agent.config.update.canary_inputs)
        agent.canary = timed
        assert agent.updater is not None
        agent.updater.recorder = timed
        agents.append(agent)
    return agents


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _applied(agent: Any, version: int) -> float | None:
    for r in agent.updater.reports:
        if r.status == "applied" and r.version == version:
            return float(r.time)
        if r.terminal and r.version == version:
            raise RuntimeError(f"{agent.device}: {r.status} {r.reason} {r.detail}")
    return None


# -- one measurement --------------------------------------------------------------------
def _publish_running(pub: Any, base: Path, key: Any) -> None:
    """The manifest of what the devices run (as a trainer would have published it), so
    the publisher pushes only what changes after it; devices see it and ignore it."""
    from agent.infer.manifest import PartitionManifest
    from cloud_trainer.release.keys import sign_manifest
    from cloud_trainer.release.publisher import make_update

    part = PartitionManifest.load(base / "manifest.json")
    manifest, files = make_update(FLEET, "digits", 1, {"": (part, base)})
    pub.publish_update(sign_manifest(manifest, key), files, push_chunks=False)


def _fleet_run(work: Path, devices: int, change: str, base: Path, key_pem: Path,
               key: Any, inputs: Path, rate_hz: float, push_delay: float) -> dict[str, Any]:
    from agent.wire.topics import Topics
    from broker.launcher import Mosquitto
    from cloud_trainer.release.keys import sign_manifest
    from cloud_trainer.release.publisher import BlobPublisher, PublisherSettings, make_update

    part = export_version(work.parent / f"v2-{change}", 2, perturb(CHANGES[change]))
    manifest, files = make_update(FLEET, "digits", 2, {"": (part, work.parent /
                                                                f"v2-{change}")})
    signed = sign_manifest(manifest, key)
    with Mosquitto(work / "broker") as broker, BlobPublisher(
            PublisherSettings(host=broker.host, port=broker.port), Topics(FLEET),
            work / "trainer", push_delay=push_delay) as pub:
        _publish_running(pub, base, key)
        agents = _make_agents(work, devices, broker.port, base / "manifest.json", key_pem,
                              inputs, rate_hz, "dev")
        with _Running(agents):
            _wait(lambda: all(a.metrics.frames_total >= 20 and a.updater.idle()
                              for a in agents), 30)
            t0 = time.time()
            report = pub.publish_update(signed, files)
            if not _wait(lambda: all(_applied(a, 2) for a in agents), 120):
                raise RuntimeError("not every device applied the update within 120 s")
            done = max(_applied(a, 2) or 0.0 for a in agents)
            stored = sum(r.bytes for a in agents for r in a.updater.reports
                         if r.status == "applied")
            served = pub.stats["served_bytes"]
    changed = sum(b.size for b in part.blocks if b.index in CHANGES[change])
    return {"devices": devices, "change": change, "seconds": done - t0,
            "manifest_bytes": report.manifest_bytes, "pushed_bytes": report.pushed_bytes,
            "served_bytes": served,
            "trainer_bytes": report.manifest_bytes + report.pushed_bytes + served,
            "device_block_bytes": stored, "changed_block_bytes": changed,
            "push_delay_s": push_delay}


def _stall_run(work: Path, change: str, base: Path, key_pem: Path, key: Any, inputs: Path,
               push_delay: float, repeats: int) -> dict[str, Any]:
    """``repeats`` successive updates (v2, v3, ...) to one agent inferring at full speed;
    per update, the longest inference gap while it installs vs just before it."""
    from agent.wire.topics import Topics
    from broker.launcher import Mosquitto
    from cloud_trainer.release.keys import sign_manifest
    from cloud_trainer.release.publisher import BlobPublisher, PublisherSettings, make_update

    updates = []
    for version in range(2, repeats + 2):
        directory = work / f"v{version}"
        part = export_version(directory, version, perturb(CHANGES[change], seed=version))
        manifest, files = make_update(FLEET, "digits", version, {"": (part, directory)})
        updates.append((version, sign_manifest(manifest, key), files))
    during, before, spans, counts = [], [], [], []
    with Mosquitto(work / "broker") as broker, BlobPublisher(
            PublisherSettings(host=broker.host, port=broker.port), Topics(FLEET),
            work / "trainer", push_delay=push_delay) as pub:
        _publish_running(pub, base, key)
        (agent,) = _make_agents(work, 1, broker.port, base / "manifest.json", key_pem, inputs,
                                0.0, "probe")
        rec: TimedRecorder = agent.canary
        with _Running([agent]):
            _wait(lambda: agent.metrics.frames_total >= 2000 and agent.updater.idle(), 30)
            for version, signed, files in updates:
                time.sleep(1.0)
                t_pub = time.perf_counter()
                pub.publish_update(signed, files)
                if not _wait(lambda v=version: _applied(agent, v) is not None, 60):
                    raise RuntimeError(f"the probe did not apply v{version}")
                t_done = time.perf_counter() + 0.05  # the swap precedes the report
                time.sleep(0.2)  # the inferences right after the swap
                times = np.array(rec.times)
                span = t_done - t_pub
                gap, n = _max_gap(times, t_pub, t_done)
                during.append(gap)
                counts.append(n)
                before.append(_max_gap(times, t_pub - span, t_pub)[0])
                spans.append(span)
        gaps = np.diff(np.array(rec.times))
    return {"change": change, "repeats": repeats, "install_s_median": float(np.median(spans)),
            "max_gap_ms_during_median": float(np.median(during)) * 1e3,
            "max_gap_ms_during_max": float(np.max(during)) * 1e3,
            "max_gap_ms_before_median": float(np.median(before)) * 1e3,
            "max_gap_ms_before_max": float(np.max(before)) * 1e3,
            "median_gap_ms": float(np.median(gaps)) * 1e3,
            "inferences_during_median": float(np.median(counts))}


def _max_gap(times: np.ndarray, lo: float, hi: float) -> tuple[float, int]:
    """The longest time between consecutive inferences that fall in ``[lo, hi]``."""
    t = times[(times >= lo) & (times <= hi)]
    return (float(np.diff(t).max()) if len(t) > 1 else float("nan")), len(t)


def run_update_bench(devices: tuple[int, ...] = (1, 5, 10),
                     changes: tuple[str, ...] = ("one-block", "full-model"),
                     rate_hz: float = 20.0, push_delay: float = 0.3, repeats: int = 5,
                     json_path: Path | None = None) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from bench.report import command_line, print_table, write_json
    from cloud_trainer.models.data import digits_splits

    fleet_rows, stall_rows = [], []
    with tempfile.TemporaryDirectory(prefix="knet-bench-update-") as tmp:
        root = Path(tmp)
        key = Ed25519PrivateKey.generate()
        key_pem = root / "operator.pub"
        key_pem.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        base = root / "v1"
        export_version(base, 1)
        s = digits_splits()
        inputs = root / "inputs.npz"
        np.savez(inputs, x=s.x_test.reshape(-1, 1, 8, 8).astype(np.float32), y=s.y_test)
        for n in devices:
            for change in changes:
                work = root / f"fleet-{n}-{change}"
                work.mkdir()
                row = _fleet_run(work, n, change, base, key_pem, key, inputs, rate_hz,
                                 push_delay)
                log.info("fleet %s", row)
                fleet_rows.append(row)
        for change in changes:
            work = root / f"stall-{change}"
            work.mkdir()
            stall_rows.append(_stall_run(work, change, base, key_pem, key, inputs,
                                         push_delay, repeats))
    print_table(f"update: manifest published -> every device applied (digits, devices at "
                f"{rate_hz:g} Hz, push after {push_delay:g} s)",
                ["change", "devices", "seconds", "trainer bytes", "pushed", "re-served",
                 "device block bytes", "changed block bytes"],
                [(r["change"], r["devices"], r["seconds"], r["trainer_bytes"],
                  r["pushed_bytes"], r["served_bytes"], r["device_block_bytes"],
                  r["changed_block_bytes"]) for r in fleet_rows])
    print_table(f"update: longest gap between two inferences of one agent at full speed, "
                f"while an update installs vs the same span just before ({repeats} updates)",
                ["change", "install s", "during: median (ms)", "during: max (ms)",
                 "before: median (ms)", "before: max (ms)", "median gap (ms)"],
                [(r["change"], r["install_s_median"], r["max_gap_ms_during_median"],
                  r["max_gap_ms_during_max"], r["max_gap_ms_before_median"],
                  r["max_gap_ms_before_max"], r["median_gap_ms"]) for r in stall_rows])
    results = {"fleet": fleet_rows, "stall": stall_rows}
    write_json(json_path, "update", command_line(), results)
    return results
